"""The training job's settings: the job's own fields, and HiLander's parameters as the estimator
declares them (:data:`agc_ray.core.params.PARAMS`: defaults, ranges, help)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

from agc_ray.core.params import PARAMS, check_params
from agc_ray.core.validation import check_param
from agc_ray.distributed.errors import InputError

#: HiLander parameters that the training job sets (others keep HiLander's defaults).
MODEL_PARAMS = (
    "k", "tau", "levels", "seed", "knn", "decode", "early_stop", "conv", "hidden_channels", "edge_channels",
    "dropout", "batch_size", "lr", "weight_decay", "train_levels", "conn_edges", "balance", "focal_gamma",
    "self_training", "subsample_identities", "epochs",
)


def _with_model_params(cls):
    """Add :data:`MODEL_PARAMS` to a dataclass-to-be as fields with the estimator's defaults."""
    for name in MODEL_PARAMS:
        param = PARAMS[name]
        cls.__annotations__[name] = param.kind.__name__ + (" | None" if param.optional else "")
        setattr(cls, name, param.default)
    return cls


@dataclass
@_with_model_params
class TrainJobConfig:
    """Every setting of the training job (the CLI flags and YAML keys have the same names).

    The job's own fields are below; the model and optimiser settings are HiLander's parameters
    (:data:`MODEL_PARAMS`, with the estimator's defaults). ``batch_size`` is the *global* batch of
    seed nodes per step (each of N workers takes 1/N of it).
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

    def model_params(self) -> dict:
        """The HiLander parameters of the trained model."""
        return {name: getattr(self, name) for name in MODEL_PARAMS}

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first invalid setting (as its flag)."""
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
        check_params(self.model_params(), flag, error=InputError)


def flag(name: str) -> str:
    """The command-line flag of a setting: ``--name-with-dashes``."""
    return "--" + name.replace("_", "-")


def _check_number(name, value, kind, low=None, high=None):
    check_param(flag(name), value, kind, low, high, error=InputError)


def config_fields() -> dict[str, dataclasses.Field]:
    """Name -> field of :class:`TrainJobConfig` (the CLI builds its flags and YAML keys from it)."""
    return {f.name: f for f in dataclasses.fields(TrainJobConfig)}


def _default_run_name(cfg: TrainJobConfig) -> str:
    key = json.dumps({"input": cfg.input, "output": os.path.abspath(cfg.output), **cfg.model_params()}, sort_keys=True)
    return "agc-train-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def storage_location(cfg: TrainJobConfig) -> tuple[str, str]:
    """(storage_path, run_name) of the run's checkpoints (defaults: next to the output)."""
    storage = cfg.storage_path or os.path.abspath(cfg.output.rstrip("/") + ".checkpoints")
    if "://" not in storage:
        storage = os.path.abspath(storage)
    return storage, cfg.run_name or _default_run_name(cfg)
