"""Exact kNN graph of a table with itself, each pair's similarity computed once.

Exact search of every row against the table (``IndexFlatIP``, ``faiss.knn``) computes ``X X^T``, a
symmetric matrix, in full: every similarity twice. Here the rows are cut into blocks of
:data:`BLOCK` on one fixed grid and only the pairs of blocks ``(i, j)`` with ``i <= j`` are multiplied;
the product serves the rows of block i (its rows) and those of block j (its columns): half the FLOPs
of the exhaustive search, the same neighbours.

The blocks of rows are split into ranges (:func:`join_range`): a range multiplies its blocks with all
the blocks at or after them and returns, for every row from the range's start on, the k best it saw;
:func:`merge_best` combines ranges. The best k are taken in one total order (similarity descending,
then id ascending), so the graph does not depend on how the blocks were split into ranges: the Ray job
splits them into tasks, a single process takes one range.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from agc_ray.core.cells import SCRATCH_BYTES, as_tensor, top_k_by_id
from agc_ray.core.graph import best_per_row

#: Rows per block: a block pair's similarities are SCRATCH_BYTES (2048 x 2048 floats, 16 MiB).
BLOCK = math.isqrt(SCRATCH_BYTES // 4)


def n_blocks(n: int) -> int:
    return max(1, math.ceil(n / BLOCK))


def balanced_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """Ranges of blocks ``[b0, b1)`` with about equal work (block i multiplies ``n_blocks - i`` blocks)."""
    nb = n_blocks(n)
    work = np.cumsum(np.arange(nb, 0, -1, dtype=np.float64))
    cuts = np.searchsorted(work, work[-1] * np.arange(1, parts) / parts, side="left") + 1
    edges = np.unique(np.concatenate([[0], np.clip(cuts, 1, nb), [nb]]))
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _merge(best_s: torch.Tensor, best_i: torch.Tensor, s: torch.Tensor, i: torch.Tensor, k: int):
    """The k best of two candidate lists per row, by similarity descending then id ascending."""
    s, i = torch.cat([best_s, s], dim=1), torch.cat([best_i, i], dim=1)
    by_id = torch.sort(i, dim=1, stable=True).indices
    s, i = torch.gather(s, 1, by_id), torch.gather(i, 1, by_id)
    top = torch.sort(-s, dim=1, stable=True).indices[:, :k]
    return torch.gather(s, 1, top), torch.gather(i, 1, top)


#: Most candidates a row of one product may bring to :func:`_merge_sparse`'s padded merge; a row with
#: more sends the product's candidates to the flat sort instead (same result).
PADDED_MERGE_WIDTH = 64


def _merge_sparse(best_s: np.ndarray, best_i: np.ndarray, rows: np.ndarray, ids: np.ndarray, sims: np.ndarray):
    """Merge candidates ``(rows[m], ids[m], sims[m])`` into the rows' k best (in place), same order as
    :func:`_merge`.

    The touched rows' candidates are padded into one (rows, width) block and merged row-wise
    (:func:`_merge`): 2k-deep lists at 60K x 256 rows spent 6 s of a 17 s self-join in the flat sort
    of every touched row's list with its candidates (:func:`~agc_ray.core.graph.best_per_row`).
    """
    k = best_s.shape[1]
    if rows.size > 1 and not bool((rows[1:] >= rows[:-1]).all()):  # a transposed product's: by row
        order = np.argsort(rows, kind="stable")
        rows, ids, sims = rows[order], ids[order], sims[order]
    touched, start, count = np.unique(rows, return_index=True, return_counts=True)
    width = int(count.max(initial=0))
    if width > PADDED_MERGE_WIDTH:
        r, rank, i, s = best_per_row(np.concatenate([np.repeat(touched, k), rows]),
                                     np.concatenate([best_i[touched].ravel(), ids]),
                                     np.concatenate([best_s[touched].ravel(), sims]), k)
        best_s[r, rank], best_i[r, rank] = s, i
        return
    slot = np.arange(rows.size) - np.repeat(start, count)
    where = np.repeat(np.arange(touched.size), count)
    cand_s = torch.full((touched.size, width), -torch.inf)
    cand_i = torch.full((touched.size, width), -1, dtype=torch.int64)
    cand_s[where, slot] = torch.from_numpy(np.ascontiguousarray(sims, dtype=np.float32))
    cand_i[where, slot] = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
    s, i = _merge(torch.from_numpy(best_s[touched]), torch.from_numpy(best_i[touched]), cand_s, cand_i, k)
    best_s[touched], best_i[touched] = s.numpy(), i.numpy()


def _block_top(scores: torch.Tensor, first_id: int, k: int):
    """Each row's k best columns of a block of similarities (ids: ``first_id + column``), in the total
    order (:func:`~agc_ray.core.cells.top_k_by_id`), -inf / -1 padded to k."""
    vals, cols = top_k_by_id(scores, k)
    best_s = torch.full((scores.shape[0], k), -torch.inf)
    best_i = torch.full((scores.shape[0], k), -1, dtype=torch.int64)
    best_s[:, :vals.shape[1]], best_i[:, :vals.shape[1]] = vals, cols + first_id
    return best_s, best_i


def join_range(rows_of: Callable[[np.ndarray], np.ndarray], n: int, k: int, b0: int, b1: int):
    """The k best neighbours, among the pairs of blocks ``(i, j)``, ``b0 <= i < b1``, ``j >= i``, of every row
    from block b0's first on.

    A block's rows take their first candidates with a top-k over one product (block b0's diagonal, then
    each later block's product with block b0); from then on a product passes to a row only the
    similarities at or above its current k-th best, which few are: one product, no transposed top-k.

    Returns:
        ``(sim, nbr)`` of shape (n - b0 * BLOCK, k), float32 / int64, best first; ``-inf`` / -1 where fewer
        were seen. Combine ranges with :func:`merge_best`.
    """
    lo = b0 * BLOCK
    best_s = np.full((n - lo, k), -np.inf, dtype=np.float32)
    best_i = np.full((n - lo, k), -1, dtype=np.int64)
    nb = n_blocks(n)
    seeded = np.zeros(nb, dtype=bool)

    def bounds(b):
        return b * BLOCK, min((b + 1) * BLOCK, n)

    def block(b):
        r0, r1 = bounds(b)
        return torch.from_numpy(np.ascontiguousarray(rows_of(np.arange(r0, r1)), dtype=np.float32))

    def seed(b, scores, first_id):
        """First candidates of block b's rows: the best of ``scores`` (its rows x some columns)."""
        r0, r1 = bounds(b)
        s, i = _block_top(scores, first_id, k)
        best_s[r0 - lo:r1 - lo], best_i[r0 - lo:r1 - lo] = s.numpy(), i.numpy()
        seeded[b] = True

    def offer(b, scores, first_id, transposed=False):
        """Candidates of ``scores`` (block b's rows x columns from ``first_id``; ``transposed``: block b's
        rows are the columns) at or above each row's current k-th best."""
        r0, r1 = bounds(b)
        kth = torch.from_numpy(best_s[r0 - lo:r1 - lo, k - 1])
        mask = (scores >= kth[None, :]) if transposed else (scores >= kth[:, None])
        flat = np.flatnonzero(mask.numpy())  # on a 4096^2 mask: 5 ms (np.nonzero: 60, torch.nonzero: 230)
        if flat.size:
            hit_r, hit_c = np.divmod(flat, scores.shape[1])
            sims = scores.numpy().ravel()[flat]
            if transposed:
                hit_r, hit_c = hit_c, hit_r
            _merge_sparse(best_s, best_i, hit_r + (r0 - lo), hit_c + first_id, sims)

    for i in range(b0, b1):
        xi = block(i)
        c0 = bounds(i)[0]
        scores = xi @ xi.T
        scores.fill_diagonal_(-torch.inf)
        (offer if seeded[i] else seed)(i, scores, c0)  # symmetric: its rows cover every pair once per side
        for j in range(i + 1, nb):
            xj = block(j)
            if seeded[j]:
                scores = xi @ xj.T
                offer(i, scores, bounds(j)[0])
                offer(j, scores, c0, transposed=True)
            else:  # block j's rows see their first candidates: a top-k over them as rows
                scores = xj @ xi.T
                seed(j, scores, c0)
                offer(i, scores, bounds(j)[0], transposed=True)
    return best_s, best_i


