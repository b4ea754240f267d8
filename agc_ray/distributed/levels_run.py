"""The level loop of the clustering job over node shards, and its writes.

:func:`run_levels` runs :func:`agc_ray.core.hierarchy.build_hierarchy`'s loop over node shards: per
level a kNN graph (:meth:`Job.knn`), LANDER scoring and decode (:meth:`Job.decode`, see
:mod:`agc_ray.distributed.level`) and aggregation into the next level's shards (:meth:`Job.aggregate`).
Each level's assignments are written under the output's staging prefix as soon as they are known (with
``--previous``, once the stable ids are matched; see :mod:`agc_ray.distributed.stable`), then the
clusters, the assignment state and the metrics.
"""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from agc_ray.core.hierarchy import next_tau_not_lower, stop_reason
from agc_ray.core.knn import IVF_NPROBE, resolve_method
from agc_ray.core.recall import ivf_missed, ivf_skipped
from agc_ray.core import subset
from agc_ray.distributed import progress
from agc_ray.distributed import level as lv
from agc_ray.distributed.input import InputSchema
from agc_ray.distributed.knn import sharded_coarse_graph, sharded_knn_graph, sharded_subset_graph
from agc_ray.distributed.output import write_table
from agc_ray.distributed.remote import lazy_remote, ref_list
from agc_ray.distributed.shards import RowShards, shard_bounds
from agc_ray.distributed.stable import PreviousOutput, stable_id_maps

if TYPE_CHECKING:
    from agc_ray.distributed.job import JobConfig  # job.py imports this module

log = logging.getLogger("agc_ray")


@dataclass
class RunInput:
    """What one run reads: the table's footers, its rows as shards, and the ``--previous`` output (or None)."""

    schema: InputSchema
    rows: RowShards
    previous: PreviousOutput | None = None


@dataclass
class Levels:
    """What the level loop found, for the manifest.

    Attributes:
        records: per level, its stats, stable-id info and metrics (the manifest's ``levels``).
        taus, clusters: per level, the decode threshold and the number of clusters.
        stop: why the loop stopped (None: it ran every level).
        next_cluster_ids: the stable ids' counters (see :func:`~agc_ray.distributed.stable.stable_id_maps`).
    """

    records: list[dict]
    taus: list[float]
    clusters: list[int]
    stop: str | None
    next_cluster_ids: list


# -- remote helpers of the driver loop ------------------------------------------------------------------
@lazy_remote(num_cpus=1)
def _write_assignments(fs, path: str, ids, labels, id_map=None):
    import pyarrow as pa

    if id_map is not None:
        labels = id_map[labels]
    return write_table(fs, path, pa.table({"id": ids, "cluster_id": pa.array(labels, pa.int64())}))


@lazy_remote(num_cpus=1)
def _write_clusters(fs, path: str, level: dict, parent_comp, id_map, parent_map, *ids):
    import pyarrow as pa

    peak_ids = pa.concat_arrays(list(ids)).take(pa.array(level["peak_row"]))
    c = level["peaks"].size
    cluster_id = np.arange(c, dtype=np.int64) if id_map is None else id_map
    if parent_comp is not None and parent_map is not None:
        parent_comp = parent_map[parent_comp]
    parent = pa.nulls(c, pa.int64()) if parent_comp is None else pa.array(parent_comp, pa.int64())
    table = pa.table({"cluster_id": pa.array(cluster_id), "size": pa.array(level["size"]),
                      "peak_id": peak_ids, "parent_cluster_id": parent})
    return write_table(fs, path, table)


@lazy_remote(num_cpus=1)
def _evaluate(n_shards: int, *parts):
    from agc_ray.metrics import evaluate

    return evaluate(np.concatenate(parts[:n_shards]), np.concatenate(parts[n_shards:]))


