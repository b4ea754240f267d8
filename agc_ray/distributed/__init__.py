"""The Ray layer: runs the Ray-free core (:mod:`agc_ray.core`) over shards of a Parquet table.

- :mod:`~agc_ray.distributed.input`: input resolution and validation (local, globs, ``s3://``), the Ray
  Data read into row shards.
- :mod:`~agc_ray.distributed.shards`: row and node shards: where they are cut, which one owns a row.
- :mod:`~agc_ray.distributed.output`: output writing and the atomic commit.
- :mod:`~agc_ray.distributed.commit`: commit-time conflict detection (the output's version, local
  locks, S3 conditional writes and the commit marker's lease).
- :mod:`~agc_ray.distributed.knn`: a faiss index sharded across Ray actors, top-k merge.
- :mod:`~agc_ray.distributed.progress`: progress lines (tasks, rows, rate, ETA) of the long stages.
- :mod:`~agc_ray.distributed.logs`: the jobs' logging set-up.
- :mod:`~agc_ray.distributed.level`: per-shard LANDER inference and decode, local and global
  union-find, aggregation into the next level.
- :mod:`~agc_ray.distributed.job`: :class:`JobConfig` and :func:`run_job` (validation, manifest, commit).
- :mod:`~agc_ray.distributed.levels_run`: the level loop over node shards and its writes.

Imports point one way: ``distributed -> core``.
"""

from agc_ray.distributed.errors import InputError

__all__ = ["InputError"]
