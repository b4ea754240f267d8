"""The dry run of the clustering job: every check that needs no cluster work, the plan, and its cost.

:func:`plan_job` runs the checks of :func:`~agc_ray.distributed.job.run_job` that read only metadata
(parameters, model, output location, ``--previous``, every file's footer) plus the row checks on a
sample (NaN / Inf, all-zero, ragged, null ids or labels: the real run's code and messages) and the
duplicate-id check on the whole id column, then estimates the run's peak memory per node and its
wall time from per-row costs measured by ``benchmarks/bench_estimate.py``. It writes nothing.

The cost model (see :data:`COSTS`): the run's memory peaks at level 0, where every row's embedding is
held a few times over (Ray Data's blocks, the shard, the index, the halo copies scoring reads) with the
graph and the model's node embeddings; so a node's peak is a fixed part per Ray worker plus a part per row
it holds (rows spread evenly over the nodes by the shards). Time: the kNN search scans ``nprobe`` IVF
cells of ``N / nlist`` rows per query (``N^2`` for exact search), scoring and reading are linear in
``N x D``, and every level above 0 repeats the work on the clusters of the one below.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from agc_ray.distributed.errors import InputError
from agc_ray.distributed.input import (InputSchema, check_schema, check_unique, find_duplicate, prepare_block,
                                      resolve_input)
from agc_ray.distributed.output import Output

#: Per-row costs measured on the project's 2-core, 24 GiB benchmark machine (Ray 2.60, faiss-cpu 1.x) by
#: ``python benchmarks/bench_estimate.py --sizes 100000,300000,1000000`` (256-d make_faces, a model with
#: k=10, hidden 128; see its ``fit_costs``): memory is the line through the 100K and 300K runs' peaks
#: (PSS of the whole process tree), which predicts the 1M runs' 5.3-5.5 GiB as 5.8 GiB; seconds are
#: CPU-seconds of each stage over its work (all levels, 1M run), then one scale and a fixed part fitted
#: by least squares on the three wall times (25 / 38 / 115 s measured).
COSTS = {
    "base_gb": 1.42,               # driver, raylet, GCS, object store bookkeeping
    "worker_gb": 0.45,             # one Ray worker with torch and faiss imported (PSS)
    "bytes_per_row_float": 12.4,   # bytes per row per embedding float: ~3 float32 copies held at level 0
    "bytes_per_row": 600.0,        # graph (k neighbours, similarities), ids, labels (assumed, not fitted)
    "read_s": 6.23e-8,             # per row x dimension
    "knn_s": 3.81e-11,             # per scanned row x dimension (IVF: 16 cells + centroids per query)
    "score_s": 1.52e-7,            # per row x (dimension + hidden)
    "rest_s": 9.13e-6,             # decode, aggregation, writing: per row
    "level_ratio": 0.25,           # nodes of level L+1 / level L: assumed (make_faces, identities of 60, gives 0.07)
    "fixed_s": 15.8,               # Ray start, per-level task overheads, model load, report, commit
}

#: Rows whose every check runs in the dry run (spread over the table's row groups).
SAMPLE_ROWS = 65_536
#: Up to this many rows, the dry run reads the whole id column for duplicates.
ID_CHECK_ROWS = 20_000_000


@dataclass
class _Estimated:
    """What both plans share: the estimate, its line and the JSON form."""

    peak_memory_gb_per_node: float
    node_memory_gb: float | None
    run_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def report(self) -> str:
        """What ``--dry-run`` prints: the plan's lines, then the plan as one line of JSON."""
        import json

        return "\n".join(["dry run: nothing was written", *self.lines(), json.dumps(self.to_dict())])

    def estimate_line(self) -> str:
        from agc_ray.distributed.progress import duration

        fits = ""
        if self.node_memory_gb:
            fits = (f" of {self.node_memory_gb:.1f} GiB" +
                    ("" if self.peak_memory_gb_per_node < 0.9 * self.node_memory_gb else "  ** may not fit **"))
        return (f"estimate: peak memory {self.peak_memory_gb_per_node:.1f} GiB per node{fits}; "
                f"run time ~{duration(self.run_seconds)}")


