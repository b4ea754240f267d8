"""The report's plots: matplotlib figures outside pyplot, saved as compact inline SVG.

matplotlib is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import io as _io
import math
import re

import numpy as np

from agc_ray.distributed.report.cells import _METRIC_LABELS, _e, _is_num, _secs
from agc_ray.distributed.report.stats import _log2_bins


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