# -- the job -------------------------------------------------------------------------------------------
class _Level:
    """Node shards of one level: offsets and object refs of x_id, x_sum (None at level 0), size, peak_row."""

    def __init__(self, offsets, x_id, x_sum=None, size=None, peak_row=None):
        self.offsets, self.x_id, self.x_sum, self.size, self.peak_row = offsets, x_id, x_sum, size, peak_row

    @property
    def n(self) -> int:
        return int(self.offsets[-1])

    def shard_rows(self) -> list[int]:
        return np.diff(self.offsets).astype(int).tolist()

    @property
    def shards(self) -> int:
        return len(self.x_id)

    def arrays(self) -> list[list]:
        """The sharded arrays that scoring reads: ``[x_id]`` at level 0, ``[x_id, x_sum, size]`` above."""
        return [self.x_id] if self.x_sum is None else [self.x_id, self.x_sum, self.size]


class Job:
    """One run: holds the cluster-side state (actors, refs) of :func:`run_job`."""

    def __init__(self, cfg: JobConfig, est, num_shards: int):
        self.cfg, self.est, self.num_shards = cfg, est, num_shards
        self.timings: dict[str, float] = {}
        self.actors = []
        self.counter = None
        self.schedule = None  # unsupervised without tau: the adaptive thresholds
        self.ivf_parts = []  # level 0's IVF cells per shard, fetched from the index actors for the state
        self.knn_method = None
        self.nprobe = None  # level 0's IVF cells probed per query (the most, with a margin)
        self.probe_margin = None  # level 0's IVF probe margin (None: nprobe cells a query)
        self._background = None  # ref of level 0's seeded background rows (chance similarity)
        self.ivf_missed = False  # a level's IVF search missed the recall target: the levels above search exactly
        self.deep = None  # ref of the level's exact lists deeper than k (the level above derives its graph)

    def _time(self, stage: str, t0: float) -> float:
        dt = time.perf_counter() - t0
        self.timings[stage] = self.timings.get(stage, 0.0) + dt
        return dt

    def knn(self, level: _Level, level_no: int, stats: dict, below=None):
        """The level's kNN graph as one object ``(nbr, sim)``: from the level below's graph where it holds
        the recall (``below = (graph, clusters)`` refs, above level 0, as the core), else searched over
        the sharded index."""
        import ray

        t0 = time.perf_counter()
        deep, self.deep = self.deep, None
        if below is not None and deep is not None:
            derived = sharded_subset_graph(level.x_id, level.offsets, self.est.k, deep, below[1],
                                           stage=f"level {level_no} kNN")
            if derived is not None:
                graph, self.deep, info = derived
                stats.update(info, knn_seconds=self._time("knn", t0))
                self.knn_method = info["knn_method"]
                log.info("level %d kNN: %d nodes, %d shards, derived, %.1fs", level_no, level.n, level.shards,
                         stats["knn_seconds"])
                return graph
            log.info("level %d kNN: %s", level_no, subset.searched_afresh(level.n))
        recall_sample = self.cfg.knn_recall_sample if level_no == 0 or self.est.knn_recall is not None else 0
        if below is not None and resolve_method(self.est.knn, level.n) == "ivf":
            graph, info = sharded_coarse_graph(
                level.x_id, level.offsets, self.est.k, *below, seed=self.est.seed, recall_sample=recall_sample,
                recall_target=self.est.knn_recall, stage=f"level {level_no} kNN")
            if graph is not None:
                stats.update(info, knn_seconds=self._time("knn", t0))
                self.knn_method = info["knn_method"]
                log.info("level %d kNN: %d nodes, %d shards, coarse, %.1fs", level_no, level.n, level.shards,
                         stats["knn_seconds"])
                return graph
            stats["knn_coarse_recall"] = info["knn_recall"]
        if self.ivf_parts:  # level 0's cells are read from the actors before they index the next level
            ray.wait(self.ivf_parts, num_returns=len(self.ivf_parts))
        method = self.est.knn
        if ivf_skipped(self.ivf_missed, resolve_method(method, level.n), level.n, self.est.knn_recall):
            log.info("level %d kNN: IVF missed the recall target a level below: exact search of %d rows",
                     level_no, level.n)
            method = "exact"
            stats["knn_ivf_skipped"] = True
        exact_k = subset.exact_depth(self.est.k, level.n, below is not None)
        graph, info, actors = sharded_knn_graph(
            level.x_id, level.offsets, self.est.k, method, self.est.seed,
            # with a recall target every IVF level is tuned (as the core does); without, level 0 is measured
            recall_sample=recall_sample,
            recall_target=self.est.knn_recall, stage=f"level {level_no} kNN",
            counter=self.row_counter(level.n), actors=self.actors,
            exact_k=exact_k,
        )
        if info["knn_method"] == "exact" and exact_k > self.est.k:  # the level above derives its graph
            graph, self.deep = lv.split_deep.remote(graph, self.est.k)
        for a in self.actors[len(actors):]:  # fewer shards than the level before: their index is stale
            ray.kill(a)
        self.actors = actors
        stats.update(info, knn_seconds=self._time("knn", t0))
        self.knn_method = info["knn_method"]
        self.ivf_missed = self.ivf_missed or ivf_missed(info)
        if level_no == 0:  # jobs/assign.py searches the new rows as level 0 was searched
            self.nprobe, self.probe_margin = info.get("knn_nprobe"), info.get("knn_probe_margin")
        if level_no == 0 and self.cfg.assign_state and info["knn_method"] == "ivf":
            self.ivf_parts = [a.ivf_state.remote() for a in self.actors]
        for a in self.actors:  # after ivf_state (an actor runs its calls in order): the scoring's memory
            a.release.remote()
        log.info("level %d kNN: %d nodes, %d shards, %s, %.1fs", level_no, level.n, level.shards, info["knn_method"],
                 stats["knn_seconds"])
        return graph

    def decode(self, level: _Level, graph, model_ref, level_no: int, stats: dict):
        """Stages 1-4 of :mod:`agc_ray.distributed.level`: the level's clusters (one object) and counts."""
        import ray

        t0 = time.perf_counter()
        offs = level.offsets
        if self.est.unsupervised:
            p = [None] * level.shards
            density = [lv.similarity_densities.remote(s, offs, graph) for s in range(level.shards)]
            progress.wait(density, f"level {level_no} scoring", rows=level.shard_rows())
        else:
            owners = ray.get(lv.halo_owners.remote(offs, graph))
            names = (f"level {level_no} scoring 1/2 (node embeddings)", f"level {level_no} scoring 2/2 (edges)")
            counter = self.row_counter(level.n)
            blocks, block_ids = lv.embedding_blocks(offs)
            stage1 = [lv.shard_embeddings.options(num_returns=len(block_ids[s])).remote(
                          model_ref, s, offs, graph, owners[s], blocks[block_ids[s][0]:block_ids[s][-1] + 2],
                          *lv.shard_inputs(level.arrays(), s, owners[s]), progress=(counter, names[0]) if counter else None)
                      for s in range(level.shards)]
            h = [r for refs in stage1 for r in ref_list(refs)]  # by block
            means = [] if level.x_sum is None else [level.x_sum, level.size]  # the edge features' inputs
            stage2 = []
            for s in range(level.shards):
                read = [b for o in (s, *owners[s]) for b in block_ids[o]]
                stage2.append(lv.shard_probabilities.remote(
                    model_ref, s, offs, graph, owners[s], blocks, read, *[h[b] for b in read],
                    *lv.shard_inputs(means, s, owners[s]), progress=(counter, names[1]) if counter else None))
            p, density = [r[0] for r in stage2], [r[1] for r in stage2]
            progress.wait([h[ids[-1]] for ids in block_ids], names[0], rows=level.shard_rows(), counter=counter)
            progress.wait(density, names[1], rows=level.shard_rows(), counter=counter)
        stats["score_seconds"] = self._time("score", t0)
        t0 = time.perf_counter()
        mode = "sim" if self.est.unsupervised else self.est.decode
        sizes = level.size if level.size is not None else [None] * level.shards
        peak_rows = level.peak_row if level.peak_row is not None else [None] * level.shards
        while True:  # twice at most: the adaptive schedule may step down once (see AdaptiveSchedule)
            tau = self.level_tau(level, graph, level_no)
            score, threshold, guard, best, how = p, tau, None, None, mode
            if self.schedule is not None and self.schedule.uses_linkage():
                score, best, threshold = self.average_links(level, graph)
                guard, how = tau, "prob"  # the peaks' threshold guards the links
                stats["linkage"] = threshold
            decoded = [lv.shard_decode.remote(s, offs, graph, score[s], threshold, how, *density, guard=guard, best=best)
                       for s in range(level.shards)]
            result, counts = lv.global_components.remote(
                level.shards, *[d[0] for d in decoded], *[d[1] for d in decoded], *sizes, *peak_rows
            )
            counts = ray.get(counts)
            if self.schedule is None or self.schedule.accept(level_no, level.n, counts["edges"]):
                break
            stats.pop("linkage", None)
        stats.update(tau=tau, edges=counts["edges"], clusters=counts["clusters"],
                     decode_seconds=self._time("decode", t0))
        return result, counts, density, p

    def average_links(self, level: _Level, graph) -> tuple[list, object, float]:
        """The linkage level's per-shard average links (refs), every node's best link (one ref, (n,)) and
        its threshold (the core's :func:`~agc_ray.core.hierarchy.linkage_threshold` over every shard's
        best links)."""
        import ray

        from agc_ray.core.hierarchy import linkage_threshold

        owners = ray.get(lv.halo_owners.remote(level.offsets, graph))
        sums = level.x_sum if level.x_sum is not None else level.x_id
        sizes = level.size if level.size is not None else [ray.put(np.ones(r, np.int64)) for r in level.shard_rows()]
        links = [lv.shard_links.remote(s, level.offsets, graph, owners[s], *lv.shard_inputs([sums, sizes], s, owners[s]))
                 for s in range(level.shards)]
        parts = ray.get([b for _, node, multi in links for b in (node, multi)])  # n floats: small
        node_best = ray.put(np.concatenate(parts[0::2]))
        threshold = linkage_threshold(np.concatenate(parts[1::2]), self.schedule.linkage_floor())
        return [link for link, _, _ in links], node_best, threshold

    def write_state(self, output, level_no: int, level: _Level, graph, result, density, p, ids: list) -> list:
        """Write tasks of this level's assignment state (see :mod:`agc_ray.distributed.state`); ``ids``:
        the row shards' ids (level 0 stores them: the node order of the state)."""
        from agc_ray.distributed.state import shard_dir

        none = [None] * level.shards
        ivf = self.ivf_parts if level_no == 0 and self.ivf_parts else none
        x_sum, size = level.x_sum or none, level.size or none
        ids = ids if level_no == 0 else none
        return [_write_state_shard.remote(output.fs, shard_dir(output.staging, level_no, s), s, level.offsets, graph,
                                          density[s], result, level.x_id[s], x_sum[s], size[s], ivf[s], ids[s], p[s])
                for s in range(level.shards)]

    def level_tau(self, level: _Level, graph, level_no: int) -> float:
        """The level's decode threshold: the estimator's (user / validation / default), or in
        unsupervised mode without tau the core's :class:`~agc_ray.core.hierarchy.AdaptiveSchedule`,
        set up at level 0 from the same seeded row sample as in a single process (so it does not
        depend on the shard count)."""
        import ray

        tau = self.est.level_tau(level_no)
        if tau is not None:
            return tau
        if self.schedule is None:
            from agc_ray.core.hierarchy import AdaptiveSchedule

            tau_0, chance = ray.get(lv.adaptive_tau.remote(graph, self.background_sample(level), self.est.seed))
            self.schedule = AdaptiveSchedule(tau_0, chance)
            log.info("unsupervised: adaptive similarity threshold %.4f (chance %.4f)", tau_0, chance)
        return self.schedule.tau()

    def background_sample(self, level: _Level):
        """Ref of level 0's seeded background rows (the core's :func:`~agc_ray.core.hierarchy.background_rows`),
        gathered once for the adaptive threshold and the boundary merge's chance similarity."""
        if self._background is None:
            from agc_ray.core.hierarchy import background_rows
            from agc_ray.distributed.knn import _gather

            self._background = _gather.remote(level.offsets, background_rows(level.n, self.est.seed), *level.x_id)
        return self._background

    def boundary_chance(self, level: _Level):
        """Ref of the table's chance similarity (from level 0's nodes: the rows), as the core measures it
        for the boundary merge."""
        return lv.background_chance.remote(self.background_sample(level), self.est.seed)

    def merge_boundaries(self, level0: tuple, node_of_row: list, result, chance, stats: dict):
        """The core's boundary merge of a level above 0 (:mod:`agc_ray.core.boundary`), the level-0 graph's
        edges summed per row shard (``level0``: refs of that graph, its row offsets and its rows' nearest
        similarities): ``(result, counts)`` as :meth:`decode` returns them."""
        import ray

        t0 = time.perf_counter()
        graph0, offsets0, nearest = level0
        clusters = [lv.relabel.remote(nr, result) for nr in node_of_row]
        tables = [lv.boundary_part.remote(s, offsets0, graph0, nearest, *clusters) for s in range(len(clusters))]
        result, counts = lv.boundary_merge.remote(result, chance, self.est.boundary_closeness, *tables)
        counts = ray.get(counts)
        stats.update(edges=counts["edges"], clusters=counts["clusters"], boundary_links=counts["boundary_links"],
                     boundary_seconds=self._time("boundary", t0))
        return result, counts

    def aggregate(self, level: _Level, result, clusters: int) -> _Level:
        """Next level's node shards from this level's clusters."""
        t0 = time.perf_counter()
        bounds = shard_bounds(clusters, self.num_shards)
        x_sum = level.x_sum if level.x_sum is not None else level.x_id
        n_next = bounds.size - 1
        parts = [ref_list(lv.split_members.options(num_returns=n_next).remote(s, level.offsets, result, x_sum[s],
                                                                             level.x_id[s], bounds))
                 for s in range(level.shards)]
        built = [lv.assemble_next.remote(t, bounds, result, *[p[t] for p in parts])
                 for t in range(n_next)]
        nxt = _Level(bounds, [b[0] for b in built], [b[1] for b in built], [b[2] for b in built], [b[3] for b in built])
        progress.wait(nxt.peak_row, "aggregation", rows=nxt.shard_rows())
        self._time("aggregate", t0)
        return nxt

    def row_counter(self, rows: int):
        """The run's :class:`~agc_ray.distributed.progress.RowCounter` (rows done inside long tasks), for a
        stage over ``rows`` nodes; None below ``progress.COUNT_INSIDE_ROWS`` (its tasks take seconds)."""
        if rows < progress.COUNT_INSIDE_ROWS:
            return None
        if self.counter is None:
            self.counter = progress.row_counter()
        return self.counter

    def close_index(self):
        """Kill the index actors (kept across levels: each level's kNN stage reuses them, and a lost graph
        object can be reconstructed from them)."""
        import ray

        if self.ivf_parts:  # their results outlive the actors once computed
            ray.wait(self.ivf_parts, num_returns=len(self.ivf_parts))
        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def close(self):
        import ray

        self.close_index()
        if self.counter is not None:
            ray.kill(self.counter)
            self.counter = None


