"""Distributed LANDER training on Ray: Ray Data reads the table, Ray Train runs DDP.

The job (``jobs/train.py``) is :func:`run_training` over a :class:`TrainJobConfig`, in four rooms:

- :mod:`.config`: the settings (the job's own, and HiLander's parameters as the estimator declares them).
- :mod:`.data`: :func:`inspect_table` checks the Parquet footers in the driver; :func:`read_table` reads
  the rows with Ray Data; :func:`prepare_data`, as Ray tasks on the table's blocks (never in the
  driver), validates, sorts by id, fingerprints, holds out whole classes, searches each split's
  level-0 kNN graph over the clustering job's sharded faiss index (identical to a single index) and
  builds the ground-truth level graphs with the core. The arrays stay in Ray's object store.
- :mod:`.worker`: :func:`train_loop_per_worker` under ``TorchTrainer``: the core's schedule (AdamW +
  one-cycle cosine per phase, self-training in the second half), one global batch per step split
  over the ranks, validation and a checkpoint after every epoch on rank 0; a run resumed from a
  checkpoint, after a lost worker (``FailureConfig``) or with ``--resume``, follows exactly the
  trajectory of an uninterrupted one.
- :mod:`.driver`: the checks (cluster, checkpoints, output), the Ray Train run, and MODEL_DIR written
  atomically in the ``HiLander.save`` format plus a ``training`` block in ``config.json``.

Errors in the input raise :class:`InputError` (the job exits with code 2 and writes nothing).
"""

from agc_ray.core.calibration import holdout_classes as split_by_class
from agc_ray.distributed.errors import InputError
from agc_ray.distributed.train.config import MODEL_PARAMS, TrainJobConfig, config_fields, flag, storage_location
from agc_ray.distributed.train.data import (
    check_split, data_fingerprint, inspect_table, prepare_data, read_table, sort_ids,
)
from agc_ray.distributed.train.driver import (
    check_checkpoints, check_cluster_capacity, check_output, run_training, write_model_dir,
)
from agc_ray.distributed.train.worker import epoch_batches, rank_share, train_loop_per_worker

__all__ = [
    "InputError",
    "MODEL_PARAMS",
    "TrainJobConfig",
    "check_checkpoints",
    "check_cluster_capacity",
    "check_output",
    "check_split",
    "config_fields",
    "data_fingerprint",
    "epoch_batches",
    "flag",
    "inspect_table",
    "prepare_data",
    "rank_share",
    "read_table",
    "run_training",
    "sort_ids",
    "split_by_class",
    "storage_location",
    "train_loop_per_worker",
    "write_model_dir",
]
