"""Input of the clustering job: Parquet in (local, directories, globs, ``s3://``), read into row shards.

:func:`resolve_input` lists the files and :func:`check_schema` checks their footers in the driver
(schemas, row counts: metadata only); :func:`read_shards` reads them with Ray Data, validates and
L2-normalises every block in a ``map_batches`` UDF (:func:`prepare_block`) and cuts the table into
contiguous row shards (:class:`~agc_ray.distributed.shards.RowShards`) whose arrays live in the object
store (the driver never holds embeddings); the ids are checked for duplicates on the way.
"""

from __future__ import annotations

import fnmatch
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from agc_ray.distributed.errors import InputError, one_line
from agc_ray.distributed.remote import lazy_remote
from agc_ray.distributed.shards import RowShards, shard_bounds

_GLOB_CHARS = "*?["

# -- filesystems ---------------------------------------------------------------------------------
def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` of a local path or ``s3://bucket/key`` URI (AWS env vars honoured)."""
    if uri.startswith("s3://"):
        rest = uri[len("s3://"):]
        if not rest or rest.startswith("/"):
            raise InputError(f"invalid S3 URI {uri!r}: expected s3://bucket/prefix")
        try:
            fs, _ = pafs.FileSystem.from_uri("s3://" + rest.split("/", 1)[0])
        except (OSError, ValueError) as e:
            raise InputError(f"cannot access {uri}: {one_line(e)}") from e
        return fs, rest.rstrip("/")
    import os

    return pafs.LocalFileSystem(), os.path.abspath(uri)


def display(fs: pafs.FileSystem, path: str) -> str:
    """The user-facing form of ``path`` (``s3://`` prefixed on S3)."""
    return f"s3://{path}" if fs.type_name == "s3" else path


def _visible(path: str, base: str) -> bool:
    rel = posixpath.relpath(path, base) if path != base else posixpath.basename(path)
    return not any(part.startswith((".", "_")) for part in rel.split("/"))


def _list_files(fs: pafs.FileSystem, base: str) -> list[str]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot list {display(fs, base)}: {one_line(e)}") from e
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and _visible(i.path, base))


def resolve_input(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The sorted Parquet files behind a file, directory or glob (local or S3).

    Hidden files and directories (names starting with ``.`` or ``_``) are skipped, as Spark and Ray do.
    """
    fs, path = filesystem_for(uri)
    if any(c in path for c in _GLOB_CHARS):
        parts = path.split("/")
        first = next(i for i, p in enumerate(parts) if any(c in p for c in _GLOB_CHARS))
        base = "/".join(parts[:first]) or "/"
        files = [f for f in _list_files(fs, base) if fnmatch.fnmatchcase(f, path)] if _exists(fs, base) else []
        if not files:
            raise InputError(f"input path not found: no file matches {uri}")
        return fs, files
    try:
        info = fs.get_file_info(path)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot access input {uri}: {one_line(e)}") from e
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input path not found: {uri}")
    if info.type == pafs.FileType.File:
        return fs, [path]
    files = _list_files(fs, path)
    if not files:
        raise InputError(f"input directory {uri} holds no Parquet file")
    return fs, files


def _exists(fs, path) -> bool:
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except (OSError, ValueError) as e:
        raise InputError(f"cannot access {display(fs, path)}: {one_line(e)}") from e


# -- schema validation -----------------------------------------------------------------------------
@dataclass
class InputSchema:
    """What the footers say: columns used, embedding dimension (when fixed), total rows."""

    files: list[str]
    id_column: str
    embedding_column: str
    label_column: str | None
    dim: int | None
    rows: int
    schema: pa.Schema


def _embedding_value_type(t: pa.DataType):
    """(value type, fixed dimension or None) of a list / fixed-size list / fixed-shape tensor type."""
    if isinstance(t, pa.FixedShapeTensorType):
        return t.value_type, (t.shape[0] if len(t.shape) == 1 else -1)
    if isinstance(t, pa.ExtensionType):
        t = t.storage_type
    if pa.types.is_fixed_size_list(t):
        return t.value_type, t.list_size
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return t.value_type, None
    return None, None


def check_schema(fs, files: list[str], id_column: str, embedding_column: str, label_column: str | None,
                 default_label: str | None = None) -> InputSchema:
    """Read every file's footer: Parquet-ness, identical schemas, columns and their types, row count.

    ``default_label``: the label column to use when ``label_column`` is None and the table has it.
    """
    import pyarrow.parquet as pq

    schema, first, rows = None, None, 0
    for f in files:
        try:
            meta = pq.read_metadata(f, filesystem=fs)
            file_schema = meta.schema.to_arrow_schema().remove_metadata()
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{display(fs, f)} is not a readable Parquet file: {one_line(e)}") from e
        if schema is None:
            schema, first = file_schema, f
        elif not file_schema.equals(schema):
            raise InputError(
                f"files have different schemas: {display(fs, first)} has {_schema_line(schema)}, "
                f"{display(fs, f)} has {_schema_line(file_schema)}"
            )
        rows += meta.num_rows
    names = schema.names
    if label_column is None and default_label in names and default_label not in (id_column, embedding_column):
        label_column = default_label
    for role, col in (("id", id_column), ("embedding", embedding_column), ("label", label_column)):
        if col is not None and col not in names:
            raise InputError(f"{role} column {col!r} not found in {display(fs, first)}; columns found: {names}")
    id_type = schema.field(id_column).type
    if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        raise InputError(f"id column {id_column!r} must be int64 or string, got {id_type}")
    emb_type = schema.field(embedding_column).type
    value_type, dim = _embedding_value_type(emb_type)
    if value_type is None or not (pa.types.is_floating(value_type) or pa.types.is_integer(value_type)):
        raise InputError(
            f"embedding column {embedding_column!r} must be a list, fixed-size list or fixed_shape_tensor "
            f"of numbers, got {emb_type}"
        )
    if dim == -1:
        raise InputError(f"embedding column {embedding_column!r} must hold 1-D vectors, got {emb_type}")
    if dim == 0:
        raise InputError(f"embedding column {embedding_column!r} has dimension 0")
    if label_column is not None and not pa.types.is_integer(schema.field(label_column).type):
        raise InputError(f"label column {label_column!r} must be integer, got {schema.field(label_column).type}")
    if rows == 0:
        raise InputError(f"input has zero rows ({len(files)} file(s) under {display(fs, files[0])})")
    return InputSchema(files, id_column, embedding_column, label_column, dim, rows, schema)


def _schema_line(schema: pa.Schema) -> str:
    return "(" + ", ".join(f"{f.name}: {f.type}" for f in schema) + ")"


# -- per-block preparation (runs in Ray Data workers) -------------------------------------------
def embedding_matrix(col, ids, column: str, dim: int | None) -> np.ndarray:
    """The (n, D) float32 matrix of an embedding column chunk; InputError on nulls or ragged rows."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    n = len(arr)
    if arr.null_count:
        bad = np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))
        raise InputError(f"embedding column {column!r} has null values (example id {ids[int(bad[0])]})")
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
        values = arr.flatten()
    else:
        import pyarrow.compute as pc

        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        d = int(lengths[0]) if n else (dim or 0)
        if n and (lengths != d).any():
            bad = int(np.flatnonzero(lengths != d)[0])
            raise InputError(
                f"ragged embedding dimensions: id {ids[0]} has {d}, id {ids[bad]} has {int(lengths[bad])}"
            )
        values = arr.flatten()
    if dim is not None and d != dim:
        raise InputError(f"ragged embedding dimensions: id {ids[0]} has {d}, expected {dim}")
    if values.null_count:
        raise InputError(f"embedding column {column!r} has null elements (example id {ids[0]})")
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, d)


def prepare_block(table: pa.Table, *, id_column: str, embedding_column: str, label_column: str | None,
                  dim: int | None) -> pa.Table:
    """Validate one block and return ``id``, ``x`` (float32 tensor) and optionally ``label``.

    Raises InputError (one line, with an example id) on null ids or labels, ragged, NaN/Inf or
    all-zero embeddings.
    """
    ids = table.column(id_column)
    if ids.null_count:
        bad = int(np.flatnonzero(ids.is_null().to_numpy())[0])
        raise InputError(f"id column {id_column!r} has {ids.null_count} null value(s) (first at block row {bad})")
    id_list = _IdView(ids)
    x = embedding_matrix(table.column(embedding_column), id_list, embedding_column, dim)
    from agc_ray.core.validation import invalid_rows  # numpy only: read workers do not import torch

    nonfinite, zero = invalid_rows(x)
    if nonfinite.size:
        raise InputError(
            f"embedding has NaN or Inf in {nonfinite.size} row(s) of a block (example id {id_list[int(nonfinite[0])]})"
        )
    if zero.size:
        raise InputError(f"embedding is all zeros in {zero.size} row(s) of a block (example id {id_list[int(zero[0])]})")
    # raw float32 values; normalised per shard once the whole table is known (see read_shards)
    cols = {"id": ids, "x": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(x))}
    if label_column is not None:
        labels = table.column(label_column)
        if labels.null_count:
            bad = int(np.flatnonzero(labels.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"label column {label_column!r} has {labels.null_count} null value(s) (example id {id_list[bad]})")
        cols["label"] = labels.cast(pa.int64())
    return pa.table(cols)


class _IdView:
    """Lazy ``ids[i]`` for error messages (avoids converting a whole column)."""

    def __init__(self, ids):
        self.ids = ids

    def __getitem__(self, i):
        return self.ids[i].as_py()


# -- reading into row shards -----------------------------------------------------------------------
#: Tables up to this many bytes of embeddings are read by the driver with pyarrow (same row checks,
#: same shards): Ray Data's start-up (its operators' workers and actors) costs seconds that a table
#: of a few thousand rows (an hourly increment, a test) does not need. ``AGC_RAY_DIRECT_READ_BYTES``.
DIRECT_READ_BYTES = 64 * 2**20


def _direct_read_bytes() -> int:
    import os

    return int(os.environ.get("AGC_RAY_DIRECT_READ_BYTES", DIRECT_READ_BYTES))


def read_shards(fs, schema: InputSchema, num_shards: int) -> RowShards:
    """Read, validate and normalise the table with Ray Data and cut it into row shards (small tables:
    read by the driver, see :data:`DIRECT_READ_BYTES`).

    Raises InputError for bad rows (found while reading) and duplicate ids.
    """
    import ray

    from agc_ray.distributed.errors import find_input_error

    if schema.rows * 4 * (schema.dim or 1024) <= _direct_read_bytes():
        return _read_direct(fs, schema, num_shards)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    cols = [schema.id_column, schema.embedding_column] + ([schema.label_column] if schema.label_column else [])
    ds = ray.data.read_parquet(schema.files, filesystem=fs).select_columns(cols)
    ds = ds.map_batches(
        prepare_block, batch_format="pyarrow", batch_size=None,
        fn_kwargs=dict(id_column=schema.id_column, embedding_column=schema.embedding_column,
                       label_column=schema.label_column, dim=schema.dim),
    )
    offsets = shard_bounds(schema.rows, num_shards)
    try:
        built = _stream_shards(ds, offsets, schema.label_column is not None)
    except Exception as e:  # Ray wraps the UDF's InputError
        err = find_input_error(e)
        if err is not None:
            raise err from None
        raise
    dim = _common_dim(ray.get([b[3] for b in built]))
    # As agc_ray.core.knn.unit_rows decides for the whole matrix: a table of unit rows is used as
    # it is, any other is L2-normalised row by row.
    x = [b[0] for b in built]
    if not all(ray.get([b[4] for b in built])):
        x = [_normalize.remote(part) for part in x]
    ids = [b[1] for b in built]
    check_unique(schema.id_column, ray.get(_find_duplicate.remote(*ids)))
    return RowShards(offsets, x, ids, [b[2] for b in built] if schema.label_column else None, dim)


def _stream_shards(ds, offsets: np.ndarray, with_labels: bool) -> list:
    """Build the row shards (``offsets``) from ``ds``'s blocks as they stream out of Ray Data: each
    shard's build task starts once its last row has been read, and a block is dropped once the shards
    that take its rows are built, so the blocks of the shards already built need not stay beside them.
    The object store keeps its high-water mark for the rest of the run: 2.4x the table when the table
    was materialised first and then cut, 2.0x streamed (300K x 256 rows; 1M: 1.9x -> 1.8x), as Ray Data
    reads ahead of the builds. Returns :func:`_build_shard`'s refs per shard."""
    n_shards = offsets.size - 1
    built, blocks, spans, pos = [], [], [], 0

    def build_finished():  # every shard that ends at the current row (empty ones included)
        nonlocal blocks, spans
        while len(built) < n_shards and pos == offsets[len(built) + 1]:
            built.append(_build_shard.options(num_returns=5).remote(with_labels, spans, *blocks))
            blocks, spans = [], []

    build_finished()
    for bundle in ds.iter_internal_ref_bundles():
        for entry, part in zip(bundle.blocks, bundle.slices):
            lo, hi = (part.start_offset, part.end_offset) if part is not None else (0, entry.metadata.num_rows)
            while lo < hi:
                if len(built) == n_shards:
                    raise InputError(f"the table has more rows than its files' footers say ({int(offsets[-1])})")
                take = min(hi - lo, int(offsets[len(built) + 1]) - pos)
                blocks.append(entry.ref)
                spans.append((lo, lo + take))
                lo, pos = lo + take, pos + take
                build_finished()
    if len(built) < n_shards:
        raise InputError(f"the table has {pos} rows where its files' footers say {int(offsets[-1])}")
    return built


def _common_dim(dims: list[int]) -> int:
    distinct = sorted(set(dims))
    if len(distinct) > 1:
        raise InputError(f"ragged embedding dimensions across the table: found dimensions {distinct}")
    return distinct[0]


def _read_direct(fs, schema: InputSchema, num_shards: int) -> RowShards:
    """:func:`read_shards` for a small table: the same checks (:func:`prepare_block` per file) and
    shards, read by the driver with pyarrow and put in the object store."""
    import pyarrow.parquet as pq
    import ray

    cols = [schema.id_column, schema.embedding_column] + ([schema.label_column] if schema.label_column else [])
    blocks = []
    for path in schema.files:
        try:
            table = pq.read_table(path, filesystem=fs, columns=cols)
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{display(fs, path)} is not a readable Parquet file: {one_line(e)}") from e
        blocks.append(prepare_block(table, id_column=schema.id_column, embedding_column=schema.embedding_column,
                                    label_column=schema.label_column, dim=schema.dim))
    table = pa.concat_tables(blocks)
    offsets = shard_bounds(table.num_rows, num_shards)
    with_labels = schema.label_column is not None
    built = [_build_shard_impl(with_labels, None, table.slice(lo, hi - lo))
             for lo, hi in zip(offsets[:-1], offsets[1:])]
    dim = _common_dim([b[3] for b in built])
    unit = all(b[4] for b in built)
    ids = [b[1] for b in built]
    check_unique(schema.id_column, find_duplicate(*ids))
    x = [ray.put(b[0] if unit else _normalize_impl(b[0])) for b in built]
    labels = [ray.put(b[2]) for b in built] if with_labels else None
    return RowShards(offsets, x, [ray.put(i) for i in ids], labels, dim)


def _build_shard_impl(with_labels: bool, spans: list | None, *tables):
    """One row shard from its Ray Data blocks, rows ``spans[i] = (lo, hi)`` of table i (None: all rows):
    ``(x, ids, labels, dimension, all rows unit)``."""
    from agc_ray.core.knn import unit_rows

    if spans is not None:
        tables = [t.slice(lo, hi - lo) for t, (lo, hi) in zip(tables, spans)]
    tables = [t for t in tables if t.num_rows]
    table = pa.concat_tables(tables) if tables else None
    col = table.column("x").combine_chunks()
    x = np.ascontiguousarray(col.to_numpy_ndarray(), dtype=np.float32)
    labels = table.column("label").to_numpy() if with_labels else None
    return x, table.column("id").combine_chunks(), labels, x.shape[1], bool(unit_rows(x) is x)


def _normalize_impl(x: np.ndarray) -> np.ndarray:
    from agc_ray.core.knn import l2_normalize

    return l2_normalize(x)


def check_unique(id_column: str, duplicate: tuple | None) -> None:
    """InputError for :func:`find_duplicate`'s result (None: the ids are unique)."""
    if duplicate is not None:
        raise InputError(f"id column {id_column!r} has duplicate values (example id {duplicate[0]!r}, "
                         f"{duplicate[1]} duplicated ids)")


def find_duplicate(*ids):
    """(example duplicate id, number of duplicated ids) or None."""
    import pyarrow.compute as pc

    all_ids = pa.concat_arrays([a for a in ids])
    counts = pc.value_counts(all_ids)
    dup = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(dup) == 0:
        return None
    return dup.field("values")[0].as_py(), len(dup)


_build_shard = lazy_remote(_build_shard_impl, num_cpus=1)
_find_duplicate = lazy_remote(find_duplicate, num_cpus=1)
_normalize = lazy_remote(_normalize_impl, num_cpus=1)
