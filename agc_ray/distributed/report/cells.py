"""Display forms of manifest values (table cells) and the HTML blocks built from them.

Every string that comes from a manifest goes through :func:`_e` (HTML-escaped, quotes too).
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

import numpy as np

TOP_N = 10  # largest clusters listed per level
# what the page shows of a cluster: all that is read of the largest ones
_CLUSTER_COLUMNS = ["cluster_id", "size", "peak_id", "parent_cluster_id"]
_METRIC_LABELS = {  # agc_ray.metrics.evaluate's keys, in display order
    "pairwise_precision": "pairwise P", "pairwise_recall": "pairwise R", "fp": "Fp",
    "bcubed_precision": "BCubed P", "bcubed_recall": "BCubed R", "fb": "Fb",
    "nmi": "NMI", "ari": "ARI", "n_clusters": "clusters",
}


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

