"""An index sharded across Ray actors, searched with a top-k merge.

Every shard actor (:mod:`agc_ray.distributed.index`) holds the rows of one contiguous range of nodes
(IVF: grouped by cell and searched cell by cell as the core does, :class:`agc_ray.core.cells.CellLists`;
exact or on GPU: a faiss index). A query block is searched against every shard for its k + 1 best, the
candidates are merged by decreasing similarity (stable, so ties go to the lower shard) and
:func:`agc_ray.core.knn.drop_self` removes the self match exactly as on a single index. With ``exact``
search the graph therefore equals a single ``IndexFlatIP``'s. The driver calls the actors with the refs
it owns (a shard, its rows' cells), and tasks merge their results, taken as arguments: no task puts or
waits on an actor (see :func:`agc_ray.distributed.level.shard_inputs`).

``ivf``: the coarse quantizer is trained once, on the same seeded sample of rows that
:func:`agc_ray.core.knn.build_index` uses (:func:`~agc_ray.core.knn.ivf_train_rows`,
:func:`~agc_ray.core.knn.ivf_centroids`), and shared by all shards; each shard probes the same
cells, so the merged result equals a single IVF index with that quantizer, whatever the shard count.
Each row's best cells are computed once, by tasks over chunks of rows: column 0 files the row in its
shard's lists, the first ``nprobe`` are the cells it scans as a query.
With a recall target, the probes are tuned as :func:`agc_ray.core.knn.knn_graph` tunes them (same
seeded sample rows, same exact k-th similarities, same ladder), so the setting chosen is the same too:
on CPU a probe margin (each query probes the cells within it of its best centroid: the rows' cells are
computed with their gaps, and every shard's actor derives a query's cells from them alike), on GPU
the number of probes. Where a miss would be searched exactly, the widest probing's recall is found first
(:func:`~agc_ray.core.recall.probe_reach`, one task): out of reach, the table is joined with itself
before any row's cells or index are built.

Above level 0, :func:`sharded_subset_graph` derives the exact graph from the level below's exact lists
where it kept them 2k deep (the core's :mod:`agc_ray.core.subset`); else :func:`sharded_coarse_graph`
first searches the graph from the level below (the core's
:mod:`agc_ray.core.coarse`, one task per shard of nodes, the same rounds and recall), and the index is
built only when that misses the target.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from agc_ray.core.cells import cell_probes, probe_pairs
from agc_ray.core.coarse import coarse_rows, first_round_recall, out_of_reach, refine_more, refine_rows
from agc_ray.core import subset
from agc_ray.core.selfjoin import balanced_ranges, join_range, merge_best, n_blocks
from agc_ray.core.subset import rescan_blocks, rescan_rows, short_rows, split_deep, subset_lists, too_many_rescans
from agc_ray.core.knn import (IVF_NPROBE, IVF_TRAIN_ITERATIONS, PROBES_FIRST_PASS, FlatView, drop_self, ivf_centroids,
                              ivf_nlist, ivf_train_rows, probe_blocks, resolve_method)
from agc_ray.core.recall import (PROBE_MARGINS, exact_kth, exact_on_miss, kth_without_self, margin_probe_cap,
                                 missed_target_goes_exact, probe_cap, probe_reach, recall_at, recall_rows, tune_margin,
                                 tune_nprobe)
from agc_ray.distributed import progress
from agc_ray.distributed.index import index_actors, merge_topk, shard_searches
from agc_ray.distributed.remote import lazy_remote
from agc_ray.distributed.shards import concat_graph, gather_rows

log = logging.getLogger("agc_ray")

JOB_METHODS = ("auto", "exact", "ivf")


SEARCH_CHUNK = 16384  # query rows per search task: enough tasks for progress lines, few enough for overheads
#: Query rows per IVF search task (and per task of their best cells): a shard's lists are scanned cell
#: by cell for the task's queries, one product and a Python step per probed cell and call, so small
#: calls cost more than the products: at 10^6 rows, 4 probes and 2 shards, calls of 64K queries took
#: 17 s a shard against 12 s in calls of 256K (the cells' rows are gathered again by every call).
IVF_SEARCH_CHUNK = 1 << 18
#: (query, probed cell) pairs per call to the index actors: a task searches its rows in calls of
#: ``IVF_PROBE_PAIRS // nprobe`` rows, so that a tuned nprobe far above 16 (2048 of 16384 cells at
#: 10M rows of make_faces) does not multiply the probe arrays and the actors' per-cell query lists (a
#: 10M run's search tasks reached 8 GB and its actors 7 GB each at 64K rows x 2048 probes a call, and
#: were killed). 2^23 pairs (~130 MB of probe arrays a call): at 16 probes a row still one call a
#: task; with a probe margin of ~100 cells a row (10M rows), calls of ~40K rows, ~250 queries a cell
#: a call (at 2^20, 30: the per-cell step costs more than its product).
IVF_PROBE_PAIRS = 1 << 23


def sharded_knn_graph(x_refs: list, offsets: np.ndarray, k: int, method: str, seed: int, *,
                      recall_sample: int = 0, recall_target: float | None = None, stage: str = "kNN", counter=None,
                      actors: list | None = None, exact_k: int | None = None) -> tuple:
    """kNN graph of rows sharded over the object store, searched over an index sharded across actors.

    Args:
        x_refs: refs to each shard's (n_s, D) unit float32 rows; shard s holds rows offsets[s]:offsets[s+1].
        k: neighbours per row (self excluded).
        method: 'auto', 'exact' or 'ivf' (the core's rule and IVF settings).
        seed: seed of the IVF training sample and k-means.
        recall_sample: rows whose neighbours are checked against exact search (approximate search only).
        recall_target: with ``recall_sample`` rows, the IVF probe margin (on GPU: the cells probed) is
            raised until their recall reaches it (:func:`agc_ray.core.recall.tune_margin`,
            :func:`~agc_ray.core.recall.tune_nprobe`); None: :data:`~agc_ray.core.knn.IVF_NPROBE`.
        stage: the name of the progress lines (the queries are searched in tasks of ``SEARCH_CHUNK`` rows,
            ``IVF_SEARCH_CHUNK`` with IVF).
        counter: a :func:`~agc_ray.distributed.progress.row_counter` for progress inside the IVF training.
        actors: index actors of an earlier level to reuse (see :func:`index_actors`).
        exact_k: neighbours a row where the search is (or falls back to) exact (default k; the core's
            :func:`~agc_ray.core.subset.exact_depth`): the graph of an ``info["knn_method"]`` 'exact'
            search has that many columns.

    Returns:
        ``(graph, info, actors)``: a ref to ``(nbr, sim)`` (n, k), ``{"knn_method", ["knn_nprobe",
        "knn_recall"]}``,
        and the index actors (the caller kills them once the graph is no longer needed: Ray may need
        them to reconstruct a lost graph object).
    """
    import ray

    n = int(offsets[-1])
    method = resolve_method(method, n)
    centroids, nprobe, probe_refs, margin, mean, exact = None, 0, None, None, 0.0, None
    sizes = np.diff(offsets).astype(int)
    step = IVF_SEARCH_CHUNK if method == "ivf" else SEARCH_CHUNK
    chunks = [(s, lo, min(lo + step, n_s)) for s, n_s in enumerate(sizes) for lo in range(0, max(1, n_s), step)]
    tuning = recall_sample > 0 and recall_target is not None
    # on CPU a tuned search probes a margin of cells (the core's cell_graph); faiss on GPU, a number
    adaptive = tuning and not ray.cluster_resources().get("GPU")
    t0 = time.perf_counter()
    if method == "ivf":
        rows = ivf_train_rows(n, seed)
        sample = _gather.remote(offsets, rows if rows is not None else np.arange(n), *x_refs)
        training = f"{stage} IVF quantizer"
        # nothing else runs meanwhile: k-means gets the CPUs of the largest node (one node: one sample)
        cpus = max([node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")] + [1.0])
        centroids = _train_centroids.options(num_cpus=cpus).remote(
            sample, n, seed, progress=(counter, training) if counter else None)
        # the index build needs them anyway: k-means iterations as progress, then a line
        progress.wait([centroids], training, rows=[IVF_TRAIN_ITERATIONS], counter=counter, unit="iterations")
        nlist = ivf_nlist(n)
        log.info("%s: IVF quantizer of %d cells trained on %d rows, %.1fs", stage, nlist,
                 n if rows is None else rows.size, time.perf_counter() - t0)
        if adaptive and exact_on_miss(n) and n > k + 1:
            # as the core: before the rows' cells and the index, a target out of the widest probing's
            # reach is searched exactly (1M rows' level 1: ~3 s of cells, index and searches saved)
            cap = margin_probe_cap(nlist, n)
            reach, *exact = _ivf_reach.remote(offsets, recall_rows(n, recall_sample, seed), k, centroids, cap, *x_refs)
            reach = ray.get(reach)
            if reach < recall_target:
                info = {"knn_method": method}
                missed_target_goes_exact(n, reach, recall_target, cap, nlist, stage=stage, info=info,
                                         margin=PROBE_MARGINS[-1])
                return self_join(x_refs, offsets, exact_k or k, stage), info, list(actors or [])
        # each row's best cells, once: column 0 files the row in its cell's list, the first nprobe are
        # the cells it probes as a query (a tuned number above the width costs the search a second product)
        nprobe = min(nlist, min(probe_cap(nlist, n), PROBES_FIRST_PASS) if tuning else IVF_NPROBE)
        t0 = time.perf_counter()
        cells = [_cell_probes.remote(x_refs[s], lo, hi, centroids, nprobe, adaptive) for s, lo, hi in chunks]
        probes, gaps = [c[0] for c in cells], [c[1] for c in cells]
        progress.wait(probes, f"{stage} IVF cells", rows=[hi - lo for _, lo, hi in chunks])
        log.info("%s: the %d best of %d IVF cells of %d rows, %.1fs", stage, nprobe, nlist, n, time.perf_counter() - t0)
        probe_refs = [[p for p, (s_, _, _) in zip(probes, chunks) if s_ == s] for s in range(len(x_refs))]
    info = {"knn_method": method}
    self_joined = not ray.cluster_resources().get("GPU")  # exact on CPU: no index, the table joined with itself
    depth = exact_k or k
    if method == "exact" and self_joined:
        return self_join(x_refs, offsets, depth, stage), info, list(actors or [])
    t0 = time.perf_counter()
    pairs = index_actors(x_refs, offsets, method, centroids, nprobe, probe_refs=probe_refs,
                         stage=f"{stage} index build", counter=counter, actors=actors)
    log.info("%s: %s index of %d rows built in %d shard(s), %.1fs", stage, method, n, len(x_refs),
             time.perf_counter() - t0)
    measure = method != "exact" and recall_sample > 0
    if measure:  # the sample's exact neighbours: for the tuning (before the search) or the recall (after)
        rows = recall_rows(n, recall_sample, seed)
        queries = _gather.remote(offsets, rows, *x_refs)
        # the sample's own rows are in the results; the recall uses the k-th best of k + 1
        exact_nbr, exact_sim = exact or _merge.remote(len(pairs), k + 1, None,
                                                      *shard_searches(pairs, queries, k + 1, True))
        if recall_target is not None:
            t0 = time.perf_counter()
            chunk_starts = np.array([offsets[s] + lo for s, lo, _ in chunks] + [n], dtype=np.int64)
            sample_probes = _gather.remote(chunk_starts, rows, *probes)
            sample_gaps = _gather.remote(chunk_starts, rows, *gaps) if adaptive else None
            margin, nprobe, info["knn_recall"], mean = _tune(queries, rows, exact_nbr, exact_sim, pairs, k,
                                                             recall_target, nlist, n, sample_probes, sample_gaps,
                                                             centroids)
            if info["knn_recall"] >= recall_target and adaptive:
                log.info("%s: IVF cells within %.4f of each row's best probed (%.1f of %d a row on average, at most "
                         "%d) for recall %.3f >= %.2f (%d sampled rows), %.1fs", stage, margin, mean, nlist, nprobe,
                         info["knn_recall"], recall_target, rows.size, time.perf_counter() - t0)
            elif info["knn_recall"] >= recall_target:
                log.info("%s: %d of %d IVF cells probed for recall %.3f >= %.2f (%d sampled rows), %.1fs", stage,
                         nprobe, nlist, info["knn_recall"], recall_target, rows.size, time.perf_counter() - t0)
            # as the core: a table small enough is searched exactly
            elif missed_target_goes_exact(n, info["knn_recall"], recall_target, nprobe, nlist, stage=stage,
                                          info=info, margin=margin):
                method, centroids, nprobe, margin = "exact", None, 0, None
    if method == "ivf":
        info["knn_nprobe"] = int(nprobe)
        if margin is not None:
            info.update(knn_probe_margin=margin, knn_probes_mean=round(mean, 2))
    elif self_joined:
        return self_join(x_refs, offsets, depth, stage), info, [a for a, _ in pairs]
    else:
        k = depth  # exact on GPU: the lists as deep
    probe_pairs = IVF_PROBE_PAIRS if method == "ivf" else SEARCH_CHUNK  # exact: one call (nprobe 0)
    results = [_search_rows(x_refs[s], lo, hi, int(offsets[s]), pairs, k, nprobe, method == "exact",
                            probes[c] if method == "ivf" else None, probe_pairs,
                            (margin, gaps[c], math.ceil(2 * mean)) if margin is not None else None)
               for c, (s, lo, hi) in enumerate(chunks)]
    progress.wait([r[0] for r in results], stage, rows=[hi - lo for _, lo, hi in chunks])
    graph, _ = concat_graph.remote(len(results), *[r[0] for r in results], *[r[1] for r in results])
    ray.wait([graph], fetch_local=False)
    if measure and "knn_recall" not in info:
        info["knn_recall"] = ray.get(_recall.remote(graph, rows, exact_nbr, exact_sim, k))
    return graph, info, [a for a, _ in pairs]


def self_join(x_refs: list, offsets: np.ndarray, k: int, stage: str = "kNN"):
    """Exact kNN graph of the sharded table with itself (:mod:`agc_ray.core.selfjoin`: each pair's
    similarity once), in tasks over ranges of blocks of equal work, merged per shard; the core's graph.

    Returns a ref to ``(nbr, sim)`` (n, k).
    """
    import ray

    n = int(offsets[-1])
    t0 = time.perf_counter()
    ranges = balanced_ranges(n, max(1, 2 * len(x_refs)))
    joins = [_join_range.remote(offsets, k, b0, b1, *x_refs) for b0, b1 in ranges]
    nb = n_blocks(n)
    progress.wait([j[0] for j in joins], f"{stage} (exact)", rows=[sum(nb - i for i in range(b0, b1)) for b0, b1 in ranges],
                  unit="block pairs")
    starts = [b0 for b0, _ in ranges]
    rows = [_merge_best.remote(n, k, int(offsets[s]), int(offsets[s + 1]), starts,
                               *[j[0] for j in joins], *[j[1] for j in joins]) for s in range(len(x_refs))]
    graph, _ = concat_graph.remote(len(rows), *[r[0] for r in rows], *[r[1] for r in rows])
    ray.wait([graph], fetch_local=False)
    log.info("%s: exact self-join of %d rows (%d block pairs in %d tasks), %.1fs", stage, n, nb * (nb + 1) // 2,
             len(ranges), time.perf_counter() - t0)
    return graph


@lazy_remote(num_cpus=1, num_returns=2)
def _join_range(offsets, k: int, b0: int, b1: int, *x_parts):
    """:func:`~agc_ray.core.selfjoin.join_range` of blocks ``b0:b1`` (one CPU: its products are BLAS's)."""
    import torch

    torch.set_num_threads(1)
    return join_range(_rows_of(offsets, x_parts), int(offsets[-1]), k, b0, b1)


@lazy_remote(num_cpus=1, num_returns=2)
def _merge_best(n: int, k: int, lo: int, hi: int, starts: list, *parts):
    """Rows ``lo:hi`` of the self-join's graph from every range's result."""
    m = len(starts)
    return merge_best(n, k, [(b0, s, i) for b0, s, i in zip(starts, parts[:m], parts[m:])], lo, hi)


def sharded_coarse_graph(x_refs: list, offsets: np.ndarray, k: int, below_graph, below_level, *, seed: int,
                         recall_sample: int = 0, recall_target: float | None = None, stage: str = "kNN"):
    """The next level's kNN graph from the level below, as :func:`agc_ray.core.coarse.coarse_graph`
    computes it, one task per shard of the next level's nodes (the same graph whatever the shards).

    Args:
        x_refs, offsets: the next level's node shards (unit features) and their bounds.
        below_graph: ref to the level below's ``(nbr, sim)``; below_level: ref to its clusters
            (:func:`~agc_ray.distributed.level.global_components`' ``comp``).
        recall_sample, recall_target: as :func:`sharded_knn_graph` (both needed to measure).

    Returns:
        ``(graph, info)``: a ref to ``(nbr, sim)`` (n, k), or None when the recall target was missed
        (``info`` holds the recall reached).
    """
    import ray

    n = int(offsets[-1])
    bounds = [(int(offsets[s]), int(offsets[s + 1])) for s in range(len(x_refs))]
    target = recall_target if recall_sample > 0 else None
    kth = rows = None
    t0 = time.perf_counter()

    def reported(measured: float, rounds: int):  # the line and the info of a measured graph
        log.info("%s: graph from the level below, recall %.3f (target %.2f) after %d round(s), %.1fs", stage,
                 measured, target, rounds, time.perf_counter() - t0)
        return {"knn_method": "coarse", "knn_rounds": rounds, "knn_recall": measured}

    if target is not None:
        rows = recall_rows(n, recall_sample, seed)
        kth = _exact_kth.remote(rows, k, *x_refs)
        first = ray.get(_first_round_recall.remote(offsets, rows, kth, k, below_graph, below_level, *x_refs))
        if out_of_reach(target, first):  # the whole first graph would miss too, with no round to try
            return None, reported(first, 0)
    parts = [_coarse_rows.remote(offsets, lo, hi, k, below_graph, below_level, *x_refs) for lo, hi in bounds]
    rounds, measured = 0, None
    while True:
        progress.wait([p[0] for p in parts], f"{stage} (coarse, round {rounds})", rows=[hi - lo for lo, hi in bounds])
        graph, _ = concat_graph.remote(len(parts), *[p[0] for p in parts], *[p[1] for p in parts])
        if target is not None:
            measured = ray.get(_graph_recall.remote(graph, rows, kth))
        if not refine_more(target, measured, rounds):
            break
        parts = [_refine_rows.remote(offsets, lo, hi, graph, *x_refs) for lo, hi in bounds]
        rounds += 1
    if measured is None:
        return graph, {"knn_method": "coarse", "knn_rounds": rounds}
    info = reported(measured, rounds)
    return (None if measured < target else graph), info


def sharded_subset_graph(x_refs: list, offsets: np.ndarray, k: int, below_deep, below_level, *, stage: str = "kNN"):
    """The next level's exact graph from the level below's exact lists, as
    :func:`agc_ray.core.subset.subset_graph` derives it: the lists filtered in one task, the rows left short
    rescanned in tasks over whole blocks of the core's grid (the same graph whatever the tasks).

    Args:
        x_refs, offsets: the next level's node shards (unit features) and their bounds.
        below_deep: ref to the level below's exact lists ``(nbr, sim)`` (n, depth); below_level: ref to its
            clusters (:func:`~agc_ray.distributed.level.global_components`' ``peaks``).

    Returns:
        ``(graph, deep, info)``: refs to the level's ``(nbr, sim)`` (C, k) and its lists (C, depth), and
        ``{"knn_method": "derived", "knn_recall": 1.0, "knn_rescanned"}``; None when too many rows would be
        rescanned (:func:`~agc_ray.core.subset.too_many_rescans`).
    """
    import ray

    n = int(offsets[-1])
    t0 = time.perf_counter()
    lists, short = _subset_lists.remote(below_deep, below_level, k)
    rows, depth = ray.get(short)  # (R,) node ids: small
    if too_many_rescans(rows.size, n):
        return None
    block = subset.RESCAN_BLOCK  # read here, passed on: the tasks cut the grid as the driver does
    nb = rescan_blocks(rows.size, block)
    cuts = np.unique(np.linspace(0, nb, min(nb, 2 * len(x_refs)) + 1).round().astype(int))
    parts = [_rescan_rows.remote(offsets, rows, depth, b0, b1, block, *x_refs) for b0, b1 in zip(cuts[:-1], cuts[1:])]
    progress.wait([p[0] for p in parts], f"{stage} (rescan)", rows=[min(b1 * block, rows.size) - b0 * block
                                                                    for b0, b1 in zip(cuts[:-1], cuts[1:])])
    graph, deep = _assemble_subset.remote(lists, rows, k, *[p[0] for p in parts], *[p[1] for p in parts])
    ray.wait([graph], fetch_local=False)
    log.info("%s: derived from the level below's exact lists, %d of %d rows rescanned, %.1fs", stage, rows.size, n,
             time.perf_counter() - t0)
    return graph, deep, {"knn_method": "derived", "knn_recall": 1.0, "knn_rescanned": int(rows.size)}


@lazy_remote(num_cpus=1, num_returns=2)
def _subset_lists(below_deep, below_level, k: int):
    """:func:`~agc_ray.core.subset.subset_lists` of the clusters' peaks, and the rows left short with
    the lists' depth."""
    nbr, sim = below_deep
    peaks = below_level["peaks"]
    out_nbr, out_sim, kept = subset_lists(nbr, sim, peaks, nbr.shape[1])
    return (out_nbr, out_sim), (short_rows(kept, k, peaks.size), nbr.shape[1])


@lazy_remote(num_cpus=1, num_returns=2)
def _rescan_rows(offsets, rows, depth: int, b0: int, b1: int, block: int, *x_parts):
    """:func:`~agc_ray.core.subset.rescan_rows` of blocks ``b0:b1`` (one CPU: its products are BLAS's)."""
    import torch

    torch.set_num_threads(1)
    return rescan_rows(_rows_of(offsets, x_parts), int(offsets[-1]), rows, depth, b0, b1, block)


@lazy_remote(num_cpus=1, num_returns=2)
def _assemble_subset(lists, rows, k: int, *parts):
    """The derived lists with the rescanned rows written in: ``((nbr, sim) (C, k), (nbr, sim) (C, depth))``."""
    m = len(parts) // 2
    nbr, sim = lists[0].copy(), lists[1].copy()  # the object store's arrays are read-only
    if rows.size:
        nbr[rows], sim[rows] = np.concatenate(parts[:m]), np.concatenate(parts[m:])
    return split_deep(nbr, sim, k)[:2], (nbr, sim)


def _rows_of(offsets, x_parts):
    parts = dict(enumerate(x_parts))
    return lambda ids: gather_rows(parts, offsets, ids)


@lazy_remote(num_cpus=1, num_returns=2)
def _coarse_rows(offsets, lo: int, hi: int, k: int, below_graph, below_level, *x_parts):
    """:func:`~agc_ray.core.coarse.coarse_rows` of nodes ``lo:hi`` (the shards are direct arguments)."""
    return coarse_rows(_rows_of(offsets, x_parts), int(offsets[-1]), below_graph[0], below_level["comp"], k, lo, hi)


@lazy_remote(num_cpus=1)
def _first_round_recall(offsets, rows, kth, k: int, below_graph, below_level, *x_parts):
    """:func:`~agc_ray.core.coarse.first_round_recall` of the sampled nodes ``rows``."""
    return first_round_recall(_rows_of(offsets, x_parts), int(offsets[-1]), below_graph[0], below_level["comp"], k,
                              rows, kth)


@lazy_remote(num_cpus=1, num_returns=2)
def _refine_rows(offsets, lo: int, hi: int, graph, *x_parts):
    """:func:`~agc_ray.core.coarse.refine_rows` of nodes ``lo:hi``."""
    return refine_rows(_rows_of(offsets, x_parts), graph[0], lo, hi)


@lazy_remote(num_cpus=1)
def _exact_kth(rows, k: int, *x_parts):
    """:func:`~agc_ray.core.recall.exact_kth` over the whole table (the shards concatenated: the same product)."""
    return exact_kth(np.concatenate(x_parts), rows, k)


@lazy_remote(num_cpus=1, num_returns=3)
def _ivf_reach(offsets, rows, k: int, centroids, nprobe: int, *x_parts):
    """:func:`~agc_ray.core.recall.probe_reach` of the seeded sample ``rows`` over the sharded table, and
    their exact search ``(ids, sim)`` (Q, k + 1), self kept: each shard searched as an index actor
    searches exactly (:class:`~agc_ray.core.knn.FlatView`), merged by :func:`~agc_ray.distributed.index.merge_topk`."""
    parts = dict(enumerate(x_parts))
    queries = gather_rows(parts, offsets, rows)
    found = [FlatView(part).search(queries, min(k + 1, part.shape[0])) for part in x_parts]
    sim, idx = merge_topk([f[0] for f in found], [np.where(f[1] >= 0, f[1] + offsets[s], -1) for s, f in enumerate(found)],
                          k + 1)
    reach = probe_reach(queries, rows, sim, idx, gather_rows(parts, offsets, idx.reshape(-1)), centroids, nprobe, k)
    return reach, idx, sim


@lazy_remote(num_cpus=1)
def _graph_recall(graph, rows, kth):
    nbr, sim = graph
    return recall_at(sim[rows], nbr[rows] >= 0, kth)


@lazy_remote(num_cpus=1)
def _gather(offsets, rows, *parts):
    """Rows of the sharded table; the parts are direct arguments (see :func:`agc_ray.distributed.level.shard_inputs`)."""
    return gather_rows(dict(enumerate(parts)), offsets, rows)


@lazy_remote(num_cpus=1)
def _train_centroids(sample, n: int, seed: int, progress=None):
    """:func:`~agc_ray.core.knn.ivf_centroids`, reporting iterations to ``progress = (counter, stage)``."""
    import faiss
    import ray

    from agc_ray.distributed.progress import reporter

    before = faiss.omp_get_max_threads()  # the worker process runs other tasks afterwards
    faiss.omp_set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    try:
        return ivf_centroids(sample, n, seed, report=reporter(*progress) if progress else None)
    finally:
        faiss.omp_set_num_threads(before)


@lazy_remote(num_cpus=1, num_returns=2)  # a product as long as the search's: two at once on a CPU only share it
def _cell_probes(x_shard, lo: int, hi: int, centroids, nprobe: int, gaps: bool):
    """:func:`~agc_ray.core.cells.cell_probes` of rows ``lo:hi`` of one shard, and their gaps (None
    without ``gaps``: only a probe margin reads them)."""
    return cell_probes(x_shard[lo:hi], centroids, nprobe, gaps=True) if gaps else \
        (cell_probes(x_shard[lo:hi], centroids, nprobe), None)


def _search_rows(x_shard, lo: int, hi: int, offset: int, actors, k: int, nprobe: int = 0, exact: bool = False,
                 probes=None, probe_pairs: int | None = None, margin: tuple | None = None):
    """Refs to the kNN graph rows ``(nbr, sim)`` of queries ``lo:hi`` of one shard: every index actor
    searches them, in calls of at most ``probe_pairs`` (row, probed cell) pairs
    (:func:`~agc_ray.core.knn.probe_blocks`; default: one call; rows are searched on their own, so
    any split gives the same rows), and a :func:`_merge` task merges the calls' results.
    ``margin = (margin, gaps, probes a row)``: each row probes its cells within the margin (``gaps``
    the ref of the rows' gaps to their best cell), the calls sized by that many probes a row.

    The driver calls the actors with refs it owns (the shard ``x_shard`` and the rows' best cells
    ``probes``), so that no task waits on the actors while it holds a CPU, and no task puts.
    """
    per_row = nprobe if margin is None else margin[2]
    blocks = probe_blocks(lo, hi, per_row, probe_pairs) if probe_pairs else [(lo, hi)]
    found = [ref for a, b in blocks
             for ref in shard_searches(actors, x_shard, k + 1, exact, probes, nprobe, (a, b), (a - lo, b - lo),
                                       *(margin[:2] if margin else ()))]
    return _merge.remote(len(actors), k + 1, offset + lo, *found)


@lazy_remote(num_cpus=1, num_returns=2)
def _merge(shards: int, kk: int, first_id, *found):
    """The index actors' results ``found`` merged (:func:`~agc_ray.distributed.index.merge_topk`): one
    ``(sim, ids)`` per shard for each block of queries, blocks in row order, shards in shard order.

    ``first_id``: the global id of the first query (consecutive rows) or each query's id (an array), whose
    self match is dropped (:func:`~agc_ray.core.knn.drop_self`): ``(nbr, sim)`` (Q, kk - 1); None: the
    merged ``(ids, sim)`` (Q, kk), self matches kept.
    """
    blocks = [found[b:b + shards] for b in range(0, len(found), shards)]
    sim, idx = (np.concatenate(parts) for parts in zip(*[merge_topk([f[0] for f in blk], [f[1] for f in blk], kk)
                                                         for blk in blocks]))
    if first_id is None:
        return idx, sim
    if np.isscalar(first_id):
        first_id = np.arange(idx.shape[0], dtype=np.int64) + int(first_id)
    return drop_self(idx, sim, first_id)


@lazy_remote(num_cpus=1)
def _recall(graph, sample_rows, exact_nbr, exact_sim, k):
    """Share of the sampled rows' neighbours whose similarity reaches the exact k-th best (as core.knn_recall)."""
    nbr, sim = graph
    n_true = min(k, int(nbr.shape[0]) - 1)
    if n_true <= 0:
        return 1.0
    kth = kth_without_self(exact_sim, exact_nbr, sample_rows, n_true)
    return recall_at(sim[sample_rows, :n_true], nbr[sample_rows, :n_true] >= 0, kth)


def _tune(queries, sample_rows, exact_nbr, exact_sim, actors, k, target, nlist, n, probes, gaps=None, centroids=None):
    """The search effort tuned over the sharded index, run by the driver (each step's actor calls take the
    sample's refs, a :func:`_merge` task their results), as the core tunes it: with ``gaps`` (the sample's
    probe gaps) a probe margin (:func:`agc_ray.core.recall.tune_margin`; the driver counts the sample's
    probes itself, :func:`~agc_ray.core.cells.probe_pairs` of its rows, as every actor computes them),
    else a number of probes (:func:`agc_ray.core.recall.tune_nprobe`).

    Returns:
        ``(margin or None, nprobe, recall, mean probes or None)``.
    """
    import ray

    kth = ray.get(_sample_kth.remote(exact_sim, exact_nbr, sample_rows, k))  # an IVF index has more than k rows

    def searched(nprobe, margin=None):
        return ray.get(_merge.remote(len(actors), k + 1, sample_rows, *shard_searches(
            actors, queries, k + 1, False, probes, nprobe, margin=margin, gaps=gaps)))

    if gaps is None:
        nprobe, measured = tune_nprobe(searched, kth, target, nlist, n)
        return None, nprobe, measured, None
    q, p, g, c = ray.get([queries, probes, gaps, centroids])

    def searched_and_counted(margin, nprobe):
        return (*searched(nprobe, margin), probe_pairs(p, nprobe, margin, g, q, c)[0].size)

    return tune_margin(searched_and_counted, kth, target, nlist, n, exact_on_miss=exact_on_miss(n))


@lazy_remote(num_cpus=1)
def _sample_kth(exact_sim, exact_nbr, sample_rows, k):
    """:func:`~agc_ray.core.recall.kth_without_self` of the sample's exact search."""
    return kth_without_self(exact_sim, exact_nbr, sample_rows, k)
