"""The incremental assignment job: new rows join a finished clustering without re-clustering it.

``run_assign`` checks everything before writing (the base is a completed output with an assignment
state, the model, dimensions, ids), reads the new rows with Ray Data (the clustering job's reader and
row checks) while a Ray actor loads the base's state (:mod:`agc_ray.distributed.state`), places them
there with :func:`agc_ray.core.incremental.assign_new_rows`, and writes an output with the clustering
job's contract holding base + new rows: assignments and clusters per level, the state extended by
the new rows (so that the output is itself a base, and a ``--previous`` for the next full run), a
manifest that says it is incremental, and report.html; committed like the clustering job's output.

Cluster ids: a new row that joins a base cluster gets its id; new clusters get fresh ids from the
base manifest's never-reused counters (``next_cluster_ids``), which the new manifest advances.
"""

from __future__ import annotations

import copy
import logging
import os
import posixpath
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from agc_ray.distributed import progress, state
from agc_ray.distributed.errors import InputError, one_line
from agc_ray.distributed.input import check_schema, read_shards, resolve_input
from agc_ray.distributed.output import Output, write_table

log = logging.getLogger("agc_ray")


@dataclass
class AssignConfig:
    """Parameters of one assignment run (the command line's flags).

    Attributes:
        base: a completed output of ``jobs/cluster.py`` or of this job (local or ``s3://``).
        input: Parquet file, directory or glob of the new rows (the base's columns and dimension).
        output: output directory or ``s3://`` prefix (may equal ``base`` with ``overwrite``).
        model: the model directory (default: the one the base run used); ignored for label-free bases.
        id_column, embedding_column: input column names.
        replace: re-assign rows whose id is already in the base (default: refuse them).
        overwrite: replace an existing non-empty output.
        num_shards: row shards of the read (0: one per CPU).
    """

    base: str | None = None
    input: str | None = None
    output: str | None = None
    model: str | None = None
    id_column: str = "id"
    embedding_column: str = "embedding"
    replace: bool = False
    overwrite: bool = False
    num_shards: int = 0


def validate_assign_config(cfg: AssignConfig) -> None:
    for flag, value, what in (("--base", cfg.base, "a completed output of jobs/cluster.py, local or s3://"),
                              ("--input", cfg.input, "the new rows: a Parquet file, directory or glob, local or s3://"),
                              ("--output", cfg.output, "a directory or s3:// prefix")):
        if not value:
            raise InputError(f"missing {flag} ({what})")
    if not isinstance(cfg.num_shards, int) or cfg.num_shards < 0:
        raise InputError(f"invalid --num-shards {cfg.num_shards!r}: expected an integer >= 0")


def _load_model(cfg: AssignConfig, base, meta: dict):
    """The base run's Lander (or None for a label-free base), checked against the state."""
    params = base.manifest.get("parameters", {})
    if params.get("unsupervised"):
        return None
    from agc_ray.distributed.job import JobConfig, load_estimator

    path = cfg.model or (base.manifest.get("model") or {}).get("path")
    if not path:
        raise InputError(f"--base {cfg.base}: its manifest names no model; pass --model DIR")
    est = load_estimator(JobConfig(model=path))
    if est.k != meta["k"]:
        raise InputError(f"model {path} was trained with k={est.k}, the base {cfg.base} was clustered with k={meta['k']}")
    if getattr(est, "n_features_in_", meta["dimension"]) != meta["dimension"]:
        raise InputError(f"model {path} expects {est.n_features_in_}-dimensional embeddings, the base {cfg.base} "
                         f"has {meta['dimension']}-dimensional ones")
    return est.model_.cpu().eval()


def _open_base(cfg: AssignConfig, id_type: pa.DataType):
    from agc_ray.distributed.stable import open_previous

    base = open_previous(cfg.base, id_type, flag="--base")
    meta = state.read_meta(base.fs, base.path)
    if meta is None:
        raise InputError(f"--base {cfg.base} has no assignment state (state/state.json): it was written with "
                         "--no-assign-state or by an older version; run jobs/cluster.py on it again")
    if meta.get("format") not in state.READABLE_STATE_FORMATS:
        raise InputError(f"--base {cfg.base}: assignment state format {meta.get('format')!r} is not one this "
                         f"version reads ({', '.join(map(str, state.READABLE_STATE_FORMATS))}): run jobs/cluster.py "
                         "on it again, or assign with the version that wrote it")
    if meta["levels"] != base.levels:
        raise InputError(f"--base {cfg.base}: its state has {meta['levels']} levels, its manifest {base.levels}")
    return base, meta


