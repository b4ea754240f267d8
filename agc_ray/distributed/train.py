"""Distributed LANDER training on Ray: Ray Data reads the table, Ray Train runs DDP.

The job (``jobs/train.py``) is :func:`run_training` over a :class:`TrainJobConfig`:

1. :func:`inspect_table` checks the Parquet files' footers in the driver (path, schemas, columns,
   types, row count) without reading any data; :func:`read_table` reads them with Ray Data.
2. :func:`prepare_data`, as Ray tasks on the table's blocks (never in the driver): :func:`split_rows`
   validates the rows, sorts them by id (so that block order does not matter), fingerprints them and
   holds out a validation split of whole classes; each split's level-0 kNN graph is searched over the
   clustering job's sharded faiss index (:func:`agc_ray.distributed.knn.sharded_knn_graph`: identical
   to a single index with exact search); :func:`build_graphs` builds the ground-truth level graphs
   with the core (:func:`agc_ray.core.train.ground_truth_graphs`). The arrays stay in Ray's object store; every
   training worker maps them read-only.
3. :func:`train_loop_per_worker` runs under ``TorchTrainer`` (gloo on CPU, NCCL on GPU). The core's
   training schedule is kept (AdamW + one-cycle cosine per phase, the second half of the epochs with
   the model's own levels added: "self-training"). Each step takes one global batch of
   ``batch_size`` seed nodes of one level graph, identical on every rank (a per-epoch seeded
   shuffle), and every rank computes the loss of its own contiguous slice of it; DDP averages the
   gradients, so N workers follow the single-worker trajectory with 1/N of the work each.
4. Rank 0 validates after every epoch (loss on the held-out ground-truth graphs, Fp / Fb / NMI of the
   clustering of the held-out rows) and saves a checkpoint (model, optimiser, scheduler, history).
   Batch order and dropout are re-seeded from (seed, epoch, rank) every epoch, so a run resumed from a
   checkpoint, after a lost worker (``FailureConfig``) or with ``--resume``, follows exactly the
   trajectory of an uninterrupted one.
5. The driver writes MODEL_DIR in the ``HiLander.save`` format plus a ``training`` block in
   ``config.json`` (data fingerprint, epochs, per-epoch metrics, resumes).

Errors in the input raise :class:`InputError` (the job exits with code 2 and writes nothing).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from agc_ray.core.calibration import holdout_classes as split_by_class  # one implementation: the core's
from agc_ray.core.validation import check_param
from agc_ray.distributed import progress
from agc_ray.distributed.commit import (
    StagingLock, Version, clean_local, local_lock, observe, replace_local_dir, require_unchanged, utc_now,
)
from agc_ray.distributed.errors import InputError, find_input_error  # shared with the clustering job

log = logging.getLogger("agc_ray")

STATE_FILE = "state.pt"
META_FILE = "meta.json"
#: HiLander parameters that the training job sets (others keep HiLander's defaults).
MODEL_PARAMS = (
    "k", "tau", "levels", "seed", "knn", "decode", "early_stop", "conv", "hidden_channels", "edge_channels",
    "dropout", "batch_size", "lr", "weight_decay", "train_levels", "conn_edges", "balance", "focal_gamma",
    "self_training", "epochs",
)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainJobConfig:
    """Every setting of the training job (the CLI flags and YAML keys have the same names).

    Model and optimiser settings mirror :class:`agc_ray.core.estimator.HiLander`'s parameters;
    ``batch_size`` is the *global* batch of seed nodes per step (each of N workers takes 1/N of it).
    """

    input: str = ""
    output: str = ""
    id_column: str = "id"
    embedding_column: str = "embedding"
    label_column: str = "label"
    # distribution
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str | None = None
    run_name: str | None = None
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    max_failures: int = 1
    resume: bool = False
    overwrite: bool = False
    # data
    val_fraction: float = 0.1
    # model / optimiser (HiLander parameters)
    epochs: int = 6
    k: int = 10
    tau: float | None = None  # None: the model's per-level defaults (core.estimator.DEFAULT_TAUS)
    levels: int = 10
    seed: int = 0
    knn: str = "auto"
    decode: str = "prob"
    early_stop: bool = True
    conv: str = "lander"
    hidden_channels: int = 128
    edge_channels: int = 128
    dropout: float = 0.5
    batch_size: int = 1024
    lr: float = 3e-3
    weight_decay: float = 1e-2
    train_levels: int = 4
    conn_edges: str = "all"
    balance: bool = True
    focal_gamma: float = 0.0
    self_training: bool = True

    def model_params(self) -> dict:
        """The HiLander parameters of the trained model."""
        return {name: getattr(self, name) for name in MODEL_PARAMS}

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first invalid setting."""
        from agc_ray.core.estimator import HiLander

        if not self.input:
            raise InputError("--input is required")
        if not self.output:
            raise InputError("--output is required")
        if self.output.startswith("s3://"):
            raise InputError(f"--output must be a local directory (HiLander.load reads local paths), got {self.output}")
        for name in ("id_column", "embedding_column", "label_column"):
            if not getattr(self, name):
                raise InputError(f"--{name.replace('_', '-')} must be a non-empty column name")
        _check_number("num_workers", self.num_workers, int, 1)
        _check_number("cpus_per_worker", self.cpus_per_worker, float, 0.01)
        _check_number("checkpoint_every", self.checkpoint_every, int, 1)
        _check_number("keep_checkpoints", self.keep_checkpoints, int, 1)
        _check_number("max_failures", self.max_failures, int, -1)
        _check_number("val_fraction", self.val_fraction, float, 0.0, 0.9)
        try:
            HiLander(**self.model_params()).validate_params()
        except ValueError as e:
            msg = str(e).removeprefix("HiLander: ")
            name, _, rest = msg.partition(" ")
            raise InputError(f"--{name.replace('_', '-')} {rest}") from None


