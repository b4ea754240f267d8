"""Exact kNN graph of a level's super-nodes from a deeper exact graph of the level below.

A super-node's identity feature is its peak's (:func:`~agc_ray.core.hierarchy.aggregate`), so the nodes
of level L + 1 are a subset of those of level L, with the same vectors. An exact list of a node's
``depth`` best neighbours among all of level L, with the nodes that are not peaks removed, is the exact
list of its best neighbours among the peaks, as long as it keeps at least k of them. So where level L
was searched exactly with ``depth`` = :func:`exact_depth` neighbours, level L + 1 filters those lists
and searches again, exactly, only the rows left with fewer than k (:func:`rescan_rows`); their fresh
lists are ``depth`` deep again, so the levels above can do the same.

Measured on 1M make_faces rows, unsupervised (levels 1-5: 73K, 58K, 54K, 51K, 35K nodes): level 1 falls
back to exact search (IVF misses the target on super-nodes, whose neighbours are far), and the levels
above kept 4.7 %, 0 %, 0 % and 18 % of their rows short of k with lists 2k deep (82 %, 60 %, 58 %, 98 %
with k deep).

Every rescanned row is scored on one fixed grid over the list of rescanned rows (blocks of
:data:`RESCAN_BLOCK` rows against blocks of as many columns), and the best are taken in
the self-join's total order (similarity descending, then id ascending): any split of the rescanned rows
into whole blocks gives the same graph, so the Ray job rescans in tasks.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from agc_ray.core.selfjoin import BLOCK, _block_top, _merge

#: Depth of the exact lists kept for the level above, in units of k. Measured (see the module
#: docstring): 2k left 0-18 % of a level's rows to rescan, 1.5k up to 51 %; a self-join 2k deep costs
#: 1.2-1.3x one k deep (60K x 256 rows: 12.6-13.0 s against 9.9-11.1 s), what a derived level saves
#: several times over.
DEPTH_FACTOR = 2
#: Most rows a derived level rescans, as a share of its nodes: a rescanned row costs its product with
#: every node, a row of a self-join 2k deep about 0.6 of that (half the products, more selection), so
#: above it the level is searched afresh.
MAX_RESCAN_SHARE = 0.5
#: Levels with more nodes than this are searched exactly ``depth`` deep (where their exact search is
#: not cheap: below it the self-join takes about a second), so that the level above can derive its graph.
DEEP_MIN_ROWS = 20_000

#: Rows of a block of the rescan grid (and columns of the blocks they are scored against).
RESCAN_BLOCK = BLOCK

#: ``rows_of(ids) -> (len(ids), D)`` unit float32 features of the given nodes (a table, or its shards).
RowsOf = Callable[[np.ndarray], np.ndarray]


def exact_depth(k: int, n: int, above_level_0: bool) -> int:
    """Neighbours a row of an exact search at a level of n nodes: :data:`DEPTH_FACTOR` k above level 0
    with over :data:`DEEP_MIN_ROWS` nodes (the level above derives its graph from them), else k."""
    return DEPTH_FACTOR * k if above_level_0 and n > DEEP_MIN_ROWS else k


def too_many_rescans(rows: int, n: int) -> bool:
    """Whether a level of n nodes with ``rows`` rows left short is searched afresh (:data:`MAX_RESCAN_SHARE`)."""
    return rows > MAX_RESCAN_SHARE * n


def searched_afresh(n: int) -> str:
    """What the log says of a level of n nodes whose graph is not derived (:func:`too_many_rescans`)."""
    return (f"over {100 * MAX_RESCAN_SHARE:.0f} % of {n} rows short of k neighbours among the level below's lists: "
            "searched afresh")


def split_deep(nbr: np.ndarray, sim: np.ndarray, k: int):
    """``(nbr, sim, deep)``: a level's (n, k) graph and, where the search returned exact lists deeper than
    k (this module), those lists ``(nbr, sim)`` for the level above, else None."""
    if nbr.shape[1] <= k:
        return nbr, sim, None
    return np.ascontiguousarray(nbr[:, :k]), np.ascontiguousarray(sim[:, :k]), (nbr, sim)


def subset_lists(nbr: np.ndarray, sim: np.ndarray, peaks: np.ndarray, depth: int):
    """The lists of the nodes ``peaks`` restricted to neighbours in ``peaks``, renumbered (a node's new id
    is its position in ``peaks``), left-aligned.

    Shapes:
        nbr, sim: (n, K) the level's lists, best first (-1 / 0 padded); peaks: (C,) distinct nodes.

    Returns:
        ``(nbr, sim, kept)``: (C, depth) int64 / float32 (-1 / 0 past a row's kept entries) and (C,) the
        number of entries each row kept.
    """
    new_id = np.full(nbr.shape[0], -1, dtype=np.int64)
    new_id[peaks] = np.arange(peaks.size, dtype=np.int64)
    old = nbr[peaks]
    mapped = np.where(old >= 0, new_id[np.maximum(old, 0)], -1)
    keep = mapped >= 0
    order = np.argsort(~keep, axis=1, kind="stable")[:, :depth]  # kept entries first, in their order
    out_nbr = np.full((peaks.size, depth), -1, dtype=np.int64)
    out_sim = np.zeros((peaks.size, depth), dtype=np.float32)
    width = order.shape[1]
    out_nbr[:, :width] = np.take_along_axis(mapped, order, axis=1)
    out_sim[:, :width] = np.where(out_nbr[:, :width] >= 0, np.take_along_axis(sim[peaks], order, axis=1), 0)
    return out_nbr, out_sim, keep.sum(axis=1)


def short_rows(kept: np.ndarray, k: int, n: int) -> np.ndarray:
    """Rows of :func:`subset_lists` left with fewer than k entries (of a level of n nodes, n - 1 at most
    real neighbours): the rows to rescan."""
    return np.flatnonzero(kept < min(k, n - 1))


def rescan_blocks(rows: int, block: int | None = None) -> int:
    """Blocks of the fixed grid (``block`` rows, default :data:`RESCAN_BLOCK`) over ``rows`` rescanned rows."""
    block = block or RESCAN_BLOCK
    return -(-rows // block)


def rescan_rows(rows_of: RowsOf, n: int, rows: np.ndarray, depth: int, b0: int, b1: int, block: int | None = None):
    """Exact ``depth`` best neighbours (self excluded) of the rescanned rows in blocks ``b0:b1`` of the
    grid over ``rows`` (sorted node ids of a level of n nodes), blocks of ``block`` rows (default
    :data:`RESCAN_BLOCK`).

    Returns:
        ``(nbr, sim)`` of ``rows[b0 * block : b1 * block]``, (R, depth) int64 / float32, best first
        (similarity descending, then id ascending), -1 / 0 padded.
    """
    block = block or RESCAN_BLOCK
    lo, hi = b0 * block, min(b1 * block, rows.size)
    nbr = np.full((hi - lo, depth), -1, dtype=np.int64)
    sim = np.zeros((hi - lo, depth), dtype=np.float32)
    for r0 in range(lo, hi, block):
        ids = rows[r0:r0 + block]
        xr = torch.from_numpy(np.ascontiguousarray(rows_of(ids), dtype=np.float32))
        best_s = torch.full((ids.size, depth), -torch.inf)
        best_i = torch.full((ids.size, depth), -1, dtype=torch.int64)
        for c0 in range(0, n, block):
            c1 = min(c0 + block, n)
            scores = xr @ torch.from_numpy(np.ascontiguousarray(rows_of(np.arange(c0, c1)), dtype=np.float32)).T
            own = np.flatnonzero((ids >= c0) & (ids < c1))
            scores[own, ids[own] - c0] = -torch.inf
            s, i = _block_top(scores, c0, depth)
            best_s, best_i = _merge(best_s, best_i, s, i, depth)
        pad = torch.isinf(best_s)
        nbr[r0 - lo:r0 - lo + ids.size] = torch.where(pad, -1, best_i).numpy()
        sim[r0 - lo:r0 - lo + ids.size] = torch.where(pad, 0.0, best_s).numpy()
    return nbr, sim


def subset_graph(x: np.ndarray, nbr: np.ndarray, sim: np.ndarray, peaks: np.ndarray, k: int,
                 info: dict | None = None):
    """The exact graph of the nodes ``peaks`` of a level, ``depth`` deep, from that level's exact lists
    (see the module docstring), or None when more than :data:`MAX_RESCAN_SHARE` of its rows would be
    rescanned (a fresh search costs less).

    Args:
        x: (C, D) unit float32 features of the new level's nodes (``peaks``' rows of the level below).
        nbr, sim: (n, depth) the level below's exact lists; peaks: (C,) its nodes that are the new nodes.
        k: neighbours the new level needs a row.
        info: filled with ``knn_method`` ('derived'), ``knn_recall`` (1.0) and ``knn_rescanned`` rows.

    Returns:
        ``(nbr, sim)`` (C, depth), best first, -1 / 0 padded; the first k columns are the level's graph.
    """
    depth = nbr.shape[1]
    c = peaks.size
    out_nbr, out_sim, kept = subset_lists(nbr, sim, peaks, depth)
    rows = short_rows(kept, k, c)
    if too_many_rescans(rows.size, c):
        return None
    x = np.ascontiguousarray(x, dtype=np.float32)
    out_nbr[rows], out_sim[rows] = rescan_rows(x.__getitem__, c, rows, depth, 0, rescan_blocks(rows.size))
    if info is not None:
        info.update(knn_method="derived", knn_recall=1.0, knn_rescanned=int(rows.size))
    return out_nbr, out_sim
