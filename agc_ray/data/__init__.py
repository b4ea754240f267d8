"""Node clustering datasets (PyAGC's ``pyagc.data``) and the input checks shared by models."""

from agc_ray.data.csbm import make_csbm
from agc_ray.data.datasets import DatasetUnavailableError, cache_dir, faces_graph, get_dataset

__all__ = ["DatasetUnavailableError", "cache_dir", "faces_graph", "get_dataset", "make_csbm"]