def _check_number(name, value, kind, low=None, high=None):
    check_param("--" + name.replace("_", "-"), value, kind, low, high, error=InputError)


# --------------------------------------------------------------------------------------------------
# Input: the clustering job's footer checks and per-block validation, then one preparation task
# --------------------------------------------------------------------------------------------------
def inspect_table(cfg: TrainJobConfig):
    """``(filesystem, InputSchema)``: files, schemas, columns (label required), types and row count,
    from the Parquet footers only (:func:`agc_ray.distributed.io.check_schema`)."""
    from agc_ray.distributed.io import check_schema, resolve_input

    fs, files = resolve_input(cfg.input)
    return fs, check_schema(fs, files, cfg.id_column, cfg.embedding_column, cfg.label_column)


def read_table(fs, schema, cfg: TrainJobConfig):
    """Ray Data dataset of validated, L2-normalised rows: columns ``id``, ``x`` (tensor), ``label``.

    Every block goes through the clustering job's :func:`agc_ray.distributed.io.prepare_block`
    (null ids or labels, ragged, NaN/Inf or all-zero embeddings raise InputError).
    """
    import ray

    from agc_ray.distributed.io import prepare_block

    ds = ray.data.read_parquet(schema.files, filesystem=fs)
    ds = ds.select_columns([cfg.id_column, cfg.embedding_column, cfg.label_column])
    return ds.map_batches(
        prepare_block, batch_format="pyarrow", batch_size=None,
        fn_kwargs=dict(id_column=cfg.id_column, embedding_column=cfg.embedding_column,
                       label_column=cfg.label_column, dim=schema.dim),
    )


def _tensor_matrix(col) -> np.ndarray:
    arr = col.combine_chunks()
    if hasattr(arr, "to_numpy_ndarray"):
        return np.ascontiguousarray(arr.to_numpy_ndarray(), dtype=np.float32)
    return np.ascontiguousarray(np.stack(arr.to_numpy(zero_copy_only=False)), dtype=np.float32)


def sort_ids(column) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted ids, order)`` of an id column; InputError on duplicates (the rows are sorted by id)."""
    ids = column.to_numpy()
    if ids.dtype == object:
        ids = ids.astype(str)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    dup = ids[1:] == ids[:-1]
    if dup.any():
        raise InputError(f"id column has duplicate values (example id {ids[1:][dup][0]!r}, {int(dup.sum())} duplicates)")
    return ids, order


def table_arrays(tables: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, x, y)`` of prepared blocks (see :func:`read_table`), sorted by id, ids checked unique.

    Sorting makes everything downstream independent of the order in which Ray Data delivers blocks.
    """
    import pyarrow as pa

    tables = [t for t in tables if t.num_rows]
    if not tables:
        raise InputError("input has zero rows")
    table = pa.concat_tables(tables)
    ids, order = sort_ids(table.column("id"))
    x = _tensor_matrix(table.column("x"))[order]
    y = table.column("label").to_numpy().astype(np.int64)[order]
    return ids, x, y


def data_fingerprint(ids: np.ndarray, x: np.ndarray, y: np.ndarray) -> str:
    """sha256 of the id-sorted ids, embeddings and labels (the rows the model was trained on)."""
    h = hashlib.sha256()
    if ids.dtype == object:
        h.update("\x00".join(map(str, ids)).encode())
    else:
        h.update(np.ascontiguousarray(ids.astype(np.int64)).data)
    h.update(np.ascontiguousarray(x, dtype=np.float32).data)
    h.update(np.ascontiguousarray(y, dtype=np.int64).data)
    h.update(str(x.shape).encode())
    return h.hexdigest()


