"""The page: CSS, one section a topic, and :func:`render_report`, which puts them together."""

from __future__ import annotations

import datetime as _dt

import numpy as np
import pyarrow as pa

from agc_ray.distributed.report.cells import (
    _CLUSTER_COLUMNS, _METRIC_LABELS, TOP_N, _chips, _e, _id, _int, _is_num, _kv_table, _metric, _num, _pct,
    _secs, _table,
)
from agc_ray.distributed.report.figures import _plot_metrics, _plot_sizes, _plot_timings
from agc_ray.distributed.report.stats import _size_stats

_STAGES = ("read", "knn", "score", "decode", "aggregate", "write")
_CHURN_KEYS = ("previous_clusters", "kept", "split", "merged", "new", "gone")


_CSS = """
:root{--fg:#1d2329;--muted:#5f6b76;--line:#dde1e6;--bg:#f6f7f9;--card:#fff;--accent:#1f77b4}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1200px;margin:0 auto;padding:20px 24px 40px}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:6px 14px;margin-bottom:4px}
h1{font-size:22px;margin:0}
h2{font-size:17px;margin:0 0 10px}
h3{font-size:14px;margin:0 0 6px}
h3.gap{margin-top:14px}
.sub{color:var(--muted);margin:0 0 16px;word-break:break-all}
.badge{display:inline-block;padding:2px 10px;border-radius:10px;font-weight:600;font-size:13px;color:#fff;background:#b42318}
.badge.ok{background:#1e7d3a}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 16px;margin:14px 0}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:10px;margin:12px 0}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 14px}
.card .v{font-size:20px;font-weight:600;font-variant-numeric:tabular-nums}
.card .k{color:var(--muted);font-size:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:14px 22px;align-items:start}
.grid3{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:14px 26px;align-items:start}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:14px 22px;align-items:start}
.scroll{overflow-x:auto}
.grid.top{grid-template-columns:repeat(auto-fill,minmax(440px,1fr))}
table.data.top{font-size:12.5px}
table.data.top th,table.data.top td{padding:3px 6px}
table.data.top span.id{display:inline-block;max-width:22ch;overflow:hidden;text-overflow:ellipsis;vertical-align:bottom}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
table.kv{width:100%}
table.kv th{text-align:left;font-weight:500;color:var(--muted);padding:2px 12px 2px 0;white-space:nowrap;vertical-align:top;width:1%}
table.kv td{padding:2px 0;word-break:break-all}
table.data{width:100%;font-size:13px}
table.data th{font-weight:600;text-align:right;padding:5px 8px;border-bottom:2px solid var(--line);white-space:nowrap;background:#fafbfc}
table.data td{text-align:right;padding:4px 8px;border-bottom:1px solid var(--line);white-space:nowrap}
table.data.first-left th:first-child,table.data.first-left td:first-child{text-align:left}
table.data tbody tr:hover{background:#f0f4f8}
table.data td.left,table.data th.left{text-align:left}
code{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;word-break:break-all}
.muted{color:var(--muted)}
.warn{color:#b42318;font-weight:600}
.chips{display:flex;flex-wrap:wrap;gap:5px 6px}
.chip{border:1px solid var(--line);border-radius:4px;padding:1px 7px;background:#fafbfc;font-size:13px;word-break:break-all}
details{margin-top:6px}
summary{cursor:pointer;margin-bottom:4px}
.note{color:var(--muted);font-size:12.5px;margin:6px 0 0}
svg.plot{max-width:100%;height:auto;display:block}
svg.plot text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
footer{color:var(--muted);font-size:12px;margin-top:18px}
"""


def _header(manifest: dict, n_levels: int) -> str:
    status = manifest.get("status", "unknown")
    inp = manifest.get("input") or {}
    timings = manifest.get("timings") or {}
    counts = manifest.get("cluster_counts") or [lv.get("clusters") for lv in manifest.get("levels") or []]
    top = counts[-1] if counts else None
    cards = [
        ("input rows", _int(inp.get("rows"))), ("dimension", _int(inp.get("dimension"))),
        ("levels", _int(n_levels)), ("clusters at level 0", _int(counts[0]) if counts else "—"),
        ("clusters at top level", _int(top)), ("total time", _secs(timings.get("total_seconds"))),
    ]
    if _is_num(manifest.get("selected_level")):
        sel = int(manifest["selected_level"])
        cards.insert(3, ("selected level", f"{sel} ({_int(counts[sel])} clusters)" if sel < len(counts) else _int(sel)))
    cards_html = "".join(f'<div class="card"><div class="v">{v}</div><div class="k">{_e(k)}</div></div>' for k, v in cards)
    ok = " ok" if status == "succeeded" else ""
    return (
        f'<header><h1>agc_ray clustering report</h1><span class="badge{ok}">{_e(status)}</span></header>'
        f'<p class="sub">input <code>{_e(inp.get("path", "—"))}</code> &rarr; output '
        f'<code>{_e(manifest.get("output", "—"))}</code></p>'
        f'<div class="cards">{cards_html}</div>'
    )