@dataclass
class Plan(_Estimated):
    """What the job would do with a configuration, and what it would cost."""

    input: str
    files: int
    rows: int
    dimension: int | None
    id_column: str
    embedding_column: str
    label_column: str | None
    rows_checked: int
    ids_checked: bool
    output: str
    previous: str | None
    model: str | None
    unsupervised: bool
    k: int
    max_levels: int
    tau: str
    decode: str
    knn_method: str
    knn_detail: str
    nodes: int
    cpus: int
    num_shards: int

    def lines(self) -> list[str]:
        """The plan as an operator reads it."""
        return [
            f"input:    {self.input}: {self.rows:,} rows in {self.files} file(s), dimension {self.dimension}, "
            f"columns {self.id_column!r}, {self.embedding_column!r}"
            + (f", label {self.label_column!r}" if self.label_column else ""),
            f"checked:  footers of every file, {self.rows_checked:,} rows (NaN/Inf, zero, ragged, nulls), "
            + ("every id unique" if self.ids_checked else f"ids not checked for duplicates (over {ID_CHECK_ROWS:,} rows; "
                                                          "the real run checks them)"),
            f"model:    {self.model or 'none (unsupervised)'}; k={self.k}, up to {self.max_levels} levels, "
            f"tau {self.tau}, decode {self.decode}",
            f"kNN:      level 0 {self.knn_method} ({self.knn_detail})",
            f"Ray:      {self.nodes} node(s), {self.cpus} CPUs, {self.num_shards} shards",
            f"output:   {self.output}" + (f" (ids kept from {self.previous})" if self.previous else ""),
            self.estimate_line(),
        ]


def cluster_shape(num_cpus: int | None = None) -> tuple[int, int, float | None]:
    """(nodes, CPUs, memory GiB of the smallest node) of the Ray cluster the job would run on.

    Inside ``ray job submit`` (RAY_ADDRESS) or a process connected to Ray, asked from the cluster
    (connecting, not starting one); otherwise this machine, as the private local instance would see it.
    """
    if _on_ray_cluster():
        import ray

        if not ray.is_initialized():
            ray.init(logging_level="WARNING")
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = int(sum(n["Resources"].get("CPU", 0) for n in nodes))
        workers = [n for n in nodes if n["Resources"].get("CPU", 0) > 0] or nodes
        memory = min(n["Resources"].get("memory", 0) + n["Resources"].get("object_store_memory", 0)
                     for n in workers) / 2**30 or None  # the estimate includes the object store
        return len(workers), max(1, cpus), memory
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 1, num_cpus or cpus or 1, memory


def _on_ray_cluster() -> bool:
    """Inside ``ray job submit`` (RAY_ADDRESS), or in a process already connected to Ray."""
    import sys

    ray = sys.modules.get("ray")
    return bool(os.environ.get("RAY_ADDRESS")) or (ray is not None and ray.is_initialized())