def graph_arrays(g) -> dict:
    """A :class:`~agc_ray.core.train.TrainGraph` as numpy arrays (zero-copy in the object store)."""
    out = {f: getattr(g, f).numpy() for f in ("x_id", "nbr", "sim", "feats", "same", "denser", "density")}
    out["x_mean"] = None if g.x_mean is g.x_id else g.x_mean.numpy()
    out["k"], out["level"] = g.k, g.level
    return out


def graph_from_arrays(d: dict, device="cpu"):
    """Inverse of :func:`graph_arrays` (tensors share the read-only buffers on CPU)."""
    import warnings

    import torch

    from agc_ray.core.train import TrainGraph

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffers: never written
        t = {f: torch.from_numpy(d[f]) for f in ("x_id", "nbr", "sim", "feats", "same", "denser", "density")}
    t["x_mean"] = t["x_id"] if d["x_mean"] is None else torch.from_numpy(d["x_mean"])
    g = TrainGraph(**t, k=d["k"], level=d["level"])
    return g.to(device) if str(device) != "cpu" else g


def check_split(cfg: TrainJobConfig, y: np.ndarray) -> np.ndarray:
    """The validation mask of the id-sorted labels ``y`` (whole classes held out); InputError when a
    split is too small to train or validate on."""
    if np.unique(y).size < 2:
        raise InputError(f"label column {cfg.label_column!r} has a single class ({y[0]}); training needs at least 2")
    val = split_by_class(y, cfg.val_fraction, cfg.seed)
    n_train, n_val = int((~val).sum()), int(val.sum())
    if n_train < cfg.batch_size:
        raise InputError(
            f"{n_train} training rows ({y.size} rows, {n_val} held out for validation) is fewer than "
            f"--batch-size {cfg.batch_size}"
        )
    if n_train <= cfg.k:
        raise InputError(f"{n_train} training rows; more than --k {cfg.k} are needed")
    if np.unique(y[~val]).size < 2:
        raise InputError("the training split has a single class; lower --val-fraction or add classes")
    if n_val and (n_val <= cfg.k or np.unique(y[val]).size < 2):
        raise InputError(
            f"the validation split ({n_val} rows, {np.unique(y[val]).size} classes) needs more than "
            f"--k {cfg.k} rows and 2 classes; raise --val-fraction or set it to 0"
        )
    return val


def split_rows(cfg: TrainJobConfig, *tables) -> dict:
    """Validate the rows, sort them by id, fingerprint them and hold out whole classes (a Ray task).

    Returns a dict of numpy arrays and small metadata: ``x_train``, ``y_train``, ``x_val``, ``y_val``
    (None without validation), ``fingerprint``, counts, ``prepare_seconds``.
    """
    t0 = time.perf_counter()
    ids, x, y = table_arrays(list(tables))
    fingerprint = data_fingerprint(ids, x, y)
    val = check_split(cfg, y)
    n_train, n_val = int((~val).sum()), int(val.sum())
    out = {
        "fingerprint": fingerprint, "n_rows": int(x.shape[0]), "n_train": n_train, "n_val": n_val,
        "dim": int(x.shape[1]), "n_classes": int(np.unique(y).size),
        "x_train": np.ascontiguousarray(x[~val]), "y_train": y[~val], "x_val": None, "y_val": None,
    }
    if n_val:
        out.update(x_val=np.ascontiguousarray(x[val]), y_val=y[val])
    out["prepare_seconds"] = time.perf_counter() - t0
    return out


