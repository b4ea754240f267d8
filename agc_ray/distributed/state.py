"""The assignment state of an output: what ``jobs/assign.py`` needs to place new rows in its hierarchy.

Written by the clustering job beside its Parquet results (``OUTPUT/state/``, committed with them) and
extended by every assignment run, so that an incremental output is itself a base::

    state/state.json                      format, levels, k, dimension, kNN method, nprobe, probe margin, shard offsets,
                                          per level the linkage threshold (label-free linkage level) or null
    state/level=L/shard=S/x_id.npy        (n_s, D) float32 unit identity features (the input rows at level 0)
    state/level=L/shard=S/x_sum.npy       (n_s, D) float32 member sums, size.npy (n_s,) int64  (L > 0)
    state/level=L/shard=S/nbr.npy         (n_s, k) int64 and sim.npy (n_s, k) float32: the level's kNN graph
    state/level=L/shard=S/density.npy     (n_s,) float32 the densities the level was decoded with
    state/level=L/shard=S/p.npy           (n_s, k) float32 the edge probabilities (runs with a model)
    state/level=L/shard=S/comp.npy        (n_s,) int64 each node's cluster (the next level's node)
    state/level=0/shard=S/lists.npy       (n_s,) int32 IVF cell of each row (IVF runs)
    state/level=0/centroids.npy           (nlist, D) float32 IVF coarse centroids (IVF runs)
    state/level=0/shard=S/ids.parquet     the rows' ids (column ``id``), in node order
    state/level=0/excluded.npy            node ids replaced by a later assignment (never linked to)
    state/level=L/cluster_ids.npy         (C_L,) int64 published cluster id of each cluster

Size per million 256-d rows: 1.5 GB measured (level 0 1.2 GB, the features being 1 GB; each level
above holds two feature rows per cluster: 0.15 GB at 70K clusters). The files are plain ``.npy``: numpy reads them, memory-mapped when local.
"""

from __future__ import annotations

import io as _bytes_io
import json
import posixpath

import numpy as np
import pyarrow.fs as pafs

STATE_DIR = "state"
#: Format written. 2: a label-free level decoded by average linkage records its threshold (``linkage``),
#: which an assignment reading format 1 would ignore (it decodes every level by peaks).
STATE_FORMAT = 2
#: Formats read: a format-1 state's linkage thresholds are read where it has them (written by the
#: versions between the linkage level and format 2), else its levels are decoded by peaks as written.
READABLE_STATE_FORMATS = (1, 2)
ARRAYS = ("x_id", "x_sum", "size", "nbr", "sim", "density", "p", "comp", "lists")


def shard_dir(root: str, level: int, shard: int) -> str:
    return posixpath.join(root, STATE_DIR, f"level={level}", f"shard={shard:05d}")


def _parent(fs, path: str) -> None:
    """Ready ``path`` for writing: its directory made (local; object stores have none), and a file
    already there removed first: an assignment's staging hard-links the base's files, and writing
    through a link would change the base."""
    if fs.type_name == "local":
        fs.create_dir(posixpath.dirname(path), recursive=True)
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)


def save_array(fs, path: str, array: np.ndarray) -> None:
    """One ``.npy`` file, streamed (numpy writes large arrays in chunks)."""
    _parent(fs, path)
    with fs.open_output_stream(path) as f:
        np.save(f, np.ascontiguousarray(array))


def load_array(fs, path: str, mmap: bool = True) -> np.ndarray:
    """A ``.npy`` file; memory-mapped read-only when local."""
    if mmap and isinstance(fs, pafs.LocalFileSystem):
        return np.load(path, mmap_mode="r")
    with fs.open_input_file(path) as f:
        return np.load(_bytes_io.BytesIO(f.readall()))