# -- the level loop -----------------------------------------------------------------------------------
def run_levels(job: Job, output, run_input: RunInput) -> Levels:
    """Build every level over node shards and write it (assignments, clusters, state) under ``output``'s staging."""
    kept, stop, writes = _level_loop(job, output, run_input)
    id_info, counters, metrics = _write_levels(job, output, run_input, kept, writes)
    records = []
    for i, entry in enumerate(kept):
        item = dict(entry["stats"]) | {k: v for k, v in id_info[i].items() if v is not None}
        if metrics is not None:
            item["metrics"] = metrics[i]
        records.append(item)
    return Levels(records, [e["stats"]["tau"] for e in kept], [e["stats"]["clusters"] for e in kept], stop, counters)


def _level_loop(job: Job, output, run_input: RunInput) -> tuple[list[dict], str | None, list]:
    """The levels: per level (result ref, row labels refs, stats, offsets), the stop reason and the write tasks
    started so far."""
    import ray
    import torch

    cfg, est, rows, previous = job.cfg, job.est, run_input.rows, run_input.previous
    torch.manual_seed(est.seed)
    model_ref = None if est.unsupervised else ray.put(est.model_.cpu().eval())
    level = _Level(rows.offsets, rows.x)
    node_of_row = None
    kept: list[dict] = []  # per level: result ref, row labels refs, stats
    writes = []
    prev_edges, stop, below = None, None, None
    for level_no in range(est.max_levels()):
        stats = {"level": level_no, "nodes": level.n}
        graph = job.knn(level, level_no, stats, below)
        result, counts, density, p = job.decode(level, graph, model_ref, level_no, stats)
        if est.boundary_closeness is not None:
            if level_no == 0:
                level0 = (graph, rows.offsets, lv.nearest_similarities.remote(graph))
                chance = job.boundary_chance(level)
            else:
                result, counts = job.merge_boundaries(level0, node_of_row, result, chance, stats)
        n_edges = counts["edges"]
        if n_edges == 0 and level_no > 0:
            stop = "no edge added"
            log.info("level %d: stop: %s", level_no, stop)
            break
        if node_of_row is None:
            labels = [lv.relabel.remote(np.arange(rows.offsets[s], rows.offsets[s + 1]), result) for s in range(len(rows.x))]
        else:
            labels = [lv.relabel.remote(nr, result) for nr in node_of_row]
        node_of_row = labels
        if previous is None:  # ids are final: write now (with --previous they wait for the matching)
            t0 = time.perf_counter()
            writes += _assignment_writes(output, level_no, rows.ids, labels, None)
            job._time("write", t0)
        kept.append({"result": result, "labels": labels, "stats": stats, "offsets": level.offsets})
        if cfg.assign_state:
            writes += job.write_state(output, level_no, level, graph, result, density, p, rows.ids)
        log.info("level %d: %d nodes -> %d clusters (%d edges), score %.1fs, decode %.1fs",
                 level_no, level.n, counts["clusters"], n_edges, stats["score_seconds"], stats["decode_seconds"])
        if n_edges == 0:
            stop = "no edge added at level 0: every row is its own cluster"
            log.info(stop)
            break
        stop = stop_reason(level_no, n_edges, prev_edges, counts["clusters"], k=est.k, levels=est.max_levels(),
                           early_stop=est.stops_early(), next_not_lower=next_tau_not_lower(est.level_tau, level_no))
        if stop:
            log.info("level %d: stop: %s", level_no, stop)
            break
        prev_edges = n_edges
        level = job.aggregate(level, result, counts["clusters"])
        below = (graph, result)
    return kept, stop, writes