def row_shards(data: dict, split: str, bounds: np.ndarray) -> list[np.ndarray]:
    """``data[split]`` cut into the contiguous row shards of ``bounds`` (a Ray task with len(bounds) - 1 returns)."""
    x = data[split]
    parts = [x[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
    return parts if len(parts) > 1 else parts[0]


def build_graphs(cfg: TrainJobConfig, data: dict, train_graph, val_graph) -> dict:
    """``data`` plus the ground-truth level graphs of both splits (a Ray task).

    ``train_graph`` / ``val_graph``: the splits' level-0 kNN graphs (nbr, sim) from the sharded search
    (None: the core searches itself); higher levels are built by the core.
    """
    from agc_ray.core.train import ground_truth_graphs

    t0 = time.perf_counter()
    settings = ((cfg.k, cfg.train_levels),)
    out = dict(data)
    out["train_graphs"] = [graph_arrays(g) for g in ground_truth_graphs(
        data["x_train"], data["y_train"], settings, knn_method=cfg.knn, seed=cfg.seed, first_graph=train_graph)]
    out["val_graphs"] = [] if not data["n_val"] else [graph_arrays(g) for g in ground_truth_graphs(
        data["x_val"], data["y_val"], settings, knn_method=cfg.knn, seed=cfg.seed, first_graph=val_graph)]
    out["prepare_seconds"] = data["prepare_seconds"] + time.perf_counter() - t0
    return out


def prepare_data(cfg: TrainJobConfig, table_refs: list, num_shards: int):
    """Ref to the training data dict (:func:`split_rows` + :func:`build_graphs`), with the level-0 kNN
    graphs of both splits searched over the clustering job's sharded index (never in the driver)."""
    import ray

    from agc_ray.core.knn import KNN_RECALL, RECALL_SAMPLE
    from agc_ray.distributed.io import shard_bounds
    from agc_ray.distributed.knn import sharded_knn_graph

    cpus = min(1.0, cfg.cpus_per_worker)
    data = ray.remote(split_rows).options(num_cpus=cpus, max_retries=0).remote(cfg, *table_refs)
    summary = ray.get(ray.remote(_data_summary).options(num_cpus=0).remote(data))
    graphs, actors = {}, []
    for split, n in (("x_train", summary["n_train"]), ("x_val", summary["n_val"])):
        if not n:
            graphs[split] = None
            continue
        bounds = shard_bounds(n, num_shards)
        shards = ray.remote(row_shards).options(num_cpus=cpus, num_returns=bounds.size - 1).remote(data, split, bounds)
        graphs[split], info, new_actors = sharded_knn_graph(
            shards if isinstance(shards, list) else [shards], bounds, cfg.k, cfg.knn, cfg.seed,
            recall_sample=RECALL_SAMPLE, recall_target=KNN_RECALL)  # the IVF search of the core's training graphs
        actors += new_actors
        log.info("%s: %d rows, level-0 kNN over %d index shards (%s)", split, n, bounds.size - 1, info["knn_method"])
    task = ray.remote(build_graphs).options(num_cpus=cpus, max_retries=0)
    out = task.remote(cfg, data, graphs["x_train"], graphs["x_val"])
    ray.wait([out], fetch_local=False)
    for a in actors:
        ray.kill(a)
    return out, summary


# --------------------------------------------------------------------------------------------------
# The per-worker training loop
# --------------------------------------------------------------------------------------------------
def _loss_module(lander, graphs, *, balance, focal_gamma, all_edges):
    """An ``nn.Module`` whose ``forward(graph_index, seeds)`` is :func:`agc_ray.core.train.batch_loss`.

    DDP synchronises gradients only through ``forward`` of the wrapped module, and ``batch_loss``
    calls the Lander's ``embed`` / ``edge_logits`` methods: this wrapper gives it a ``forward``.
    The level graphs are a plain attribute (not buffers): DDP neither broadcasts nor moves them.
    """
    import torch

    from agc_ray.core.train import batch_loss

    class BatchLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lander = lander
            self.graphs = graphs

        def forward(self, gi: int, seeds: torch.Tensor):
            return batch_loss(
                self.lander, self.graphs[gi], seeds, balance=balance, focal_gamma=focal_gamma, all_edges=all_edges
            )

    return BatchLoss()


def epoch_batches(graphs, batch_size: int, seed: int, epoch: int):
    """The global batch list of an epoch: ``[(graph_index, seeds)]`` in a seeded shuffled order.

    Identical on every rank (and across restarts) for the same (seed, epoch): the core's
    :func:`~agc_ray.core.train.epoch_batches` with a generator seeded by (seed, epoch).
    """
    import torch

    from agc_ray.core.train import epoch_batches as core_epoch_batches

    return core_epoch_batches(graphs, batch_size, torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def rank_share(seeds, rank: int, world: int):
    """This rank's contiguous slice of a global batch and its loss weight (0 for an empty slice).

    A rank whose slice is empty still runs a step (DDP needs every rank in every all-reduce) on one
    seed with weight 0.
    """
    mine = seeds.tensor_split(world)[rank]
    if mine.numel() == 0:
        return seeds[:1], 0.0
    return mine, 1.0


def _estimator(params: dict, model, dim: int, device: str):
    from agc_ray.core.estimator import HiLander

    est = HiLander(**{**params, "device": device})
    est.model_ = model
    est.n_features_in_ = dim
    return est


@dataclass
class _Phase:
    index: int
    start: int  # first epoch (0-based)
    stop: int  # one past the last epoch


def _phases(epochs: int, self_training: bool) -> list[_Phase]:
    """The core's schedule: the first half of the epochs on ground truth, the rest with own levels."""
    first = max(1, epochs // 2) if self_training and epochs > 1 else epochs
    phases = [_Phase(0, 0, first)]
    if first < epochs:
        phases.append(_Phase(1, first, epochs))
    return phases


def _validate_epoch(lander, val_graphs, x_val, y_val, params, batch_size, device) -> dict:
    """Held-out loss (ground-truth val graphs) and Fp / Fb / NMI of clustering the held-out rows."""
    import torch

    from agc_ray.core.train import batch_loss
    from agc_ray.metrics import evaluate

    if x_val is None:
        return {}
    lander.eval()
    sums, count = np.zeros(2), 0
    with torch.no_grad():
        for g in val_graphs:
            for start in range(0, g.n, batch_size):
                seeds = torch.arange(start, min(start + batch_size, g.n), device=device)
                conn, den = batch_loss(
                    lander, g, seeds, balance=params["balance"], focal_gamma=params["focal_gamma"],
                    all_edges=params["conn_edges"] == "all",
                )
                sums += (conn.item(), den.item())
                count += 1
    t0 = time.perf_counter()
    est = _estimator(params, copy.deepcopy(lander).eval(), x_val.shape[1], "cuda" if device.type == "cuda" else "cpu")
    levels = est.predict_hierarchy(x_val)
    scores = evaluate(y_val, levels[-1])
    lander.train()
    return {
        "val_loss_conn": float(sums[0] / max(count, 1)),
        "val_loss_den": float(sums[1] / max(count, 1)),
        "val_fp": float(scores["fp"]),
        "val_fb": float(scores["fb"]),
        "val_nmi": float(scores["nmi"]),
        "val_levels": len(levels),
        "val_clusters": int(np.unique(levels[-1]).size),
        "val_seconds": time.perf_counter() - t0,
    }


def _save_checkpoint(state: dict, meta: dict):
    import torch
    from ray.train import Checkpoint

    tmp = tempfile.mkdtemp(prefix="agc_ckpt_")
    torch.save(state, os.path.join(tmp, STATE_FILE))
    Path(tmp, META_FILE).write_text(json.dumps(meta, indent=1))
    return tmp, Checkpoint.from_directory(tmp)


def _load_checkpoint(checkpoint) -> tuple[dict, dict]:
    import torch

    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        meta = json.loads(Path(d, META_FILE).read_text())
    return state, meta


def _maybe_inject_fault(fault: dict | None, epoch_done: int, rank: int) -> None:
    """Testing hook: kill this worker process once (a lost worker), after epoch ``fault['epoch']``."""
    if not fault or fault.get("epoch") != epoch_done or fault.get("rank", 1) != rank:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(str(epoch_done))
    time.sleep(fault.get("delay_s", 3.0))  # let the controller record the epoch's checkpoint first
    log.warning("fault injection: worker rank %d exits after epoch %d", rank, epoch_done)
    os._exit(1)


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function (one process per rank). See the module docstring.

    ``config``: ``params`` (HiLander parameters), ``data`` (ObjectRef of :func:`build_graphs`'s
    output), ``threads``, ``checkpoint_every``, ``fingerprint``, optional ``fault``.
    """
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from agc_ray.distributed import logs

    logs.configure(config.get("verbose", False))  # this process's loggers, as the driver's (before faiss loads)
    from agc_ray.core.lander import Lander
    from agc_ray.core.train import epoch_steps, fit_normalization, optimizer, self_training_graphs

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # a worker process of its own: reproducible weights for a seed, as in the core
        torch.use_deterministic_algorithms(True)
    params = config["params"]
    seed, epochs, bs = params["seed"], params["epochs"], params["batch_size"]
    data = ray.get(config["data"])
    graphs = [graph_from_arrays(d, device) for d in data["train_graphs"]]
    val_graphs = [graph_from_arrays(d, device) for d in data["val_graphs"]] if rank == 0 else []
    dim = data["dim"]

    torch.manual_seed(seed)
    lander = Lander(
        dim, params["k"], hidden_channels=params["hidden_channels"], edge_channels=params["edge_channels"],
        conv=params["conv"], dropout=params["dropout"],
    )
    state, start = None, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state, meta = _load_checkpoint(checkpoint)
        if meta["fingerprint"] != config["fingerprint"]:
            raise RuntimeError(f"checkpoint {checkpoint.path} was trained on other data ({meta['fingerprint'][:12]})")
        lander.load_state_dict(state["model"])
        start = int(state["epoch"])
        history, resumes = list(state["history"]), [*state["resumes"], start]
        log.info("rank %d: resumed from the checkpoint of epoch %d", rank, start)
    else:
        fit_normalization(lander, [graph_from_arrays(d) for d in data["train_graphs"]], torch.Generator().manual_seed(seed))
        history, resumes = [], []
    loss_module = _loss_module(
        lander, graphs, balance=params["balance"], focal_gamma=params["focal_gamma"],
        all_edges=params["conn_edges"] == "all",
    )
    model = ray.train.torch.prepare_model(loss_module)
    boundary = state.get("boundary") if state else None
    for phase in _phases(epochs, params["self_training"]):
        if phase.stop <= start:
            continue
        if phase.index == 1:
            # Self-training: the model's own levels of the training rows, from the weights at the
            # phase boundary (kept in checkpoints so that a resumed run rebuilds the same graphs).
            src = copy.deepcopy(lander).cpu()
            if boundary is not None:
                src.load_state_dict(boundary)
            else:
                boundary = {k: v.detach().cpu().clone() for k, v in lander.state_dict().items()}
            est = _estimator(params, src.eval(), dim, "cuda" if device.type == "cuda" else "cpu")
            own = est.own_levels(data["x_train"], data["y_train"])
            loss_module.graphs = self_training_graphs(graphs, [g.to(device) for g in own])
            log.info("rank %d: self-training with %d own level graphs (%s nodes)", rank, len(own), [g.n for g in own])
        steps = epoch_steps(loss_module.graphs, bs)
        opt, sched = optimizer(lander, lr=params["lr"], weight_decay=params["weight_decay"],
                               total_steps=(phase.stop - phase.start) * steps)
        if state is not None and state["phase"] == phase.index and phase.start < start:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        for epoch in range(max(start, phase.start), phase.stop):
            t0 = time.perf_counter()
            model.train()
            torch.manual_seed(seed * 7919 + epoch * 131 + rank)  # dropout: per rank, per epoch
            batches = epoch_batches(loss_module.graphs, bs, seed, epoch)
            sums = torch.zeros(3, dtype=torch.float64)
            ticker = progress.Ticker(f"epoch {epoch + 1}/{epochs}", len(batches), "batches") if rank == 0 else None
            for b, (gi, seeds) in enumerate(batches):
                if ticker is not None:
                    ticker.tick(b)
                mine, weight = rank_share(seeds, rank, world)
                conn, den = model(gi, mine.to(device))
                loss = (conn + den) * weight
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                sums += torch.tensor([conn.item() * weight, den.item() * weight, weight], dtype=torch.float64)
            if dist.is_available() and dist.is_initialized() and world > 1:
                sums = sums.to(device)  # NCCL reduces CUDA tensors only
                dist.all_reduce(sums)  # the mean over every rank's batches
                sums = sums.cpu()
            seconds = time.perf_counter() - t0
            rec = {
                "epoch": epoch + 1,
                "phase": phase.index,
                "loss_conn": float(sums[0] / sums[2]),
                "loss_den": float(sums[1] / sums[2]),
                "seconds": seconds,
                "seed_nodes": int(sum(g.n for g in loss_module.graphs)),
                "seed_nodes_per_s": sum(g.n for g in loss_module.graphs) / seconds,
            }
            checkpoint, tmp = None, None
            if rank == 0:
                rec.update(_validate_epoch(lander, val_graphs, data["x_val"], data["y_val"], params, bs, device))
                history.append(rec)
                left = (epochs - epoch - 1) * sum(h["seconds"] for h in history[-3:]) / len(history[-3:])
                log.info("epoch %d/%d: %s%s", epoch + 1, epochs,
                         {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()},
                         f"; ETA {progress.duration(left)}" if epoch + 1 < epochs else "")
                if (epoch + 1) % config["checkpoint_every"] == 0 or epoch + 1 == epochs:
                    state_out = {
                        "model": lander.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "epoch": epoch + 1,
                        "phase": phase.index,
                        "history": history,
                        "resumes": resumes,
                        "boundary": boundary,
                    }
                    tmp, checkpoint = _save_checkpoint(
                        state_out, {"fingerprint": config["fingerprint"], "epoch": epoch + 1, "params": params}
                    )
            ray.train.report({**rec, "resumes": resumes}, checkpoint=checkpoint)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            _maybe_inject_fault(config.get("fault"), epoch + 1, rank)
        state = None  # the next phase starts with a fresh optimiser


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
def check_cluster_capacity(num_workers: int, cpus_per_worker: float, use_gpu: bool, nodes: list | None = None) -> None:
    """Raise :class:`InputError` when the cluster's nodes cannot place ``num_workers`` workers at all.

    Counts whole workers per alive node (a worker cannot span nodes); busy resources are not
    counted against the cluster: those workers wait, they can be placed eventually. ``nodes``:
    ``ray.nodes()``'s entries (default: asked from the connected cluster).
    """
    if nodes is None:
        import ray

        nodes = ray.nodes()
    fits, summary = 0, []
    for node in nodes:
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        cpu, gpu = res.get("CPU", 0.0), res.get("GPU", 0.0)
        n = math.floor(cpu / cpus_per_worker + 1e-9)
        if use_gpu:
            n = min(n, math.floor(gpu + 1e-9))
        fits += n
        summary.append(f"{cpu:g} CPU" + (f" {gpu:g} GPU" if use_gpu else ""))
    if fits < num_workers:
        need = f"{cpus_per_worker:g} CPU" + (" + 1 GPU" if use_gpu else "")
        raise InputError(
            f"--num-workers {num_workers}: each worker needs {need}, but the cluster ({len(summary)} nodes: "
            f"{', '.join(summary)}) can place at most {fits}; lower --num-workers or --cpus-per-worker"
        )


def _default_run_name(cfg: TrainJobConfig) -> str:
    key = json.dumps({"input": cfg.input, "output": os.path.abspath(cfg.output), **cfg.model_params()}, sort_keys=True)
    return "agc-train-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def storage_location(cfg: TrainJobConfig) -> tuple[str, str]:
    """(storage_path, run_name) of the run's checkpoints (defaults: next to the output)."""
    storage = cfg.storage_path or os.path.abspath(cfg.output.rstrip("/") + ".checkpoints")
    if "://" not in storage:
        storage = os.path.abspath(storage)
    return storage, cfg.run_name or _default_run_name(cfg)


def check_checkpoints(cfg: TrainJobConfig) -> tuple[str, str, bool]:
    """``(storage, run_name, checkpoints exist)``; InputError when an earlier run's checkpoints are there
    and ``resume`` is not set."""
    storage, run_name = storage_location(cfg)
    exists = _run_has_checkpoints(storage, run_name)
    if exists and not cfg.resume:
        raise InputError(
            f"checkpoints of an earlier run exist at {storage}/{run_name}; pass --resume to continue it, or a new "
            f"--run-name / --storage-path"
        )
    return storage, run_name, exists


def _run_has_checkpoints(storage: str, run_name: str) -> bool:
    try:
        fs, root = pafs.FileSystem.from_uri(storage if "://" in storage else Path(storage).as_uri())
        info = fs.get_file_info(f"{root.rstrip('/')}/{run_name}/checkpoint_manager_snapshot.json")
    except Exception as e:  # noqa: BLE001
        raise InputError(f"--storage-path {storage}: cannot access ({type(e).__name__}: {e})") from None
    return info.type == pafs.FileType.File


def check_output(cfg: TrainJobConfig, clean: bool = True) -> Version:
    """Refuse an existing non-empty MODEL_DIR unless ``overwrite``; return the version seen (its config.json).

    A commit that a kill cut short between its two renames is undone first, and the staging
    directories of dead runs are removed (unless ``clean`` is False: the dry run changes nothing).
    """
    out = Path(cfg.output).absolute()
    if clean and out.parent.is_dir():  # else there is nothing to restore or clean up
        with local_lock(str(out)):
            clean_local(str(out), "--output")
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {cfg.output} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise InputError(f"--output {cfg.output} exists and is not empty; pass --overwrite to replace it")
    return observe(pafs.LocalFileSystem(), str(out), "config.json")


def write_model_dir(cfg: TrainJobConfig, state: dict, dim: int, training: dict, seen: Version | None = None) -> Path:
    """Write MODEL_DIR atomically: ``HiLander.save`` into a sibling staging dir, then rename.

    ``config.json`` gets a ``training`` block (fingerprint, epochs, metrics, resumes, this run's id);
    weights are a plain state dict (``weights_only=True`` loads them). ``seen`` is the version that
    :func:`check_output` returned: the directory is replaced only if it is still that version
    (:class:`~agc_ray.distributed.commit.OutputConflict` otherwise; None: not checked).
    """
    from agc_ray.core.estimator import CONFIG_FILE, HiLander
    from agc_ray.core.lander import Lander

    params = {**cfg.model_params(), "device": "auto"}
    model = Lander(
        dim, cfg.k, hidden_channels=cfg.hidden_channels, edge_channels=cfg.edge_channels, conv=cfg.conv, dropout=cfg.dropout
    )
    model.load_state_dict(state["model"])
    est = HiLander(**params)
    est.model_, est.n_features_in_, est.history_ = model.eval(), dim, state["history"]
    out = Path(cfg.output).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    run_id = training.get("run", {}).get("id") or uuid.uuid4().hex[:12]
    staging = out.parent / f".{out.name}.staging-{run_id}"
    with local_lock(str(out)):  # claimed under the lock that the next run's clean-up takes
        lock = StagingLock(str(staging))  # the next run removes it only once this process is gone
    try:
        est.save(staging)
        config = json.loads((staging / CONFIG_FILE).read_text())
        config["training"] = training
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        with local_lock(str(out)):
            if seen is not None:
                require_unchanged(seen, observe(pafs.LocalFileSystem(), str(out), CONFIG_FILE), f"--output {cfg.output}")
            replace_local_dir(str(staging), str(out), run_id)
    finally:
        lock.release()
        shutil.rmtree(staging, ignore_errors=True)
    return out


def run_training(cfg: TrainJobConfig, *, fault: dict | None = None) -> dict:
    """Run the whole job on the connected Ray cluster; return the training summary.

    Raises :class:`InputError` for bad input (before anything is written) and
    ``ray.train.TrainingFailedError`` when training fails past ``max_failures``.
    ``fault`` is a testing hook (see :func:`_maybe_inject_fault`).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t_start = time.perf_counter()
    cfg.validate()
    run = {"id": uuid.uuid4().hex[:12], "started": utc_now()}
    seen = check_output(cfg)
    check_cluster_capacity(cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu)
    storage, run_name, exists = check_checkpoints(cfg)
    if cfg.resume and not exists:
        log.warning("--resume: no checkpoint at %s/%s, starting from scratch", storage, run_name)
    fs, schema = inspect_table(cfg)
    log.info("input %s: %d files, %d rows", cfg.input, len(schema.files), schema.rows)

    t0 = time.perf_counter()
    try:
        refs = read_table(fs, schema, cfg).to_arrow_refs()
        data_ref, summary = prepare_data(cfg, refs, max(1, int(ray.cluster_resources().get("CPU", 1))))
    except Exception as e:  # Ray wraps InputErrors raised in Ray Data UDFs and tasks
        cause = find_input_error(e)
        if cause is not None:
            raise InputError(_one_line_message(cause)) from None
        raise
    del refs
    prepare_seconds = time.perf_counter() - t0
    log.info(
        "prepared %d rows (%d train, %d validation, %d classes, D=%d) in %.1fs; fingerprint %s",
        summary["n_rows"], summary["n_train"], summary["n_val"], summary["n_classes"], summary["dim"],
        prepare_seconds, summary["fingerprint"][:12],
    )
    threads = max(1, int(cfg.cpus_per_worker))
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "params": cfg.model_params(),
            "data": data_ref,
            "threads": threads,
            "verbose": log.isEnabledFor(logging.DEBUG),  # the workers log as the driver does (-v)
            "checkpoint_every": cfg.checkpoint_every,
            "fingerprint": summary["fingerprint"],
            "fault": fault,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    fit_seconds = time.perf_counter() - t0
    state, meta = _load_checkpoint(result.checkpoint)
    if meta["fingerprint"] != summary["fingerprint"] or state["epoch"] != cfg.epochs:
        raise RuntimeError(f"final checkpoint {result.checkpoint.path} is not this run's last epoch ({meta})")
    last = state["history"][-1]
    training = {
        "run": run,
        "input": cfg.input,
        "data_fingerprint": summary["fingerprint"],
        "rows": summary["n_rows"],
        "train_rows": summary["n_train"],
        "val_rows": summary["n_val"],
        "classes": summary["n_classes"],
        "columns": {"id": cfg.id_column, "embedding": cfg.embedding_column, "label": cfg.label_column},
        "epochs": cfg.epochs,
        "num_workers": cfg.num_workers,
        "use_gpu": cfg.use_gpu,
        "backend": "nccl" if cfg.use_gpu else "gloo",
        "checkpoints": f"{storage}/{run_name}",
        "resumed_from_epochs": state["resumes"],
        "metrics": {k: v for k, v in last.items() if k.startswith(("loss", "val_"))},
        "history": state["history"],
        "prepare_seconds": prepare_seconds,
        "fit_seconds": fit_seconds,
        "ray_version": ray.__version__,
    }
    path = write_model_dir(cfg, state, summary["dim"], training, seen)
    training["output"] = str(path)
    training["total_seconds"] = time.perf_counter() - t_start
    log.info("model written to %s (%.1fs in all)", path, training["total_seconds"])
    return training


def _one_line_message(err: BaseException) -> str:
    """The InputError's own message (Ray's task errors add the remote traceback around it)."""
    text = str(err)
    marker = "InputError: "
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _data_summary(data: dict) -> dict:
    """The small fields of the training data dict (the driver never fetches the arrays)."""
    return {k: v for k, v in data.items() if not isinstance(v, (np.ndarray, list)) and v is not None}


def config_fields() -> dict[str, dataclasses.Field]:
    """Name -> field of :class:`TrainJobConfig` (the CLI builds its flags and YAML keys from it)."""
    return {f.name: f for f in dataclasses.fields(TrainJobConfig)}


__all__ = [
    "InputError",
    "TrainJobConfig",
    "check_cluster_capacity",
    "data_fingerprint",
    "epoch_batches",
    "inspect_table",
    "prepare_data",
    "rank_share",
    "read_table",
    "run_training",
    "split_by_class",
    "train_loop_per_worker",
    "write_model_dir",
]
