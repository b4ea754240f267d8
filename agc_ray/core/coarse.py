"""kNN graph of a level's super-nodes from the graph of the level below (no index to build).

The nodes of level L + 1 are the clusters of level L, and a cluster's nearest clusters are, with few
exceptions, the clusters that its members' level-L neighbours belong to. So the next graph starts from
those candidates (both directions of every level-L edge between two clusters), scored exactly, and is
refined by rounds of neighbour-of-neighbour search (NN-descent's local join, Dong et al., WWW 2011):
each node's candidates become its neighbours and their neighbours, scored exactly, best k kept.

Every step is a function of one node's rows of the inputs, so any split of the nodes into ranges
(:func:`coarse_rows`, :func:`refine_rows`) gives the same graph as the whole: the Ray job computes it
shard by shard. Recall is measured on a seeded sample against exact search after each round (the
caller's recall target decides when to stop; out of reach, the caller searches another way).

Similarities are those of the unit rows of ``x`` (inner products); equal similarities are ordered by
node id, so the graph does not depend on the order of the candidates.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from agc_ray.core.cells import as_tensor, scratch_rows
from agc_ray.core.graph import best_per_row

#: ``rows_of(ids) -> (len(ids), D)`` unit float32 features of the given nodes (a table, or its shards).
RowsOf = Callable[[np.ndarray], np.ndarray]

#: Level-L nodes whose edges are turned into candidate pairs at once (the whole graph's edges at once
#: were ~10 arrays of N k entries: 0.5 GB a task at 10^6 nodes, the job's peak once the scoring's was cut).
EDGE_BLOCK = 1 << 16

#: Neighbour-of-neighbour rounds at most. Measured on the levels of a 1M-row hierarchy (recall after
#: rounds 0, 1, 2): 0.988 / 0.992 / 0.992 where few nodes merged, 0.848 / 0.895 / 0.896 and 0.243 /
#: 0.494 / 0.611 where many did: a round adds little once the first candidates missed, and costs twice
#: their scoring.
MAX_ROUNDS = 2
#: A round is tried only while the recall is within this of the target (it gained 0.05 from 0.85 above).
REFINE_REACH = 0.05


def _dot(xa: np.ndarray, xb: np.ndarray) -> torch.Tensor:
    """Inner products over the last axis, as one elementwise product and sum: the same floating-point
    result for a pair whatever else is in the block (a matrix product's blocking may differ)."""
    return (as_tensor(xa) * as_tensor(xb)).sum(dim=-1)


def _pair_similarity(rows_of: RowsOf, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(P,) inner products of the rows ``a[i]`` and ``b[i]``, in blocks of
    :data:`~agc_ray.core.cells.SCRATCH_BYTES` of gathered rows (1M rows' edges: 5.0 s in blocks of 64 MB,
    4.1 s in 16 MB)."""
    out = np.empty(a.size, dtype=np.float32)
    step = scratch_rows(rows_of(a[:1]).shape[1]) if a.size else 1
    for lo in range(0, a.size, step):
        out[lo:lo + step] = _dot(rows_of(a[lo:lo + step]), rows_of(b[lo:lo + step])).numpy()
    return out


def _top_k_pairs(a: np.ndarray, b: np.ndarray, s: np.ndarray, lo: int, hi: int, k: int):
    """Each node ``a`` in ``[lo, hi)``'s k best partners ``b`` (distinct pairs) by similarity ``s``, ties:
    smaller id first; (hi - lo, k) int64 / float32, padded with -1 / 0."""
    a, rank, b, s = best_per_row(a, b, s, k)
    nbr = np.full((hi - lo, k), -1, dtype=np.int64)
    sim = np.zeros((hi - lo, k), dtype=np.float32)
    nbr[a - lo, rank] = b
    sim[a - lo, rank] = s
    return nbr, sim


def _cross_pairs(n_clusters: int, nbr: np.ndarray, comp: np.ndarray, chosen: Callable[[np.ndarray], np.ndarray]):
    """The distinct cluster pairs ``(a, b)`` joined by a level-L edge either way with ``chosen(a)`` true
    (a boolean mask of cluster ids), sorted by ``a * C + b``."""
    comp = np.asarray(comp, dtype=np.int64)
    c = np.int64(n_clusters)
    codes = [np.zeros(0, dtype=np.int64)]
    for r0 in range(0, nbr.shape[0], EDGE_BLOCK):  # the level-L edges in blocks of nodes, pairs coded a * C + b
        nb = nbr[r0:r0 + EDGE_BLOCK]
        valid = nb >= 0
        src = np.broadcast_to(comp[r0:r0 + EDGE_BLOCK, None], nb.shape)[valid]
        dst = comp[nb[valid]]
        cross = src != dst
        src, dst = src[cross], dst[cross]
        out, back = chosen(src), chosen(dst)  # edges leaving a chosen cluster, and those entering one
        codes.append(np.unique(np.concatenate([src[out] * c + dst[out], dst[back] * c + src[back]])))
    pair = np.unique(np.concatenate(codes))
    return pair // c, pair % c


def coarse_rows(rows_of: RowsOf, n_clusters: int, nbr: np.ndarray, comp: np.ndarray, k: int, lo: int, hi: int):
    """Rows ``lo:hi`` of the first coarse graph: each cluster's k best clusters among those joined to
    it by a level-L edge (either direction).

    Args:
        rows_of: features of the clusters (the next level's nodes) by id.
        n_clusters: C, the number of clusters.
        nbr: (n, k_L) the level-L graph (-1: padding).
        comp: (n,) the cluster of each level-L node.
        k: neighbours per cluster.

    Returns:
        ``(nbr, sim)`` of clusters lo:hi, (hi - lo, k) int64 / float32, best first, -1 / 0 padded.
    """
    a, b = _cross_pairs(n_clusters, nbr, comp, lambda ids: (ids >= lo) & (ids < hi))
    return _top_k_pairs(a, b, _pair_similarity(rows_of, a, b), lo, hi, k)


def first_round_recall(rows_of: RowsOf, n_clusters: int, nbr: np.ndarray, comp: np.ndarray, k: int,
                       rows: np.ndarray, kth: np.ndarray) -> float:
    """The recall of the first coarse graph (:func:`coarse_rows`) on the sampled clusters ``rows``
    (``kth``: their exact k-th similarities), from their rows alone: the same rows as the whole
    graph's (each pair's similarity does not depend on the other pairs). Where it misses the target
    out of a round's reach the whole graph need not be built (1M rows' level 1: recall 0.23)."""
    from agc_ray.core.recall import recall_at

    order = np.argsort(rows)
    chosen = np.zeros(n_clusters, dtype=bool)
    chosen[rows] = True
    a, b = _cross_pairs(n_clusters, nbr, comp, chosen.__getitem__)
    nbr_s, sim_s = _top_k_pairs(np.searchsorted(rows[order], a), b, _pair_similarity(rows_of, a, b), 0,
                                rows.size, k)
    return recall_at(sim_s, nbr_s >= 0, np.asarray(kth)[order])


def out_of_reach(recall: float | None, first: float) -> bool:
    """Whether a first coarse graph of recall ``first`` misses the target with no round to try
    (:func:`refine_more`): the caller searches another way without building it."""
    return recall is not None and first < recall and not refine_more(recall, first, 0)


def refine_rows(rows_of: RowsOf, graph: np.ndarray, lo: int, hi: int):
    """Rows ``lo:hi`` after one round of neighbour-of-neighbour search over ``graph`` (C, k): each
    node's best k among its neighbours and their neighbours, scored exactly.

    Returns:
        ``(nbr, sim)`` (hi - lo, k), best first (ties: smaller id), -1 / 0 padded.
    """
    k = graph.shape[1]
    gt = as_tensor(graph)  # the job's graph is a read-only object-store array, only read here
    nbr = np.empty((hi - lo, k), dtype=np.int64)
    sim = np.empty((hi - lo, k), dtype=np.float32)
    # blocks of SCRATCH_BYTES of gathered candidates: at 1024 nodes (115 MB at k = 10, D = 256) 300K nodes
    # took 19.5 s with 12.7M page faults, at 128 nodes 8.1 s, the same graph
    step = scratch_rows(rows_of(np.arange(lo, lo + 1)).shape[1] * (k + k * k)) if hi > lo else 1
    for b0 in range(lo, hi, step):
        b1 = min(b0 + step, hi)
        g1 = gt[b0:b1]
        g2 = gt[g1.clamp_min(0)].reshape(b1 - b0, k * k)
        g2[(g1 < 0).repeat_interleave(k, dim=1)] = -1
        cand, _ = torch.sort(torch.cat([g1, g2], dim=1), dim=1)  # ids ascending: ties keep the smaller id
        bad = (cand < 0) | (cand == torch.arange(b0, b1)[:, None])
        bad[:, 1:] |= cand[:, 1:] == cand[:, :-1]
        own = rows_of(np.arange(b0, b1))
        s = _dot(rows_of(cand.clamp_min(0).reshape(-1).numpy()).reshape(b1 - b0, cand.shape[1], -1), own[:, None])
        s[bad] = -torch.inf
        top = torch.sort(-s, dim=1, stable=True).indices[:, :k]
        best_s, best = torch.gather(s, 1, top), torch.gather(cand, 1, top)
        pad = torch.isinf(best_s)
        nbr[b0 - lo:b1 - lo] = torch.where(pad, -1, best).numpy()
        sim[b0 - lo:b1 - lo] = torch.where(pad, 0.0, best_s).numpy()
    return nbr, sim


def refine_more(recall: float | None, measured: float | None, rounds: int) -> bool:
    """Whether another refinement round is worth its cost (see :data:`MAX_ROUNDS`)."""
    if rounds >= MAX_ROUNDS:
        return False
    if recall is None:  # nothing measured: every round
        return True
    return recall - REFINE_REACH <= measured < recall


def coarse_graph(x: np.ndarray, nbr: np.ndarray, comp: np.ndarray, k: int, *, recall: float | None,
                 seed: int = 0, info: dict | None = None):
    """The next level's kNN graph from the level below (whole table; see the module docstring).

    Args:
        x: (C, D) unit float32 features of the clusters.
        nbr: (n, k_L) the level-L graph; comp: (n,) cluster of each level-L node.
        k: neighbours per cluster.
        recall: target recall@k, measured after each round on :func:`~agc_ray.core.recall.recall_rows`
            against exact search; None: :data:`MAX_ROUNDS` rounds, nothing measured.
        info: filled with ``knn_method`` ('coarse'), ``knn_rounds`` and ``knn_recall``.

    Returns:
        ``(nbr, sim)`` (C, k), or None when ``recall`` was not reached (``info`` then holds the recall
        reached: the caller searches another way).
    """
    from agc_ray.core.recall import RECALL_SAMPLE, exact_kth, recall_at, recall_rows

    c = x.shape[0]
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows_of = x.__getitem__
    rows = kth = measured = None
    if recall is not None:
        rows = recall_rows(c, RECALL_SAMPLE, seed)
        kth = exact_kth(x, rows, k)
        first = first_round_recall(rows_of, c, nbr, comp, k, rows, kth)
        if out_of_reach(recall, first):
            if info is not None:
                info.update(knn_method="coarse", knn_rounds=0, knn_recall=first)
            return None
    g_nbr, g_sim = coarse_rows(rows_of, c, nbr, comp, k, 0, c)
    rounds = 0
    while True:
        if recall is not None:
            measured = recall_at(g_sim[rows], g_nbr[rows] >= 0, kth)
        if not refine_more(recall, measured, rounds):
            break
        g_nbr, g_sim = refine_rows(rows_of, g_nbr, 0, c)
        rounds += 1
    if info is not None:
        info.update(knn_method="coarse", knn_rounds=rounds)
        if measured is not None:
            info["knn_recall"] = measured
    if recall is not None and measured < recall:
        return None
    return g_nbr, g_sim