def run_assign(cfg: AssignConfig) -> dict:
    """Run the assignment job (Ray must be initialised). Returns the manifest.

    Raises:
        InputError: bad input, base, model or output location; nothing has been written.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    t_start = time.perf_counter()
    validate_assign_config(cfg)
    fs, files = resolve_input(cfg.input)
    schema = check_schema(fs, files, cfg.id_column, cfg.embedding_column, None)
    base, meta = _open_base(cfg, schema.schema.field(cfg.id_column).type)
    if schema.dim is not None and schema.dim != meta["dimension"]:
        raise InputError(f"--input {cfg.input} has {schema.dim}-dimensional embeddings, the base {cfg.base} "
                         f"{meta['dimension']}-dimensional ones")
    # the base's state loads in an actor on this node while the model, the output and the new rows are
    # checked and read here
    holder = ray.remote(BaseIndex).options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=True)).remote(base.fs, base.path, meta)
    loaded = holder.ready.remote()
    try:
        model = _load_model(cfg, base, meta)
        output = Output(cfg.output, cfg.overwrite)
        output.check()
    except BaseException:
        ray.kill(holder)
        raise
    timings = {}
    try:
        t0 = time.perf_counter()
        num_shards = cfg.num_shards or max(1, int(ray.cluster_resources().get("CPU", 1)))
        rows = read_shards(fs, schema, num_shards)
        if rows.dim != meta["dimension"]:
            raise InputError(f"--input {cfg.input} has {rows.dim}-dimensional embeddings, the base {cfg.base} "
                             f"{meta['dimension']}-dimensional ones")
        new_ids = pa.concat_arrays(ray.get(rows.ids))
        replaced = _replaced_nodes(cfg, base, meta, new_ids)
        timings["read_seconds"] = time.perf_counter() - t0
        log.info("read + validate: %d new rows, dimension %d, %d replacing base rows, %.1fs", rows.n, rows.dim,
                 replaced.size, timings["read_seconds"])
        progress.wait([loaded], "loading the base's state", rows=[meta["levels"]])
        error = ray.get(loaded)
        if error is not None:  # a state file missing or unreadable: the base is damaged
            raise InputError(f"--base {cfg.base}: cannot read its assignment state (state/): {error}; "
                             "run jobs/cluster.py on it again")

        t0 = time.perf_counter()
        params = base.manifest["parameters"]
        task = holder.assign.remote(None if model is None else ray.put(model), list(params["tau"]),
                                    params.get("decode") or "prob", replaced, *rows.x)
        progress.wait([task], "assignment", rows=[rows.n])
        result, lists = ray.get(task)
        ray.kill(holder)
        holder = None
        timings["assign_seconds"] = time.perf_counter() - t0
        for lvl in range(meta["levels"]):
            log.info("level %d: %d new rows joined base clusters, %d new clusters", lvl, result.joined_rows[lvl],
                     result.new_clusters[lvl])

        t0 = time.perf_counter()
        manifest = _write_output(cfg, output, base, meta, result, lists, new_ids, replaced, rows.n)
        timings["write_seconds"] = time.perf_counter() - t0
        manifest["timings"] = timings | {"total_seconds": time.perf_counter() - t_start}
        from agc_ray.distributed.job import _write_report

        _write_report(output, manifest)
        output.commit(manifest, ((base.fs, base.path, base.version, f"--base {base.uri}"),))
    except BaseException:
        if holder is not None:
            ray.kill(holder)
        output.abort()
        raise
    log.info("committed %s (%.1fs)", cfg.output, time.perf_counter() - t_start)
    return manifest


def _replaced_nodes(cfg: AssignConfig, base, meta: dict, new_ids: pa.Array) -> np.ndarray:
    """Level-0 node ids of base rows that the new rows replace (InputError without ``replace``)."""
    base_ids = state.read_ids(base.fs, base.path, meta)
    if base_ids.type != new_ids.type:
        base_ids = base_ids.cast(new_ids.type)
    hit = pc.is_in(base_ids, value_set=new_ids).to_numpy(zero_copy_only=False)
    excluded = state.read_level_array(base.fs, base.path, 0, "excluded")
    if excluded is not None:
        hit[excluded] = False  # replaced earlier: the new row is not a duplicate of a removed one
    nodes = np.flatnonzero(hit)
    if nodes.size and not cfg.replace:
        raise InputError(f"--input {cfg.input}: {nodes.size} id(s) are already in the base {cfg.base} (example "
                         f"id {base_ids[int(nodes[0])].as_py()!r}); pass --replace to re-assign them")
    return nodes


class BaseIndex:
    """Ray actor holding a base output's assignment state in memory: loaded while the new rows are read,
    then :meth:`assign` places them (:func:`agc_ray.core.incremental.assign_new_rows`).

    It reserves no CPU (the read's Ray Data tasks need them meanwhile) and computes with the node's
    cores once the read is done.
    """

    def __init__(self, fs, root: str, meta: dict):
        self._threads()
        self.levels, self.error = [], None
        try:
            self._load(fs, root, meta)
        except (OSError, ValueError, KeyError, IndexError) as e:  # a file missing or unreadable: reported by ready()
            self.error = one_line(e)

    def _load(self, fs, root: str, meta: dict) -> None:
        from agc_ray.core.incremental import BaseLevel

        linkage = meta.get("linkage") or [None] * meta["levels"]  # absent in states written before it
        for lvl in range(meta["levels"]):
            a = state.read_level(fs, root, meta, lvl)
            index = None
            if lvl == 0 and "centroids" in a and "lists" in a and a["lists"].shape[0] == a["x_id"].shape[0]:
                index = state.ivf_from_lists(a["x_id"], a["centroids"], a["lists"], meta["nprobe"])
            self.levels.append(BaseLevel(a["x_id"], a.get("x_sum"), a.get("size"), a["nbr"], a["sim"], a["density"],
                                         a["comp"], a.get("p"), index, meta.get("probe_margin") if index else None,
                                         linkage[lvl]))
        self.excluded = state.read_level_array(fs, root, 0, "excluded")

    @staticmethod
    def _threads():
        import os

        import faiss
        import torch

        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(cpus)
        faiss.omp_set_num_threads(cpus)

    def ready(self) -> str | None:
        """None once loaded, else why the state could not be read (one line)."""
        return self.error

    def assign(self, model, taus: list, mode: str, replaced: np.ndarray, *x_parts):
        """``(Assignment, IVF cells of the new rows or None)``."""
        import faiss

        from agc_ray.core.incremental import assign_new_rows

        self._threads()
        exclude = replaced if self.excluded is None else np.union1d(self.excluded, replaced)
        x_new = np.concatenate(x_parts) if len(x_parts) > 1 else x_parts[0]
        result = assign_new_rows(model, self.levels, x_new, taus, mode=mode, exclude=exclude if exclude.size else None)
        lists = None
        index = self.levels[0].index
        if isinstance(index, faiss.IndexIVF):  # the new rows' cells, so that the extended state keeps its IVF index
            lists = index.quantizer.assign(np.ascontiguousarray(x_new, dtype=np.float32), 1)[:, 0].astype(np.int32)
        return result, lists


# -- the output --------------------------------------------------------------------------------------
def _parquet_files(fs, directory: str) -> list[str]:
    return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
                  if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def _copy(src_fs, src: str, dst_fs, dst: str) -> None:
    """Copy one file of the base into staging: a hard link locally (the files are never modified once
    committed; 1.5 GB of state per million rows), a server-side copy within S3."""
    if dst_fs.type_name == "local":
        dst_fs.create_dir(posixpath.dirname(dst), recursive=True)
    if src_fs.type_name == dst_fs.type_name == "local":
        try:
            os.link(src, dst)
        except OSError:  # another filesystem, or links not supported
            dst_fs.copy_file(src, dst)
    else:
        pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def _copy_tree(src_fs, src: str, dst_fs, dst: str) -> None:
    for info in src_fs.get_file_info(pafs.FileSelector(src, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            _copy(src_fs, info.path, dst_fs, posixpath.join(dst, posixpath.relpath(info.path, src)))


def _published(result, lvl: int, base_ids: np.ndarray, counter: int) -> np.ndarray:
    """Published cluster id of each internal cluster of a level: the base's, then the new ones'."""
    return np.concatenate([np.asarray(base_ids, np.int64),
                           counter + np.arange(result.new_clusters[lvl], dtype=np.int64)])


def _write_output(cfg, output, base, meta: dict, result, lists, new_ids: pa.Array, replaced: np.ndarray,
                  n_new: int) -> dict:
    """Assignments, clusters and state of base + new rows into staging; returns the manifest."""
    fs, staging = output.fs, output.staging
    levels = meta["levels"]
    counters = list(base.counters())
    counters += [0] * (levels - len(counters))
    replaced_ids = state.read_ids(base.fs, base.path, meta).take(pa.array(replaced, pa.int64())) if replaced.size \
        else None
    cluster_counts, level_info, new_counters = [], [], list(counters)
    published_of = []
    for lvl in range(levels):
        base_cluster_ids = state.read_level_array(base.fs, base.path, lvl, "cluster_ids")
        published = _published(result, lvl, base_cluster_ids, counters[lvl])
        published_of.append(published)
        new_counters[lvl] = counters[lvl] + result.new_clusters[lvl]
    state_dir = posixpath.join(staging, state.STATE_DIR)
    _copy_tree(base.fs, posixpath.join(base.path, state.STATE_DIR), fs, state_dir)
    for lvl in range(levels):
        labels = published_of[lvl][result.cluster[lvl]]
        # assignments: the base's parts (without replaced rows), then one part of new rows
        a_src = posixpath.join(base.path, "assignments", f"level={lvl}")
        a_dst = posixpath.join(staging, "assignments", f"level={lvl}")
        parts = _parquet_files(base.fs, a_src)
        removed = []
        for i, path in enumerate(parts):
            dst = posixpath.join(a_dst, f"part-{i:05d}.parquet")
            if replaced_ids is None:
                _copy(base.fs, path, fs, dst)
                continue
            table = pq.read_table(path, filesystem=base.fs)
            gone = pc.is_in(table.column("id"), value_set=replaced_ids)
            removed.append(table.filter(gone).column("cluster_id").to_numpy())
            write_table(fs, dst, table.filter(pc.invert(gone)))
        write_table(fs, posixpath.join(a_dst, f"part-{len(parts):05d}.parquet"),
                       pa.table({"id": new_ids, "cluster_id": pa.array(labels, pa.int64())}))
        # clusters: sizes updated, clusters emptied by replacement dropped, new clusters appended
        c_src = posixpath.join(base.path, "clusters", f"level={lvl}")
        table = pa.concat_tables([pq.read_table(p, filesystem=base.fs) for p in _parquet_files(base.fs, c_src)])
        old_ids = table.column("cluster_id").to_numpy()
        delta = _count_by(old_ids, labels) - (_count_by(old_ids, np.concatenate(removed)) if removed else 0)
        size = table.column("size").to_numpy() + delta
        table = table.set_column(table.schema.get_field_index("size"), "size", pa.array(size, pa.int64()))
        table = table.filter(pa.array(size > 0))
        new_table = _new_clusters(result, lvl, levels, published_of, new_ids, table.schema)
        table = pa.concat_tables([table, new_table])
        write_table(fs, posixpath.join(staging, "clusters", f"level={lvl}", "part-00000.parquet"), table)
        cluster_counts.append(table.num_rows)
        in_base = int((result.cluster[lvl] < result.base_clusters[lvl]).sum())
        level_info.append({"rows_in_base_clusters": in_base, "rows_in_new_clusters": n_new - in_base,
                           "new_clusters": result.new_clusters[lvl], "clusters": table.num_rows})
        _extend_state(fs, staging, meta, result, lvl, lists, new_ids, published_of[lvl])
    if replaced.size:
        old = state.read_level_array(base.fs, base.path, 0, "excluded")
        state.save_array(fs, posixpath.join(state_dir, "level=0", "excluded.npy"),
                         replaced if old is None else np.union1d(old, replaced))
    new_meta = copy.deepcopy(meta)
    new_meta["rows"] = int(meta["rows"]) + n_new
    for lvl, nodes in enumerate(result.nodes):
        if nodes is not None:
            new_meta["offsets"][lvl].append(new_meta["offsets"][lvl][-1] + int(nodes["x_id"].shape[0]))
    state.write_meta(fs, staging, {k: v for k, v in new_meta.items() if k != "format"})
    return _manifest(cfg, output, base, result, n_new, replaced, cluster_counts, level_info, new_counters, new_meta)


def _count_by(cluster_ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """How many of ``labels`` fall on each of ``cluster_ids`` (labels not among them are new clusters)."""
    order = np.argsort(cluster_ids)
    sorted_ids = cluster_ids[order]
    pos = np.searchsorted(sorted_ids, labels)
    found = pos < sorted_ids.size
    found[found] = sorted_ids[pos[found]] == labels[found]
    return np.bincount(order[pos[found]], minlength=cluster_ids.size).astype(np.int64)


def _new_clusters(result, lvl: int, levels: int, published_of: list, new_ids: pa.Array, schema: pa.Schema) -> pa.Table:
    """Rows of the clusters table for the new clusters of one level."""
    c = result.new_clusters[lvl]
    ids = published_of[lvl][result.base_clusters[lvl]:]
    labels = result.cluster[lvl]
    size = np.bincount(labels[labels >= result.base_clusters[lvl]] - result.base_clusters[lvl], minlength=c)
    peak_rows = result.new_peaks[lvl]
    if lvl + 1 < levels:
        parent = published_of[lvl + 1][result.cluster[lvl + 1][peak_rows]]
        parent = pa.array(parent, pa.int64())
    else:
        parent = pa.nulls(c, pa.int64())
    return pa.table({"cluster_id": pa.array(ids, pa.int64()), "size": pa.array(size.astype(np.int64)),
                     "peak_id": new_ids.take(pa.array(peak_rows, pa.int64())), "parent_cluster_id": parent},
                    schema=schema)


def _extend_state(fs, staging: str, meta: dict, result, lvl: int, lists, new_ids: pa.Array, published: np.ndarray):
    """The new nodes of a level as one more state shard, and the level's published cluster ids."""
    level_dir = posixpath.join(staging, state.STATE_DIR, f"level={lvl}")
    state.save_array(fs, posixpath.join(level_dir, "cluster_ids.npy"), published)
    nodes = result.nodes[lvl]
    if nodes is None:
        return
    shard = len(meta["offsets"][lvl]) - 1
    arrays = {k: v for k, v in nodes.items() if k != "peak_row"}
    state.write_shard(fs, state.shard_dir(staging, lvl, shard), ids=new_ids if lvl == 0 else None,
                      lists=lists if lvl == 0 else None, **arrays)


def _manifest(cfg, output, base, result, n_new: int, replaced: np.ndarray, cluster_counts: list, level_info: list,
              counters: list, meta: dict) -> dict:
    """The base's manifest, updated: what this run read and did, and the counts of base + new."""
    manifest = copy.deepcopy(base.manifest)
    levels_out = []
    for lvl, item in enumerate(manifest["levels"]):
        item = {k: v for k, v in item.items() if k not in ("metrics", "churn")}
        item["clusters"] = cluster_counts[lvl]
        levels_out.append(item | {"incremental": level_info[lvl]})
    manifest.update({
        "status": "succeeded",
        "run": output.run_info(),
        "output": cfg.output,
        "input": {"path": cfg.input, "rows": int(base.manifest["input"]["rows"]) + n_new - int(replaced.size),
                  "new_rows": n_new,
                  "id_column": cfg.id_column, "embedding_column": cfg.embedding_column},
        "previous": None,
        "incremental": {"base": {"path": base.uri, "run_id": base.version.run_id}, "new_rows": n_new,
                        "replaced_rows": int(replaced.size),
                        "rows_in_base_clusters": [i["rows_in_base_clusters"] for i in level_info],
                        "new_clusters": [i["new_clusters"] for i in level_info]},
        "levels": levels_out,
        "cluster_counts": cluster_counts,
        "next_cluster_ids": counters,
    })
    if manifest.get("model") and cfg.model:
        manifest["model"]["path"] = cfg.model
    return manifest
