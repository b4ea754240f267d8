"""Inverted lists searched one cell at a time, as matrix products.

An IVF search scans, for every query, the rows of the few cells (inverted lists) whose centroids are
most similar to it. faiss' ``IndexIVFFlat`` does that query by query with vector dot products (~12
GFLOP/s on this project's 2-core machine). A kNN graph searches every row of the table, so each cell is
probed by many queries at once: grouping the queries by the cells they probe turns the scan into one
matrix product per cell, ``(queries probing c, D) @ (D, rows of c)``, at BLAS speed (4-6x here), and
the cell assignment of the rows (their best centroid) and of the queries (their ``nprobe`` best) is
one product of the rows with the centroids, computed once for both.

The cells and the rows scanned are those of an ``IndexIVFFlat`` with the same centroids and
``nprobe`` (inner product), so the neighbours are that index's (test), ties aside: here equal
similarities are ordered by row id, whatever the order in which the cells were scanned.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

#: Bytes of one block's temporary results (scores, gathered rows) in the blocked loops of the core (here,
#: :mod:`~agc_ray.core.selfjoin`, :mod:`~agc_ray.core.coarse`). Under glibc's largest mmap threshold (32
#: MiB) a freed block is reused from the heap by the next; a larger one is mapped afresh each time and
#: page-faulted in again: at 64 MiB (blocks of 4096 x 4096 floats) 1M rows' best cells took 12.6 s, at 16
#: MiB 9.0 s, and a 72K-row self-join 12.1 s against 8.7 s (2.7M page faults against 0.1M), same results.
SCRATCH_BYTES = 16 << 20


def scratch_rows(width: int) -> int:
    """Items per block when each holds ``width`` float32 values: :data:`SCRATCH_BYTES` a block (at least 1)."""
    return max(1, SCRATCH_BYTES // (4 * max(1, width)))


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """A float32/int tensor sharing ``a``'s memory (read-only arrays, e.g. Ray's, are only read here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(a))


def cell_probes(x: np.ndarray, centroids: np.ndarray, nprobe: int, gaps: bool = False):
    """Each row's ``nprobe`` most similar centroids (inner product), best first.

    Column 0 is the row's own cell (an ``IndexIVFFlat``'s assignment), columns ``:p`` the cells that a
    search with ``p`` probes scans. With ``gaps``, also how far each of those centroids is below the
    row's best one (similarity of column 0 minus that of the column: 0 first, increasing), which
    :func:`probe_pairs` compares with a probe margin.

    Shapes:
        x: (N, D) float32, centroids: (nlist, D) float32 -> (N, nprobe) int32 [and (N, nprobe) float32].
    """
    n, nlist = x.shape[0], centroids.shape[0]
    nprobe = min(int(nprobe), nlist)
    xt, ct = as_tensor(x), as_tensor(centroids).T.contiguous()
    out = np.empty((n, nprobe), dtype=np.int32)
    gap = np.empty((n, nprobe), dtype=np.float32) if gaps else None
    step = scratch_rows(nlist)  # a block's scores
    for lo in range(0, n, step):
        top = torch.topk(xt[lo:lo + step] @ ct, nprobe, dim=1, sorted=True)
        out[lo:lo + step] = top.indices.numpy()
        if gaps:
            gap[lo:lo + step] = (top.values[:, :1] - top.values).numpy()
    return (out, gap) if gaps else out


def query_probes(queries: np.ndarray, probes: np.ndarray | None, centroids: np.ndarray, nprobe: int) -> np.ndarray:
    """The ``nprobe`` IVF cells each query scans, best first: the first ``nprobe`` columns of ``probes``
    when it has that many (computed once for every row), else computed for these queries.

    Shapes:
        queries (Q, D), probes (Q, P) or None, centroids (nlist, D) -> (Q, nprobe) contiguous.
    """
    if probes is None or probes.shape[1] < nprobe:
        probes = cell_probes(queries, centroids, nprobe)
    return np.ascontiguousarray(probes[:, :nprobe])


#: Cells a query probes at least with a probe margin. Beside the product that finds each row's best
#: cells, scanning a few costs little (make_faces 1M x 256: 22.9 s for 1.02 cells a row, 23.2 s for 4),
#: and the recall above the target that they give is clustering quality (100K x 128 rows at the same
#: target: recall 0.955 with 1.1 cells a row, 0.990 with 4; the hierarchy's top level Fp 0.716 / 0.742).
MARGIN_MIN_PROBES = 4


