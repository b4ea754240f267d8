"""The training job's driver: checks (cluster, checkpoints, output), the Ray Train run, the model
directory written atomically in the ``HiLander.save`` format with a ``training`` block."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from agc_ray.distributed.commit import (
    StagingLock, Version, clean_local, local_lock, observe, replace_local_dir, require_unchanged, utc_now,
)
from agc_ray.distributed.errors import InputError, find_input_error, one_line
from agc_ray.distributed.train.config import TrainJobConfig, storage_location
from agc_ray.distributed.train.data import inspect_table, prepare_data, read_table
from agc_ray.distributed.train.worker import _load_checkpoint, train_loop_per_worker

log = logging.getLogger("agc_ray")


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

    est = HiLander.from_weights(state["model"], dim, history=state["history"], **cfg.model_params(), device="auto")
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
            raise InputError(one_line(cause)) from None
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