def _run_section(manifest: dict) -> str:
    inp = dict(manifest.get("input") or {})
    model = manifest.get("model")
    if model is None:
        model_html = "<p>none: unsupervised (similarity density, similarity decode)</p>"
    else:
        model = dict(model)
        params = model.pop("params", None)
        model_html = _kv_table(model)
        if isinstance(params, dict) and params:
            model_html += (f'<details><summary class="muted">training parameters ({len(params)})</summary>'
                           f"{_chips(params)}</details>")
    right = f"{_chips(manifest.get('parameters') or {})}<h3 class=\"gap\">Versions</h3>{_chips(manifest.get('versions') or {})}"
    blocks = [("Input", _kv_table(inp)), ("Model", model_html), ("Parameters", right)]
    inner = "".join(f"<div><h3>{_e(t)}</h3>{b}</div>" for t, b in blocks)
    return f'<section><h2>Run</h2><div class="grid3">{inner}</div></section>'


def _knn_cell(lv: dict) -> str:
    method = lv.get("knn_method")
    if method is None:
        return "—"
    cell = _e(method)
    if _is_num(lv.get("knn_probes_mean")):  # a probe margin: the cells probed vary per row
        cell += f' <span class="muted">cells a row</span> {float(lv["knn_probes_mean"]):.1f}'
    elif _is_num(lv.get("knn_nprobe")):
        cell += f' <span class="muted">nprobe</span> {int(lv["knn_nprobe"])}'
    elif _is_num(lv.get("knn_rescanned")):  # derived from the level below's lists: rows searched again
        cell += f' <span class="muted">rescanned</span> {int(lv["knn_rescanned"]):,}'
    if _is_num(lv.get("knn_recall")):
        cell += f' <span class="muted">recall</span> {float(lv["knn_recall"]):.3f}'
    if lv.get("knn_recall_target_met") is False:
        cell += ' <span class="warn">below target</span>'
    return cell


def _tau_cell(lv: dict) -> str:
    """The level's decode threshold; a linkage level's is the average link's, its peaks' tau guards it."""
    if not _is_num(lv.get("linkage")):
        return _num(lv.get("tau"), 3)
    return f'{_num(lv["linkage"], 3)} <span class="muted">average link; peaks</span> {_num(lv.get("tau"), 3)}'


def _levels_section(levels: list[dict], cluster_sizes: dict, has_metrics: bool) -> str:
    sub = '<br><span class="muted">{}</span>'.format
    header = ["level", "nodes", "clusters", "edges", "nodes per" + sub("cluster"),
              "singletons" + sub("% clusters"), "singletons" + sub("% rows"), "median" + sub("size"),
              "p90" + sub("size"), "max" + sub("size"), "largest" + sub("% rows"), "kNN", "tau"]
    if has_metrics:
        header += ["Fp", "Fb", "NMI"]
    rows, missing = [], []
    for i, lv in enumerate(levels):
        no = lv.get("level", i)
        st = _size_stats(cluster_sizes.get(no))
        if not st:
            missing.append(no)
        nodes, clusters = lv.get("nodes"), lv.get("clusters", st.get("clusters"))
        ratio = f"{nodes / clusters:,.2f}" if _is_num(nodes) and _is_num(clusters) and clusters else "—"
        largest = st["max"] / st["rows"] if st.get("rows") else None
        row = [_int(no), _int(nodes), _int(clusters), _int(lv.get("edges")), ratio,
               _pct(st.get("singleton_share")), _pct(st.get("singleton_rows_share")),
               _num(st.get("median"), 1), _num(st.get("p90"), 1), _int(st.get("max")), _pct(largest),
               _knn_cell(lv), _tau_cell(lv)]
        if has_metrics:
            m = lv.get("metrics") if isinstance(lv.get("metrics"), dict) else {}
            row += [_metric(m.get("fp")), _metric(m.get("fb")), _metric(m.get("nmi"))]
        rows.append(row)
    note = ('<p class="note">nodes: what the level clusters (input rows at level 0, the previous level\'s clusters '
            "above); edges: the edges the decode kept; sizes in input rows; kNN recall (approximate search only): "
            "share of the true k nearest neighbours found, on a sample of level 0; derived: the exact graph from the level "
            "below's lists, some rows searched again; tau: the level's decode threshold (its source under Parameters; "
            "on a linkage level, the average link's threshold, the peaks' tau guarding it).</p>")
    if missing:
        note += f'<p class="note">no cluster table for level(s) {_e(", ".join(map(str, missing)))}: size columns left empty.</p>'
    return f"<section><h2>Levels</h2>{_table(header, rows)}{note}</section>"


