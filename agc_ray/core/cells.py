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

#: (query, cell) pairs that :meth:`CellLists.search` scans together. Its candidates: ``kk`` a query from the
#: first cell, then ~3 a pair (make_faces, 28 cells a query: 98 a query; at most ``kk`` a pair).
SEARCH_PAIRS = 1 << 20


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
        # rows of cell c, ascending; int32 (a shard's rows) halves the candidates' ids in a search
        order = np.argsort(cells, kind="stable")
        self.order = torch.from_numpy(order.astype(np.int32) if x.shape[0] < 2**31 else order)
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
        live = flat >= 0
        live[live] = np.diff(self.starts)[flat[live]] > 0  # pairs whose cell holds rows here
        query, flat = query[live], flat[live]
        if query.size and np.any(query[1:] < query[:-1]):
            order = np.argsort(query, kind="stable")
            query, flat = query[order], flat[order]
        best_s = torch.full((q_count, kk), -float("inf"))
        best_i = torch.full((q_count, kk), -1, dtype=torch.int64)
        if q_count and kk and query.size:
            xt, qt = as_tensor(self.x), as_tensor(queries)
            bounds = np.searchsorted(query, np.arange(q_count + 1))  # each query's pairs: bounds[q]:bounds[q + 1]
            step = SEARCH_PAIRS
            lo = 0
            while lo < q_count:  # blocks of whole queries, at most ``step`` pairs (one query at least)
                hi = max(lo + 1, int(np.searchsorted(bounds, bounds[lo] + step, side="right")) - 1)
                a, b = bounds[lo], bounds[hi]
                best_s[lo:hi], best_i[lo:hi] = self._search_pairs(xt, qt[lo:hi], query[a:b] - lo, flat[a:b], kk)
                lo = hi
        sim, ids = best_s.numpy(), best_i.numpy()
        # equal similarities by increasing id: the result does not depend on the order of the scan
        order = np.lexsort((last_if_padding(ids), -sim), axis=1)
        sim, ids = np.take_along_axis(sim, order, axis=1), np.take_along_axis(ids, order, axis=1)
        missing = ids < 0
        sim[missing] = -np.finfo(np.float32).max
        return sim.astype(np.float32, copy=False), np.where(missing, -1, ids + self.offset)

    def _search_pairs(self, xt, qt, query, cell, kk):
        """:meth:`search` over the pairs ``(query, cell)`` (grouped by query, every cell holding rows
        here; a query's first pair, at best its best cell, gives its bound) -> ``(sim, local ids)``, (Q, kk).

        No top-k per cell (``torch.topk`` of 11 among ~600 columns takes 3x the product itself here):
        scores below a lower bound of the query's final ``kk``-th similarity are dropped and each
        query's survivors merged once. The bound: the query's ``kk``-th best score in its first cell
        (``np.partition``), which its ``kk`` best there reach; in its other cells a query whose best
        score stays below it is skipped after one ``amax``. Whatever the final top ``kk`` holds is at or
        above the bound, so the result is a top-k over every scanned row (the candidates: ``kk`` a query,
        then ~3 a pair, ids as int32).
        """
        q_count = qt.shape[0]
        counts = np.bincount(query, minlength=q_count)
        first = np.zeros(query.size, dtype=bool)
        first[(np.cumsum(counts) - counts)[counts > 0]] = True
        kept = ([], [], [])
        for q, rows, scores in self._scores(xt, qt, query[first], cell[first]):
            q_bound = _kth_best(scores, kk)
            _keep(kept, q, rows, scores, q_bound, kk)
        best_s, best_i = _top_per_group(*kept, q_count, kk)
        bound = best_s.min(dim=1).values  # -inf where the first cell had fewer than kk rows
        kept = ([torch.arange(q_count, dtype=torch.int32).repeat_interleave(kk)], [best_s.ravel()], [best_i.ravel()])
        for q, rows, scores in self._scores(xt, qt, query[~first], cell[~first]):
            q_bound = bound[q]
            hit = (scores.amax(dim=1) >= q_bound).nonzero().squeeze(1)  # most queries: none above the bound
            if hit.shape[0] == 0:
                continue
            q, q_bound, scores = q[hit], q_bound[hit], scores.index_select(0, hit)
            _keep(kept, q, rows, scores, q_bound, kk)
        return _top_per_group(*kept, q_count, kk) if len(kept[0]) > 1 else (best_s, best_i)

    def _scores(self, xt, qt, query, cell):
        """``(its queries, its rows, their scores)`` for each cell of the pairs, in cell order.

        Shapes: scores (queries, rows); rows gathered with ``index_select`` (5x faster than indexing)."""
        by_cell = np.argsort(cell, kind="stable")
        query_of = torch.from_numpy(query[by_cell].astype(np.int32))
        cells, first = np.unique(cell[by_cell], return_index=True)
        bounds = np.append(first, query.size).tolist()
        for j, c in enumerate(cells.tolist()):
            q = query_of[bounds[j]:bounds[j + 1]]
            rows = self.order[self.starts[c]:self.starts[c + 1]]
            yield q, rows, _product(qt.index_select(0, q), xt.index_select(0, rows))


