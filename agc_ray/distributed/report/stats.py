"""Per-level cluster-size statistics, read in chunks so that a level's sizes are never copied whole."""

from __future__ import annotations

import numpy as np

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
