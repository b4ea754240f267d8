"""Cluster heads (PyAGC's ``pyagc.clusters``): modules from node embeddings to a clustering loss and
to cluster assignments. Any :class:`BaseClusterHead` can be dropped into a model's ``cluster_head``."""

from agc_ray.clusters.base import BaseClusterHead
from agc_ray.clusters.dec import DECClusterHead
from agc_ray.clusters.dmon import DMoNClusterHead
from agc_ray.clusters.kmeans import KMeansClusterHead, kmeans

__all__ = ["BaseClusterHead", "DECClusterHead", "DMoNClusterHead", "KMeansClusterHead", "kmeans"]
