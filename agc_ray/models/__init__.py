"""Encoder + cluster-head models (PyAGC's ``pyagc.models``) and a full-batch training helper."""

from agc_ray.models.base import ClusteringModel, call_head, resolve_head_arguments
from agc_ray.models.dec import DEC, edge_reconstruction_loss
from agc_ray.models.dmon import DMoN
from agc_ray.models.train import fit

__all__ = [
    "ClusteringModel",
    "DEC",
    "DMoN",
    "call_head",
    "edge_reconstruction_loss",
    "fit",
    "resolve_head_arguments",
]
