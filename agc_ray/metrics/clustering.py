"""Partition metrics of face/image clustering: pairwise and BCubed F, NMI, ARI.

All of them reduce to the contingency counts n_gc of (true class g, predicted cluster c), which
take one sort of N pair codes: O(N log N) time and O(N) memory, no per-cluster Python loops.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class Contingency(NamedTuple):
    """Non-empty cells of the contingency table, aligned 1-D int64 arrays (one entry per cell)."""

    count: np.ndarray  # n_gc
    class_size: np.ndarray  # |G_g| of the cell's class
    cluster_size: np.ndarray  # |P_c| of the cell's cluster
    class_sizes: np.ndarray  # |G_g| for every class (one entry per class)
    cluster_sizes: np.ndarray  # |P_c| for every cluster
    class_index: np.ndarray  # g of the cell (classes numbered in sorted label order)
    cluster_index: np.ndarray  # c of the cell


def _check_labels(labels_true, labels_pred) -> tuple[np.ndarray, np.ndarray]:
    labels_true = np.asarray(labels_true).ravel()
    labels_pred = np.asarray(labels_pred).ravel()
    if labels_true.shape != labels_pred.shape:
        raise ValueError(
            "labels_true and labels_pred differ in length: "
            f"{labels_true.shape[0]} vs {labels_pred.shape[0]}"
        )
    if labels_true.size == 0:
        raise ValueError("labels_true and labels_pred are empty")
    return labels_true, labels_pred


def contingency(labels_true, labels_pred) -> Contingency:
    """Sparse contingency table of two labelings of the same N samples."""
    labels_true, labels_pred = _check_labels(labels_true, labels_pred)
    _, g = np.unique(labels_true, return_inverse=True)
    _, c = np.unique(labels_pred, return_inverse=True)
    n_clusters = int(c.max()) + 1
    cells, count = np.unique(g.astype(np.int64) * n_clusters + c, return_counts=True)
    class_index, cluster_index = np.divmod(cells, n_clusters)
    class_sizes = np.bincount(g)
    cluster_sizes = np.bincount(c)
    return Contingency(
        count=count.astype(np.int64),
        class_size=class_sizes[class_index].astype(np.int64),
        cluster_size=cluster_sizes[cluster_index].astype(np.int64),
        class_sizes=class_sizes.astype(np.int64),
        cluster_sizes=cluster_sizes.astype(np.int64),
        class_index=class_index,
        cluster_index=cluster_index,
    )


def _f(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def pairwise(labels_true, labels_pred) -> tuple[float, float, float]:
    """Pairwise precision, recall and F-score (Fp) over ordered pairs of distinct samples.

    With no predicted (or true) pairs at all, precision (recall) is 1 by convention.
    """
    return _pairwise(contingency(labels_true, labels_pred))


def _pairwise(t: Contingency) -> tuple[float, float, float]:
    n = float(t.count.sum())
    tp = float(np.square(t.count, dtype=np.float64).sum()) - n
    pred_pairs = float(np.square(t.cluster_sizes, dtype=np.float64).sum()) - n
    true_pairs = float(np.square(t.class_sizes, dtype=np.float64).sum()) - n
    precision = 1.0 if pred_pairs == 0 else tp / pred_pairs
    recall = 1.0 if true_pairs == 0 else tp / true_pairs
    return precision, recall, _f(precision, recall)


def bcubed(labels_true, labels_pred) -> tuple[float, float, float]:
    """BCubed precision, recall and F-score (Fb)."""
    return _bcubed(contingency(labels_true, labels_pred))


def _bcubed(t: Contingency) -> tuple[float, float, float]:
    n = float(t.count.sum())
    sq = np.square(t.count, dtype=np.float64)
    precision = float((sq / t.cluster_size).sum()) / n
    recall = float((sq / t.class_size).sum()) / n
    return precision, recall, _f(precision, recall)


def nmi(labels_true, labels_pred) -> float:
    """Normalised mutual information (arithmetic normalisation, scikit-learn's default; its value)."""
    return _nmi(contingency(labels_true, labels_pred))


def ari(labels_true, labels_pred) -> float:
    """Adjusted Rand index (scikit-learn's value)."""
    return _ari(contingency(labels_true, labels_pred))


def _entropy(sizes: np.ndarray) -> float:
    """Entropy of a labelling from its class sizes (scikit-learn's formula, so the same float)."""
    if sizes.size == 1:
        return 0.0
    pi = sizes.astype(np.float64)
    total = pi.sum()
    return float(-np.sum((pi / total) * (np.log(pi) - math.log(total))))


def _nmi(t: Contingency) -> float:
    """:func:`nmi` from the contingency cells: scikit-learn's steps (its mutual information of the sparse
    contingency matrix, over the mean of the two entropies), without sorting the labels again."""
    from scipy.sparse import csr_matrix
    from sklearn.metrics import mutual_info_score

    if t.class_sizes.size == t.cluster_sizes.size == 1:
        return 1.0
    table = csr_matrix((t.count.astype(np.float64), (t.class_index, t.cluster_index)),
                       shape=(t.class_sizes.size, t.cluster_sizes.size))
    mi = mutual_info_score(None, None, contingency=table)
    if mi == 0:
        return 0.0
    return float(mi / ((_entropy(t.class_sizes) + _entropy(t.cluster_sizes)) / 2))


def _ari(t: Contingency) -> float:
    """:func:`ari` from the contingency cells: scikit-learn's pair confusion counts (exact integers)."""
    n = int(t.count.sum())
    sum_squares = int(np.square(t.count).sum())
    tp = sum_squares - n
    fp = int((t.count * t.cluster_size).sum()) - sum_squares
    fn = int((t.count * t.class_size).sum()) - sum_squares
    tn = n * n - fp - fn - sum_squares
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def evaluate(labels_true, labels_pred) -> dict[str, float]:
    """All partition metrics at once: pairwise and BCubed P/R/F, NMI, ARI, cluster count (one
    contingency table for all: at 10^6 rows a job's levels took 2.3 s each when every metric sorted
    the labels itself)."""
    t = contingency(labels_true, labels_pred)
    pp, pr, pf = _pairwise(t)
    bp, br, bf = _bcubed(t)
    return {
        "pairwise_precision": pp,
        "pairwise_recall": pr,
        "fp": pf,
        "bcubed_precision": bp,
        "bcubed_recall": br,
        "fb": bf,
        "nmi": _nmi(t),
        "ari": _ari(t),
        "n_clusters": int(t.cluster_sizes.size),
    }
