"""Reading an output's cluster tables (only the columns and row groups the page needs) and writing
its page."""

from __future__ import annotations

import posixpath

import numpy as np
import pyarrow as pa

from agc_ray.distributed.commit import read_manifest
from agc_ray.distributed.report.cells import _CLUSTER_COLUMNS, TOP_N
from agc_ray.distributed.report.page import render_report

REPORT_NAME = "report.html"


def _level_dir(path: str, level: int) -> str:
    return posixpath.join(path, "clusters", f"level={level}")


def read_clusters(fs, path: str, level: int, top: int = TOP_N) -> tuple[np.ndarray, pa.Table] | None:
    """``(sizes, largest)`` of one level of an output, or None when it has no cluster table.

    ``sizes``: every cluster's size, in file order (only the ``size`` column is read, batch by batch
    into one preallocated int64 array). ``largest``: the ``top`` largest clusters (ties: file order
    first) with ``cluster_id``, ``size``, ``peak_id``, ``parent_cluster_id``, read from the row
    groups that hold them only.
    """
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    d = _level_dir(path, level)
    if fs.get_file_info(d).type == pafs.FileType.NotFound:
        return None
    files = sorted(ds.dataset(d, filesystem=fs, format="parquet").files)  # hidden files (., _) skipped
    metas = []
    for f in files:
        with fs.open_input_file(f) as fh:
            metas.append(pq.ParquetFile(fh).metadata)
    n = sum(m.num_rows for m in metas)
    sizes = np.empty(n, dtype=np.int64)
    pos = 0
    for f in files:
        with fs.open_input_file(f) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(columns=["size"], batch_size=1 << 20):
                col = batch.column(0)
                sizes[pos:pos + len(col)] = col.fill_null(0).to_numpy()
                pos += len(col)
    idx = largest_clusters(sizes, top)
    # (file, row group, first row) of every row group, to read only those holding the top rows
    groups, start = [], 0
    for fi, m in enumerate(metas):
        for rg in range(m.num_row_groups):
            groups.append((fi, rg, start))
            start += m.row_group(rg).num_rows
    starts = np.array([g[2] for g in groups], dtype=np.int64)
    names = metas[0].schema.to_arrow_schema().names if metas else []
    cols = [c for c in _CLUSTER_COLUMNS if c in names]
    group_of = np.searchsorted(starts, idx, side="right") - 1
    picked = {}  # top position -> one-row table; each row group is read, cut and dropped in turn
    for i in np.unique(group_of):
        fi, rg, first = groups[int(i)]
        rows = idx[group_of == i]
        with fs.open_input_file(files[fi]) as fh:
            part = pq.ParquetFile(fh).read_row_group(rg, columns=cols).take(pa.array(rows - first))
        for k, r in enumerate(rows):
            picked[int(r)] = part.slice(k, 1)
    table = (pa.concat_tables([picked[int(r)] for r in idx]).combine_chunks() if idx.size
             else pa.table({c: pa.array([], pa.int64()) for c in cols}))
    return sizes, table


def largest_clusters(sizes: np.ndarray, top: int = TOP_N) -> np.ndarray:
    """Positions of the ``top`` largest sizes, largest first (ties: lower position first); O(n)."""
    sizes = np.asarray(sizes)
    n = sizes.size
    if n == 0 or top <= 0:
        return np.zeros(0, np.int64)
    if n > top:
        kth = np.partition(sizes, n - top)[n - top]  # the top-th largest value
        cand = np.flatnonzero(sizes >= kth)
    else:
        cand = np.arange(n)
    order = np.argsort(-sizes[cand].astype(np.int64), kind="stable")[:top]
    return cand[order].astype(np.int64)


def build_report(fs, path: str, manifest: dict | None = None) -> str:
    """The HTML report of the output at ``path`` on the pyarrow filesystem ``fs`` (not written).

    ``manifest``: the manifest to render (default: ``path/manifest.json``, which must be a completed
    output's: :func:`~agc_ray.distributed.commit.read_manifest`).
    """
    if manifest is None:
        manifest, _ = read_manifest(fs, path, path)
    levels = [lv.get("level", i) for i, lv in enumerate(manifest.get("levels") or [])]
    sizes, largest = {}, {}
    for no in levels:
        got = read_clusters(fs, path, int(no))
        if got is not None:
            sizes[int(no)], largest[int(no)] = got
    return render_report(manifest, sizes, largest)


def write_report(fs, path: str, manifest: dict | None = None) -> str:
    """Write ``report.html`` into the output directory ``path`` on ``fs``; returns the report's path.

    ``manifest``: the manifest to render (default: ``path/manifest.json``). Reads only the
    ``clusters/level=*`` tables (the ``size`` column in full, four columns of the ten largest rows).
    """
    text = build_report(fs, path, manifest)
    out = posixpath.join(path, REPORT_NAME)
    with fs.open_output_stream(out) as f:
        f.write(text.encode("utf-8"))
    return out
