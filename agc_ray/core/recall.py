"""Recall of a kNN search against exact search, and the probe ladder that tunes IVF to a recall target.

Recall@k is measured on a seeded sample of rows (:func:`recall_rows`, the same rows for any sharding):
their exact k-th best similarity (:func:`exact_kth`) against what the search found (:func:`recall_at`).
:func:`tune_nprobe` doubles the IVF cells probed until that recall reaches a target, within
:func:`probe_cap`; :func:`tune_margin` widens a query-adaptive probe margin instead (the cells within
a margin of each query's best centroid, :func:`~agc_ray.core.cells.probe_pairs`). Where a miss is
searched exactly, :func:`probe_reach` first finds the recall of the widest probing from the cells of the
sample's exact neighbours, before any row's cells are computed: a target beyond it goes straight to
exact search (1M x 256 rows' level 1: recall 0.683 at most, ~3 s of cells, lists and searches saved).
Used by the single-process search (:mod:`agc_ray.core.knn`), the graph from the level below
(:mod:`agc_ray.core.coarse`) and the sharded search of the job.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("agc_ray.core.knn")  # the tuning's lines stay under the kNN search's logger

#: Largest table searched exactly when the IVF search misses the recall target with its most probes.
#: Exact search costs N^2 D (1M x 256 rows: about half an hour on 2 cores); above it the IVF graph is
#: kept, and its measured recall is logged as a warning and reported (``knn_recall_target_met``).
EXACT_FALLBACK_MAX_ROWS = 250_000

#: Rows whose neighbours are searched exactly to measure recall (seeded: the same rows for any sharding).
RECALL_SAMPLE = 1000
#: Smallest number of probes tried by :func:`tune_nprobe`; each step doubles it.
NPROBE_START = 4
#: Largest share of the cells an IVF search probes. Scanning cells costs several times more per row than
#: the exact search's matrix products (measured here: 16 probes of 1024 cells at 100K rows took 1/7 of
#: the exact search's time, 256 probes as long as it), so a table that needs more is searched exactly.
IVF_MAX_PROBE_SHARE = 1 / 8
#: The most of the cells one query probes under a probe margin (:func:`tune_margin`) where a miss keeps
#: the IVF graph (too many rows to search exactly): there the search's cost is bounded by the sample's
#: mean scan (:data:`IVF_MAX_SCAN_ROWS`), and a per-query eighth cut off the queries that need the
#: most cells. make_faces 300K x 256 rows (2048 cells): an eighth, recall 0.944 with every query at
#: its 256 cells, 132 s; a quarter, 0.959 at margin 0.288 with 114 a query on average, 62 s; a half,
#: 0.973 at the same margin with 190, 89 s.
IVF_MAX_PROBE_SHARE_KEPT = 1 / 4
#: Most rows one query scans (probes x rows per cell) while the probes are raised (with a probe margin:
#: the sample's mean). The share above alone grows with the table: at 10M x 128 rows the tuning climbed
#: to 2048 of 16384 cells (1.25M rows a query, days of search on 2 cores) and its probe lists got the
#: job's workers OOM-killed. At 3M x 128 of make_faces (8192 cells) this cap is 178 probes: recall
#: 0.935 of a 0.95 target, 25 minutes. With the margin, 10M x 128 of make_faces reached it at margin
#: 0.192 and recall 0.840, and the search at that cost was on course for ~7.5 hours on 2 cores.
IVF_MAX_SCAN_ROWS = 65_536


def sample_rows(n: int, size: int, seed: int | tuple[int, ...]) -> np.ndarray:
    """``min(size, n)`` distinct rows of ``range(n)``, uniformly at random (seeded), sorted.

    Memory is O(size), not O(n): ``Generator.choice(n, replace=False)`` permutes all n rows once the
    sample is over 2 % of them (800 MB at n = 10^8 for the IVF training sample).
    """
    rng = np.random.default_rng(seed)
    if size >= n:
        return np.arange(n, dtype=np.int64)
    if 4 * size > n:
        return np.sort(rng.choice(n, size=size, replace=False))
    # Draws with replacement, deduplicated and topped up, then cut to size at random: every step is
    # symmetric in the rows, so every subset of that size is equally likely.
    rows = np.unique(rng.integers(0, n, size=size + size // 8 + 64))
    while rows.size < size:
        rows = np.unique(np.concatenate([rows, rng.integers(0, n, size=size - rows.size + 64)]))
    return np.sort(rng.choice(rows, size=size, replace=False))


def recall_rows(n: int, size: int, seed: int) -> np.ndarray:
    """The seeded rows whose neighbours are searched exactly to measure (and tune) recall.

    Drawn from a stream of their own: with the IVF training sample's stream the two samples overlap,
    and rows the quantizer was trained on find their neighbours more easily (measured: recall 0.967 on
    the overlapping sample, 0.945 on independent rows).
    """
    return sample_rows(n, size, (seed, 1))


def exact_kth(x: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """(len(rows),) exact k-th best similarity of each sampled row to the other rows of unit ``x``.

    Brute force over ``x`` in place (``faiss.knn``: no copy of the table). With n <= k rows the
    (n - 1)-th is returned.
    """
    sim, idx = exact_neighbours(x, rows, k)
    return kth_without_self(sim, idx, rows, min(k, x.shape[0] - 1))


def exact_neighbours(x: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sim, idx)`` (len(rows), k + 1): the exact k + 1 best of each sampled row among the rows of unit
    ``x``, its own match included (fewer columns when x has fewer rows)."""
    import faiss

    return faiss.knn(np.ascontiguousarray(x[rows]), x, min(k + 1, x.shape[0]), metric=faiss.METRIC_INNER_PRODUCT)


