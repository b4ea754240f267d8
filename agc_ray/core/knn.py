"""kNN graphs with faiss: inner product on L2-normalised rows, self excluded, fixed degree.

The graph is returned as two dense (N, k) arrays, ``nbr`` (int64 neighbour indices, -1 where a row has
fewer than k neighbours) and ``sim`` (float32 cosine similarities, 0 where padded), sorted by
decreasing similarity. Edges point from neighbour ``nbr[i, j]`` to centre ``i``.

Methods:

- ``exact``: O(N^2 D), deterministic: on CPU the table joined with itself in blocks, each similarity
  computed once (:mod:`agc_ray.core.selfjoin`: half the products of ``IndexFlatIP``'s search), on GPU
  faiss' ``IndexFlatIP``.
- ``ivf``: inverted lists (exact similarities inside the probed cells), k-means trained on a seeded
  sample; deterministic for a fixed seed. On CPU the cells are searched one at a time as matrix
  products (:mod:`agc_ray.core.cells`: ``IndexIVFFlat``'s graph, 4-6x faster for a whole table of
  queries), on GPU by faiss' ``IndexIVFFlat``. Recall is a property of the data as much as of the index
  (0.98 with 16 probes on one table, 0.80 on another): given a recall target, the search effort is
  raised until the recall measured on a seeded sample against exact search reaches it, so easy tables
  are searched with few probes and hard ones with many. On CPU each query probes the cells whose
  centroids are within a margin of its best one, and the margin is what is raised
  (:func:`~agc_ray.core.recall.tune_margin`: a query between cells probes them, one inside a cell does
  not: a third of the rows scanned for the same recall); on GPU the number of probes of every query
  (:func:`~agc_ray.core.recall.tune_nprobe`).
- ``hnsw``: ``IndexHNSWFlat``; fast to build, but its multi-threaded construction is not
  deterministic, so it is offered but never chosen by ``auto``.
- ``auto``: exact up to ``exact_max_rows`` rows, ivf above.

Above level 0 (``below``), a level whose level below kept exact lists 2k deep derives its exact graph
from them (:mod:`agc_ray.core.subset`, ``knn_method`` 'derived'); else the graph is first taken from the
level below's (:mod:`agc_ray.core.coarse`) and an index is built only where that misses the recall target.

On a machine where faiss sees a GPU (``faiss-gpu``), exact and ivf indexes run on it unless
``device='cpu'``.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import numpy as np

from agc_ray.core import subset
from agc_ray.core.subset import exact_depth, subset_graph
from agc_ray.core.recall import (PROBE_MARGINS, RECALL_SAMPLE, exact_kth, exact_neighbours, exact_on_miss, ivf_skipped,
                                 kth_without_self, margin_probe_cap, missed_target_goes_exact, probe_reach, recall_at,
                                 recall_rows, sample_rows, tune_margin, tune_nprobe)

log = logging.getLogger(__name__)

METHODS = ("auto", "exact", "ivf", "hnsw")
EXACT_MAX_ROWS = 20_000
_QUERY_BLOCK = 16384


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation into a new C-contiguous float32 array (zero rows stay zero)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``x`` itself when it already is C-contiguous float32 with unit rows, else :func:`l2_normalize` of it.

    Embedding tables are often stored normalised; skipping the copy saves N D 4 bytes at the peak.
    """
    if isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous and x.ndim == 2:
        norms = np.einsum("ij,ij->i", x, x)
        if np.all(np.abs(norms - 1.0) < 1e-4):
            return x
    return l2_normalize(x)


def use_gpu(device: str) -> bool:
    """Whether faiss searches on GPU for ``device`` ('auto': when faiss-gpu sees one; 'cuda': required)."""
    if device == "cpu":
        return False
    import faiss

    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "cuda" and n == 0:
        raise ValueError("device='cuda' but faiss sees no GPU (install the 'gpu' extra: faiss-gpu)")
    return n > 0


