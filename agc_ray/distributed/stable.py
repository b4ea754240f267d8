"""``--previous``: keep cluster ids stable across scheduled runs (see :mod:`agc_ray.core.stable_ids`).

The overlap counts are Ray Data operations over the shared ids: one hash join of this run's
assignments with the previous run's on ``(id, level)`` for all levels at once, then one group-by
``(level, new, old)`` counting the shared rows of every pair of clusters. The distinct pairs (about
one per cluster) are split by level and one task per level matches the clusters (vectorised, in
:func:`agc_ray.core.stable_ids.match_clusters`). The driver only sees the per-level churn counts.

Counters: the manifest keeps ``next_cluster_ids``, per level the first id never issued at that level
in this chain of runs (levels that a run does not reach keep their counter), so ids are never reused.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from agc_ray.distributed.commit import PREVIOUS_WORDING, Version, read_manifest
from agc_ray.distributed.errors import InputError, one_line
from agc_ray.distributed.input import filesystem_for
from agc_ray.distributed.output import COMMIT_MARKER
from agc_ray.distributed.remote import lazy_remote

log = logging.getLogger("agc_ray")


@dataclass
class PreviousOutput:
    """A completed earlier output: where it is, its manifest, and the levels it has."""

    uri: str
    fs: pafs.FileSystem
    path: str
    manifest: dict
    levels: int
    version: Version  # what this run read; the commit requires it unchanged

    def counters(self) -> list[int]:
        """Per level, the first id never issued (older manifests: the level's cluster count)."""
        saved = self.manifest.get("next_cluster_ids")
        if isinstance(saved, list) and all(isinstance(c, int) for c in saved):
            return saved
        return [int(lv.get("next_cluster_id", lv.get("clusters", 0))) for lv in self.manifest["levels"]]


def open_previous(uri: str, id_type: pa.DataType, flag: str = "--previous") -> PreviousOutput:
    """Check that ``uri`` is a completed output whose ids can be matched with ``id_type`` (InputError
    naming ``flag``)."""
    fs, path = filesystem_for(uri)
    manifest, version = read_manifest(fs, path, uri, PREVIOUS_WORDING, flag=flag,
                                      missing_hint=lambda: _interrupted_hint(fs, path))
    levels = len(manifest["levels"])
    prev_type = None
    try:
        for lvl in range(levels):
            for part in ("assignments", "clusters"):
                d = posixpath.join(path, part, f"level={lvl}")
                files = [i.path for i in fs.get_file_info(pafs.FileSelector(d, allow_not_found=True))
                         if i.path.endswith(".parquet")]
                if not files:
                    raise InputError(f"{flag} {uri} lacks {part}/level={lvl}/*.parquet (its manifest has {levels} levels)")
                if part == "assignments" and lvl == 0:
                    prev_type = _parquet_schema(fs, files[0]).field("id").type
    except (OSError, KeyError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"cannot read {flag} {uri}: {one_line(e)}") from e
    for t, whose in ((prev_type, f"{flag} {uri} has"), (id_type, "this input has")):
        if pa.types.is_uint64(t):
            raise InputError(f"{whose} uint64 ids: cast them to int64 or string to match runs")
    if _id_kind(prev_type) != _id_kind(id_type):
        raise InputError(f"{flag} {uri} has {prev_type} ids, this input has {id_type} ids")
    return PreviousOutput(uri, fs, path, manifest, levels, version)


def _interrupted_hint(fs, path: str) -> str:
    """Why an output has no manifest when a killed commit left its marker (empty otherwise)."""
    if _exists(fs, posixpath.join(path, COMMIT_MARKER)):
        return " (its commit was interrupted: any run with --output on it finishes the commit)"
    return ""


def _exists(fs, path: str) -> bool:
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError:
        return False


def _parquet_schema(fs, path: str) -> pa.Schema:
    import pyarrow.parquet as pq

    return pq.read_schema(path, filesystem=fs)


def _id_kind(t: pa.DataType) -> str:
    return "integer" if pa.types.is_integer(t) else "string" if pa.types.is_string(t) or pa.types.is_large_string(t) else str(t)


def _normalise_ids(col: pa.ChunkedArray | pa.Array):
    """Integers as int64, strings as large_string: both sides of the join need one key type."""
    return col.cast(pa.int64()) if pa.types.is_integer(col.type) else col.cast(pa.large_string())


@lazy_remote(num_cpus=1)
def _long_table(ids, *labels):
    """(id, level, new) rows of one shard for every level."""
    ids = _normalise_ids(ids)
    return pa.concat_tables([
        pa.table({"id": ids, "level": pa.array(np.full(len(ids), lvl, np.int64)),
                  "new": pa.array(np.asarray(lab, dtype=np.int64))})
        for lvl, lab in enumerate(labels)
    ])


def _previous_block(table: pa.Table, levels: int) -> pa.Table:
    """(id, level, old) rows of the previous run's first ``levels`` levels."""
    import pyarrow.compute as pc

    table = table.filter(pc.less(table.column("level").cast(pa.int64()), levels))
    return pa.table({"id": _normalise_ids(table.column("id")), "level": table.column("level").cast(pa.int64()),
                     "old": table.column("cluster_id").cast(pa.int64())})


@lazy_remote(num_cpus=1)
def _split_levels(levels: int, table: pa.Table):
    """One block of distinct pairs, split by level (``levels`` returns)."""
    import pyarrow.compute as pc

    parts = [table.filter(pc.equal(table.column("level"), lvl)) for lvl in range(levels)]
    return parts if levels > 1 else parts[0]


@lazy_remote(num_cpus=1, num_returns=2)
def _match_level(n_clusters: int, fs, clusters_dir: str | None, next_id: int, *pairs):
    """(id_map, info) of one level from its distinct ``(new, old, count)`` pairs."""
    import pyarrow.dataset as pads

    from agc_ray.core.stable_ids import match_clusters

    parts = [t for t in pairs if t.num_rows]
    t = pa.concat_tables(parts) if parts else None
    col = (lambda name: t.column(name).to_numpy()) if t is not None else (lambda name: np.empty(0, np.int64))
    previous_ids = np.empty(0, np.int64)
    if clusters_dir is not None:
        previous_ids = pads.dataset(clusters_dir, filesystem=fs, format="parquet").to_table(
            columns=["cluster_id"]).column("cluster_id").to_numpy()
    try:
        id_map, churn, nxt = match_clusters(col("new"), col("old"), col("count"), n_clusters, previous_ids, next_id)
    except ValueError as e:  # an inconsistent previous output
        raise InputError(f"--previous {clusters_dir}: {e}") from None
    return id_map, {"churn": churn, "next_cluster_id": nxt}


def stable_id_maps(previous: PreviousOutput | None, ids: list, labels: list[list], n_clusters: list[int],
                   num_partitions: int) -> tuple[list, list[dict], list[int]]:
    """Per level, a ref to the (C,) stable-id map of this run's clusters and the level's churn info.

    Args:
        previous: the earlier output, or None (ids 0 .. C - 1, counters started).
        ids: refs to each row shard's id array.
        labels: per level, refs to each row shard's cluster labels (0 .. C - 1).
        n_clusters: clusters per level.
        num_partitions: partitions of the hash join and the group-by.

    Returns:
        ``(maps, infos, counters)``: maps (None without ``previous``), infos (``churn``,
        ``next_cluster_id``), and the chain's ``next_cluster_ids`` for the manifest.
    """
    import ray

    if previous is None:
        return [None] * len(labels), [{"next_cluster_id": int(c)} for c in n_clusters], [int(c) for c in n_clusters]
    shared = min(previous.levels, len(labels))
    counters = previous.counters()
    left = ray.data.from_arrow_refs([
        _long_table.remote(ids[s], *[labels[lvl][s] for lvl in range(shared)]) for s in range(len(ids))
    ])
    base = posixpath.join(previous.path, "assignments")
    right = ray.data.read_parquet(
        base, filesystem=previous.fs,
        partitioning=ray.data.datasource.Partitioning("hive", base_dir=base, field_types={"level": int}),
    ).map_batches(_previous_block, batch_format="pyarrow", batch_size=None, fn_kwargs={"levels": shared})
    parts = max(1, num_partitions)
    pairs = (left.join(right, join_type="inner", num_partitions=parts, on=("id", "level"))
             .groupby(["level", "new", "old"], num_partitions=parts).count()
             .rename_columns({"count()": "count"}))
    by_level = [_split_levels.options(num_returns=shared).remote(shared, block) if shared > 1
                else [_split_levels.remote(1, block)] for block in pairs.to_arrow_refs()]
    maps, infos = [], []
    for lvl, c in enumerate(n_clusters):
        next_id = counters[lvl] if lvl < len(counters) else 0
        if lvl < shared:
            clusters_dir = posixpath.join(previous.path, "clusters", f"level={lvl}")
            m, info = _match_level.remote(int(c), previous.fs, clusters_dir, next_id, *[b[lvl] for b in by_level])
        else:  # a level the previous run did not reach: every cluster is new
            m, info = _match_level.remote(int(c), None, None, next_id)
        maps.append(m)
        infos.append(info)
    infos = ray.get(infos)
    new_counters = [info["next_cluster_id"] for info in infos] + counters[len(infos):]
    return maps, infos, new_counters
