"""Partition metrics of face/image clustering: pairwise and BCubed F, NMI, ARI.

All of them reduce to the contingency counts n_gc of (true class g, predicted cluster c), which
take one sort of N pair codes: O(N log N) time and O(N) memory, no per-cluster Python loops.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


class Contingency(NamedTuple):
    """Non-empty cells of the contingency table, aligned 1-D int64 arrays (one entry per cell)."""

    count: np.ndarray  # n_gc
    class_size: np.ndarray  # |G_g| of the cell's class
    cluster_size: np.ndarray  # |P_c| of the cell's cluster
    class_sizes: np.ndarray  # |G_g| for every class (one entry per class)
    cluster_sizes: np.ndarray  # |P_c| for every cluster


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
    class_sizes = np.bincount(g)
    cluster_sizes = np.bincount(c)
    return Contingency(
        count=count.astype(np.int64),
        class_size=class_sizes[cells // n_clusters].astype(np.int64),
        cluster_size=cluster_sizes[cells % n_clusters].astype(np.int64),
        class_sizes=class_sizes.astype(np.int64),
        cluster_sizes=cluster_sizes.astype(np.int64),
    )


def _f(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def pairwise(labels_true, labels_pred) -> tuple[float, float, float]:
    """Pairwise precision, recall and F-score (Fp) over ordered pairs of distinct samples.

    With no predicted (or true) pairs at all, precision (recall) is 1 by convention.
    """
    t = contingency(labels_true, labels_pred)
    n = float(t.count.sum())
    tp = float(np.square(t.count, dtype=np.float64).sum()) - n
    pred_pairs = float(np.square(t.cluster_sizes, dtype=np.float64).sum()) - n
    true_pairs = float(np.square(t.class_sizes, dtype=np.float64).sum()) - n
    precision = 1.0 if pred_pairs == 0 else tp / pred_pairs
    recall = 1.0 if true_pairs == 0 else tp / true_pairs
    return precision, recall, _f(precision, recall)


def bcubed(labels_true, labels_pred) -> tuple[float, float, float]:
    """BCubed precision, recall and F-score (Fb)."""
    t = contingency(labels_true, labels_pred)
    n = float(t.count.sum())
    sq = np.square(t.count, dtype=np.float64)
    precision = float((sq / t.cluster_size).sum()) / n
    recall = float((sq / t.class_size).sum()) / n
    return precision, recall, _f(precision, recall)


def nmi(labels_true, labels_pred) -> float:
    """Normalised mutual information (arithmetic normalisation, scikit-learn's default)."""
    labels_true, labels_pred = _check_labels(labels_true, labels_pred)
    return float(normalized_mutual_info_score(labels_true, labels_pred))


def ari(labels_true, labels_pred) -> float:
    """Adjusted Rand index."""
    labels_true, labels_pred = _check_labels(labels_true, labels_pred)
    return float(adjusted_rand_score(labels_true, labels_pred))


def evaluate(labels_true, labels_pred) -> dict[str, float]:
    """All partition metrics at once: pairwise and BCubed P/R/F, NMI, ARI, cluster count."""
    pp, pr, pf = pairwise(labels_true, labels_pred)
    bp, br, bf = bcubed(labels_true, labels_pred)
    return {
        "pairwise_precision": pp,
        "pairwise_recall": pr,
        "fp": pf,
        "bcubed_precision": bp,
        "bcubed_recall": br,
        "fb": bf,
        "nmi": nmi(labels_true, labels_pred),
        "ari": ari(labels_true, labels_pred),
        "n_clusters": int(np.unique(np.asarray(labels_pred)).size),
    }
