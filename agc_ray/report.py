"""The run report: one self-contained HTML page (``report.html``) describing a clustering output.

:func:`render_report` turns a manifest and the per-level cluster sizes into HTML (inline CSS, plots as
inline SVG drawn by matplotlib's SVG backend; no script, font, stylesheet or image is fetched).
:func:`write_report` reads what it needs from an output directory (local or ``s3://``, through a
pyarrow filesystem) and writes ``report.html`` next to ``manifest.json``.

Ray-free: importing this module imports neither Ray nor torch.
"""

from __future__ import annotations

import datetime as _dt
import html
import io as _io
import json
import math
import posixpath
import re
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["REPORT_NAME", "build_report", "largest_clusters", "read_clusters", "render_report", "write_report"]

REPORT_NAME = "report.html"
TOP_N = 10
_CLUSTER_COLUMNS = ["cluster_id", "size", "peak_id", "parent_cluster_id"]
_STAGES = ("read", "knn", "score", "decode", "aggregate", "write")
_METRIC_LABELS = {  # agc_ray.metrics.evaluate's keys, in display order
    "pairwise_precision": "pairwise P", "pairwise_recall": "pairwise R", "fp": "Fp",
    "bcubed_precision": "BCubed P", "bcubed_recall": "BCubed R", "fb": "Fb",
    "nmi": "NMI", "ari": "ARI", "n_clusters": "clusters",
}
_CHURN_KEYS = ("previous_clusters", "kept", "split", "merged", "new", "gone")


# -- formatting ---------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    """HTML-escaped text of any value (quotes too: safe in attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _int(v) -> str:
    if not _is_num(v):
        return "—" if v is None else _e(v)
    if isinstance(v, (float, np.floating)) and not float(v).is_integer():
        return _num(v)
    return f"{int(v):,}"


def _id(v) -> str:
    """An identifier: as is (no thousands separators), — for null."""
    return "—" if v is None else _e(v)


def _num(v, digits: int = 3) -> str:
    if not _is_num(v):
        return "—" if v is None else _e(v)
    v = float(v)
    if math.isnan(v):
        return "—"
    if v.is_integer() and abs(v) < 1e15:
        return f"{int(v):,}"
    return f"{v:,.{digits}f}" if abs(v) < 1e6 else f"{v:.3g}"


def _pct(v) -> str:
    return "—" if not _is_num(v) or math.isnan(float(v)) else f"{100 * float(v):.1f}%"


def _secs(v) -> str:
    if not _is_num(v):
        return "—"
    v = float(v)
    if v >= 3600:
        return f"{v / 3600:.2f} h"
    if v >= 120:
        return f"{v / 60:.1f} min"
    return f"{v:.2f} s" if v < 10 else f"{v:.1f} s"


def _value(v) -> str:
    """Display form of a manifest value (nested dicts and lists as compact JSON)."""
    if isinstance(v, bool) or v is None:
        return _e(json.dumps(v))
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        return _e(f"{float(v):.6g}")
    if isinstance(v, (dict, list, tuple)):
        return f"<code>{_e(json.dumps(v, default=str, sort_keys=True))}</code>"
    return _e(v)


def _metric(v) -> str:
    return f"{float(v):.3f}" if _is_num(v) else "—"


def _chips(items: dict) -> str:
    if not items:
        return '<p class="muted">—</p>'
    return '<div class="chips">' + "".join(
        f'<span class="chip"><span class="muted">{_e(k)}</span> {_value(v)}</span>' for k, v in items.items()) + "</div>"


def _kv_table(items: dict, cls: str = "kv") -> str:
    if not items:
        return '<p class="muted">—</p>'
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_value(v)}</td></tr>" for k, v in items.items())
    return f'<table class="{cls}">{rows}</table>'