def _metrics_section(levels: list[dict]) -> str:
    ms = [(lv.get("level", i), lv["metrics"]) for i, lv in enumerate(levels) if isinstance(lv.get("metrics"), dict)]
    if not ms:
        return ""
    keys = [k for k in _METRIC_LABELS if any(k in m for _, m in ms)]
    keys += sorted({k for _, m in ms for k in m} - set(keys))
    header = ["level"] + [_e(_METRIC_LABELS.get(k, k)) for k in keys]
    rows = [[_int(no)] + [_int(m.get(k)) if k == "n_clusters" else _metric(m.get(k)) for k in keys] for no, m in ms]
    note = ('<p class="note">Against the input\'s label column: pairwise and BCubed precision (P), recall (R) and '
            "F-score (Fp, Fb), normalised mutual information (NMI), adjusted Rand index (ARI).</p>")
    best = []
    for k in ("fp", "fb", "nmi", "ari"):
        vals = [(m[k], no) for no, m in ms if _is_num(m.get(k))]
        if vals:
            v, no = max(vals, key=lambda t: (t[0], -t[1]))
            best.append([_e(_METRIC_LABELS[k]), _int(no), _metric(v)])
    best_html = ("<h3>Best level per metric</h3>" + _table(["metric", "level", "value"], best, first_left=True)) if best else ""
    return (f'<section><h2>Quality metrics</h2>{_table(header, rows)}{note}'
            f'<div class="grid2"><div>{_plot_metrics(levels)}</div><div>{best_html}</div></div></section>')


def _churn_section(manifest: dict, levels: list[dict]) -> str:
    ch = [(lv.get("level", i), lv) for i, lv in enumerate(levels) if isinstance(lv.get("churn"), dict)]
    prev = manifest.get("previous")
    if not ch and not isinstance(prev, dict):
        return ""
    prev_path = prev.get("path") if isinstance(prev, dict) else None
    head = f'<p class="sub">compared with <code>{_e(prev_path)}</code></p>' if prev_path else ""
    if not ch:
        return f'<section><h2>Churn against the previous run</h2>{head}<p class="muted">no per-level churn recorded.</p></section>'
    header = ["level", "previous clusters", "clusters", "kept", "split", "merged", "new", "gone", "rows changed"]
    rows = []
    for no, lv in ch:
        c = lv["churn"]
        rows.append([_int(no), _int(c.get("previous_clusters")), _int(lv.get("clusters"))]
                    + [_int(c.get(k)) for k in _CHURN_KEYS[1:]]
                    + [_pct(c.get("changed_row_share"))])
    note = ('<p class="note">kept, split, merged and gone count clusters of the previous run, new counts clusters of '
            "this run; rows changed: share of the input rows whose cluster changed.</p>")
    return f"<section><h2>Churn against the previous run</h2>{head}{_table(header, rows)}{note}</section>"


def _sizes_section(cluster_sizes: dict, levels: list[dict]) -> str:
    svg = _plot_sizes(cluster_sizes, levels)
    if not svg:
        return ""
    note = ""
    if any(v is not None and len(v) for v in cluster_sizes.values()):
        note = ('<p class="note">Size bins are powers of two: [1], [2, 3], [4, 7], … Middle: number of clusters per '
                "bin (log scale). Right: share of the input rows in clusters of that size.</p>")
    return f"<section><h2>Cluster sizes</h2>{svg}{note}</section>"


