"""The distributed clustering job: :class:`JobConfig` and :func:`run_job`.

``run_job`` validates everything it can before any output is written (parameters, model, output
location, input footers, then every row while Ray Data reads the table), then runs the level loop of
:func:`agc_ray.core.hierarchy.build_hierarchy` over node shards (:func:`~agc_ray.distributed.levels_run.run_levels`,
see :mod:`agc_ray.distributed.level`), which writes each level under a staging prefix as soon as it is known
(with ``--previous``, once the stable ids are matched; see :mod:`agc_ray.distributed.stable`), then writes
the manifest and report.html and commits at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np

from agc_ray.core.knn import RECALL_SAMPLE
from agc_ray.core.params import DECODE_MODES
from agc_ray.core.validation import check_param
from agc_ray.distributed.errors import InputError, one_line
from agc_ray.distributed.input import check_schema, read_shards, resolve_input
from agc_ray.distributed.knn import JOB_METHODS
from agc_ray.distributed.levels_run import Job, Levels, RunInput, run_levels
from agc_ray.distributed.output import Output

log = logging.getLogger("agc_ray")


@dataclass
class JobConfig:
    """Parameters of one job run (the command line's flags; None means: the model's value or the default).

    Attributes:
        input: Parquet file, directory or glob, local or ``s3://``.
        output: output directory or ``s3://`` prefix.
        model: directory written by ``HiLander.save`` (or the training job); exclusive with unsupervised.
        unsupervised: cluster without a model (similarity density, 'sim' decode).
        id_column, embedding_column: input column names.
        label_column: integer class column; metrics per level in the manifest. None: ``label`` if the
            table has it.
        k, tau, max_levels, knn, knn_recall, decode, early_stop, seed: the core's parameters (k must match the
            model's; None: the model's own).
        boundary_closeness: the core's boundary merge above level 0 (a closeness in [0, 1], or 'off'; None:
            the model's own).
        num_shards: node shards (0: one per CPU of the cluster).
        overwrite: replace an existing non-empty output.
        knn_recall_sample: rows whose neighbours are searched exactly to tune the IVF search to ``knn_recall``
            and report its recall (the core's :data:`~agc_ray.core.knn.RECALL_SAMPLE`, so that the job
            probes as many cells as a single process; 0: no tuning, 16 cells, no recall reported).
        previous: a completed earlier output (local or ``s3://``) whose cluster ids this run keeps for
            the clusters that continue earlier ones (see :mod:`agc_ray.core.stable_ids`).
        assign_state: write ``OUTPUT/state/`` (see :mod:`agc_ray.distributed.state`), which
            ``jobs/assign.py`` needs to add new rows to this output.
    """

    input: str | None = None
    output: str | None = None
    model: str | None = None
    unsupervised: bool = False
    id_column: str = "id"
    embedding_column: str = "embedding"
    label_column: str | None = None
    k: int | None = None
    tau: float | None = None
    max_levels: int | None = None
    knn: str | None = None
    knn_recall: float | None = None
    decode: str | None = None
    early_stop: bool | None = None
    boundary_closeness: float | str | None = None
    seed: int | None = None
    num_shards: int = 0
    overwrite: bool = False
    knn_recall_sample: int = RECALL_SAMPLE
    previous: str | None = None
    assign_state: bool = True

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def _check(name, value, kind, low=None, high=None, options=None):
    if value is not None:
        check_param("--" + name.replace("_", "-"), value, kind, low, high, options, error=InputError)


def _boundary_off(cfg: JobConfig) -> bool:
    # 'off' on the command line; YAML reads a bare `off` as false
    return cfg.boundary_closeness == "off" or cfg.boundary_closeness is False


def validate_config(cfg: JobConfig) -> None:
    """Parameter checks that need no data (InputError with the flag, the value and what is expected)."""
    if not cfg.input:
        raise InputError("missing --input (a Parquet file, directory or glob, local or s3://)")
    if not cfg.output:
        raise InputError("missing --output (a directory or s3:// prefix)")
    if cfg.model and cfg.unsupervised:
        raise InputError("--model and --unsupervised are exclusive")
    if not cfg.model and not cfg.unsupervised:
        raise InputError("pass --model DIR (a saved HiLander) or --unsupervised")
    _check("k", cfg.k, int, 1)
    _check("max_levels", cfg.max_levels, int, 1)
    _check("num_shards", cfg.num_shards, int, 0)
    _check("seed", cfg.seed, int)
    _check("knn", cfg.knn, None, options=JOB_METHODS)
    _check("decode", cfg.decode, None, options=DECODE_MODES)
    _check("tau", cfg.tau, float, -1.0, 1.0)
    _check("knn_recall_sample", cfg.knn_recall_sample, int, 0)
    _check("knn_recall", cfg.knn_recall, float, 0.0, 1.0)
    if not _boundary_off(cfg):
        _check("boundary_closeness", cfg.boundary_closeness, float, 0.0, 1.0)
    if cfg.tau is not None and cfg.tau < 0 and (cfg.decode or "prob") == "prob" and not cfg.unsupervised:
        raise InputError(f"--tau must be in [0, 1] with --decode prob, got {cfg.tau!r}")


def load_estimator(cfg: JobConfig):
    """The :class:`~agc_ray.HiLander` whose parameters the job runs with (model loaded, flags applied)."""
    from agc_ray.core.estimator import HiLander

    if cfg.model:
        try:
            est = HiLander.load(cfg.model)
        except (ValueError, OSError, RuntimeError, KeyError, TypeError) as e:
            raise InputError(f"cannot load model {cfg.model}: {one_line(e)}") from e
        if cfg.k is not None and cfg.k != est.k:
            raise InputError(f"invalid --k {cfg.k}: the model {cfg.model} was trained with k={est.k} (its inputs are k-specific)")
    else:
        est = HiLander(unsupervised=True, decode="sim", k=cfg.k if cfg.k is not None else 10)
    overrides = {"tau": cfg.tau, "levels": cfg.max_levels, "knn": cfg.knn, "knn_recall": cfg.knn_recall,
                 "decode": cfg.decode, "early_stop": cfg.early_stop, "seed": cfg.seed}
    est.set_params(**{key: val for key, val in overrides.items() if val is not None})
    if cfg.boundary_closeness is not None:
        est.set_params(boundary_closeness=None if _boundary_off(cfg) else cfg.boundary_closeness)
    if est.knn not in JOB_METHODS:
        est.set_params(knn="auto")
    try:
        est.validate_params()
    except ValueError as e:
        raise InputError(str(e)) from e
    return est


def _versions() -> dict:
    import faiss
    import pyarrow
    import ray
    import torch

    from agc_ray import __version__

    return {"agc_ray": __version__, "ray": ray.__version__, "torch": torch.__version__,
            "faiss": getattr(faiss, "__version__", "?"), "pyarrow": pyarrow.__version__, "numpy": np.__version__}


def default_num_shards() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_job(cfg: JobConfig) -> dict:
    """Run the clustering job (Ray must be initialised). Returns the manifest.

    Raises:
        InputError: bad input, parameters or output location; nothing has been written.
    """
    t_start = time.perf_counter()
    validate_config(cfg)
    est = load_estimator(cfg)
    output = Output(cfg.output, cfg.overwrite)
    output.check()  # records the output's version; from here on a failure removes this run's staging
    job = None
    try:
        t0 = time.perf_counter()
        fs, files = resolve_input(cfg.input)
        schema = check_schema(fs, files, cfg.id_column, cfg.embedding_column, cfg.label_column, default_label="label")
        _check_dim(est, schema.dim, cfg)
        num_shards = cfg.num_shards or default_num_shards()
        log.info("input: %d rows in %d file(s), %d shards", schema.rows, len(files), num_shards)
        previous = None
        if cfg.previous:
            from agc_ray.distributed.stable import open_previous

            previous = open_previous(cfg.previous, schema.schema.field(schema.id_column).type)
        rows = read_shards(fs, schema, num_shards)
        _check_dim(est, rows.dim, cfg)
        timings = {"read_seconds": time.perf_counter() - t0}
        log.info("read + validate: %d rows, dimension %d, %.1fs", rows.n, rows.dim, timings["read_seconds"])

        job = Job(cfg, est, num_shards)
        run_input = RunInput(schema, rows, previous)
        manifest = _manifest(job, output, run_input, timings, run_levels(job, output, run_input))
        job.close()
        t0 = time.perf_counter()
        manifest["timings"]["total_seconds"] = time.perf_counter() - t_start
        _write_report(output, manifest)
        # the output and the previous output must still be what this run saw when it started
        require = () if previous is None else ((previous.fs, previous.path, previous.version, f"--previous {previous.uri}"),)
        output.commit(manifest, require)
    except BaseException:
        if job is not None:
            job.close()
        output.abort()
        raise
    log.info("committed %s (%.1fs)", cfg.output, time.perf_counter() - t0)
    return manifest


def _write_report(output, manifest: dict) -> None:
    """report.html into staging, committed with the rest; a report failure never fails a finished job."""
    from agc_ray.distributed.report import write_report

    try:
        write_report(output.fs, output.staging, manifest)
    except Exception as e:  # noqa: BLE001 - the clustering result matters more than its report
        log.warning("report.html not written: %s", one_line(e))


def _check_dim(est, dim, cfg):
    n_in = getattr(est, "n_features_in_", None)
    if dim is not None and n_in is not None and not est.unsupervised and dim != n_in:
        raise InputError(f"model {cfg.model} expects {n_in}-dimensional embeddings, the table's are {dim}-dimensional")


def _manifest(job: Job, output, run_input: RunInput, timings: dict, levels: Levels) -> dict:
    """The run's manifest.json: input, parameters, model, versions, timings and the levels found."""
    cfg, est, schema, rows, previous = job.cfg, job.est, run_input.schema, run_input.rows, run_input.previous
    return {
        "status": "succeeded",
        "run": output.run_info(),
        "input": {"path": cfg.input, "files": len(schema.files), "rows": rows.n, "dimension": rows.dim,
                  "id_column": schema.id_column, "embedding_column": schema.embedding_column,
                  "label_column": schema.label_column},
        "output": cfg.output,
        "previous": None if previous is None else {"path": previous.uri, "levels": previous.levels,
                                                    "run_id": previous.version.run_id},
        "parameters": {"k": est.k, "tau": levels.taus, "tau_source": _tau_source(est),
                       "max_levels": est.max_levels(), "knn": est.knn, "knn_recall": est.knn_recall,
                       "knn_recall_sample": cfg.knn_recall_sample, "decode": est.decode,
                       "early_stop": est.early_stop, "boundary_closeness": est.boundary_closeness, "seed": est.seed,
                       "num_shards": job.num_shards,
                       "unsupervised": est.unsupervised},
        "model": None if est.unsupervised else {"path": cfg.model, "params": est.get_params(),
                                                "n_features_in": est.n_features_in_,
                                                "validation": getattr(est, "validation_", None)},
        "versions": _versions(),
        "timings": timings | {f"{k}_seconds": v for k, v in job.timings.items()},
        "levels": levels.records,
        "cluster_counts": levels.clusters,
        "selected_level": (len(levels.records) - 1 if job.schedule is None
                           else job.schedule.selected(len(levels.records))),
        "stop_reason": levels.stop,
        "next_cluster_ids": levels.next_cluster_ids,
    }


def _tau_source(est) -> str:
    """Where the per-level taus of the manifest came from."""
    if est.tau is not None:
        return "user"
    if getattr(est, "taus_", None):
        return "validation"
    return "adaptive" if est.unsupervised else "default"