def probe_pairs(probes: np.ndarray, nprobe: int, margin: float | None = None, gaps: np.ndarray | None = None,
                queries: np.ndarray | None = None, centroids: np.ndarray | None = None):
    """The (query, cell) pairs that an IVF search scans: each query's first ``nprobe`` cells or, with a
    probe ``margin``, the cells whose centroid is within ``margin`` of its best one (inner product;
    always its best :data:`MARGIN_MIN_PROBES`, at most ``nprobe``).

    A query-adaptive number of probes (SPANN's query-aware pruning, Chen et al., NeurIPS 2021): a
    query near its best centroid scans few cells, a query between many scans them all. Measured on
    make_faces (1M x 128, 4096 cells, 4000 sampled queries): recall 0.957 for 1635 rows scanned a query
    where a fixed number of probes needs 3726 (16 probes, 0.954), 0.972 for 3962 against 15001 (64
    probes, 0.971); at 3M rows (at least 2 cells a query) 0.945 for 36K rows against 96K (256 probes).
    Each query's pairs depend on that query alone, so any split of the queries (or of the rows into
    shards) scans the same cells.

    Args:
        probes: (Q, W) each query's best cells, best first (:func:`cell_probes`).
        nprobe: most cells a query scans.
        margin: None: the first ``nprobe`` columns (``W >= nprobe``).
        gaps: (Q, W) :func:`cell_probes`' gaps of ``probes`` (with ``margin``).
        queries, centroids: (Q, D), (nlist, D): where a query's W cells are all within the margin and
            ``W < nprobe``, its best ``nprobe`` are computed again from them.

    Returns:
        ``(query, cell)``: int64 arrays of equal length, grouped by query in order.
    """
    q_count, width = probes.shape
    if margin is None:
        if width < nprobe:
            raise ValueError(f"probe_pairs: {width} probes computed, {nprobe} asked")
        cells = probes[:, :nprobe]
        keep = cells >= 0
    else:
        width = min(width, nprobe)
        cells, keep = probes[:, :width], gaps[:, :width] <= margin
        keep[:, :MARGIN_MIN_PROBES] = True
    query = np.broadcast_to(np.arange(q_count, dtype=np.int64)[:, None], cells.shape)[keep]
    cell = cells[keep].astype(np.int64)
    if margin is None or width >= nprobe:
        return query, cell
    more = np.flatnonzero(keep[:, width - 1])  # every computed cell within the margin: maybe more are
    if more.size == 0:
        return query, cell
    wide, wide_gaps = cell_probes(queries[more], centroids, nprobe, gaps=True)
    more_query, more_cell = probe_pairs(wide, nprobe, margin, wide_gaps)
    drop = np.isin(query, more)
    query = np.concatenate([query[~drop], more[more_query]])
    order = np.argsort(query, kind="stable")
    return query[order], np.concatenate([cell[~drop], more_cell])[order]


class CellLists:
    """The rows of one table (or shard of it) grouped by cell, searched with one product per cell.

    Args:
        x: (n, D) unit float32 rows (kept by reference, not copied).
        cells: (n,) cell of each row (:func:`cell_probes`' column 0).
        nlist: number of cells.
        offset: global id of ``x[0]`` (ids returned are ``offset + row``).
    """

    def __init__(self, x: np.ndarray, cells: np.ndarray, nlist: int, offset: int = 0):
        cells = np.asarray(cells, dtype=np.int64)
        self.x, self.nlist, self.offset = x, int(nlist), int(offset)
        self.order = torch.from_numpy(np.argsort(cells, kind="stable"))  # rows of cell c: ascending ids
        self.starts = np.concatenate([[0], np.cumsum(np.bincount(cells, minlength=nlist))]).tolist()

    @property
    def ntotal(self) -> int:
        return self.x.shape[0]

    def cells(self) -> np.ndarray:
        """(n,) int64 cell of each row."""
        out = np.empty(self.ntotal, dtype=np.int64)
        sizes = np.diff(self.starts)
        out[self.order.numpy()] = np.repeat(np.arange(self.nlist), sizes)
        return out

    def search(self, queries: np.ndarray, probes, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``kk`` most similar rows of the probed cells for each query, as ``IndexIVFFlat.search``.

        Shapes:
            queries: (Q, D) float32, probes: (Q, P) cells each query scans (-1: none), or the
            ``(query, cell)`` pairs of :func:`probe_pairs` -> ``(sim, ids)``, both (Q, kk), by decreasing
            similarity (ties by increasing id), ids global, -1 (similarity -FLT_MAX) where fewer than
            kk rows were scanned.
        """
        q_count = queries.shape[0]
        if isinstance(probes, tuple):
            query, flat = (np.asarray(a, dtype=np.int64) for a in probes)
        else:
            probes = np.asarray(probes, dtype=np.int64)
            query = np.repeat(np.arange(q_count, dtype=np.int64), probes.shape[1])
            flat = probes.ravel()
            query, flat = query[flat >= 0], flat[flat >= 0]
        best_s = torch.full((q_count, kk), -float("inf"))
        best_i = torch.full((q_count, kk), -1, dtype=torch.int64)
        if q_count and kk:
            xt, qt = as_tensor(self.x), as_tensor(queries)
            by_cell = np.argsort(flat, kind="stable")  # (query, probe) pairs grouped by cell
            query_of = torch.from_numpy(query[by_cell])
            q_starts = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=self.nlist))]).tolist()
            for c in np.unique(flat).tolist():
                lo, hi = self.starts[c], self.starts[c + 1]
                if hi == lo:
                    continue
                rows = self.order[lo:hi]
                q = query_of[q_starts[c]:q_starts[c + 1]]
                top_s, top_j = torch.topk(qt[q] @ xt[rows].T, min(kk, hi - lo), dim=1)
                # merge with what the query's earlier cells gave (a query appears once per cell)
                cand_s = torch.cat([best_s[q], top_s], dim=1)
                cand_i = torch.cat([best_i[q], rows[top_j]], dim=1)
                keep_s, keep_j = torch.topk(cand_s, kk, dim=1)
                best_s[q], best_i[q] = keep_s, cand_i.gather(1, keep_j)
        sim, ids = best_s.numpy(), best_i.numpy()
        # equal similarities by increasing id: the result does not depend on the order of the scan
        order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -sim), axis=1)
        sim, ids = np.take_along_axis(sim, order, axis=1), np.take_along_axis(ids, order, axis=1)
        missing = ids < 0
        sim[missing] = -np.finfo(np.float32).max
        return sim.astype(np.float32, copy=False), np.where(missing, -1, ids + self.offset)