def _write_levels(job: Job, output, run_input: RunInput, kept: list[dict], writes: list):
    """Stable ids, the remaining writes (all awaited) and the per-level metrics: ``(id_info, counters, metrics)``."""
    import ray

    cfg, est, rows, previous = job.cfg, job.est, run_input.rows, run_input.previous
    t0 = time.perf_counter()
    id_maps, id_info, counters = stable_id_maps(previous, rows.ids, [e["labels"] for e in kept],
                                                [e["stats"]["clusters"] for e in kept], job.num_shards)
    if previous is not None:
        job._time("stable_ids", t0)
        log.info("stable ids against %s: %s", previous.uri, ", ".join(
            f"level {i}: {d['churn']['kept']} kept, {d['churn']['new']} new" for i, d in enumerate(id_info)))
        t0 = time.perf_counter()
        for i, entry in enumerate(kept):
            writes += _assignment_writes(output, i, rows.ids, entry["labels"], id_maps[i])
    for i, entry in enumerate(kept):
        parent = kept[i + 1]["result"] if i + 1 < len(kept) else None
        parent_map = id_maps[i + 1] if i + 1 < len(kept) else None
        path = output.staged("clusters", f"level={i}", "part-00000.parquet")
        writes.append(_write_clusters.remote(output.fs, path, entry["result"], _comp_of(parent), id_maps[i],
                                             parent_map, *rows.ids))
    if cfg.assign_state:
        writes += _state_meta_writes(output, job, est, rows, kept, id_maps)
    metrics = None
    if rows.labels is not None:
        metrics = ray.get([_evaluate.remote(len(rows.labels), *rows.labels, *e["labels"]) for e in kept])
    progress.wait(writes, "writing")
    ray.get(writes)
    job._time("write", t0)
    return id_info, counters, metrics


