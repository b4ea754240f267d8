"""The embedded demo behind ``python jobs/cluster.py`` with no arguments (single process, no Ray).

Generates a labelled synthetic train split and a test split of other identities, trains a small
model, clusters the test split, writes every level as Parquet and prints a summary against the kNN
threshold baseline.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("agc_ray")


def write_levels(output: Path, ids: np.ndarray, levels: list[np.ndarray], manifest: dict) -> None:
    """Write ``assignments/level=L/part-0.parquet`` (id, cluster_id) and ``manifest.json`` atomically.

    Everything goes to a staging directory beside ``output`` that replaces it in one rename at the
    end, so a crash never leaves a half-written output.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    for level, labels in enumerate(levels):
        part = staging / "assignments" / f"level={level}"
        part.mkdir(parents=True)
        pq.write_table(pa.table({"id": ids, "cluster_id": labels.astype(np.int64)}), part / "part-0.parquet")
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    if output.exists():
        os.replace(output, old)
    os.replace(staging, output)
    shutil.rmtree(old, ignore_errors=True)


def run_demo(output: str | Path = "agc_output/demo", n_train: int = 20_000, n_test: int = 20_000, epochs: int = 4) -> dict:
    from agc_ray import HiLander, __version__
    from agc_ray.core.baselines import best_threshold
    from agc_ray.core.knn import knn_graph
    from agc_ray.core.synthetic import make_faces
    from agc_ray.metrics import evaluate

    t_start = time.perf_counter()
    x_train, y_train = make_faces(n_train, seed=1)
    x_test, y_test = make_faces(n_test, seed=2)
    log.info("demo: training on %d synthetic rows, clustering %d rows of other identities", n_train, n_test)
    t0 = time.perf_counter()
    model = HiLander(epochs=epochs).fit(x_train, y_train)
    fit_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    levels = model.predict_hierarchy(x_test)
    cluster_seconds = time.perf_counter() - t0
    per_level = [st | {k: v for k, v in evaluate(y_test, lv).items()} for st, lv in zip(model.stats_, levels)]
    nbr, sim = knn_graph(x_test, model.k)
    threshold, base = best_threshold(nbr, sim, y_test)
    baseline = evaluate(y_test, base) | {"threshold": threshold}
    manifest = {
        "status": "succeeded",
        "input": f"synthetic make_faces(n={n_test}, seed=2)",
        "rows": n_test,
        "params": model.get_params(),
        "agc_ray_version": __version__,
        "timings": {"fit_seconds": fit_seconds, "cluster_seconds": cluster_seconds},
        "levels": per_level,
        "baseline_best_threshold": baseline,
    }
    write_levels(Path(output), np.arange(n_test, dtype=np.int64), levels, manifest)
    print(f"\nagc_ray demo: {n_test} rows clustered in {cluster_seconds:.1f}s (model trained in {fit_seconds:.1f}s)")
    print(f"{'level':>5} {'clusters':>9} {'Fp':>6} {'Fb':>6} {'NMI':>6}")
    for lv in per_level:
        print(f"{lv['level']:>5} {lv['n_clusters']:>9} {lv['fp']:>6.3f} {lv['fb']:>6.3f} {lv['nmi']:>6.3f}")
    print(f"kNN threshold baseline (best threshold {threshold}, chosen with the labels): "
          f"Fp {baseline['fp']:.3f} Fb {baseline['fb']:.3f} NMI {baseline['nmi']:.3f}")
    print(f"output: {Path(output).resolve()} ({time.perf_counter() - t_start:.0f}s in all)")
    return manifest
