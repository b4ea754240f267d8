"""Clustering metrics.

Partition metrics (``clustering``) are computed in O(N) from contingency counts; graph clustering
metrics (``graph``) cover what attributed graph clustering papers report.
"""

from agc_ray.metrics.clustering import (
    ari,
    bcubed,
    contingency,
    evaluate,
    nmi,
    pairwise,
)
from agc_ray.metrics.graph import acc, conductance, f1, label_metrics, modularity, structure_metrics

__all__ = [
    "acc",
    "ari",
    "bcubed",
    "conductance",
    "contingency",
    "evaluate",
    "f1",
    "label_metrics",
    "modularity",
    "nmi",
    "pairwise",
    "structure_metrics",
]