def probe_reach(queries: np.ndarray, rows: np.ndarray, exact_sim: np.ndarray, exact_idx: np.ndarray,
                neighbours: np.ndarray, centroids: np.ndarray, nprobe: int, n_true: int) -> float:
    """The recall@k that an IVF search probing each sampled row's ``nprobe`` best cells measures, found
    without building or searching it: a list holds its rows' exact vectors, so a true neighbour is found
    exactly when its cell (its best centroid) is among the cells probed. Ties at the k-th similarity
    with rows outside the exact lists count as misses here (the search may find them): never above
    the measured recall.

    Shapes:
        queries (Q, D) the sampled rows ``rows`` (Q,); exact_sim, exact_idx (Q, k + 1) their exact
        search, self included (:func:`exact_neighbours`); neighbours (Q * (k + 1), D) the rows of
        ``exact_idx``; centroids (nlist, D).
    """
    from agc_ray.core.cells import cell_probes

    probed = cell_probes(queries, centroids, nprobe)  # (Q, P)
    cells = cell_probes(neighbours, centroids, 1)[:, 0].reshape(exact_idx.shape)
    inside = (cells[:, :, None] == probed[:, None, :]).any(axis=2)
    kth = kth_without_self(exact_sim, exact_idx, rows, n_true)
    true = (exact_idx != np.asarray(rows)[:, None]) & (exact_idx >= 0) & (exact_sim >= kth[:, None] - 1e-5)
    return float(np.minimum((inside & true).sum(axis=1), n_true).sum() / (len(rows) * n_true))


def kth_without_self(sim: np.ndarray, idx: np.ndarray, rows: np.ndarray, n_true: int) -> np.ndarray:
    """The ``n_true``-th best of each row of an exact (Q, k + 1) result that includes the queries
    themselves (``rows``), their self match dropped."""
    sim = np.where(idx == np.asarray(rows)[:, None], -np.inf, sim)
    return -np.sort(-sim, axis=1)[:, n_true - 1]


def recall_at(found_sim: np.ndarray, found_valid: np.ndarray, kth: np.ndarray) -> float:
    """Share of found neighbours (Q, k) whose similarity reaches the exact k-th best ``kth`` (Q,).

    Similarity, not identity: ties and duplicate vectors make neighbour identity ambiguous.
    """
    q, k = found_sim.shape
    if q == 0 or k == 0:
        return 1.0
    return float(((found_sim >= kth[:, None] - 1e-5) & found_valid).sum() / (q * k))


