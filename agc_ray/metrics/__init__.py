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

__all__ = ["ari", "bcubed", "contingency", "evaluate", "nmi", "pairwise"]
