"""A contextual stochastic block model (CSBM): a graph whose features and edges both carry the classes.

Each node gets a class (balanced sizes, shuffled order). Features are a Gaussian mixture, one mean a
class: ``x_i = mu_{y_i} + noise``, with class means of norm ``feature_signal`` in random directions
and unit-variance noise, so k-means on the features alone is informative but clearly imperfect.
Edges are drawn with a fixed budget: every draw picks a source node uniformly and, with probability
``homophily``, a target of the same class, otherwise a target of another class (both uniform within
the chosen class); duplicates and self loops are dropped and the graph is made undirected. Averaging
features over neighbours (what a GCN does) therefore raises the signal-to-noise ratio.

Everything is drawn from one seeded generator with vectorised numpy: the same arguments give the
same graph.
"""

from __future__ import annotations

import numpy as np
import torch


def make_csbm(n_nodes: int = 3000, n_classes: int = 6, n_features: int = 64, *, avg_degree: float = 10.0,
              homophily: float = 0.65, feature_signal: float = 2.0,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate a CSBM graph.

    Args:
        n_nodes: number of nodes N (>= n_classes).
        n_classes: number of classes K (>= 2).
        n_features: feature dimension F (>= 1).
        avg_degree: expected average (undirected) degree before duplicates are removed (> 0).
        homophily: probability that an edge joins two nodes of the same class, in [0, 1].
        feature_signal: norm of each class mean; the noise has unit variance per dimension (>= 0).
        seed: random seed.

    Returns:
        ``(x, edge_index, y)``: x of shape (N, F) float32, edge_index of shape (2, E) int64
        (undirected: both directions, sorted, no self loops), y of shape (N,) int64.
    """
    if n_classes < 2:
        raise ValueError(f"make_csbm: n_classes must be >= 2, got {n_classes}")
    if n_nodes < n_classes:
        raise ValueError(f"make_csbm: n_nodes must be >= n_classes={n_classes}, got {n_nodes}")
    if n_features < 1:
        raise ValueError(f"make_csbm: n_features must be >= 1, got {n_features}")
    if not avg_degree > 0:
        raise ValueError(f"make_csbm: avg_degree must be > 0, got {avg_degree}")
    if not 0.0 <= homophily <= 1.0:
        raise ValueError(f"make_csbm: homophily must be in [0, 1], got {homophily}")
    if not feature_signal >= 0:
        raise ValueError(f"make_csbm: feature_signal must be >= 0, got {feature_signal}")
    rng = np.random.default_rng(seed)

    y = rng.permutation(np.arange(n_nodes) % n_classes).astype(np.int64)
    means = rng.standard_normal((n_classes, n_features))
    means *= feature_signal / np.linalg.norm(means, axis=1, keepdims=True)
    x = (means[y] + rng.standard_normal((n_nodes, n_features))).astype(np.float32)

    # Members of each class, contiguous in `order`: class c is order[start[c] : start[c] + size[c]].
    order = np.argsort(y, kind="stable")
    size = np.bincount(y, minlength=n_classes)
    start = np.concatenate([[0], np.cumsum(size)[:-1]])

    n_draws = int(round(n_nodes * avg_degree / 2))
    src = rng.integers(0, n_nodes, size=n_draws)
    same = rng.random(n_draws) < homophily
    shift = rng.integers(1, n_classes, size=n_draws)  # another class, uniformly
    dst_class = np.where(same, y[src], (y[src] + shift) % n_classes)
    dst = order[start[dst_class] + (rng.random(n_draws) * size[dst_class]).astype(np.int64)]

    keep = src != dst
    src, dst = src[keep], dst[keep]
    both = np.stack([np.concatenate([src, dst]), np.concatenate([dst, src])])
    codes = np.unique(both[0] * n_nodes + both[1])  # sorted, duplicates dropped
    edge_index = np.stack([codes // n_nodes, codes % n_nodes])
    return torch.from_numpy(x), torch.from_numpy(edge_index.astype(np.int64)), torch.from_numpy(y)