def _largest_section(largest: dict | None, total_rows) -> str:
    if not largest:
        return ""
    blocks = []
    for no in sorted(largest):
        t = largest[no]
        if t is None:
            continue
        cols = {name: (t.column(name).to_pylist() if name in t.column_names else [None] * t.num_rows)
                for name in _CLUSTER_COLUMNS}
        rows = []
        for cid, size, peak, parent in zip(*(cols[c] for c in _CLUSTER_COLUMNS)):
            share = _pct(size / total_rows) if _is_num(size) and _is_num(total_rows) and total_rows else "—"
            rows.append([_id(cid), _int(size), share, f'<span class="id" title="{_e(peak)}">{_e(peak)}</span>',
                         _id(parent)])
        table = _table(["cluster_id", "size", "% rows", "peak_id", "parent"], rows, cls="data top")
        blocks.append(f"<div><h3>Level {_e(no)}</h3>{table}</div>")
    if not blocks:
        return ""
    return (f'<section><h2>Largest clusters (top {TOP_N} per level)</h2><div class="grid top">{"".join(blocks)}</div>'
            '<p class="note">peak_id: the input id of the cluster\'s density peak; parent: its cluster at the next '
            "level (— at the top level).</p></section>")


def _timings_section(manifest: dict, levels: list[dict]) -> str:
    timings = manifest.get("timings") or {}
    if not timings:
        return ""
    stages = [(s, float(timings[f"{s}_seconds"])) for s in _STAGES if _is_num(timings.get(f"{s}_seconds"))]
    stages += [(k[: -len("_seconds")], float(v)) for k, v in timings.items()
               if k.endswith("_seconds") and k != "total_seconds" and k[: -len("_seconds")] not in _STAGES and _is_num(v)]
    total = timings.get("total_seconds")
    rows = [[_e(name), _secs(v), _pct(v / total) if _is_num(total) and total > 0 else "—"] for name, v in stages]
    if _is_num(total):
        rows.append(["<b>total</b>", f"<b>{_secs(total)}</b>", "100.0%"])
    other = {k: v for k, v in timings.items() if not k.endswith("_seconds")}
    left = _table(["stage", "time", "% of total"], rows, first_left=True)
    if other:
        left += _kv_table(other)
    left += ('<p class="note">Stage times are summed over levels; the total is the wall time of the whole job '
             "(with set-up and the commit).</p>")
    per_level = [[_int(lv.get("level", i)), _e(lv.get("knn_method", "—")), _secs(lv.get("knn_seconds")),
                  _secs(lv.get("score_seconds")), _secs(lv.get("decode_seconds"))]
                 for i, lv in enumerate(levels)]
    if any(any(c != "—" for c in r[2:]) for r in per_level):
        left += '<h3 class="gap">Per level</h3>' + _table(["level", "kNN method", "kNN", "score", "decode"], per_level)
    return (f'<section><h2>Timings</h2><div class="grid2"><div>{left}</div>'
            f"<div>{_plot_timings(stages)}</div></div></section>")


def render_report(manifest: dict, cluster_sizes: dict[int, np.ndarray],
                  largest: dict[int, pa.Table] | None = None) -> str:
    """One self-contained HTML page describing a clustering run.

    Args:
        manifest: the job's manifest (``manifest.json``); optional keys are rendered when present
            (level ``metrics`` with labels, ``previous`` and level ``churn`` for incremental runs).
        cluster_sizes: per level, the sizes (input rows) of all its clusters.
        largest: per level, a table of its largest clusters (``cluster_id``, ``size``, ``peak_id``,
            ``parent_cluster_id``), largest first; see :func:`read_clusters`.

    Returns:
        The HTML text (inline CSS and SVG, nothing fetched; every manifest string escaped).
    """
    levels = [lv for lv in (manifest.get("levels") or []) if isinstance(lv, dict)]
    cluster_sizes = {int(k): (None if v is None else np.asarray(v)) for k, v in (cluster_sizes or {}).items()}
    has_metrics = any(isinstance(lv.get("metrics"), dict) for lv in levels)
    total_rows = (manifest.get("input") or {}).get("rows")
    body = [
        _header(manifest, len(levels)),
        _run_section(manifest),
        _levels_section(levels, cluster_sizes, has_metrics),
        _metrics_section(levels),
        _churn_section(manifest, levels),
        _sizes_section(cluster_sizes, levels),
        _timings_section(manifest, levels),
        _largest_section(largest, total_rows),
    ]
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    version = (manifest.get("versions") or {}).get("agc_ray", "")
    title = f"agc_ray report: {manifest.get('output', '')}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        + "".join(b for b in body if b)
        + f"<footer>generated {now} by agc_ray {_e(version)} (agc_ray.distributed.report)</footer></main></body></html>\n"
    )