def _table(header: list[str], rows: list[list[str]], cls: str = "data", first_left: bool = False) -> str:
    """A table from pre-escaped cells; numeric columns are right-aligned by CSS."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    extra = " first-left" if first_left else ""
    return f'<div class="scroll"><table class="{cls}{extra}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


# -- statistics ---------------------------------------------------------------------------------------
_CHUNK = 1 << 20


def _size_stats(sizes: np.ndarray | None) -> dict:
    """Counts and quantiles of one level's cluster sizes (one copy of the array at most)."""
    if sizes is None or sizes.size == 0:
        return {}
    s = np.asarray(sizes)
    singles = rows = 0
    for lo in range(0, s.size, _CHUNK):
        part = s[lo:lo + _CHUNK]
        singles += int(np.count_nonzero(part == 1))
        rows += int(part.sum(dtype=np.int64))
    median, p90 = np.percentile(s, [50, 90])
    return {
        "clusters": int(s.size), "rows": rows,
        "singleton_share": singles / s.size,
        "singleton_rows_share": singles / rows if rows else 0.0,
        "median": float(median), "p90": float(p90), "max": int(s.max()),
    }


def _log2_bins(sizes: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster counts and row counts per power-of-two size bin [2^i, 2^(i+1)) (chunked: small temporaries)."""
    s = np.asarray(sizes)
    edges = np.left_shift(np.int64(1), np.arange(1, n_bins, dtype=np.int64))  # 2, 4, …, 2^(n_bins-1)
    counts = np.zeros(n_bins, np.float64)
    rows = np.zeros(n_bins, np.float64)
    for lo in range(0, s.size, _CHUNK):
        part = s[lo:lo + _CHUNK]
        part = part[part > 0]
        b = np.searchsorted(edges, part, side="right")  # exact on integers, no float log
        counts += np.bincount(b, minlength=n_bins)[:n_bins]
        rows += np.bincount(b, weights=part, minlength=n_bins)[:n_bins]
    return counts, rows


# -- plots (matplotlib, SVG backend) --------------------------------------------------------------------
def _figure(**kw):
    """A matplotlib Figure outside pyplot: no backend selected or changed, no global figure registry
    (safe inside a job's driver and in threads); saved through the SVG backend."""
    from matplotlib.figure import Figure

    return Figure(**kw)


_RC = {
    "svg.fonttype": "none",  # text as <text>, not glyph paths: small files, page font
    "font.size": 9, "font.family": "sans-serif",
    "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.color": "#e3e6ea", "grid.linewidth": 0.6,
    "axes.edgecolor": "#9aa3ad", "axes.titlesize": 10, "axes.titleweight": "bold",
    "legend.frameon": False, "legend.fontsize": 8,
    "figure.dpi": 72,
}


def _svg(fig, name: str) -> str:
    """The figure as a compact inline ``<svg>`` element: no XML prologue or metadata, ids prefixed with
    ``name`` (unique on the page), unreferenced ids dropped, coordinates rounded, the font left to the page."""
    import matplotlib

    buf = _io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": f"agc-report-{name}"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})  # laid out by tight_layout
    return _compact_svg(buf.getvalue(), name)


_NUMBER = re.compile(r"-?\d+\.\d{3,}")


def _round(m) -> str:
    return f"{float(m.group(0)):.2f}".rstrip("0").rstrip(".")


def _compact_svg(text: str, name: str) -> str:
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    used = set(re.findall(r'(?:url\(#|href="#)([^)"]+)', text))
    text = re.sub(r'\sid="([^"]+)"', lambda m: f' id="{name}-{m.group(1)}"' if m.group(1) in used else "", text)
    text = re.sub(r'(url\(#|href="#)([^)"]+)', lambda m: f"{m.group(1)}{name}-{m.group(2)}", text)
    text = re.sub(r"font-family:[^;\"]*;?\s*", "", text)  # the page's font (svg.plot text in the CSS)
    text = re.sub(r'\s*transform="rotate\(-?0 [^)]*\)"', "", text)
    text = re.sub(r'="([^"]*)"', lambda m: '="' + _NUMBER.sub(_round, m.group(1)) + '"', text)  # attributes only
    text = text.replace("*{stroke-linejoin", "svg.plot *{stroke-linejoin")  # matplotlib's global rule, scoped
    text = re.sub(r"\s*\n\s*", " ", text)  # path data and indentation on one line
    text = re.sub(r">\s+<", "><", text)
    return text.replace("<svg ", f'<svg class="plot" role="img" aria-label="{_e(name)}" ', 1)


def _level_colors(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    cmap = colormaps["viridis"]
    return [cmap(i / max(1, n - 1)) for i in range(n)]


def _compact_count(v, _pos=None) -> str:
    v = float(v)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def _log_count_axis(axis, low: float, high: float) -> None:
    """Plain-number ticks (1, 2, 5, 10, …, 1K, 10K) on a log axis; 1-2-5 steps only over a short range."""
    from matplotlib import ticker

    decades = math.log10(max(high, 1.0) / max(low, 1e-9)) if high > 0 else 1.0
    subs = (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)
    axis.set_major_locator(ticker.LogLocator(base=10, subs=subs, numticks=12))
    axis.set_major_formatter(ticker.FuncFormatter(_compact_count))
    axis.set_minor_formatter(ticker.NullFormatter())


def _plot_sizes(cluster_sizes: dict[int, np.ndarray], levels: list[dict]) -> str:
    """Nodes and clusters per level, then the log-binned size distributions with the levels overlaid."""
    import matplotlib
    from matplotlib import ticker

    with_sizes = [lv for lv in sorted(cluster_sizes) if cluster_sizes[lv] is not None and len(cluster_sizes[lv])]
    xs = [lv.get("level", i) for i, lv in enumerate(levels)]
    clusters = [lv.get("clusters") for lv in levels]
    nodes = [lv.get("nodes") for lv in levels]
    counts_ok = bool(xs) and all(_is_num(c) for c in clusters)
    n_panels = int(counts_ok) + 2 * bool(with_sizes)
    if n_panels == 0:
        return ""
    with matplotlib.rc_context(_RC):
        fig = _figure(figsize=(3.9 * n_panels, 3.1))
        axes = fig.subplots(1, n_panels, squeeze=False)
        axes = list(axes[0])
        if counts_ok:
            ax = axes.pop(0)
            if all(_is_num(n) for n in nodes):
                ax.plot(xs, nodes, marker="o", ms=4, color="#9aa3ad", label="nodes (input)")
            ax.plot(xs, clusters, marker="o", ms=4, color="#1f77b4", label="clusters")
            if len(xs) == 1:
                ax.set_ylim(0, max(v for v in clusters + nodes if _is_num(v)) * 1.15)
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(_compact_count))
                ax.set_xlim(xs[0] - 0.5, xs[0] + 0.5)
            elif all(c > 0 for c in clusters) and all(not _is_num(n) or n > 0 for n in nodes):
                ax.set_yscale("log")
                vals = [v for v in clusters + nodes if _is_num(v)]
                _log_count_axis(ax.yaxis, min(vals), max(vals))
            ax.set_xticks(xs)
            ax.set_xlabel("level")
            ax.set_title("Nodes and clusters per level")
            ax.legend(loc="upper right")
        if with_sizes:
            ax1, ax2 = axes
            max_size = max(int(np.max(cluster_sizes[lv])) for lv in with_sizes)
            n_bins = int(np.floor(np.log2(max(max_size, 1)))) + 1
            edges = 2.0 ** np.arange(n_bins + 1)
            top_count = 1.0
            for lv, color in zip(with_sizes, _level_colors(len(with_sizes))):
                counts, rows = _log2_bins(cluster_sizes[lv], n_bins)
                top_count = max(top_count, float(counts.max()))
                ax1.stairs(counts, edges, color=color, linewidth=1.3, label=f"level {lv}")
                ax2.stairs(rows / (rows.sum() or 1.0), edges, color=color, linewidth=1.3)
            for ax in (ax1, ax2):
                ax.set_xscale("log", base=2)
                ax.set_xlim(1, edges[-1])
                ax.set_xlabel("cluster size (input rows)")
            ax1.set_yscale("log")
            ax1.set_ylim(bottom=0.7)
            _log_count_axis(ax1.yaxis, 1.0, top_count)
            ax1.set_title("Clusters per size bin")
            ax2.set_ylim(0, None)
            ax2.yaxis.set_major_formatter(ticker.PercentFormatter(1.0, decimals=0))
            ax2.set_title("Share of input rows per size bin")
            ncol = min(len(with_sizes), 10)
            legend_rows = -(-len(with_sizes) // ncol)
            fig.legend(*ax1.get_legend_handles_labels(), loc="lower center", ncol=ncol,
                       bbox_to_anchor=(0.5, 0.0), handlelength=1.6, columnspacing=1.2)
            fig.set_figheight(3.1 + 0.2 * legend_rows)
            fig.tight_layout(rect=(0, 0.03 + 0.2 * legend_rows / fig.get_figheight(), 1, 1))
        else:
            fig.tight_layout()
        return _svg(fig, "sizes")


def _plot_timings(stages: list[tuple[str, float]]) -> str:
    import matplotlib

    if not stages:
        return ""
    with matplotlib.rc_context(_RC):
        fig = _figure(figsize=(5.4, 0.45 + 0.3 * len(stages) + 0.6))
        ax = fig.subplots()
        names = [s for s, _ in stages][::-1]
        vals = [v for _, v in stages][::-1]
        bars = ax.barh(names, vals, color="#1f77b4", height=0.6)
        ax.bar_label(bars, labels=[_secs(v) for v in vals], padding=3, fontsize=8)
        ax.set_xlabel("seconds")
        ax.set_xlim(0, max(vals) * 1.2 if max(vals) > 0 else 1)
        ax.grid(axis="y", visible=False)
        ax.set_title("Time per stage (all levels)")
        fig.tight_layout()
        return _svg(fig, "timings")


def _plot_metrics(levels: list[dict]) -> str:
    import matplotlib

    pts = [(lv.get("level", i), lv["metrics"]) for i, lv in enumerate(levels) if isinstance(lv.get("metrics"), dict)]
    if not pts:
        return ""
    with matplotlib.rc_context(_RC):
        fig = _figure(figsize=(5.4, 3.0))
        ax = fig.subplots()
        for key, color in (("fp", "#1f77b4"), ("fb", "#ff7f0e"), ("nmi", "#2ca02c"), ("ari", "#9467bd")):
            ys = [(x, m.get(key)) for x, m in pts if _is_num(m.get(key))]
            if ys:
                ax.plot([x for x, _ in ys], [y for _, y in ys], marker="o", ms=4, color=color, label=_METRIC_LABELS[key])
        ax.set_xticks([x for x, _ in pts])
        ax.set_xlim(min(x for x, _ in pts) - 0.3, max(x for x, _ in pts) + 0.3)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("level")
        ax.set_title("Quality per level (against labels)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        return _svg(fig, "metrics")


# -- page -------------------------------------------------------------------------------------------------
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
    if _is_num(lv.get("knn_nprobe")):
        cell += f' <span class="muted">nprobe</span> {int(lv["knn_nprobe"])}'
    if _is_num(lv.get("knn_recall")):
        cell += f' <span class="muted">recall</span> {float(lv["knn_recall"]):.3f}'
    if lv.get("knn_recall_target_met") is False:
        cell += ' <span class="warn">below target</span>'
    return cell


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
               _knn_cell(lv), _num(lv.get("tau"), 3)]
        if has_metrics:
            m = lv.get("metrics") if isinstance(lv.get("metrics"), dict) else {}
            row += [_metric(m.get("fp")), _metric(m.get("fb")), _metric(m.get("nmi"))]
        rows.append(row)
    note = ('<p class="note">nodes: what the level clusters (input rows at level 0, the previous level\'s clusters '
            "above); edges: the edges the decode kept; sizes in input rows; kNN recall (approximate search only): "
            "share of the true k nearest neighbours found, on a sample of level 0; tau: the level's decode threshold "
            "(its source under Parameters).</p>")
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
        + f"<footer>generated {now} by agc_ray {_e(version)} (agc_ray.report)</footer></main></body></html>\n"
    )


# -- reading an output -------------------------------------------------------------------------------------
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


def _read_manifest(fs, path: str) -> dict:
    with fs.open_input_stream(posixpath.join(path, "manifest.json")) as f:
        return json.loads(f.read().decode())


def build_report(fs, path: str, manifest: dict | None = None) -> str:
    """The HTML report of the output at ``path`` on the pyarrow filesystem ``fs`` (not written)."""
    if manifest is None:
        manifest = _read_manifest(fs, path)
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