def check_rows(fs, schema: InputSchema, sample_rows: int = SAMPLE_ROWS) -> tuple[int, int | None]:
    """Run the real run's per-block checks on up to ``sample_rows`` rows spread over the row groups.

    Returns (rows checked, the embedding dimension found). Raises InputError as the real run would.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = [schema.id_column, schema.embedding_column] + ([schema.label_column] if schema.label_column else [])
    groups = []  # (file, row group, rows)
    for f in schema.files:
        meta = pq.read_metadata(f, filesystem=fs)
        groups += [(f, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    groups = [g for g in groups if g[2]]
    if schema.rows > sample_rows:  # evenly spaced row groups, the first rows of each
        take = min(len(groups), max(1, math.ceil(sample_rows / (schema.rows / len(groups)))))
        groups = [groups[i] for i in np.linspace(0, len(groups) - 1, take).round().astype(int)]
    per_group = max(1, sample_rows // len(groups)) if schema.rows > sample_rows else None
    checked, dim = 0, schema.dim
    for f, g, _ in groups:
        with fs.open_input_file(f) as handle:
            pf = pq.ParquetFile(handle)
            if per_group is None:
                table = pf.read_row_group(g, columns=cols)
            else:
                table = pa.Table.from_batches([next(pf.iter_batches(batch_size=per_group, row_groups=[g], columns=cols))])
        block = prepare_block(table, id_column=schema.id_column, embedding_column=schema.embedding_column,
                                 label_column=schema.label_column, dim=schema.dim)
        d = block.column("x").type.shape[0]
        if dim is not None and d != dim:
            raise InputError(f"ragged embedding dimensions across the table: found dimensions {sorted({dim, d})}")
        dim, checked = d, checked + table.num_rows
    return checked, dim


def check_ids(fs, schema: InputSchema) -> None:
    """The whole id column has no nulls and no duplicates (the real run's duplicate message)."""
    import pyarrow.dataset as pds

    ids = pds.dataset(schema.files, filesystem=fs, format="parquet").to_table(columns=[schema.id_column]).column(0)
    if ids.null_count:  # outside the sampled rows: the real run names the block row, this the table row
        first = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(f"id column {schema.id_column!r} has {ids.null_count} null value(s) (first at table row {first})")
    check_unique(schema.id_column, find_duplicate(*ids.chunks))


def estimate(rows: int, dim: int, nodes: int, cpus: int, knn_method: str, costs: dict = COSTS,
             levels: int = 10, hidden: int | None = 128) -> tuple[float, float]:
    """(peak memory GiB per node, wall seconds) of a run over ``rows`` x ``dim`` (see the module docstring)."""
    from agc_ray.core.knn import IVF_NPROBE, ivf_nlist, resolve_method

    c = costs
    per_node = rows / max(1, nodes)
    cpus_per_node = max(1, cpus // max(1, nodes))
    memory = (c["base_gb"] + c["worker_gb"] * cpus_per_node
              + per_node * (c["bytes_per_row_float"] * dim + c["bytes_per_row"]) / 2**30)
    seconds, n = c["fixed_s"] + c["read_s"] * rows * dim / cpus, float(rows)
    for level in range(levels):
        if n < 2:
            break
        m = resolve_method(knn_method, int(n))  # the job's method at every level ('auto': per level)
        nlist = ivf_nlist(int(n))
        scanned = n if m == "exact" else IVF_NPROBE * n / nlist + nlist
        scoring = 0.0 if hidden is None else c["score_s"] * n * (dim + hidden)  # no model: no scoring
        seconds += (c["knn_s"] * n * scanned * dim + scoring + c["rest_s"] * n) / cpus
        n *= c["level_ratio"]
    return memory, seconds


def plan_job(cfg, num_cpus: int | None = None) -> Plan:
    """Check everything the job can check without running it (InputError as the real run) and plan it."""
    from agc_ray.core.knn import IVF_NPROBE, ivf_nlist, resolve_method
    from agc_ray.core.recall import exact_on_miss, margin_probe_cap, margin_probe_share, probe_cap
    from agc_ray.distributed.job import _check_dim, _tau_source, load_estimator, validate_config

    validate_config(cfg)
    est = load_estimator(cfg)
    output = Output(cfg.output, cfg.overwrite)
    output.inspect()
    fs, files = resolve_input(cfg.input)
    schema = check_schema(fs, files, cfg.id_column, cfg.embedding_column, cfg.label_column, default_label="label")
    _check_dim(est, schema.dim, cfg)
    if cfg.previous:
        from agc_ray.distributed.stable import open_previous

        open_previous(cfg.previous, schema.schema.field(schema.id_column).type)
    checked, dim = check_rows(fs, schema)
    ids_checked = schema.rows <= ID_CHECK_ROWS
    if ids_checked:
        check_ids(fs, schema)
    _check_dim(est, dim, cfg)  # after the rows and ids, as the real run
    nodes, cpus, node_memory = cluster_shape(num_cpus)
    method, nlist = resolve_method(est.knn, schema.rows), ivf_nlist(schema.rows)
    if method != "ivf":
        detail = "flat index, exact"
    elif est.knn_recall is not None and cfg.knn_recall_sample > 0:
        missed = ("exact search" if exact_on_miss(schema.rows)
                  else "the IVF graph kept, reported below target (too many rows to search exactly)")
        share = margin_probe_share(schema.rows)
        detail = (f"{nlist} cells, a probe margin raised until recall >= {est.knn_recall} on {cfg.knn_recall_sample} "
                  f"sampled rows (the cells within it of each row's best, at most {margin_probe_cap(nlist, schema.rows)} "
                  f"a row and {probe_cap(nlist, schema.rows, max_share=share)} on average; then {missed})")
    else:
        detail = f"{nlist} cells, nprobe {IVF_NPROBE}, recall measured on {cfg.knn_recall_sample} rows"
    memory, seconds = estimate(schema.rows, dim, nodes, cpus, est.knn, levels=est.max_levels(),
                               hidden=None if est.unsupervised else est.hidden_channels)
    taus = _tau_source(est)
    return Plan(
        input=cfg.input, files=len(files), rows=schema.rows, dimension=dim, id_column=schema.id_column,
        embedding_column=schema.embedding_column, label_column=schema.label_column, rows_checked=checked,
        ids_checked=ids_checked, output=cfg.output, previous=cfg.previous, model=cfg.model,
        unsupervised=est.unsupervised, k=est.k, max_levels=est.max_levels(),
        tau=f"{est.tau} (user)" if taus == "user" else taus, decode="sim" if est.unsupervised else est.decode,
        knn_method=method, knn_detail=detail, nodes=nodes, cpus=cpus, num_shards=cfg.num_shards or cpus,
        peak_memory_gb_per_node=memory, node_memory_gb=node_memory, run_seconds=seconds,
    )


# -- the training job ---------------------------------------------------------------------------------
#: Costs of the training job measured by ``python benchmarks/bench_estimate.py --sizes "" --train-sizes
#: 20000,60000`` (same machine as :data:`COSTS`, 256-d make_faces, 2 epochs, one worker on both CPUs):
#: memory per row of the table (the prepared table, its splits and ground-truth level graphs in the object
#: store and the worker) and CPU-seconds per training row and epoch (all ground-truth levels of an epoch,
#: validation included), rows counting the identity-subsampled copy's, each from the line through two
#: runs: time from those of 2026-12-05 (41.6 / 68.7 s; the faster training steps), memory from the pair
#: before (2.42 / 2.79 GiB), which stays above that day's (2.42 / 2.57 GiB, estimated 2.49 / 2.99).
TRAIN_COSTS = {
    "base_gb": 1.64,
    "worker_gb": 0.6,
    "bytes_per_row_float": 32.9,
    "bytes_per_row": 1500.0,
    "epoch_s_per_row": 5.44e-4,
    "fixed_s": 27.8,
}


@dataclass
class TrainPlan(_Estimated):
    """What the training job would do with a configuration, and what it would cost."""

    input: str
    files: int
    rows: int
    dimension: int | None
    classes: int
    train_rows: int
    val_rows: int
    rows_checked: int
    output: str
    checkpoints: str
    resume_from_checkpoint: bool
    num_workers: int
    use_gpu: bool
    cpus: int
    epochs: int
    batch_size: int

    def lines(self) -> list[str]:
        """The plan as an operator reads it."""
        return [
            f"input:    {self.input}: {self.rows:,} rows in {self.files} file(s), dimension {self.dimension}, "
            f"{self.classes:,} classes",
            f"checked:  footers of every file, {self.rows_checked:,} rows (NaN/Inf, zero, ragged, nulls), every id "
            f"unique, the class split",
            f"split:    {self.train_rows:,} training rows, {self.val_rows:,} validation rows (whole classes held out)",
            f"training: {self.epochs} epochs, global batch {self.batch_size}, {self.num_workers} worker(s) "
            f"({'GPU' if self.use_gpu else 'CPU'}) on {self.cpus} CPUs",
            f"output:   {self.output}; checkpoints {self.checkpoints}"
            + (" (resumed from its latest)" if self.resume_from_checkpoint else ""),
            self.estimate_line(),
        ]


def counted_training_rows(rows: int, train_rows: int, subsample: bool) -> tuple[int, int]:
    """``(rows, train_rows)`` as :data:`TRAIN_COSTS` count them: with ``subsample`` the identity-subsampled
    copy is trained on too, about ``SUBSAMPLE_SHARE`` of the training rows more, in both counts."""
    from agc_ray.core.train import SUBSAMPLE_SHARE

    copy_rows = round(train_rows * SUBSAMPLE_SHARE) if subsample else 0
    return rows + copy_rows, train_rows + copy_rows


def estimate_training(rows: int, train_rows: int, dim: int, epochs: int, workers: int, cpus_per_worker: float,
                      nodes: int = 1, costs: dict = TRAIN_COSTS) -> tuple[float, float]:
    """(peak memory GiB per node, wall seconds) of a training run (see :data:`TRAIN_COSTS`)."""
    c = costs
    memory = (c["base_gb"] + c["worker_gb"] * math.ceil(workers / max(1, nodes))
              + rows * (c["bytes_per_row_float"] * dim + c["bytes_per_row"]) / 2**30)
    cpus = max(1.0, workers * max(1.0, math.floor(cpus_per_worker)))
    return memory, c["fixed_s"] + c["epoch_s_per_row"] * train_rows * epochs * dim / 256 / cpus


def plan_training(cfg, num_cpus: float | None = None) -> TrainPlan:
    """Check everything the training job can check without training (InputError as the real run) and plan it."""
    import pyarrow.dataset as pds

    from agc_ray.distributed import train as tr

    cfg.validate()
    tr.check_output(cfg, clean=False)
    nodes, cpus, node_memory = cluster_shape(int(num_cpus) if num_cpus else None)
    if _on_ray_cluster():
        tr.check_cluster_capacity(cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu)
    else:
        gpus = _local_gpus() if cfg.use_gpu else 0
        tr.check_cluster_capacity(cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu,
                                  nodes=[{"Alive": True, "Resources": {"CPU": float(cpus), "GPU": float(gpus)}}])
    storage, run_name, exists = tr.check_checkpoints(cfg)
    fs, schema = tr.inspect_table(cfg)
    checked, dim = check_rows(fs, schema)
    table = pds.dataset(schema.files, filesystem=fs, format="parquet").to_table(columns=[cfg.id_column, cfg.label_column])
    for column in (cfg.id_column, cfg.label_column):  # outside the sampled rows
        if table.column(column).null_count:
            raise InputError(f"{'label' if column == cfg.label_column else 'id'} column {column!r} has "
                             f"{table.column(column).null_count} null value(s)")
    _, order = tr.sort_ids(table.column(0))  # as the real run: duplicates refused, rows by id
    labels = table.column(1).to_numpy()[order]
    val = tr.check_split(cfg, labels)
    n_val = int(val.sum())
    rows, train_rows = counted_training_rows(schema.rows, schema.rows - n_val, cfg.subsample_identities)
    memory, seconds = estimate_training(rows, train_rows, dim, cfg.epochs, cfg.num_workers, cfg.cpus_per_worker, nodes)
    return TrainPlan(
        input=cfg.input, files=len(schema.files), rows=schema.rows, dimension=dim,
        classes=int(np.unique(labels).size), train_rows=schema.rows - n_val,
        val_rows=n_val, rows_checked=checked, output=cfg.output, checkpoints=f"{storage}/{run_name}",
        resume_from_checkpoint=bool(exists and cfg.resume), num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
        cpus=cpus, epochs=cfg.epochs, batch_size=cfg.batch_size, peak_memory_gb_per_node=memory,
        node_memory_gb=node_memory, run_seconds=seconds,
    )


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
