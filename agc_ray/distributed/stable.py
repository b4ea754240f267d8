"""``--previous``: keep cluster ids stable across scheduled runs (see :mod:`agc_ray.core.stable_ids`).

The overlap counts are one Ray Data hash join of this run's assignments with the previous run's, on
``(id, level)`` for all levels at once, each joined block reduced to partial ``(level, new, old)``
counts by a pyarrow group-by; one task per level sums the partials and matches the clusters
(vectorised, in :func:`agc_ray.core.stable_ids.match_clusters`). The driver only sees the per-level
churn counts.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from agc_ray.distributed import io
from agc_ray.distributed.errors import InputError
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

    def next_ids(self) -> list[int | None]:
        """Per level, the first id never issued (None when the manifest predates the counter)."""
        return [lv.get("next_cluster_id") for lv in self.manifest.get("levels", [])]


def open_previous(uri: str, id_type: pa.DataType) -> PreviousOutput:
    """Check that ``uri`` is a completed output whose ids have ``id_type``'s kind (InputError)."""
    fs, path = io.filesystem_for(uri)
    manifest_path = posixpath.join(path, "manifest.json")
    try:
        with fs.open_input_stream(manifest_path) as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise InputError(f"--previous {uri} is not a completed output (no manifest.json)") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read --previous {uri}/manifest.json: {io._one_line(e)}") from e
    if manifest.get("status") != "succeeded" or not manifest.get("levels"):
        raise InputError(f"--previous {uri} is not a completed output (status {manifest.get('status')!r})")
    levels = len(manifest["levels"])
    first = posixpath.join(path, "assignments", "level=0")
    try:
        files = [i.path for i in fs.get_file_info(pafs.FileSelector(first)) if i.path.endswith(".parquet")]
        prev_type = _parquet_schema(fs, files[0]).field("id").type if files else None
    except (OSError, KeyError, ValueError) as e:
        raise InputError(f"cannot read --previous {uri}/assignments: {io._one_line(e)}") from e
    if prev_type is None:
        raise InputError(f"--previous {uri} has no assignments/level=0/*.parquet")
    if _id_kind(prev_type) != _id_kind(id_type):
        raise InputError(f"--previous {uri} has {prev_type} ids, this input has {id_type} ids")
    return PreviousOutput(uri, fs, path, manifest, levels)


def _parquet_schema(fs, path: str) -> pa.Schema:
    import pyarrow.parquet as pq

    return pq.read_schema(path, filesystem=fs)


def _id_kind(t: pa.DataType) -> str:
    return "integer" if pa.types.is_integer(t) else "string" if pa.types.is_string(t) or pa.types.is_large_string(t) else str(t)


def _normalise_ids(col: pa.ChunkedArray | pa.Array):
    """Integers as int64, strings as large_string: both sides of the join need one key type."""
    return col.cast(pa.int64()) if pa.types.is_integer(col.type) else col.cast(pa.large_string())


@lazy_remote(num_cpus=0.5)
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


def _partial_counts(table: pa.Table) -> pa.Table:
    counts = table.group_by(["level", "new", "old"]).aggregate([([], "count_all")])
    return counts.rename_columns({"count_all": "count"}) if "count_all" in counts.column_names else counts


@lazy_remote(num_cpus=0.5, num_returns=2)
def _match_level(level: int, n_clusters: int, fs, clusters_dir: str, next_id, *partials):
    """(id_map, info) of one level from the partial counts of every joined block."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from agc_ray.core.stable_ids import match_clusters, pair_counts

    parts = [t.filter(pc.equal(t.column("level"), level)) for t in partials if t.num_rows]
    if parts:
        t = pa.concat_tables(parts)
        pairs = pair_counts(t.column("new").to_numpy(), t.column("old").to_numpy(), t.column("count").to_numpy())
    else:
        pairs = (np.empty(0, np.int64),) * 3
    previous_ids = np.empty(0, np.int64)
    if fs is not None:
        previous_ids = pads.dataset(clusters_dir, filesystem=fs, format="parquet").to_table(
            columns=["cluster_id"]).column("cluster_id").to_numpy()
    id_map, churn, nxt = match_clusters(*pairs, n_clusters, previous_ids, next_id or 0)
    return id_map, {"churn": churn if fs is not None else None, "next_cluster_id": nxt}


def stable_id_maps(previous: PreviousOutput | None, ids: list, labels: list[list], n_clusters: list[int],
                   num_partitions: int) -> tuple[list, list[dict]]:
    """Per level, a ref to the (C,) stable-id map of this run's clusters, and the level's churn info.

    Args:
        previous: the earlier output, or None (ids 0 .. C - 1, counters started).
        ids: refs to each row shard's id array.
        labels: per level, refs to each row shard's cluster labels (0 .. C - 1).
        n_clusters: clusters per level.
        num_partitions: partitions of the hash join.
    """
    import ray

    if previous is None:
        return [None] * len(labels), [{"next_cluster_id": int(c)} for c in n_clusters]
    shared = min(previous.levels, len(labels))
    left = ray.data.from_arrow_refs([
        _long_table.remote(ids[s], *[labels[lvl][s] for lvl in range(shared)]) for s in range(len(ids))
    ])
    base = posixpath.join(previous.path, "assignments")
    right = ray.data.read_parquet(
        base, filesystem=previous.fs,
        partitioning=ray.data.datasource.Partitioning("hive", base_dir=base, field_types={"level": int}),
    ).map_batches(_previous_block, batch_format="pyarrow", batch_size=None, fn_kwargs={"levels": shared})
    joined = left.join(right, join_type="inner", num_partitions=max(1, num_partitions), on=("id", "level"))
    partials = joined.map_batches(_partial_counts, batch_format="pyarrow", batch_size=None).to_arrow_refs()
    next_ids = previous.next_ids()
    maps, infos = [], []
    for lvl, c in enumerate(n_clusters):
        if lvl < shared:
            clusters_dir = posixpath.join(previous.path, "clusters", f"level={lvl}")
            m, info = _match_level.remote(lvl, int(c), previous.fs, clusters_dir, next_ids[lvl], *partials)
        else:  # a level the previous run did not reach: fresh ids from 0
            m, info = _match_level.remote(lvl, int(c), None, "", 0)
        maps.append(m)
        infos.append(info)
    return maps, ray.get(infos)
