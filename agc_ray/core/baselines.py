"""Baselines a learned clustering model must beat (printed by every benchmark, run in the same process).

- :func:`threshold_components`: connected components of kNN edges with similarity above a threshold;
  :func:`best_threshold` picks the threshold with the labels (an oracle the model does not get).
- :class:`EdgeClassifierBaseline`: gradient-boosted trees over the per-edge kNN features of
  :func:`agc_ray.core.graph.edge_features`, components over edges with probability > tau; no GNN, no
  hierarchy. Strong on face-like data: a GNN that does not beat it is not earning its cost.
- :func:`chinese_whispers`: dlib's face-clustering default, label propagation over the kNN edges with
  similarity above one threshold (:func:`chinese_whispers_on_validation` picks it on labelled data).
  No model; it does not chain the way components do: the peer an unsupervised mode has to approach.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from agc_ray.core.graph import N_EDGE_FEATURES_V1, edge_features
from agc_ray.core.hierarchy import canonical_labels, weak_components
from agc_ray.metrics.clustering import pairwise


def components_of_edges(nbr: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Connected components (undirected) of the kept kNN edges; (n,) int64 canonical labels."""
    n = nbr.shape[0]
    keep = keep & (nbr >= 0)
    rows = np.repeat(np.arange(n), keep.sum(axis=1))
    return canonical_labels(weak_components(rows, nbr[keep], n))


def threshold_components(nbr: np.ndarray, sim: np.ndarray, threshold: float) -> np.ndarray:
    """Clusters = components of the kNN edges with s_ij > threshold."""
    return components_of_edges(nbr, sim > threshold)


def _threshold_grid(thresholds) -> np.ndarray:
    return np.round(np.arange(0.30, 0.96, 0.025), 3) if thresholds is None else np.asarray(thresholds)


def best_threshold(
    nbr: np.ndarray, sim: np.ndarray, y: np.ndarray, thresholds=None
) -> tuple[float, np.ndarray]:
    """The threshold (chosen with the labels, by pairwise F) and its clustering."""
    best = (-1.0, None, None)
    for t in _threshold_grid(thresholds):
        labels = threshold_components(nbr, sim, float(t))
        f = pairwise(y, labels)[2]
        if f > best[0]:
            best = (f, float(t), labels)
    return best[1], best[2]


def similarity_graph(nbr: np.ndarray, sim: np.ndarray, threshold: float | None = None) -> sp.csr_matrix:
    """Symmetric (n, n) CSR of the kNN edges with s_ij > threshold (all edges when None), weight s_ij.

    An edge found from either end is kept once (i -> j and j -> i carry the same similarity); self
    matches and -1 padding are dropped.
    """
    n = nbr.shape[0]
    keep = (nbr >= 0) & (nbr != np.arange(n)[:, None])
    if threshold is not None:
        keep &= sim > threshold
    rows = np.repeat(np.arange(n), keep.sum(axis=1))
    a = sp.csr_matrix((sim[keep].astype(np.float64), (rows, nbr[keep])), shape=(n, n))
    return a.maximum(a.T).tocsr()


#: Random batches per Chinese-whispers round: each batch updates synchronously, batch after batch.
_CW_BATCHES = 4


def chinese_whispers(
    nbr: np.ndarray, sim: np.ndarray, threshold: float, rounds: int = 20, seed: int = 0
) -> np.ndarray:
    """Chinese whispers (Biemann 2006; dlib's ``chinese_whispers``) over the kNN edges with s_ij > threshold.

    Every node starts in its own class; each round visits all nodes in a seeded random order, in a few
    batches that update at once, and every node takes the class with the largest summed similarity
    among its neighbours (ties: the smaller class id). Stops after ``rounds`` or the first round that
    changes nothing. Nodes without an edge stay singletons.

    Shapes:
        nbr: (n, k) int64 neighbours (-1 padded); sim: (n, k) similarities.
        returns: (n,) int64 canonical labels.
    """
    n = nbr.shape[0]
    w = similarity_graph(nbr, sim, threshold)
    labels = np.arange(n, dtype=np.int64)
    active = np.flatnonzero(np.diff(w.indptr))
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        changed = 0
        for batch in np.array_split(rng.permutation(active), _CW_BATCHES):
            if batch.size == 0:
                continue
            sub = w[batch]
            row = np.repeat(np.arange(batch.size, dtype=np.int64), np.diff(sub.indptr))
            key, inverse = np.unique(row * n + labels[sub.indices], return_inverse=True)
            total = np.bincount(inverse.ravel(), weights=sub.data)
            key_row, key_label = key // n, key % n
            order = np.lexsort((key_label, -total, key_row))
            first = order[np.r_[True, key_row[order[1:]] != key_row[order[:-1]]]]
            new = key_label[first]  # one entry per batch row: every active node has an edge
            changed += int(np.count_nonzero(labels[batch] != new))
            labels[batch] = new
        if changed == 0:
            break
    return canonical_labels(labels)


def chinese_whispers_on_validation(val_nbr: np.ndarray, val_sim: np.ndarray, val_y: np.ndarray, thresholds=None) -> float:
    """The Chinese-whispers threshold with the best pairwise F on a labelled validation kNN graph.

    The grid defaults to :func:`best_threshold`'s (0.30 to 0.95 in steps of 0.025).
    """
    scores = {float(t): pairwise(val_y, chinese_whispers(val_nbr, val_sim, float(t)))[2] for t in _threshold_grid(thresholds)}
    return max(scores, key=scores.get)


class EdgeClassifierBaseline:
    """Gradient-boosted edge classifier over kNN edge features, then components above tau."""

    def __init__(self, max_iter: int = 200, max_edges: int = 2_000_000, seed: int = 0):
        self.max_iter = max_iter
        self.max_edges = max_edges
        self.seed = seed

    @staticmethod
    def _features(nbr, sim):
        # The level-0 features it was measured with (the added ones repeat sim and a constant there)
        f = edge_features(nbr, sim)[..., :N_EDGE_FEATURES_V1].numpy()
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
