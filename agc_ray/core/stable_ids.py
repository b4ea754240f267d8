"""Stable cluster ids across runs: match this run's clusters to a previous run's by shared rows.

A new cluster *continues* an earlier one when they are each other's maximum overlap: of all earlier
clusters, the earlier one shares the most rows (rows present in both runs) with the new one, and of
all new clusters, the new one shares the most with the earlier one (ties go to the smaller id). That
relation is one-to-one by construction and stable under small changes: rerunning on the same input
keeps every id; adding a few rows keeps almost every id; a split keeps the id on its largest part.
Every other new cluster gets a fresh id from a counter that only grows across runs (``next_id``), so
an id is never reused for a different cluster.

Churn, per level (the two sides each add up):

- previous clusters = kept + split + gone
- this run's clusters = kept + merged + new

where *kept* clusters continue one earlier cluster; *split*: an earlier cluster not continued whose
shared rows went to two or more new clusters; *gone*: the other earlier clusters (rows removed, or
absorbed as a minority); *merged*: a new cluster not continuing any that draws shared rows from two
or more earlier clusters; *new*: the rest (only new rows, or a minority from one earlier cluster).
"""

from __future__ import annotations

import numpy as np


def pair_counts(new: np.ndarray, old: np.ndarray, count: np.ndarray | None = None):
    """Sum ``count`` (default 1 per row) over equal ``(new, old)`` pairs.

    Args:
        new: (P,) int64 cluster of each row (or partial pair) in this run.
        old: (P,) int64 cluster of the same row in the previous run.
        count: (P,) int64 weights, e.g. partial counts from several blocks.

    Returns:
        ``(new, old, count)`` of the distinct pairs, sorted by (new, old).
    """
    new = np.asarray(new, dtype=np.int64)
    old = np.asarray(old, dtype=np.int64)
    count = np.ones(new.size, np.int64) if count is None else np.asarray(count, dtype=np.int64)
    if new.size == 0:
        return new, old, count
    order = np.lexsort((old, new))
    new, old, count = new[order], old[order], count[order]
    start = np.flatnonzero(np.r_[True, (new[1:] != new[:-1]) | (old[1:] != old[:-1])])
    return new[start], old[start], np.add.reduceat(count, start)


def _best_of(group: np.ndarray, other: np.ndarray, count: np.ndarray) -> np.ndarray:
    """(P,) bool: the pair is its group's largest count (ties: the smallest ``other``)."""
    best = np.zeros(group.size, bool)
    if group.size:
        order = np.lexsort((other, -count, group))
        first = np.r_[True, group[order][1:] != group[order][:-1]]
        best[order[first]] = True
    return best


def match_clusters(new: np.ndarray, old: np.ndarray, count: np.ndarray, n_clusters: int,
                   previous_ids: np.ndarray, next_id: int) -> tuple[np.ndarray, dict, int]:
    """Stable ids for this run's clusters ``0 .. n_clusters - 1``.

    Args:
        new, old, count: distinct pairs from :func:`pair_counts` (``old`` holds previous cluster ids).
        n_clusters: clusters in this run at this level.
        previous_ids: (C_prev,) every cluster id of the previous run at this level.
        next_id: the first id never issued at this level (fresh ids start there).

    Returns:
        ``(id_map, churn, next_id)``: id_map (n_clusters,) int64 stable id of each cluster; churn counts
        (see the module docstring) with ``shared_rows`` and ``changed_row_share`` (share of shared rows
        whose cluster id changed); the new ``next_id``.
    """
    previous_ids = np.unique(np.asarray(previous_ids, dtype=np.int64))
    next_id = max(int(next_id), int(previous_ids[-1]) + 1 if previous_ids.size else 0)
    old_idx = np.searchsorted(previous_ids, old)
    if old.size and (old_idx.max() >= previous_ids.size or np.any(previous_ids[np.minimum(old_idx, previous_ids.size - 1)] != old)):
        raise ValueError("previous assignments name a cluster id missing from the previous clusters table")
    keep = _best_of(new, old_idx, count) & _best_of(old_idx, new, count)

    id_map = np.full(n_clusters, -1, dtype=np.int64)
    id_map[new[keep]] = old[keep]
    fresh = np.flatnonzero(id_map < 0)
    id_map[fresh] = next_id + np.arange(fresh.size, dtype=np.int64)

    kept_new = np.zeros(n_clusters, bool)
    kept_new[new[keep]] = True
    kept_old = np.zeros(previous_ids.size, bool)
    kept_old[old_idx[keep]] = True
    sources = np.bincount(new, minlength=n_clusters)  # earlier clusters feeding each new one
    targets = np.bincount(old_idx, minlength=previous_ids.size)
    kept = int(keep.sum())
    merged = int((~kept_new & (sources >= 2)).sum())
    split = int((~kept_old & (targets >= 2)).sum())
    shared = int(count.sum())
    changed = int(count[id_map[new] != old].sum())
    churn = {
        "previous_clusters": int(previous_ids.size), "clusters": int(n_clusters),
        "kept": kept, "split": split, "gone": int(previous_ids.size) - kept - split,
        "merged": merged, "new": int(n_clusters) - kept - merged,
        "shared_rows": shared, "changed_rows": changed,
        "changed_row_share": changed / shared if shared else 0.0,
    }
    return id_map, churn, int(next_id + fresh.size)
