"""Input checks shared by heads, models and datasets: one ValueError a problem, naming it precisely."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor


class Graph(NamedTuple):
    """The tensors a model reads from its input graph."""

    x: Tensor  # (N, F) floating
    edge_index: Tensor  # (2, E) int64
    edge_weight: Tensor | None  # (E,) or None


def check_features(x: Any, name: str = "x") -> Tensor:
    """Check a node feature matrix: a 2-D floating tensor with finite entries.

    Returns the tensor (a numpy array is converted without copying).
    """
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as exc:  # noqa: BLE001 - re-raised with the argument's name
            raise ValueError(f"{name} must be a tensor or array, got {type(x).__name__}") from exc
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (N, F), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has no rows (N = 0)")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int((~finite).sum()) - n_nan
        row = int((~finite).any(dim=1).nonzero()[0, 0])
        raise ValueError(
            f"{name} has {n_nan} NaN and {n_inf} infinite entries (first in row {row}); "
            "features must be finite"
        )
    return x


def check_edge_index(edge_index: Any, num_nodes: int, name: str = "edge_index") -> Tensor:
    """Check edge indices: an integer tensor of shape (2, E) with every entry in [0, num_nodes).

    Returns the tensor as int64.
    """
    if not isinstance(edge_index, Tensor):
        try:
            edge_index = torch.as_tensor(edge_index)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{name} must be a tensor or array, got {type(edge_index).__name__}") from exc
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"{name} must have shape (2, E), got shape {tuple(edge_index.shape)}")
    if edge_index.is_floating_point() or edge_index.is_complex() or edge_index.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer node indices, got dtype {edge_index.dtype}")
    if edge_index.numel():
        lo, hi = int(edge_index.min()), int(edge_index.max())
        if lo < 0 or hi >= num_nodes:
            bad = ((edge_index < 0) | (edge_index >= num_nodes)).any(dim=0).nonzero()[:, 0]
            col = int(bad[0])
            raise ValueError(
                f"{name} has {bad.numel()} edges with node indices out of range [0, {num_nodes}) "
                f"(min {lo}, max {hi}; first bad edge at column {col}: {edge_index[:, col].tolist()})"
            )
    return edge_index.long()


def check_edge_weight(edge_weight: Any, num_edges: int, name: str = "edge_weight") -> Tensor | None:
    """Check optional edge weights: None, or a finite non-negative (E,) floating tensor."""
    if edge_weight is None:
        return None
    edge_weight = torch.as_tensor(edge_weight)
    if edge_weight.dim() != 1 or edge_weight.shape[0] != num_edges:
        raise ValueError(f"{name} must have shape ({num_edges},), got shape {tuple(edge_weight.shape)}")
    if not edge_weight.is_floating_point():
        edge_weight = edge_weight.float()
    if not bool(torch.isfinite(edge_weight).all()) or bool((edge_weight < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative")
    return edge_weight


def check_n_clusters(n_clusters: Any, n_nodes: int | None = None, owner: str = "n_clusters") -> int:
    """Check a cluster count: an int >= 1, and at most the number of nodes when that is known."""
    if isinstance(n_clusters, np.integer):
        n_clusters = int(n_clusters)
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int):
        raise ValueError(f"{owner}: n_clusters must be an int, got {n_clusters!r}")
    if n_clusters < 1:
        raise ValueError(f"{owner}: n_clusters must be >= 1, got {n_clusters}")
    if n_nodes is not None and n_clusters > n_nodes:
        raise ValueError(f"{owner}: n_clusters={n_clusters} is larger than the number of nodes N={n_nodes}")
    return n_clusters


def unpack_graph(data: Any) -> Graph:
    """Read ``(x, edge_index, edge_weight)`` from a PyG ``Data`` (or any object with ``x`` and
    ``edge_index`` attributes) or from a tuple ``(x, edge_index[, y])`` as :func:`get_dataset` returns.
    No checks; see :func:`check_graph`."""
    if isinstance(data, (tuple, list)):
        if len(data) < 2:
            raise ValueError(f"a graph tuple must be (x, edge_index[, y]), got {len(data)} items")
        return Graph(data[0], data[1], None)
    x = getattr(data, "x", None)
    edge_index = getattr(data, "edge_index", None)
    if x is None or edge_index is None:
        raise ValueError(
            f"data must be a torch_geometric Data (or a tuple) with x and edge_index, got "
            f"{type(data).__name__} with x={'missing' if x is None else 'set'}, "
            f"edge_index={'missing' if edge_index is None else 'set'}"
        )
    return Graph(x, edge_index, getattr(data, "edge_weight", None))


def check_graph(data: Any) -> Graph:
    """Unpack and check a graph: finite floating x (N, F), edge_index (2, E) in range, weights."""
    x, edge_index, edge_weight = unpack_graph(data)
    x = check_features(x)
    edge_index = check_edge_index(edge_index, x.shape[0])
    edge_weight = check_edge_weight(edge_weight, edge_index.shape[1])
    return Graph(x, edge_index, edge_weight)
