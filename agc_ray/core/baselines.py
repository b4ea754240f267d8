"""Baselines a learned clustering model must beat (printed by every benchmark, run in the same process).

- :func:`threshold_components`: connected components of kNN edges with similarity above a threshold;
  :func:`best_threshold` picks the threshold with the labels (an oracle the model does not get).
- :class:`EdgeClassifierBaseline`: gradient-boosted trees over the per-edge kNN features of
  :func:`agc_ray.core.graph.edge_features`, components over edges with probability > tau; no GNN, no
  hierarchy. Strong on face-like data: a GNN that does not beat it is not earning its cost.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from agc_ray.core.graph import edge_features
from agc_ray.core.hierarchy import canonical_labels
from agc_ray.metrics.clustering import pairwise


def components_of_edges(nbr: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Connected components (undirected) of the kept kNN edges; (n,) int64 canonical labels."""
    n = nbr.shape[0]
    keep = keep & (nbr >= 0)
    rows = np.repeat(np.arange(n), keep.sum(axis=1))
    graph = sp.csr_matrix((np.ones(rows.size, dtype=np.int8), (rows, nbr[keep])), shape=(n, n))
    _, comp = connected_components(graph, directed=True, connection="weak")
    return canonical_labels(comp)


def threshold_components(nbr: np.ndarray, sim: np.ndarray, threshold: float) -> np.ndarray:
    """Clusters = components of the kNN edges with s_ij > threshold."""
    return components_of_edges(nbr, sim > threshold)


def best_threshold(
    nbr: np.ndarray, sim: np.ndarray, y: np.ndarray, thresholds=None
) -> tuple[float, np.ndarray]:
    """The threshold (chosen with the labels, by pairwise F) and its clustering."""
    thresholds = np.round(np.arange(0.30, 0.96, 0.025), 3) if thresholds is None else thresholds
    best = (-1.0, None, None)
    for t in thresholds:
        labels = threshold_components(nbr, sim, float(t))
        f = pairwise(y, labels)[2]
        if f > best[0]:
            best = (f, float(t), labels)
    return best[1], best[2]


class EdgeClassifierBaseline:
    """Gradient-boosted edge classifier over kNN edge features, then components above tau."""

    def __init__(self, max_iter: int = 200, max_edges: int = 2_000_000, seed: int = 0):
        self.max_iter = max_iter
        self.max_edges = max_edges
        self.seed = seed

    @staticmethod
    def _features(nbr, sim):
        f = edge_features(nbr, sim).numpy()
        valid = nbr >= 0
        return f[valid], valid

    def fit(self, nbr, sim, y, val=None):
        """Fit on a labelled kNN graph; if ``val=(nbr, sim, y)`` is given, choose tau on it by Fp."""
        from sklearn.ensemble import HistGradientBoostingClassifier

        f, valid = self._features(nbr, sim)
        target = (y[np.maximum(nbr, 0)] == y[:, None])[valid]
        rng = np.random.default_rng(self.seed)
        if f.shape[0] > self.max_edges:
            pick = rng.choice(f.shape[0], self.max_edges, replace=False)
            f, target = f[pick], target[pick]
        self.model_ = HistGradientBoostingClassifier(max_iter=self.max_iter, random_state=self.seed)
        self.model_.fit(f, target)
        self.tau_ = 0.5
        if val is not None:
            vnbr, vsim, vy = val
            p = self.edge_probabilities(vnbr, vsim)
            scores = {t: pairwise(vy, components_of_edges(vnbr, p > t))[2] for t in np.arange(0.5, 0.99, 0.05)}
            self.tau_ = float(max(scores, key=scores.get))
        return self

    def edge_probabilities(self, nbr, sim) -> np.ndarray:
        f, valid = self._features(nbr, sim)
        p = np.zeros(nbr.shape, dtype=np.float32)
        p[valid] = self.model_.predict_proba(f)[:, 1]
        return p

    def predict(self, nbr, sim) -> np.ndarray:
        return components_of_edges(nbr, self.edge_probabilities(nbr, sim) > self.tau_)
