"""The embedded demo behind ``python jobs/cluster.py`` with no arguments, on a (local) Ray instance.

A labelled synthetic split trains a small model (in the driver: it is the demo's model, not the job),
a synthetic table of other identities is written as Parquet, and the distributed job clusters it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("agc_ray")


def write_table(path: str | Path, x: np.ndarray, labels: np.ndarray | None = None, *, files: int = 4,
                ids: np.ndarray | None = None, embedding_type: str = "fixed_size_list") -> Path:
    """Write an embedding table as ``files`` Parquet files (``id``, ``embedding``, optional ``label``).

    ``embedding_type``: 'fixed_size_list', 'list' or 'tensor' (fixed_shape_tensor).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n, d = x.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else ids
    bounds = np.linspace(0, n, max(1, min(files, n)) + 1).round().astype(int)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        block = np.ascontiguousarray(x[lo:hi], dtype=np.float32)
        if embedding_type == "tensor":
            emb = pa.FixedShapeTensorArray.from_numpy_ndarray(block)
        elif embedding_type == "list":
            emb = pa.ListArray.from_arrays(pa.array(np.arange(hi - lo + 1, dtype=np.int32) * d), pa.array(block.ravel()))
        else:
            emb = pa.FixedSizeListArray.from_arrays(pa.array(block.ravel()), d)
        cols = {"id": pa.array(ids[lo:hi]), "embedding": emb}
        if labels is not None:
            cols["label"] = pa.array(np.asarray(labels[lo:hi], dtype=np.int64))
        pq.write_table(pa.table(cols), path / f"part-{i:05d}.parquet")
    return path


def run_demo(root: str | Path = "agc_output", n_rows: int = 20_000, epochs: int = 4) -> dict:
    """Train a small model, write a synthetic table, cluster it with the job; print a summary."""
    from agc_ray.core.estimator import HiLander
    from agc_ray.core.synthetic import make_faces
    from agc_ray.distributed.job import JobConfig, run_job

    root = Path(root)
    t_start = time.perf_counter()
    x_train, y_train = make_faces(n_rows, seed=1)
    x_test, y_test = make_faces(n_rows, seed=2)
    log.info("demo: training on %d synthetic rows (%d epochs)", n_rows, epochs)
    t0 = time.perf_counter()
    model = HiLander(epochs=epochs).fit(x_train, y_train)
    fit_seconds = time.perf_counter() - t0
    model_dir = model.save(root / "demo_model")
    input_dir = write_table(root / "demo_input", x_test, y_test)
    output = root / "demo"
    cfg = JobConfig(input=str(input_dir), output=str(output), model=str(model_dir), overwrite=True)
    manifest = run_job(cfg)
    print(f"\nagc_ray demo: {n_rows} rows clustered by the Ray job in {manifest['timings']['total_seconds']:.1f}s "
          f"(model trained in {fit_seconds:.1f}s)")
    print(f"{'level':>5} {'nodes':>7} {'clusters':>9} {'Fp':>6} {'Fb':>6} {'NMI':>6}")
    for lv in manifest["levels"]:
        m = lv["metrics"]
        print(f"{lv['level']:>5} {lv['nodes']:>7} {lv['clusters']:>9} {m['fp']:>6.3f} {m['fb']:>6.3f} {m['nmi']:>6.3f}")
    print(f"output: {output.resolve()} ({time.perf_counter() - t_start:.0f}s in all)")
    return manifest