#: Rows below which a product's operands are padded with zeros: MKL computes products of fewer than 12
#: rows (either side) by other kernels whose sums round differently, so a score would depend on how many
#: queries probe a cell together (blocks of queries, shards of rows) and so would the graph.
PRODUCT_MIN_ROWS = 16


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T``, each score the same to the bit whatever the number of rows of ``a`` and ``b``.

    Shapes: a (M, D), b (N, D) -> (M, N)."""
    m, n = a.shape[0], b.shape[0]
    if m >= PRODUCT_MIN_ROWS and n >= PRODUCT_MIN_ROWS:
        return a @ b.T
    pad = [torch.cat([t, t.new_zeros(PRODUCT_MIN_ROWS - t.shape[0], t.shape[1])]) if t.shape[0] < PRODUCT_MIN_ROWS
           else t for t in (a, b)]
    return (pad[0] @ pad[1].T)[:m, :n].contiguous()


def _kth_best(scores: torch.Tensor, kk: int) -> torch.Tensor:
    """(Q,) each row's ``kk``-th largest score, -inf where it has fewer (``np.partition``: 5x the speed of
    ``torch.topk`` here)."""
    n = scores.shape[1]
    if n < kk:
        return torch.full((scores.shape[0],), -float("inf"))
    return torch.from_numpy(np.partition(scores.numpy(), n - kk, axis=1)[:, n - kk])


def _keep(kept: tuple, q: torch.Tensor, rows: torch.Tensor, scores: torch.Tensor, q_bound: torch.Tensor, kk: int):
    """Append to ``kept`` = (query, sim, id) lists the scores at or above each query's bound, raised to
    the query's ``kk``-th best score here where the bound keeps more than ``kk`` a query."""
    flat = np.flatnonzero((scores >= q_bound[:, None]).numpy())  # 7x torch.nonzero's speed
    if flat.size > kk * q.shape[0] and scores.shape[1] > kk:
        q_bound = torch.maximum(q_bound, _kth_best(scores, kk))
        flat = np.flatnonzero((scores >= q_bound[:, None]).numpy())
    flat = torch.from_numpy(flat)
    r, j = flat // scores.shape[1], flat % scores.shape[1]
    kept[0].append(q[r])
    kept[1].append(scores[r, j])
    kept[2].append(rows[j])


def last_if_padding(ids: np.ndarray) -> np.ndarray:
    """``ids`` as int64 with padding (negative ids) made the largest, for sorting ties by id.

    The int64 cast comes first: numpy 2.5 refuses int64's maximum in an int32 array (OverflowError).
    """
    ids = ids.astype(np.int64, copy=False)
    return np.where(ids >= 0, ids, np.iinfo(np.int64).max)


def top_k_by_id(scores: torch.Tensor, k: int, ids: torch.Tensor | None = None):
    """Each row's ``k`` largest ``scores`` and their ids, best first, in the kNN graphs' total order:
    equal scores by increasing id (negative ids, padding, last). ``torch.topk`` picks any of the entries
    tied at the k-th place, so rows with such a tie (between finite scores) are sorted in full.

    Shapes:
        scores (R, W); ids (R, W) int64, default each entry's column -> (R, min(k, W)) x 2.
    """
    kk = min(k + 1, scores.shape[1])
    vals, cols = torch.topk(scores, kk, dim=1, sorted=True)
    top_i = cols if ids is None else ids.gather(1, cols)
    if kk <= k:
        return vals, top_i
    tie = (vals[:, k - 1] == vals[:, k]) & (vals[:, k - 1] > -float("inf"))
    vals, top_i = vals[:, :k].clone(), top_i[:, :k].clone()
    if bool(tie.any()):  # rare (duplicate rows, equal products)
        rows = tie.nonzero().squeeze(1)
        row_s = scores[rows]
        row_i = torch.arange(scores.shape[1]).expand_as(row_s) if ids is None else ids[rows]
        order = torch.from_numpy(np.lexsort((last_if_padding(row_i.numpy()), -row_s.numpy()), axis=1)[:, :k])
        vals[rows], top_i[rows] = row_s.gather(1, order), row_i.gather(1, order)
    return vals, top_i


def _top_per_group(group, sim, ids, n_groups: int, kk: int):
    """The ``kk`` largest ``sim`` (and their ``ids``) of each group, -inf / -1 padded: one top-k per
    set of groups of the same size (rounded up to a power of two), ties by id (:func:`top_k_by_id`:
    ``torch.topk`` alone made 8 rows of a 1M-row graph take another neighbour tied at the k-th place
    than the Ray job's shards did).

    Shapes:
        group, sim, ids: (M,) tensors or lists of them, group in [0, n_groups) -> (n_groups, kk) x 2.
    """
    group, sim, ids = (torch.cat(a) if isinstance(a, list) else a for a in (group, sim, ids))
    group = group.numpy()
    order = torch.from_numpy(np.argsort(group, kind="stable"))
    sim = torch.cat([sim[order], torch.tensor([-float("inf")])])  # the last entry pads
    ids = torch.cat([ids[order], torch.tensor([-1], dtype=ids.dtype)])
    counts = np.bincount(group, minlength=n_groups)
    ends = np.cumsum(counts)
    width = 1 << np.ceil(np.log2(np.maximum(counts, kk))).astype(np.int64)
    best_s = torch.full((n_groups, kk), -float("inf"))
    best_i = torch.full((n_groups, kk), -1, dtype=ids.dtype)
    for w in np.unique(width[counts > 0]).tolist():
        gs = np.flatnonzero((width == w) & (counts > 0))
        at = (ends - counts)[gs, None] + np.arange(w)
        idx = torch.from_numpy(np.where(at < ends[gs, None], at, group.size))
        top_s, top_i = top_k_by_id(sim[idx], kk, ids[idx])
        rows = torch.from_numpy(gs)
        best_s[rows], best_i[rows] = top_s, top_i
    return best_s, best_i
