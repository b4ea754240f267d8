"""agc_ray: hierarchical GNN clustering (Hi-LANDER) and attributed graph clustering on Ray.

Layout (imports point one way, downwards):

- ``agc_ray.core``: the algorithms as plain functions and torch modules over arrays (no Ray).
- ``agc_ray.metrics``: clustering metrics computed from contingency counts.
- ``agc_ray.clusters`` / ``encoders`` / ``models`` / ``data``: PyAGC-style attributed graph clustering.
- ``agc_ray.distributed``: the Ray layer that runs the core over shards.
"""

__version__ = "0.1.0"

__all__ = ["HiLander", "__version__"]


def __getattr__(name):
    # Lazy: `import agc_ray` stays cheap for CLIs; torch is imported on first use of HiLander.
    if name == "HiLander":
        from agc_ray.core.estimator import HiLander

        return HiLander
    raise AttributeError(f"module 'agc_ray' has no attribute {name!r}")
