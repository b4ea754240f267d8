"""The index of a sharded kNN search: one Ray actor per node shard, searched with a top-k merge.

Every :class:`ShardIndexActor` holds a :class:`ShardIndex` over the rows of one contiguous range of
nodes (IVF: grouped by cell and searched cell by cell as the core does,
:class:`agc_ray.core.cells.CellLists`; exact or on GPU: a faiss index). The caller sends each actor the
same queries (:func:`shard_searches`) and merges their k + 1 best by decreasing similarity
(:func:`merge_topk`, stable, so ties go to the lower shard); :func:`agc_ray.core.knn.drop_self` then
removes the self match exactly as on a single index (:mod:`agc_ray.distributed.knn`).
"""

from __future__ import annotations

import numpy as np

from agc_ray.core.cells import CellLists, probe_pairs, query_probes
from agc_ray.core.knn import FlatView, ivf_index, to_gpu, use_gpu
from agc_ray.distributed import progress
from agc_ray.distributed.remote import release_heap

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

    def search(self, source: list, queries: np.ndarray, kk: int, exact: bool = False, probes=None, nprobe: int = 0,
               rows: tuple[int, int] | None = None, probe_rows: tuple[int, int] | None = None,
               margin: float | None = None, gaps=None):
        """:meth:`ShardIndex.search` of ``queries[rows[0]:rows[1]]`` (all rows when None) probing their
        first ``nprobe`` cells of ``probes[probe_rows[0]:probe_rows[1]]`` (IVF; see
        :func:`~agc_ray.core.cells.query_probes`), or with a ``margin`` their cells within it of their best,
        at most ``nprobe`` (:func:`~agc_ray.core.cells.probe_pairs`; ``gaps``: the probes' gaps, a ref like
        ``probes``).

        ``queries`` and ``probes`` come as refs that the caller owns (a shard, a chunk's probes), resolved
        by Ray: the caller puts nothing per call, and a restarted actor gets them back by lineage.
        """
        index = self._index(source)
        queries = np.ascontiguousarray(queries if rows is None else queries[rows[0]:rows[1]], dtype=np.float32)
        if exact or index.centroids is None:
            probes = None
        elif margin is not None:
            if probe_rows is not None:
                probes, gaps = probes[probe_rows[0]:probe_rows[1]], gaps[probe_rows[0]:probe_rows[1]]
            probes = probe_pairs(probes, nprobe, margin, gaps, queries, index.centroids)
        else:
            probes = query_probes(queries, probes if probe_rows is None else probes[probe_rows[0]:probe_rows[1]],
                                  index.centroids, nprobe)
        return index.search(queries, kk, exact, probes)

    def release(self) -> None:
        """Drop the index (its cell order, the shard and the searches' freed heap) once the level's graph
        is complete; a later call for this level (Ray reconstructing a lost graph) rebuilds it."""
        self.index, self.key = None, None
        release_heap()

    def ivf_state(self):
        """``(centroids, IVF cell of each shard row)`` for the output's assignment state; None if not IVF
        (or if the actor was restarted and has not rebuilt its index)."""
        from agc_ray.distributed.state import ivf_state

        if self.index is None:
            return None
        if isinstance(self.index.index, CellLists):
            return self.index.centroids, self.index.index.cells().astype(np.int32)
        return ivf_state(self.index.index)


def shard_searches(actors, queries, kk: int, exact: bool = False, probes=None, nprobe: int = 0,
                   rows: tuple[int, int] | None = None, probe_rows: tuple[int, int] | None = None,
                   margin: float | None = None, gaps=None) -> list:
    """One :meth:`ShardIndexActor.search` call per ``(actor, source)`` pair of :func:`index_actors`:
    refs to each shard's ``(sim, ids)`` (Q, kk) for :func:`merge_topk` (in shard order).

    ``queries``, ``probes``: refs (a shard and its rows' cells, or a put by the driver), resolved by
    Ray in each actor; ``rows``, ``probe_rows``: the row ranges of them searched; ``margin``, ``gaps``:
    see :meth:`ShardIndexActor.search`.
    """
    return [a.search.remote(source, queries, kk, exact, probes, nprobe, rows, probe_rows, margin, gaps)
            for a, source in actors]


class MergedIndex:
    """Searches every shard actor from the driver, which puts the queries once for all shards.

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
        assign = None
        if self.centroids is not None:
            assign = ray.put(query_probes(queries, probes, self.centroids, self.nprobe))
        found = ray.get(shard_searches(self.actors, ray.put(queries), kk, self.exact, assign, self.nprobe))
        return merge_topk([f[0] for f in found], [f[1] for f in found], kk)


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


def index_actors(x_refs: list, offsets: np.ndarray, method: str, centroids, nprobe: int, *,
                 probe_refs: list | None = None, stage: str = "kNN index", counter=None,
                 actors: list | None = None) -> list:
    """One :class:`ShardIndexActor` per node shard (GPU actors when the cluster has GPUs; restartable).

    ``probe_refs``: (ivf) per shard, the refs of its row chunks' best cells (:func:`~agc_ray.distributed.knn.sharded_knn_graph`'s).
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