def probe_cap(nlist: int, n: int = 0, start: int = NPROBE_START, max_share: float = IVF_MAX_PROBE_SHARE) -> int:
    """The most cells :func:`tune_nprobe` probes: ``max_share`` of ``nlist`` and, for a table of ``n``
    rows (0: unknown), no more than :data:`IVF_MAX_SCAN_ROWS` rows a query; at least ``start``."""
    cap = int(nlist * max_share)
    if n > 0:
        cap = min(cap, IVF_MAX_SCAN_ROWS * nlist // n)
    return max(1, min(nlist, max(start, cap)))


def margin_probe_cap(nlist: int, n: int = 0, start: int = NPROBE_START, max_share: float | None = None) -> int:
    """The most cells one query probes under a probe margin (:func:`tune_margin`): ``max_share`` of them
    (default :func:`margin_probe_share`), at least ``start``."""
    return probe_cap(nlist, 0, start, margin_probe_share(n) if max_share is None else max_share)


def margin_probe_share(n: int) -> float:
    """The most of the cells one query probes under a probe margin for a table of ``n`` rows (0:
    unknown): :data:`IVF_MAX_PROBE_SHARE` where a miss is searched exactly, else
    :data:`IVF_MAX_PROBE_SHARE_KEPT`."""
    return IVF_MAX_PROBE_SHARE if exact_on_miss(n) else IVF_MAX_PROBE_SHARE_KEPT


def tune_nprobe(search_sample, kth: np.ndarray, target: float, nlist: int, n: int = 0,
                start: int = NPROBE_START, max_share: float = IVF_MAX_PROBE_SHARE) -> tuple[int, float]:
    """The fewest probes (``start``, doubled each step, up to :func:`probe_cap`) whose recall reaches
    ``target``; the last tried when none does (see :func:`missed_target_goes_exact`).

    ``search_sample(nprobe) -> (nbr, sim)`` searches the sampled rows with that many probes ((Q, k),
    -1 where a row found fewer), ``kth`` (Q,) their exact k-th best similarity, ``n`` the table's rows.
    With every cell probed an IVF search is exhaustive, but slower than exact search long before that.

    Returns:
        ``(nprobe, recall measured with it)``.
    """
    cap = probe_cap(nlist, n, start, max_share)
    nprobe = min(start, cap)
    while True:
        nbr, sim = search_sample(nprobe)
        measured = recall_at(sim, nbr >= 0, kth)
        log.debug("IVF nprobe %d: recall %.4f (target %.3f)", nprobe, measured, target)
        if measured >= target or nprobe >= cap:
            return nprobe, measured
        nprobe = min(2 * nprobe, cap)


#: Probe margins tried by :func:`tune_margin`, in inner-product units (unit rows and centroids: gaps of
#: 0 to 2), each 1.5 times the last; the last takes every cell up to the cap.
PROBE_MARGINS = tuple(round(0.005 * 1.5 ** i, 5) for i in range(16))


def tune_margin(search_sample, kth: np.ndarray, target: float, nlist: int, n: int = 0, start: int = NPROBE_START,
                max_share: float | None = None, exact_on_miss: bool = False) -> tuple[float, int, float, float]:
    """The smallest of :data:`PROBE_MARGINS` whose recall reaches ``target``; the last tried when none
    does (its mean scan reached :data:`IVF_MAX_SCAN_ROWS` a query, or the margins ran out), or the last
    within that scan when a margin passes it (unless the first margin does).

    ``exact_on_miss``: the caller searches exactly when the target is missed, so after a first margin
    that misses, the widest is tried; missing there, no margin can reach it (a wider margin scans a
    superset of cells) and the ladder stops with it (1M rows' level 1: ~12 searches saved, ~5 s).

    ``search_sample(margin, nprobe) -> (nbr, sim, probes)`` searches the sampled rows scanning each
    one's cells within ``margin`` of its best, at most ``nprobe`` (``probes``: the cells scanned in all),
    ``kth`` (Q,) their exact k-th best similarity. A query may probe up to ``max_share`` of the cells
    (default :func:`margin_probe_share`), the sample on average no more than :data:`IVF_MAX_SCAN_ROWS`
    rows a query (of a table of ``n`` rows, 0: unknown).

    Returns:
        ``(margin, nprobe, recall, mean probes)``: ``nprobe`` the most cells a query probes.
    """
    nprobe = margin_probe_cap(nlist, n, start, max_share)
    scan_cap = IVF_MAX_SCAN_ROWS * nlist / n if n > 0 else float(nprobe)
    within = None  # the last margin tried whose scan stays within the cap
    for step, margin in enumerate(PROBE_MARGINS):
        nbr, sim, probes = search_sample(margin, nprobe)
        measured = recall_at(sim, nbr >= 0, kth)
        mean = probes / max(1, len(kth))
        log.debug("IVF probe margin %.4f: %.1f cells a query, recall %.4f (target %.3f)", margin, mean, measured,
                  target)
        if mean > scan_cap and within is not None:
            # one step can pass the cap by far (10M x 128 rows of make_faces: from under 214 cells a row to
            # 956, ~290K rows a query for the whole table): the search keeps to the last margin within it
            return within
        if measured >= target or mean >= min(scan_cap, nprobe):
            break
        within = (margin, nprobe, measured, mean)
        if step == 0 and exact_on_miss:
            nbr, sim, probes = search_sample(PROBE_MARGINS[-1], nprobe)
            widest = recall_at(sim, nbr >= 0, kth)
            if widest < target:
                return PROBE_MARGINS[-1], nprobe, widest, probes / max(1, len(kth))
    return margin, nprobe, measured, mean


def exact_on_miss(n: int) -> bool:
    """Whether a table of ``n`` rows whose IVF search misses the recall target is searched exactly
    (:data:`EXACT_FALLBACK_MAX_ROWS`)."""
    return n <= EXACT_FALLBACK_MAX_ROWS


def ivf_missed(info: dict) -> bool:
    """Whether a level's tuned IVF search missed its recall target (then searched exactly, or kept)."""
    return "knn_ivf_recall" in info or info.get("knn_recall_target_met") is False


def ivf_skipped(missed: bool, method: str, n: int, recall: float | None, nprobe: int | None = None) -> bool:
    """Whether a level that would tune an IVF index (``method`` resolved) to ``recall`` searches exactly
    instead, a level below having ``missed`` the target with IVF (``skip_ivf`` of
    :func:`~agc_ray.core.knn.knn_graph`; the job alike)."""
    return missed and method == "ivf" and recall is not None and nprobe is None and exact_on_miss(n)


def missed_target_goes_exact(n: int, measured: float, target: float, nprobe: int, nlist: int, *,
                             stage: str = "kNN", info: dict | None = None, margin: float | None = None) -> bool:
    """Whether a table whose tuned IVF search missed the recall ``target`` is searched exactly: up to
    :data:`EXACT_FALLBACK_MAX_ROWS` rows; above, the IVF graph is kept and a warning says what to change.
    ``info`` (if given) records which: the exact search's method and recall with the IVF's, or
    ``knn_recall_target_met`` False. ``margin``: the probe margin tried last (the message says so)."""
    probed = f"{nprobe} of {nlist} cells probed" if margin is None else \
        f"up to {nprobe} of {nlist} cells probed (those within {margin:.3f} of each row's best)"
    if exact_on_miss(n):
        log.info("%s: IVF recall %.3f < %.2f with %s: exact search", stage, measured, target, probed)
        if info is not None:
            info.update(knn_method="exact", knn_recall=1.0, knn_ivf_recall=measured, knn_ivf_nprobe=int(nprobe))
            if margin is not None:
                info["knn_ivf_probe_margin"] = margin
        return True
    share = IVF_MAX_PROBE_SHARE if margin is None else margin_probe_share(n)
    log.warning("%s: IVF recall %.3f is below the target %.2f with %s (the most the tuning probes: 1/%d of "
                "the cells a query, at most %d rows a query on average), and %d rows are too many to search "
                "exactly (over %d): the IVF graph is kept. Lower the recall target (knn_recall, --knn-recall) or "
                "ask for exact search (knn='exact', --knn exact; hours on CPU, minutes on a GPU)", stage, measured,
                target, probed, round(1 / share), IVF_MAX_SCAN_ROWS, n, EXACT_FALLBACK_MAX_ROWS)
    if info is not None:
        info["knn_recall_target_met"] = False
    return False
