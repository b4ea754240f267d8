"""What attributed graph clustering papers report (PyAGC's ``label_metrics``/``structure_metrics``).

- Label metrics: ACC and macro F1 after the best one-to-one matching of clusters to classes
  (Hungarian algorithm on the contingency table, ``scipy.optimize.linear_sum_assignment``), NMI and
  ARI (from :mod:`agc_ray.metrics.clustering`).
- Structure metrics, from the graph and the predicted labels only: modularity and conductance.

All of them are vectorised over the contingency table or the edge list; labels and edges may be
numpy arrays or torch tensors.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from agc_ray.metrics.clustering import ari, nmi

LABEL_METRICS = ("NMI", "ARI", "ACC", "F1")
STRUCTURE_METRICS = ("Mod", "Cond")


def _numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _labels_pair(labels_true: Any, labels_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t, p = _numpy(labels_true).ravel(), _numpy(labels_pred).ravel()
    if t.shape != p.shape:
        raise ValueError(f"labels_true and labels_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    if t.size == 0:
        raise ValueError("labels_true and labels_pred are empty")
    return t, p


def _matched_table(labels_true: Any, labels_pred: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Dense contingency table (classes x clusters) and the Hungarian matching maximising the
    matched counts: returns ``(table, matched_classes, matched_clusters, n)``."""
    t, p = _labels_pair(labels_true, labels_pred)
    _, g = np.unique(t, return_inverse=True)
    _, c = np.unique(p, return_inverse=True)
    n_g, n_c = int(g.max()) + 1, int(c.max()) + 1
    table = np.bincount(g * n_c + c, minlength=n_g * n_c).reshape(n_g, n_c)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return table, rows, cols, t.size


def acc(labels_true: Any, labels_pred: Any) -> float:
    """Clustering accuracy: the share of samples whose cluster maps to their class under the best
    one-to-one matching of clusters to classes (Hungarian). 1.0 for any relabelling of the truth."""
    table, rows, cols, n = _matched_table(labels_true, labels_pred)
    return float(table[rows, cols].sum() / n)


def f1(labels_true: Any, labels_pred: Any) -> float:
    """Macro F1 over the true classes after the Hungarian matching used by :func:`acc`. A class
    left without a cluster (more classes than clusters) scores 0; samples of unmatched clusters
    count as misses of their class."""
    table, rows, cols, _ = _matched_table(labels_true, labels_pred)
    tp = table[rows, cols].astype(np.float64)
    precision = tp / np.maximum(table.sum(axis=0)[cols], 1)
    recall = tp / np.maximum(table.sum(axis=1)[rows], 1)
    denom = precision + recall
    per_class = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(per_class.sum() / table.shape[0])


def _edges(
    edge_index: Any, clusters: Any, edge_weight: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    ei = _numpy(edge_index)
    c = _numpy(clusters).ravel()
    if ei.ndim != 2 or ei.shape[0] != 2:
        raise ValueError(f"edge_index must have shape (2, E), got shape {ei.shape}")
    if not np.issubdtype(ei.dtype, np.integer):
        raise ValueError(f"edge_index must hold integer node indices, got dtype {ei.dtype}")
    if ei.shape[1] == 0:
        raise ValueError("edge_index has no edges")
    n = c.size
    lo, hi = int(ei.min()), int(ei.max())
    if lo < 0 or hi >= n:
        raise ValueError(
            f"edge_index has node indices out of range [0, {n}) of the labels (min {lo}, max {hi})"
        )
    _, c = np.unique(c, return_inverse=True)
    w = np.ones(ei.shape[1]) if edge_weight is None else _numpy(edge_weight).astype(np.float64).ravel()
    if w.shape[0] != ei.shape[1]:
        raise ValueError(f"edge_weight must have shape ({ei.shape[1]},), got shape {w.shape}")
    return ei[0].astype(np.int64), ei[1].astype(np.int64), c.astype(np.int64), w


def modularity(edge_index: Any, clusters: Any, edge_weight: Any = None) -> float:
    r"""Newman's modularity of the partition ``clusters`` (N,) of the graph ``edge_index`` (2, E),

    .. math::
        Q = \frac{1}{W} \sum_{(i, j) \in E} w_{ij}\, \delta(c_i, c_j)
            - \sum_c \frac{d^{out}_c\, d^{in}_c}{W^2},

    with :math:`W` the total edge weight and :math:`d_c` the summed degrees of cluster :math:`c`.
    For an undirected graph given with both directions of each edge (PyG's convention) this is the
    usual :math:`\frac{1}{2m}\sum_{ij}(A_{ij} - \frac{k_i k_j}{2m})\delta(c_i, c_j)`; for a directed
    graph it is the directed (Leicht-Newman) modularity.
    """
    src, dst, c, w = _edges(edge_index, clusters, edge_weight)
    total = w.sum()
    if not total > 0:
        raise ValueError("modularity: the total edge weight is 0")
    k = int(c.max()) + 1
    intra = w[c[src] == c[dst]].sum()
    d_out = np.bincount(c[src], weights=w, minlength=k)
    d_in = np.bincount(c[dst], weights=w, minlength=k)
    return float(intra / total - (d_out * d_in).sum() / total**2)


def conductance(edge_index: Any, clusters: Any, edge_weight: Any = None) -> float:
    r"""Graph conductance of the partition as in DMoN's and PyAGC's evaluation (Yang & Leskovec,
    2012): the share of edge weight that leaves its cluster,
    :math:`\sum_c \mathrm{cut}(c) / \sum_c \mathrm{vol}(c)`. 0 for clusters with no edges between
    them, lower is better."""
    src, dst, c, w = _edges(edge_index, clusters, edge_weight)
    total = w.sum()
    if not total > 0:
        raise ValueError("conductance: the total edge weight is 0")
    return float(w[c[src] != c[dst]].sum() / total)


_LABEL_FNS = {"NMI": nmi, "ARI": ari, "ACC": acc, "F1": f1}
_STRUCTURE_FNS = {"Mod": modularity, "Cond": conductance}


def _names(metrics: str | Iterable[str], known: tuple[str, ...]) -> list[str]:
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    bad = [m for m in names if m not in known]
    if bad:
        raise ValueError(f"Invalid metric(s) {bad}; expected any of {list(known)}")
    return names


def label_metrics(
    labels_true: Any, labels_pred: Any, metrics: str | Iterable[str] = LABEL_METRICS
) -> dict[str, float]:
    """Label metrics by name (``'NMI'``, ``'ARI'``, ``'ACC'``, ``'F1'``): ``{name: value}``."""
    names = _names(metrics, LABEL_METRICS)
    t, p = _labels_pair(labels_true, labels_pred)
    return {m: float(_LABEL_FNS[m](t, p)) for m in names}


def structure_metrics(
    edge_index: Any,
    labels_pred: Any,
    metrics: str | Iterable[str] = STRUCTURE_METRICS,
    edge_weight: Any = None,
) -> dict[str, float]:
    """Structure metrics by name (``'Mod'``, ``'Cond'``): ``{name: value}``."""
    names = _names(metrics, STRUCTURE_METRICS)
    return {m: float(_STRUCTURE_FNS[m](edge_index, labels_pred, edge_weight)) for m in names}