# -- the loop's writes --------------------------------------------------------------------------------
@lazy_remote(num_cpus=1)
def _write_state_shard(fs, directory: str, s: int, offsets, graph, density, result, x_id, x_sum=None, size=None,
                       ivf=None, ids=None, p=None):
    from agc_ray.distributed import state

    nbr, sim = graph
    lo, hi = int(offsets[s]), int(offsets[s + 1])
    state.write_shard(fs, directory, x_id=x_id, x_sum=x_sum, size=size, nbr=nbr[lo:hi], sim=sim[lo:hi],
                      density=np.asarray(density, dtype=np.float32), comp=result["comp"][lo:hi],
                      lists=None if ivf is None else ivf[1], ids=ids,
                      p=None if p is None else np.asarray(p, dtype=np.float32))
    if ivf is not None and s == 0:
        state.save_array(fs, posixpath.join(posixpath.dirname(directory), "centroids.npy"), ivf[0])
    return directory


@lazy_remote(num_cpus=1)
def _write_cluster_ids(fs, path: str, n_clusters: int, id_map=None):
    from agc_ray.distributed import state

    state.save_array(fs, path, np.arange(n_clusters, dtype=np.int64) if id_map is None else np.asarray(id_map, np.int64))
    return path


def _state_meta_writes(output, job: Job, est, rows, kept: list, id_maps: list) -> list:
    """state.json and each level's published cluster ids."""
    from agc_ray.distributed import state

    meta = {"levels": len(kept), "k": est.k, "dimension": rows.dim, "rows": rows.n,
            "level0_knn": "ivf" if job.ivf_parts else "exact", "nprobe": job.nprobe or IVF_NPROBE,
            "probe_margin": job.probe_margin, "linkage": [e["stats"].get("linkage") for e in kept],
            "offsets": [np.asarray(e["offsets"]).astype(int).tolist() for e in kept]}
    state.write_meta(output.fs, output.staging, meta)
    return [_write_cluster_ids.remote(output.fs, posixpath.join(output.staging, state.STATE_DIR, f"level={i}", "cluster_ids.npy"),
                                      int(e["stats"]["clusters"]), id_maps[i]) for i, e in enumerate(kept)]


def _assignment_writes(output, level_no: int, ids: list, labels: list, id_map) -> list:
    return [_write_assignments.remote(output.fs, output.staged("assignments", f"level={level_no}", f"part-{s:05d}.parquet"),
                                      i, lab, id_map) for s, (i, lab) in enumerate(zip(ids, labels))]


@lazy_remote(num_cpus=1)
def _comp_only(result):
    return result["comp"]


def _comp_of(result):
    return None if result is None else _comp_only.remote(result)