def merge_best(n: int, k: int, parts: list[tuple[int, np.ndarray, np.ndarray]], lo: int, hi: int):
    """Rows ``lo:hi`` of the graph from :func:`join_range` results ``(b0, sim, nbr)`` (every range's
    rows start at ``b0 * BLOCK``): ``(nbr, sim)`` (hi - lo, k), -1 / 0 padded."""
    best_s = torch.full((hi - lo, k), -torch.inf)
    best_i = torch.full((hi - lo, k), -1, dtype=torch.int64)
    for b0, s, i in parts:
        start = b0 * BLOCK
        if start >= hi:
            continue
        a = max(lo, start)
        best_s[a - lo:], best_i[a - lo:] = _merge(best_s[a - lo:], best_i[a - lo:],
                                                  as_tensor(s[a - start:hi - start]), as_tensor(i[a - start:hi - start]), k)
    pad = torch.isinf(best_s)
    return torch.where(pad, -1, best_i).numpy(), torch.where(pad, 0.0, best_s).numpy().astype(np.float32)


def self_join_graph(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN graph of the unit rows ``x`` (N, D), self excluded: ``(nbr, sim)`` (N, k), best first,
    ties by id, -1 / 0 padded where N <= k."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    s, i = join_range(x.__getitem__, n, k, 0, n_blocks(n))
    return merge_best(n, k, [(0, s, i)], 0, n)