def write_shard(fs, directory: str, ids=None, **arrays) -> str:
    """Write the given arrays of one level shard (None values skipped) and, at level 0, the rows' ids
    (a pyarrow array); returns the directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, value in arrays.items():
        if value is not None:
            save_array(fs, posixpath.join(directory, f"{name}.npy"), np.asarray(value))
    if ids is not None:
        _parent(fs, posixpath.join(directory, "ids.parquet"))
        pq.write_table(pa.table({"id": ids}), posixpath.join(directory, "ids.parquet"), filesystem=fs)
    return directory


def read_ids(fs, root: str, meta: dict):
    """The level-0 node ids of the state, in node order (one pyarrow array)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = len(meta["offsets"][0]) - 1
    parts = [pq.read_table(posixpath.join(shard_dir(root, 0, s), "ids.parquet"), filesystem=fs).column("id")
             for s in range(shards)]
    return pa.chunked_array([c for p in parts for c in p.chunks], type=parts[0].type).combine_chunks()


def write_meta(fs, root: str, meta: dict) -> None:
    path = posixpath.join(root, STATE_DIR, "state.json")
    _parent(fs, path)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(meta | {"format": STATE_FORMAT}, indent=1).encode())


def read_meta(fs, root: str) -> dict | None:
    """state.json of an output, or None when the output has no state."""
    path = posixpath.join(root, STATE_DIR, "state.json")
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_file(path) as f:
        return json.loads(f.readall())


def read_level(fs, root: str, meta: dict, level: int) -> dict:
    """All shards of one level, concatenated: ``{name: array}`` (missing arrays absent)."""
    shards = len(meta["offsets"][level]) - 1
    required = ("x_id", "nbr", "sim", "density", "comp") + (("x_sum", "size") if level else ())
    out: dict[str, list] = {}
    for s in range(shards):
        d = shard_dir(root, level, s)
        for name in ARRAYS:
            path = posixpath.join(d, f"{name}.npy")
            if fs.get_file_info(path).type == pafs.FileType.File:
                out.setdefault(name, []).append(load_array(fs, path))
            elif name in required:
                raise FileNotFoundError(f"{path} is missing")
    # optional arrays (probabilities, IVF cells) count only when every shard has them
    out = {name: parts for name, parts in out.items() if len(parts) == shards}
    arrays = {name: np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0]) for name, parts in out.items()}
    for name in ("cluster_ids", "centroids", "excluded"):
        value = read_level_array(fs, root, level, name)
        if value is not None:
            arrays[name] = value
    return arrays


def read_level_array(fs, root: str, level: int, name: str) -> np.ndarray | None:
    """One level-wide array (cluster_ids, centroids, excluded), or None when absent."""
    path = posixpath.join(root, STATE_DIR, f"level={level}", f"{name}.npy")
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    return load_array(fs, path, mmap=False)


def ivf_from_lists(x: np.ndarray, centroids: np.ndarray, lists: np.ndarray, nprobe: int):
    """The IVF index of the run, rebuilt without re-assigning rows: each row goes to its recorded cell.

    Rows are added to their lists in row order, as ``index.add`` did: the searches are the run's.
    """
    import faiss

    from agc_ray.core.knn import ivf_index

    index = ivf_index(np.asarray(centroids, dtype=np.float32), nprobe)
    order = np.argsort(lists, kind="stable").astype(np.int64)
    bounds = np.searchsorted(np.asarray(lists)[order], np.arange(index.nlist + 1))
    for cell in range(index.nlist):
        lo, hi = int(bounds[cell]), int(bounds[cell + 1])
        if hi > lo:
            ids = np.ascontiguousarray(order[lo:hi])
            codes = np.ascontiguousarray(x[ids], dtype=np.float32).view(np.uint8)
            index.invlists.add_entries(cell, hi - lo, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    index.ntotal = int(x.shape[0])
    return index


def ivf_state(index) -> tuple[np.ndarray, np.ndarray] | None:
    """``(centroids, cell of each row)`` of a (CPU or GPU) IVF index over rows 0 .. n - 1; None otherwise."""
    import faiss

    if hasattr(faiss, "index_gpu_to_cpu") and not isinstance(index, faiss.IndexIVF) and "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)
    if not isinstance(index, faiss.IndexIVF):
        return None
    invlists = index.invlists
    lists = np.empty(index.ntotal, dtype=np.int32)
    for cell in range(index.nlist):
        size = invlists.list_size(cell)
        if size:
            lists[faiss.rev_swig_ptr(invlists.get_ids(cell), size).copy()] = cell
    centroids = index.quantizer.reconstruct_n(0, index.nlist)
    return centroids, lists