#: IVF cells probed per query when no recall target is given (recall 0.99 at 100K and 0.98 at 1M rows
#: on make_faces, 0.80 on a real word-embedding table: prefer a target).
IVF_NPROBE = 16
#: Default recall@k target of the approximate search, measured against exact search.
KNN_RECALL = 0.95


#: Rows a cell that the IVF cell count keeps to above ~1M rows. With ~4 sqrt(N) cells the cells fall
#: behind the table's groups (identities, look-alike families grow with N) and k-means splits the
#: table along directions that every group shares: make_faces x 128 at 3M rows and 8192 cells spread an
#: identity over 8.8 cells and kept 0.747 of a row's 10 neighbours in its best cell, against 2.8 and
#: 0.891 at 1M / 4096 cells; 16,384 cells at 3M brought back 3.1 and 0.885.
IVF_ROWS_PER_CELL = 256


def ivf_nlist(n: int) -> int:
    """IVF cells for n rows: the more of ~4 sqrt(N) and N / :data:`IVF_ROWS_PER_CELL` (the latter from
    ~1M rows on), a power of two, at least 39 training points per cell (faiss' minimum)."""
    cells = max(4 * math.sqrt(n), n / IVF_ROWS_PER_CELL, 16)
    return int(min(2 ** round(math.log2(cells)), max(16, n // 39)))


#: Rows of the IVF training sample per cell. The k-means costs (sample x cells x D) per iteration; a
#: coarser quantizer makes the recall target probe more cells or the lists less even. Measured at 1M x
#: 256 on two regimes (benchmarks/bench_knn.py --train-per-cell): 64 a cell 85-88 s of k-means, 32
#: a cell half that with the same probes and search time, 16 a cell uneven lists (search 1.6x slower).
IVF_TRAIN_PER_CELL = 32


def ivf_train_rows(n: int, seed: int) -> np.ndarray | None:
    """Sorted rows of the seeded IVF training sample (:data:`IVF_TRAIN_PER_CELL` per cell), or None
    when every row is used."""
    n_train = min(n, IVF_TRAIN_PER_CELL * ivf_nlist(n))
    if n_train >= n:
        return None
    return sample_rows(n, n_train, seed)


#: k-means iterations of the IVF quantizer (faiss' default for an IVF index's coarse quantizer).
IVF_TRAIN_ITERATIONS = 10


def ivf_centroids(sample: np.ndarray, n: int, seed: int, report=None) -> np.ndarray:
    """(nlist, D) coarse centroids for an index of n rows, trained by faiss' k-means on ``sample``.

    The same spherical k-means as ``IndexIVFFlat.train`` (its clustering parameters), run one
    iteration per call so that ``report`` (if given) is called with 1 after each of the
    :data:`IVF_TRAIN_ITERATIONS`: the centroids are identical, and a long training shows progress.
    """
    import faiss

    nlist, d = ivf_nlist(n), sample.shape[1]
    like = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)  # owns ``cp``: keep it alive
    cp = like.cp  # the index's clustering defaults (spherical for inner product, 10 iterations)
    cp.seed, cp.niter = seed, 1
    # faiss prints a WARNING below 39 rows a cell; fewer is a choice here (IVF_TRAIN_PER_CELL)
    cp.min_points_per_centroid = max(1, min(cp.min_points_per_centroid, sample.shape[0] // nlist))
    clustering = faiss.Clustering(d, nlist, cp)
    del like
    x = np.ascontiguousarray(sample, dtype=np.float32)
    for _ in range(IVF_TRAIN_ITERATIONS):  # each call continues from the centroids of the last
        clustering.train(x, faiss.IndexFlatIP(d))
        if report is not None:
            report(1)
    return faiss.vector_to_array(clustering.centroids).reshape(nlist, d)


def ivf_index(centroids: np.ndarray, nprobe: int | None = None):
    """An empty, trained ``IndexIVFFlat`` (inner product) over the given coarse centroids."""
    import faiss

    nlist, d = centroids.shape
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    index.nprobe = nprobe or IVF_NPROBE  # faiss' Python wrapper keeps the quantizer alive with the index
    return index


def build_index(x: np.ndarray, method: str, *, seed: int = 0, nprobe: int | None = None, device: str = "auto"):
    """Build a faiss inner-product index over the unit rows ``x`` of shape (N, D)."""
    import faiss

    n, d = x.shape
    if method == "exact":
        index = faiss.IndexFlatIP(d)
    elif method == "ivf":
        rows = ivf_train_rows(n, seed)
        index = ivf_index(ivf_centroids(x if rows is None else x[rows], n, seed), nprobe)
    elif method == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 96
    else:
        raise ValueError(f"knn method must be one of {METHODS}, got {method!r}")
    if method != "hnsw" and use_gpu(device):
        index = to_gpu(index)
    index.add(x)
    return index


def to_gpu(index):
    """The index on GPU 0 (faiss-gpu), holding its GPU resources."""
    import faiss

    res = faiss.StandardGpuResources()
    index = faiss.index_cpu_to_gpu(res, 0, index)
    faiss.add_to_referenced_objects(index, res)  # faiss refuses unknown attributes: keep res alive this way
    return index


class Below(NamedTuple):
    """The level below, for :func:`knn_graph` at the level of its clusters.

    Shapes:
        nbr: (n, k_L) its graph; comp: (n,) each node's cluster; peaks: (C,) each cluster's peak node
        (whose features the cluster's are); deep: ``(nbr, sim)`` (n, depth), its exact lists where it
        kept them deeper than k (:mod:`agc_ray.core.subset`), else None.
    """

    nbr: np.ndarray
    comp: np.ndarray
    peaks: np.ndarray | None = None
    deep: tuple[np.ndarray, np.ndarray] | None = None


def resolve_method(method: str, n: int, exact_max_rows: int = EXACT_MAX_ROWS) -> str:
    if method not in METHODS:
        raise ValueError(f"knn method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return "exact" if n <= exact_max_rows else "ivf"
    if method == "ivf" and n < 39 * 16:
        return "exact"  # too few rows to train cells
    return method


def search(index, queries: np.ndarray, k: int, query_offset: int | np.ndarray | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """Search ``k`` neighbours of each query, excluding the query itself.

    ``query_offset`` is the index position of ``queries[0]`` when the queries are consecutive rows of
    the index, an array of each query's index position when they are any rows of it (so that the self
    match can be removed), or None for external queries.

    Returns:
        ``(nbr, sim)`` of shape (Q, k): int64 indices (-1 padded) and float32 similarities (0 padded).
    """
    q = queries.shape[0]
    nbr = np.empty((q, k), dtype=np.int64)
    sim = np.empty((q, k), dtype=np.float32)
    extra = 0 if query_offset is None else 1
    for start in range(0, q, _QUERY_BLOCK):
        stop = min(start + _QUERY_BLOCK, q)
        s, i = index.search(queries[start:stop], k + extra)
        if extra:
            if isinstance(query_offset, np.ndarray):
                self_idx = np.asarray(query_offset[start:stop], dtype=np.int64)
            else:
                self_idx = np.arange(start, stop, dtype=np.int64) + query_offset
            i, s = drop_self(i, s, self_idx)
        nbr[start:stop], sim[start:stop] = i, np.where(i < 0, 0.0, s)
    return nbr, sim


class MarginIVF:
    """A faiss ``IndexIVF`` searched as :func:`cell_graph` searches with a probe margin: each query scans
    the cells whose centroid is within ``margin`` of its best one, at most ``index.nprobe``
    (:func:`~agc_ray.core.cells.probe_pairs`, then faiss' ``search_preassigned`` with each query's
    cells, -1 padded). ``params``: faiss ``SearchParametersIVF`` (an id selector); ``keep_alive``:
    objects that ``params`` points to."""

    def __init__(self, index, margin: float, params=None, keep_alive=None):
        self.index, self.margin, self.params, self._keep = index, float(margin), params, keep_alive
        self.centroids = index.quantizer.reconstruct_n(0, index.nlist)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        from agc_ray.core.cells import cell_probes, probe_pairs

        q = np.ascontiguousarray(queries, dtype=np.float32)
        n, nprobe = q.shape[0], int(self.index.nprobe)
        probes, gaps = cell_probes(q, self.centroids, min(nprobe, PROBES_FIRST_PASS), gaps=True)
        query, cell = probe_pairs(probes, nprobe, self.margin, gaps, q, self.centroids)
        counts = np.bincount(query, minlength=n)
        assign = np.full((n, max(1, int(counts.max(initial=0)))), -1, dtype=np.int64)  # faiss skips cells < 0
        assign[query, np.arange(query.size) - np.repeat(np.cumsum(counts) - counts, counts)] = cell
        params = self.params if self.params is not None else faiss.SearchParametersIVF()
        params.nprobe = assign.shape[1]
        sim, idx = np.empty((n, k), dtype=np.float32), np.empty((n, k), dtype=np.int64)
        # the C++ call: the Python wrapper of search_preassigned takes no search parameters
        self.index.search_preassigned_c(n, faiss.swig_ptr(q), k, faiss.swig_ptr(assign),
                                        faiss.swig_ptr(np.zeros(assign.shape, dtype=np.float32)),
                                        faiss.swig_ptr(sim), faiss.swig_ptr(idx), False, params)
        return sim, idx


def drop_self(idx: np.ndarray, sim: np.ndarray, self_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own row from its (Q, k + 1) result: ``(idx, sim)`` of shape (Q, k), the
    similarity of padding (-1) entries set to 0.

    With duplicate vectors the self match may be missing or not first: exactly one entry per row is
    dropped, the self match if present, else the last (weakest) one.
    """
    q, kk = idx.shape
    drop = idx == np.asarray(self_idx, dtype=np.int64)[:, None]
    drop[~drop.any(axis=1), -1] = True
    keep = np.ones_like(drop)
    keep[np.arange(q), np.argmax(drop, axis=1)] = False
    idx, sim = idx[keep].reshape(q, kk - 1), sim[keep].reshape(q, kk - 1)
    return idx, np.where(idx < 0, np.float32(0), sim)


def knn_graph(
    x: np.ndarray,
    k: int,
    *,
    method: str = "auto",
    seed: int = 0,
    nprobe: int | None = None,
    device: str = "auto",
    normalize: bool = True,
    recall: float | None = KNN_RECALL,
    info: dict | None = None,
    below: Below | None = None,
    skip_ivf: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """kNN graph of the rows of ``x`` (cosine similarity), self excluded.

    Args:
        x: (N, D) features.
        k: neighbours per node (not counting the node itself). Rows of a graph with N <= k get N - 1
            real neighbours and the rest padded with -1 / 0.
        method: 'auto', 'exact', 'ivf' or 'hnsw' (see module docstring).
        seed: seed of the IVF training sample and k-means.
        nprobe: IVF cells probed per query; default: tuned to ``recall``
            (:func:`~agc_ray.core.recall.tune_nprobe`), or :data:`IVF_NPROBE` when ``recall`` is None.
        device: 'auto', 'cpu' or 'cuda' (faiss-gpu).
        normalize: L2-normalise rows first (set False when ``x`` already has unit rows).
        recall: recall@k target of the IVF search, measured on :data:`~agc_ray.core.recall.RECALL_SAMPLE`
            seeded rows against exact search; None: probe ``nprobe`` cells, measure nothing.
        info: if given, filled with ``knn_method`` and, for IVF, ``knn_nprobe`` and (with a recall
            target) the ``knn_recall`` measured.
        below: :class:`Below` when the rows of ``x`` are the clusters of a level below. Where that level
            kept exact lists deeper than k, the graph is derived from them (:func:`~agc_ray.core.subset.subset_graph`,
            ``knn_method`` 'derived': exact); else, where ``method`` would build an IVF index, it is searched
            from the level below's graph (:func:`~agc_ray.core.coarse.coarse_graph`, ``knn_method``
            'coarse') and the index is built only when that misses the recall target. An exact search
            of a level above 0 returns :func:`~agc_ray.core.subset.exact_depth` columns (2k above
            :data:`~agc_ray.core.subset.DEEP_MIN_ROWS` nodes) for the level above.
        skip_ivf: a level below missed the recall target with IVF (:func:`~agc_ray.core.recall.ivf_missed`):
            where the IVF index would be built with a recall target, search exactly instead (up to
            :data:`~agc_ray.core.recall.EXACT_FALLBACK_MAX_ROWS` rows; ``info`` gets ``knn_ivf_skipped``).
            The coarser levels are no easier: 1M make_faces rows, IVF recall 0.676 at level 1 and 0.594
            at level 2 (72K and 47K nodes), each after ~13 s of quantizer, cells and tuning in the job.

    Returns:
        ``(nbr, sim)``: (N, k) int64 and (N, k) float32, sorted by decreasing similarity; (N, depth) where
        the graph is exact and deeper (derived, or exact above level 0, see ``below``).
    """
    if k < 1:
        raise ValueError(f"knn_graph: k must be >= 1, got {k}")
    x = unit_rows(x) if normalize else np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    method = resolve_method(method, n)
    if info is not None:
        info["knn_method"] = method
    if below is not None and not isinstance(below, Below):
        below = Below(*below)
    depth = exact_depth(k, n, below is not None)
    if below is not None and below.deep is not None:
        graph = subset_graph(x, *below.deep, below.peaks, k, info=info)
        if graph is not None:
            return graph
        log.info("kNN: %s", subset.searched_afresh(n))
    if method == "ivf" and below is not None and nprobe is None:
        from agc_ray.core.coarse import coarse_graph

        tried: dict = {}
        graph = coarse_graph(x, below.nbr, below.comp, k, recall=recall, seed=seed, info=tried)
        if graph is not None:
            if info is not None:
                info.update(tried)
            return graph
        log.info("coarse kNN recall %.3f < %.2f after %d rounds: IVF search", tried["knn_recall"], recall,
                 tried["knn_rounds"])
        if info is not None:
            info["knn_coarse_recall"] = tried["knn_recall"]
    if ivf_skipped(skip_ivf, method, n, recall, nprobe):
        log.info("kNN: IVF missed the recall target a level below: exact search of %d rows", n)
        if info is not None:
            info.update(knn_method="exact", knn_recall=1.0, knn_ivf_skipped=True)
        return exact_graph(x, depth, device)
    if method == "ivf" and not use_gpu(device):
        rows = ivf_train_rows(n, seed)
        centroids = ivf_centroids(x if rows is None else x[rows], n, seed)
        return cell_graph(x, centroids, k, nprobe=nprobe, recall=recall, seed=seed, info=info, exact_k=depth)
    if method == "exact":
        return exact_graph(x, depth, device)
    index = build_index(x, method, seed=seed, nprobe=nprobe, device=device)
    if method == "ivf":
        if recall is not None and nprobe is None:
            def search_sample(p, rows):
                set_nprobe(index, p)
                return search(index, x[rows], k, query_offset=rows)

            tuned = _tuned(x, k, recall, seed, ivf_nlist(n), search_sample, info, margin=False)
            if tuned is None:  # out of IVF's reach on a table small enough: search exactly
                return exact_graph(x, depth, device)
            nprobe = tuned[1]
            set_nprobe(index, nprobe)
        if info is not None:
            info["knn_nprobe"] = int(nprobe or IVF_NPROBE)
    return search(index, x, k)


#: Probes per row computed with the rows' cells when the number is tuned (one product with the
#: centroids serves the lists and the search; a tuned number above it costs a second product).
PROBES_FIRST_PASS = 16
#: (row, probed cell) pairs searched at once: above it the rows go in blocks of PROBE_PAIRS // nprobe.
#: 1M rows at 16 probes stay one block; at 3M x 128 of make_faces the tuning chose 512 probes, and the
#: whole table's probes and per-cell query lists (~6 GB each) got the process killed at 24 GB.
PROBE_PAIRS = 1 << 24


def probe_blocks(lo: int, hi: int, nprobe: int, pairs: int) -> list[tuple[int, int]]:
    """Ranges ``[a, b)`` covering rows ``lo:hi`` in order, each of at most ``pairs`` (row, probed cell)
    pairs at ``nprobe`` probes a row (one row at least; one empty range when ``lo == hi``)."""
    step = max(1, pairs // max(1, nprobe))
    return [(a, min(a + step, hi)) for a in range(lo, max(lo + 1, hi), step)]


def cell_graph(x: np.ndarray, centroids: np.ndarray, k: int, *, nprobe: int | None = None,
               recall: float | None = KNN_RECALL, seed: int = 0, info: dict | None = None,
               exact_k: int | None = None):
    """:func:`knn_graph`'s IVF search on CPU over the unit rows ``x`` and the given centroids, cell by
    cell (:class:`~agc_ray.core.cells.CellLists`): the graph of an ``IndexIVFFlat`` with these
    centroids and ``nprobe`` probes; with a recall target and no ``nprobe``, each row probes the cells
    within a margin of its best centroid, the margin tuned to ``recall``
    (:func:`~agc_ray.core.recall.tune_margin`; ``info`` gets ``knn_probe_margin``, ``knn_probes_mean``
    and, as ``knn_nprobe``, the most cells a row may probe). Where the target is out of reach and the
    table is searched exactly, ``exact_k`` neighbours (default k) a row."""
    from agc_ray.core.cells import CellLists, cell_probes, probe_pairs, query_probes

    n, nlist = x.shape[0], centroids.shape[0]
    tuning = recall is not None and nprobe is None
    kth = None
    if tuning and exact_on_miss(n) and n > k + 1:
        # before the rows' cells and lists: a target out of the widest probing's reach is searched exactly
        rows = recall_rows(n, RECALL_SAMPLE, seed)
        exact_sim, exact_idx = exact_neighbours(x, rows, k)
        cap = margin_probe_cap(nlist, n)
        reach = probe_reach(x[rows], rows, exact_sim, exact_idx, x[exact_idx.reshape(-1)], centroids, cap, k)
        if reach < recall:
            missed_target_goes_exact(n, reach, recall, cap, nlist, info=info, margin=PROBE_MARGINS[-1])
            return exact_graph(x, exact_k or k, "cpu")
        kth = kth_without_self(exact_sim, exact_idx, rows, k)
    width = min(nlist, PROBES_FIRST_PASS if tuning else nprobe or IVF_NPROBE)
    probes, gaps = cell_probes(x, centroids, width, gaps=True) if tuning else (cell_probes(x, centroids, width), None)
    lists = CellLists(x, probes[:, 0], nlist)
    nprobe, margin, mean = nprobe or width, None, None

    def pairs_of(lo, hi, p, m):
        if m is None:
            return probe_pairs(query_probes(x[lo:hi], probes[lo:hi], centroids, p), p)
        return probe_pairs(probes[lo:hi], p, m, gaps[lo:hi], x[lo:hi], centroids)

    if tuning:
        def search_sample(m, p, rows):
            pairs = probe_pairs(probes[rows], p, m, gaps[rows], x[rows], centroids)
            sim, idx = lists.search(x[rows], pairs, k + 1)
            return (*drop_self(idx, sim, rows), pairs[0].size)

        tuned = _tuned(x, k, recall, seed, nlist, search_sample, info, margin=True, kth=kth)
        if tuned is None:  # out of IVF's reach on a table small enough: search exactly
            return exact_graph(x, exact_k or k, "cpu")
        margin, nprobe, mean = tuned
    if info is not None:
        info["knn_nprobe"] = int(nprobe)
    nbr = np.empty((n, k), dtype=np.int64)
    sim = np.empty((n, k), dtype=np.float32)
    # rows are searched on their own: any blocks do
    for lo, hi in probe_blocks(0, n, nprobe if margin is None else math.ceil(2 * mean), PROBE_PAIRS):
        found_sim, found = lists.search(x[lo:hi], pairs_of(lo, hi, nprobe, margin), k + 1)
        nbr[lo:hi], sim[lo:hi] = drop_self(found, found_sim, np.arange(lo, hi))
    return nbr, sim


def _tuned(x: np.ndarray, k: int, recall: float, seed: int, nlist: int, search_sample, info: dict | None, *,
           margin: bool, kth: np.ndarray | None = None) -> tuple[float | None, int, float | None] | None:
    """The search effort tuned to ``recall`` on the seeded :func:`~agc_ray.core.recall.recall_rows` of
    ``x``: a probe margin (:func:`~agc_ray.core.recall.tune_margin`, ``search_sample(margin, nprobe,
    rows)``) or a number of probes (:func:`~agc_ray.core.recall.tune_nprobe`, ``search_sample(nprobe,
    rows)``). ``(margin or None, nprobe, mean probes or None)``, or None when the target is out of IVF's
    reach on a table small enough to search exactly (``info`` then says so; the caller searches exactly).
    ``kth``: the sample's exact k-th best similarities where the caller has them."""
    n = x.shape[0]
    rows = recall_rows(n, RECALL_SAMPLE, seed)
    kth = exact_kth(x, rows, k) if kth is None else kth
    if margin:
        chosen, nprobe, measured, mean = tune_margin(lambda m, p: search_sample(m, p, rows), kth, recall, nlist, n,
                                                     exact_on_miss=exact_on_miss(n))
    else:
        (nprobe, measured), chosen, mean = tune_nprobe(lambda p: search_sample(p, rows), kth, recall, nlist, n), \
            None, None
    if info is not None:
        info["knn_recall"] = measured
    if measured >= recall or not missed_target_goes_exact(n, measured, recall, nprobe, nlist, info=info,
                                                          margin=chosen):
        if info is not None and margin:
            info.update(knn_probe_margin=chosen, knn_probes_mean=round(mean, 2))
        return chosen, nprobe, mean
    return None


def exact_graph(x: np.ndarray, k: int, device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN graph of the unit rows ``x``: on CPU the self-join that computes each similarity once
    (:func:`~agc_ray.core.selfjoin.self_join_graph`), on GPU faiss' flat search."""
    if use_gpu(device):
        return search(build_index(x, "exact", device=device), x, k)
    from agc_ray.core.selfjoin import self_join_graph

    return self_join_graph(x, k)


class FlatView:
    """Exact inner-product search over ``x`` (at least k rows) in place (``faiss.knn``, the search of an
    ``IndexFlatIP``, which would copy ``x``)."""

    def __init__(self, x: np.ndarray):
        self.x = np.ascontiguousarray(x, dtype=np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        return faiss.knn(np.ascontiguousarray(queries, dtype=np.float32), self.x, k, metric=faiss.METRIC_INNER_PRODUCT)


def set_nprobe(index, nprobe: int) -> None:
    """Set the cells probed by an IVF index (CPU or GPU)."""
    import faiss

    if hasattr(index, "nprobe"):
        index.nprobe = int(nprobe)
    else:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))


def knn_recall(
    x: np.ndarray, nbr: np.ndarray, *, sample: int = 2000, seed: int = 0, normalize: bool = True
) -> float:
    """Recall of a kNN graph against exact search, on a seeded sample of rows.

    A returned neighbour counts as a hit when its similarity (recomputed here) reaches the exact k-th
    best similarity: ties and duplicate vectors make index identity ambiguous, similarity is not.
    """
    x = l2_normalize(x) if normalize else np.ascontiguousarray(x, dtype=np.float32)
    n, k = nbr.shape
    n_true = min(k, n - 1)
    if n_true <= 0:
        return 1.0
    rows = recall_rows(n, sample, seed)
    kth = exact_kth(x, rows, k)
    found = nbr[rows, :n_true]
    valid = found >= 0
    got = np.einsum("qd,qkd->qk", x[rows], x[np.where(valid, found, 0)])
    return recall_at(got, valid, kth)
