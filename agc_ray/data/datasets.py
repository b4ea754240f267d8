"""``get_dataset(name)`` -> ``(x, edge_index, y)`` (PyAGC's ``pyagc.data.get_dataset``).

- ``'Cora'``, ``'CiteSeer'``, ``'PubMed'``: PyG's Planetoid, cached under ``$AGC_RAY_CACHE/planetoid``
  (default ``$XDG_CACHE_HOME/agc_ray`` or ``~/.cache/agc_ray``) or ``root``. When the files are not
  cached and the download host cannot be reached within a few seconds (or ``AGC_RAY_OFFLINE=1``),
  :class:`DatasetUnavailableError` says so at once instead of hanging.
- ``'csbm'``: a contextual stochastic block model (:func:`agc_ray.data.csbm.make_csbm`).
- ``'synthetic-faces'``: Hi-LANDER's synthetic face embeddings
  (:func:`agc_ray.core.synthetic.make_faces`) with their symmetrised kNN graph.

Both built-ins are generated offline and deterministically (keyword arguments reach the generator).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

PLANETOID = ("Cora", "CiteSeer", "PubMed")
BUILTIN = ("csbm", "synthetic-faces")
PLANETOID_HOST = ("github.com", 443)  # PyG downloads Planetoid from github.com/kimiyoung/planetoid


class DatasetUnavailableError(ConnectionError):
    """A dataset is neither cached nor downloadable (offline)."""


def cache_dir() -> Path:
    """The root of agc_ray's dataset cache: ``$AGC_RAY_CACHE``, else ``$XDG_CACHE_HOME/agc_ray``,
    else ``~/.cache/agc_ray``."""
    if os.environ.get("AGC_RAY_CACHE"):
        return Path(os.environ["AGC_RAY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "agc_ray"


def can_reach(host: str, port: int, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds in all (name
    resolution included, which the socket timeout alone does not bound)."""
    result: list[bool] = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _planetoid_cached(folder: Path, name: str) -> bool:
    raw = folder / name / "raw"
    files = [f"ind.{name.lower()}.{s}" for s in ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")]
    return all((raw / f).is_file() for f in files) or (folder / name / "processed" / "data.pt").is_file()


def _load_planetoid(
    name: str, root: str | os.PathLike | None, timeout: float
) -> tuple[Tensor, Tensor, Tensor]:
    folder = Path(root).expanduser() if root is not None else cache_dir() / "planetoid"
    if not _planetoid_cached(folder, name):
        where = f"{PLANETOID_HOST[0]}:{PLANETOID_HOST[1]}"
        hint = (
            f"download it on a machine with internet access (get_dataset({name!r}) there) and copy "
            f"{folder / name} to this machine, or point AGC_RAY_CACHE (or root=) to a directory that "
            "holds it; the built-in offline datasets are 'csbm' and 'synthetic-faces'"
        )
        if os.environ.get("AGC_RAY_OFFLINE", "") not in ("", "0"):
            raise DatasetUnavailableError(
                f"get_dataset({name!r}): not cached under {folder} and AGC_RAY_OFFLINE is set; {hint}"
            )
        if not can_reach(*PLANETOID_HOST, timeout=timeout):
            raise DatasetUnavailableError(
                f"get_dataset({name!r}): not cached under {folder} and {where} cannot be reached "
                f"within {timeout:g} s (offline?); {hint}"
            )
    from torch_geometric.datasets import Planetoid

    existed = (folder / name).exists()
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60.0)  # a stalled download fails instead of hanging
    try:
        dataset = Planetoid(str(folder), name)
    except Exception as exc:
        if not existed:  # no half-downloaded files that would later look cached
            shutil.rmtree(folder / name, ignore_errors=True)
        raise DatasetUnavailableError(
            f"get_dataset({name!r}): downloading to {folder} failed: {exc}"
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)
    data = dataset[0]
    return data.x.float().contiguous(), data.edge_index.long().contiguous(), data.y.long().contiguous()


def faces_graph(
    n_samples: int = 5000, k: int = 10, dim: int = 256, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Hi-LANDER's synthetic face embeddings with their kNN graph, undirected.

    Edges point from ``nbr[i, j]`` to ``i`` (padding dropped); both directions are kept so the
    graph is symmetric, duplicates removed.

    Returns:
        ``(x, edge_index, y)``: (N, dim) float32 unit rows, (2, E) int64, (N,) int64 identities.
    """
    from agc_ray.core.knn import knn_graph
    from agc_ray.core.synthetic import make_faces

    if k < 1:
        raise ValueError(f"get_dataset('synthetic-faces'): k must be >= 1, got {k}")
    x, y = make_faces(n_samples, dim=dim, seed=seed)
    nbr, _ = knn_graph(x, k, seed=seed, normalize=False)
    n = x.shape[0]
    centre = np.repeat(np.arange(n, dtype=np.int64), nbr.shape[1])
    source = nbr.reshape(-1)
    keep = source >= 0
    src, dst = source[keep], centre[keep]
    codes = np.unique(np.concatenate([src * n + dst, dst * n + src]))
    edge_index = np.stack([codes // n, codes % n])
    return torch.from_numpy(x), torch.from_numpy(edge_index), torch.from_numpy(y.astype(np.int64))


def get_dataset(
    name: str, root: str | os.PathLike | None = None, *, timeout: float = 3.0, **kwargs: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """Load a node clustering dataset as ``(x, edge_index, y)`` tensors.

    Args:
        name: ``'Cora'``, ``'CiteSeer'``, ``'PubMed'`` (case-insensitive), ``'csbm'`` or
            ``'synthetic-faces'``.
        root: Planetoid directory (default: ``cache_dir() / 'planetoid'``).
        timeout: seconds to wait for the download host before giving up (Planetoid only).
        **kwargs: arguments of the built-in generators (:func:`agc_ray.data.csbm.make_csbm`,
            :func:`faces_graph`).

    Returns:
        x (N, F) float32, edge_index (2, E) int64 (undirected: both directions), y (N,) int64.

    Raises:
        ValueError: unknown name or bad generator arguments.
        DatasetUnavailableError: a Planetoid dataset that is not cached and cannot be downloaded.
    """
    if not isinstance(name, str):
        raise ValueError(f"get_dataset: name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    planetoid = {p.lower(): p for p in PLANETOID}
    if key in planetoid:
        if kwargs:
            raise ValueError(f"get_dataset({name!r}) takes no generator arguments, got {sorted(kwargs)}")
        return _load_planetoid(planetoid[key], root, timeout)
    if key == "csbm":
        from agc_ray.data.csbm import make_csbm

        return make_csbm(**kwargs)
    if key in ("synthetic-faces", "faces"):
        return faces_graph(**kwargs)
    raise ValueError(f"get_dataset: unknown dataset {name!r}; expected one of {list(PLANETOID + BUILTIN)}")
