"""An index sharded across Ray actors, searched with a top-k merge.

Every shard actor holds the rows of one contiguous range of nodes (IVF: grouped by cell and searched
cell by cell as the core does, :class:`agc_ray.core.cells.CellLists`; exact or on GPU: a faiss index). A query block is searched against
every shard for its k + 1 best, the candidates are merged by decreasing similarity (stable, so ties go
to the lower shard) and :func:`agc_ray.core.knn.search` removes the self match exactly as on a single
index. With ``exact`` search the graph therefore equals a single ``IndexFlatIP``'s.

``ivf``: the coarse quantizer is trained once, on the same seeded sample of rows that
:func:`agc_ray.core.knn.build_index` uses (:func:`~agc_ray.core.knn.ivf_train_rows`,
:func:`~agc_ray.core.knn.ivf_centroids`), and shared by all shards; each shard probes the same
cells, so the merged result equals a single IVF index with that quantizer, whatever the shard count.
Each row's best cells are computed once, by tasks over chunks of rows: column 0 files the row in its
shard's lists, the first ``nprobe`` are the cells it scans as a query.
With a recall target, the cells probed are tuned as :func:`agc_ray.core.knn.knn_graph` tunes them (same
seeded sample rows, same exact k-th similarities, same ladder), so the number chosen is the same too.

Above level 0, :func:`sharded_coarse_graph` first searches the graph from the level below (the core's
:mod:`agc_ray.core.coarse`, one task per shard of nodes, the same rounds and recall), and the index is
built only when that misses the target.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from agc_ray.core.cells import CellLists, cell_probes
from agc_ray.core.coarse import coarse_rows, refine_more, refine_rows
from agc_ray.core.selfjoin import balanced_ranges, join_range, merge_best, n_blocks
from agc_ray.core.knn import (IVF_NPROBE, IVF_TRAIN_ITERATIONS, PROBES_FIRST_PASS, FlatView, drop_self, exact_kth,
                              ivf_centroids, ivf_index, ivf_nlist, ivf_train_rows, kth_without_self, probe_blocks,
                              missed_target_goes_exact, probe_cap, recall_at, recall_rows, resolve_method, to_gpu,
                              tune_nprobe, use_gpu)
from agc_ray.distributed import progress
from agc_ray.distributed.remote import lazy_remote
from agc_ray.distributed.shards import concat_graph, gather_rows

log = logging.getLogger("agc_ray")

JOB_METHODS = ("auto", "exact", "ivf")
ADD_CHUNK = 65536  # rows per index.add: progress while a shard's index is built


class ShardIndex:
    """The index over one shard's unit rows (global ids ``offset + local row``): IVF cell lists searched
    cell by cell (:class:`~agc_ray.core.cells.CellLists`, as the core searches), a faiss index on GPU or
    for exact search.

    Held by a :class:`ShardIndexActor`, which rebuilds it from the (reconstructed) shard object when
    Ray restarts the actor on a node loss.

    Args:
        x: (n_s, D) unit rows of the shard.
        offset: global id of the shard's first row.
        method: 'exact' or 'ivf'.
        centroids: (nlist, D) shared IVF centroids (ivf only).
        nprobe: IVF cells probed per query.
        probes: (ivf) the shard rows' best cells, :func:`~agc_ray.core.cells.cell_probes` of consecutive
            row chunks (column 0: each row's cell).
    """

    def __init__(self, x: np.ndarray, offset: int, method: str, centroids: np.ndarray | None = None, nprobe: int = 0,
                 probes: list | None = None, report=None):
        import faiss

        self.offset, self.x, self.centroids = int(offset), x, centroids
        gpu = use_gpu("auto")  # a GPU actor with faiss-gpu
        if method == "ivf" and not gpu:
            cells = np.concatenate([p[:, 0] for p in probes]) if probes else np.zeros(0, dtype=np.int64)
            self.index = CellLists(x, cells, centroids.shape[0], offset)
            if report is not None:
                report(x.shape[0])
            return
        index = faiss.IndexFlatIP(x.shape[1]) if method == "exact" else ivf_index(centroids, nprobe)
        if gpu:
            index = to_gpu(index)
        for lo in range(0, x.shape[0], ADD_CHUNK):  # same index as one add; ``report`` gets each chunk's rows
            index.add(np.ascontiguousarray(x[lo:lo + ADD_CHUNK], dtype=np.float32))
            if report is not None:
                report(min(ADD_CHUNK, x.shape[0] - lo))
        self.index = index

    def ready(self) -> int:
        """Rows indexed (a call to wait for the constructor)."""
        return self.index.ntotal

    def search(self, queries: np.ndarray, kk: int, exact: bool = False, probes=None) -> tuple[np.ndarray, np.ndarray]:
        """``(sim, global ids)`` of the kk best rows of this shard for each query (-1 padded).

        ``probes``: (Q, nprobe) the queries' IVF cells, best first, computed once for all shards.
        """
        import faiss

        if isinstance(self.index, CellLists) and not exact:
            return self.index.search(queries, probes, kk)  # global ids already
        if probes is not None and not exact and isinstance(self.index, faiss.IndexIVF):
            self.index.nprobe = probes.shape[1]  # the cells probed are the caller's (a tuned number)
            sim, idx = self.index.search_preassigned(queries, kk, np.ascontiguousarray(probes, dtype=np.int64), None)
        elif exact and not isinstance(self.index, (faiss.IndexFlatIP, getattr(faiss, "GpuIndexFlatIP", ()))):
            sim, idx = FlatView(self.x).search(queries, kk)
        else:
            sim, idx = self.index.search(queries, kk)
        return sim, np.where(idx >= 0, idx + self.offset, -1)


class ShardIndexActor:
    """Ray actor holding one :class:`ShardIndex`, built on first use from the refs that each call carries.

    Not from constructor arguments: Ray does not lineage-count actor creation arguments that live in
    the object store (ray-project/ray#53727), so a restarted actor could not get them back, and Ray
    says so with an error-level line. Every call brings ``source = [x_ref, centroids_ref, offset,
    method, nprobe]`` (refs the driver owns, nested so that they stay refs); a restarted actor (a node
    lost) rebuilds the same index on its next call, from lineage if the shard was lost too.

    One actor serves every level of a job (an actor is a process: starting one per shard and level
    cost seconds per level): a call whose source differs from the index held rebuilds it, so a late
    call for an earlier level (Ray reconstructing a lost graph) still searches that level's rows.
    """

    def __init__(self):
        self.index: ShardIndex | None = None
        self.key = None

    @staticmethod
    def _key(source: list):
        def key(v):
            if isinstance(v, list):
                return tuple(key(u) for u in v)
            return v.hex() if hasattr(v, "hex") and not isinstance(v, (int, float, str)) else v

        return key(source)

    def _index(self, source: list, progress=None) -> ShardIndex:
        key = self._key(source)
        if self.index is None or self.key != key:
            import ray

            from agc_ray.distributed.progress import reporter

            self.index = None  # the last level's index goes before the next is built
            x, centroids, offset, method, nprobe, probes = (ray.get(v) if isinstance(v, (ray.ObjectRef, list)) else v
                                                            for v in source)
            self.index = ShardIndex(x, offset, method, centroids, nprobe, probes,
                                    report=reporter(*progress) if progress else None)
            self.key = key
        return self.index

    def build(self, source: list, progress=None) -> int:
        """Build the index (rows added reported to ``progress = (counter, stage)``); rows indexed."""
        return self._index(source, progress).ready()

    def search(self, source: list, queries: np.ndarray, kk: int, exact: bool = False, probes=None):
        """:meth:`ShardIndex.search`."""
        return self._index(source).search(queries, kk, exact, probes)

    def release(self) -> None:
        """Drop the index (its cell lists are a copy of the shard's rows) once the level's graph is
        complete; a later call for this level (Ray reconstructing a lost graph) rebuilds it."""
        self.index, self.key = None, None

    def ivf_state(self):
        """``(centroids, IVF cell of each shard row)`` for the output's assignment state; None if not IVF
        (or if the actor was restarted and has not rebuilt its index)."""
        from agc_ray.distributed.state import ivf_state

        if self.index is None:
            return None
        if isinstance(self.index.index, CellLists):
            return self.index.centroids, self.index.index.cells().astype(np.int32)
        return ivf_state(self.index.index)


class MergedIndex:
    """Looks like a faiss index to :func:`agc_ray.core.knn.search`; searches every shard actor.

    ``actors``: ``(actor, source)`` pairs of :func:`index_actors`.
    """

    def __init__(self, actors, exact: bool = False, centroids: np.ndarray | None = None, nprobe: int = 0):
        self.actors = actors
        self.exact = exact
        self.centroids = None if exact else centroids
        self.nprobe = nprobe

    def search(self, queries: np.ndarray, kk: int, probes: np.ndarray | None = None):
        """``(sim, ids)`` (Q, kk) over every shard; ``probes`` (Q, >= nprobe): the queries' best cells,
        computed here (once for all shards) when not given."""
        import ray

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        qref = ray.put(queries)
        assign = None
        if self.centroids is not None:
            if probes is None or probes.shape[1] < self.nprobe:
                probes = cell_probes(queries, self.centroids, self.nprobe)
            assign = ray.put(np.ascontiguousarray(probes[:, :self.nprobe]))
        parts = ray.get([a.search.remote(source, qref, kk, self.exact, assign) for a, source in self.actors])
        return merge_topk([p[0] for p in parts], [p[1] for p in parts], kk)


def merge_topk(sims: list[np.ndarray], ids: list[np.ndarray], kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard results (each (Q, kk), sorted) into the global kk best, stable in shard order.

    Shapes:
        sims, ids: S arrays of (Q, kk) -> (Q, kk) float32 similarities, (Q, kk) int64 ids.
    """
    sim = np.concatenate(sims, axis=1)
    idx = np.concatenate(ids, axis=1)
    sim = np.where(idx >= 0, sim, -np.inf).astype(np.float32)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :kk]
    out_sim = np.take_along_axis(sim, order, axis=1)
    out_idx = np.take_along_axis(idx, order, axis=1)
    out_sim[out_idx < 0] = -np.finfo(np.float32).max
    return out_sim, out_idx


def search_shard(x_q: np.ndarray, query_ids, actors, k: int, exact: bool = False, centroids=None, nprobe: int = 0,
                 probes: np.ndarray | None = None):
    """kNN graph rows of the queries ``x_q`` (global ids ``query_ids``: an array, or the first of
    consecutive ids), self excluded: ``(nbr, sim)`` of shape (Q, k). ``probes``: their best IVF cells."""
    if np.isscalar(query_ids):
        query_ids = np.arange(x_q.shape[0], dtype=np.int64) + int(query_ids)
    sim, idx = MergedIndex(actors, exact, centroids, nprobe).search(x_q, k + 1, probes)
    return drop_self(idx, sim, query_ids)


# -- the sharded search, as Ray tasks and actors ----------------------------------------------------
def index_actors(x_refs: list, offsets: np.ndarray, method: str, centroids, nprobe: int, *,
                 probe_refs: list | None = None, stage: str = "kNN index", counter=None,
                 actors: list | None = None) -> list:
    """One :class:`ShardIndexActor` per node shard (GPU actors when the cluster has GPUs; restartable).

    ``probe_refs``: (ivf) per shard, the refs of its row chunks' best cells (:func:`_cell_probes`).
    ``actors``: actors of an earlier level to reuse (the first ones, one per shard; new ones are
    started for shards beyond them). Returns ``(actor, source)`` pairs, ``source`` the refs that the
    actor's calls carry. The build's progress is shown under ``stage`` (rows added, reported to
    ``counter`` if given).
    """
    import ray

    shards = len(x_refs)
    actors = list(actors or [])[:shards]
    if len(actors) < shards:
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0.0)
        # num_cpus=0: the actors compute only while the search tasks (which hold CPUs) wait on them, and
        # they stay alive after the kNN stage (Ray may need them to reconstruct a lost graph object):
        # reserving CPUs would starve the scoring tasks of the level.
        cls = ray.remote(ShardIndexActor).options(
            num_cpus=0, scheduling_strategy="SPREAD",
            num_gpus=min(1.0, gpus / shards) if gpus else 0,
            max_restarts=3, max_task_retries=3,
        )
        actors += [cls.remote() for _ in range(shards - len(actors))]
    probe_refs = probe_refs or [[] for _ in x_refs]
    pairs = [(a, [x, centroids, int(offsets[s]), method, nprobe, list(probe_refs[s])])
             for s, (a, x) in enumerate(zip(actors, x_refs))]
    builds = [a.build.remote(source, progress=(counter, stage) if counter else None) for a, source in pairs]
    progress.wait(builds, stage, rows=np.diff(offsets).astype(int).tolist(), counter=counter)
    ray.get(builds)
    return pairs


SEARCH_CHUNK = 16384  # query rows per search task: enough tasks for progress lines, few enough for overheads
#: Query rows per IVF search task: a shard's lists are scanned cell by cell for the task's queries, so
#: each call costs a loop over the cells; with 16K queries a cell got ~16 of them (small products).
IVF_SEARCH_CHUNK = 65536
#: (query, probed cell) pairs per call to the index actors: a task searches its rows in calls of
#: ``IVF_PROBE_PAIRS // nprobe`` rows, so that a tuned nprobe far above 16 (2048 of 16384 cells at
#: 10M rows of make_faces) does not multiply the probe arrays and the actors' per-cell query lists (a
#: 10M run's search tasks reached 8 GB and its actors 7 GB each at 64K rows a call, and were killed).
IVF_PROBE_PAIRS = IVF_SEARCH_CHUNK * 16


def sharded_knn_graph(x_refs: list, offsets: np.ndarray, k: int, method: str, seed: int, *,
                      recall_sample: int = 0, recall_target: float | None = None, stage: str = "kNN", counter=None,
                      actors: list | None = None) -> tuple:
    """kNN graph of rows sharded over the object store, searched over an index sharded across actors.

    Args:
        x_refs: refs to each shard's (n_s, D) unit float32 rows; shard s holds rows offsets[s]:offsets[s+1].
        k: neighbours per row (self excluded).
        method: 'auto', 'exact' or 'ivf' (the core's rule and IVF settings).
        seed: seed of the IVF training sample and k-means.
        recall_sample: rows whose neighbours are checked against exact search (approximate search only).
        recall_target: with ``recall_sample`` rows, the IVF cells probed are raised until their recall
            reaches it (:func:`agc_ray.core.knn.tune_nprobe`); None: :data:`~agc_ray.core.knn.IVF_NPROBE`.
        stage: the name of the progress lines (the queries are searched in tasks of ``SEARCH_CHUNK`` rows,
            ``IVF_SEARCH_CHUNK`` with IVF).
        counter: a :func:`~agc_ray.distributed.progress.row_counter` for progress inside the IVF training.
        actors: index actors of an earlier level to reuse (see :func:`index_actors`).

    Returns:
        ``(graph, info, actors)``: a ref to ``(nbr, sim)`` (n, k), ``{"knn_method", ["knn_nprobe",
        "knn_recall"]}``,
        and the index actors (the caller kills them once the graph is no longer needed: Ray may need
        them to reconstruct a lost graph object).
    """
    import ray

    n = int(offsets[-1])
    method = resolve_method(method, n)
    centroids, nprobe, probe_refs = None, 0, None
    sizes = np.diff(offsets).astype(int)
    step = IVF_SEARCH_CHUNK if method == "ivf" else SEARCH_CHUNK
    chunks = [(s, lo, min(lo + step, n_s)) for s, n_s in enumerate(sizes) for lo in range(0, max(1, n_s), step)]
    tuning = recall_sample > 0 and recall_target is not None
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
        # each row's best cells, once: column 0 files the row in its cell's list, the first nprobe are
        # the cells it probes as a query (a tuned number above the width costs the search a second product)
        nprobe = min(nlist, min(probe_cap(nlist, n), PROBES_FIRST_PASS) if tuning else IVF_NPROBE)
        t0 = time.perf_counter()
        probes = [_cell_probes.remote(x_refs[s], lo, hi, centroids, nprobe) for s, lo, hi in chunks]
        progress.wait(probes, f"{stage} IVF cells", rows=[hi - lo for _, lo, hi in chunks])
        log.info("%s: the %d best of %d IVF cells of %d rows, %.1fs", stage, nprobe, nlist, n, time.perf_counter() - t0)
        probe_refs = [[p for p, (s_, _, _) in zip(probes, chunks) if s_ == s] for s in range(len(x_refs))]
    info = {"knn_method": method}
    self_joined = not ray.cluster_resources().get("GPU")  # exact on CPU: no index, the table joined with itself
    if method == "exact" and self_joined:
        return self_join(x_refs, offsets, k, stage), info, list(actors or [])
    t0 = time.perf_counter()
    pairs = index_actors(x_refs, offsets, method, centroids, nprobe, probe_refs=probe_refs,
                         stage=f"{stage} index build", counter=counter, actors=actors)
    log.info("%s: %s index of %d rows built in %d shard(s), %.1fs", stage, method, n, len(x_refs),
             time.perf_counter() - t0)
    measure = method != "exact" and recall_sample > 0
    if measure:  # the sample's exact neighbours: for the tuning (before the search) or the recall (after)
        rows = recall_rows(n, recall_sample, seed)
        queries = _gather.remote(offsets, rows, *x_refs)
        exact_nbr, exact_sim = _search_shard_exact.remote(queries, pairs, k)
        if recall_target is not None:
            t0 = time.perf_counter()
            chunk_starts = np.array([offsets[s] + lo for s, lo, _ in chunks] + [n], dtype=np.int64)
            sample_probes = _gather.remote(chunk_starts, rows, *probes)
            nprobe, info["knn_recall"] = ray.get(_tune_nprobe.remote(
                queries, rows, exact_nbr, exact_sim, pairs, k, centroids, recall_target, nlist, n, sample_probes))
            if info["knn_recall"] >= recall_target:
                log.info("%s: %d of %d IVF cells probed for recall %.3f >= %.2f (%d sampled rows), %.1fs", stage,
                         nprobe, nlist, info["knn_recall"], recall_target, rows.size, time.perf_counter() - t0)
            elif missed_target_goes_exact(n, info["knn_recall"], recall_target, nprobe, nlist, stage=stage,
                                          info=info):  # as the core: a table small enough is searched exactly
                method, centroids, nprobe = "exact", None, 0
    if method == "ivf":
        info["knn_nprobe"] = int(nprobe)
    elif self_joined:
        return self_join(x_refs, offsets, k, stage), info, [a for a, _ in pairs]
    probe_pairs = IVF_PROBE_PAIRS if method == "ivf" else SEARCH_CHUNK  # exact: one call (nprobe 0)
    results = [_search_rows.remote(x_refs[s], lo, hi, int(offsets[s]), pairs, k, centroids, nprobe, method == "exact",
                                   probes[c] if method == "ivf" else None, probe_pairs)
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


@lazy_remote(num_cpus=0.5, num_returns=2)
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
    if target is not None:
        rows = recall_rows(n, recall_sample, seed)
        kth = _exact_kth.remote(rows, k, *x_refs)
    t0 = time.perf_counter()
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
    info = {"knn_method": "coarse", "knn_rounds": rounds}
    if measured is not None:
        info["knn_recall"] = measured
        log.info("%s: graph from the level below, recall %.3f (target %.2f) after %d round(s), %.1fs", stage,
                 measured, target, rounds, time.perf_counter() - t0)
    if target is not None and measured < target:
        return None, info
    return graph, info


def _rows_of(offsets, x_parts):
    parts = dict(enumerate(x_parts))
    return lambda ids: gather_rows(parts, offsets, ids)


@lazy_remote(num_cpus=0.5, num_returns=2)
def _coarse_rows(offsets, lo: int, hi: int, k: int, below_graph, below_level, *x_parts):
    """:func:`~agc_ray.core.coarse.coarse_rows` of nodes ``lo:hi`` (the shards are direct arguments)."""
    return coarse_rows(_rows_of(offsets, x_parts), int(offsets[-1]), below_graph[0], below_level["comp"], k, lo, hi)


@lazy_remote(num_cpus=0.5, num_returns=2)
def _refine_rows(offsets, lo: int, hi: int, graph, *x_parts):
    """:func:`~agc_ray.core.coarse.refine_rows` of nodes ``lo:hi``."""
    return refine_rows(_rows_of(offsets, x_parts), graph[0], lo, hi)


@lazy_remote(num_cpus=0.5)
def _exact_kth(rows, k: int, *x_parts):
    """:func:`~agc_ray.core.knn.exact_kth` over the whole table (the shards concatenated: the same product)."""
    return exact_kth(np.concatenate(x_parts), rows, k)


@lazy_remote(num_cpus=0.5)
def _graph_recall(graph, rows, kth):
    nbr, sim = graph
    return recall_at(sim[rows], nbr[rows] >= 0, kth)


@lazy_remote(num_cpus=0.5)
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


@lazy_remote(num_cpus=0.5)
def _cell_probes(x_shard, lo: int, hi: int, centroids, nprobe: int):
    """:func:`~agc_ray.core.cells.cell_probes` of rows ``lo:hi`` of one shard."""
    return cell_probes(x_shard[lo:hi], centroids, nprobe)


@lazy_remote(num_cpus=0.5, num_returns=2)
def _search_rows(x_shard, lo: int, hi: int, offset: int, actors, k: int, centroids=None, nprobe: int = 0,
                 exact: bool = False, probes=None, probe_pairs: int | None = None):
    """kNN graph rows of queries ``lo:hi`` of one shard (the shard and the rows' best cells are direct
    arguments: lineage), searched in calls of at most ``probe_pairs`` (row, probed cell) pairs
    (:func:`~agc_ray.core.knn.probe_blocks`; default: one call; rows are searched on their own, so
    any split gives the same rows)."""
    blocks = probe_blocks(lo, hi, nprobe, probe_pairs) if probe_pairs else [(lo, hi)]
    parts = [search_shard(x_shard[a:b], offset + a, actors, k, exact, centroids, nprobe,
                          None if probes is None else probes[a - lo:b - lo])
             for a, b in blocks]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@lazy_remote(num_cpus=0.5, num_returns=2)
def _search_shard_exact(queries, actors, k):
    sim, idx = MergedIndex(actors, exact=True).search(queries, k + 1)
    return idx, sim  # the sample's own rows are in the results; the recall uses the k-th best of k + 1


@lazy_remote(num_cpus=0.5)
def _recall(graph, sample_rows, exact_nbr, exact_sim, k):
    """Share of the sampled rows' neighbours whose similarity reaches the exact k-th best (as core.knn_recall)."""
    nbr, sim = graph
    n_true = min(k, int(nbr.shape[0]) - 1)
    if n_true <= 0:
        return 1.0
    kth = kth_without_self(exact_sim, exact_nbr, sample_rows, n_true)
    return recall_at(sim[sample_rows, :n_true], nbr[sample_rows, :n_true] >= 0, kth)


@lazy_remote(num_cpus=0.5)
def _tune_nprobe(queries, sample_rows, exact_nbr, exact_sim, actors, k, centroids, target, nlist, n, probes):
    """:func:`agc_ray.core.knn.tune_nprobe` over the sharded index: ``(nprobe, recall)``."""
    kth = kth_without_self(exact_sim, exact_nbr, sample_rows, k)  # an IVF index has more than k rows

    def search_sample(nprobe):
        return search_shard(queries, sample_rows, actors, k, False, centroids, nprobe, probes)

    return tune_nprobe(search_sample, kth, target, nlist, n)
