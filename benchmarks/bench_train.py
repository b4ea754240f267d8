"""Distributed training benchmark: the training job with 1 and N Ray Train workers vs the core's fit.

    python benchmarks/bench_train.py                          # 100K x 256, 1 and 2 workers, 2 epochs
    python benchmarks/bench_train.py --rows 10000 --epochs 2  # a quick run
    python benchmarks/bench_train.py --use-gpu --workers 1    # GPU workers (NCCL), on a GPU machine

A synthetic face-like table (make_faces, seed 1) is written as Parquet; for each worker count the job
(:func:`agc_ray.distributed.train.run_training`, local Ray) trains on it with a held-out 10% of the
classes, and the single-process ``HiLander.fit`` trains on the same training rows for the same epochs
(with the torch threads of one worker) and clusters the same held-out rows. Reported: per-epoch time
and throughput (seed nodes per second, all level graphs of the epoch) of every epoch, wall time of the whole job (Ray start-up, Ray Data
read, ground-truth preparation, TorchTrainer start-up), and the held-out Fp / Fb / NMI of each model.
Prints a table and writes JSON to benchmarks/results/train_<rows>.json.

On a 2-core machine every worker count shares the same two cores, so N workers cannot be faster than
one there; the figures show the overhead of the distribution (all-reduce, smaller per-worker batches).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def write_table(path: Path, x: np.ndarray, y: np.ndarray) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    pq.write_table(pa.table({"id": np.arange(x.shape[0], dtype=np.int64), "embedding": emb, "label": y}), path,
                   row_group_size=16384)
    return str(path)


def epoch_figures(history: list[dict]) -> dict:
    steady = history[1:] or history  # the first epoch includes warm-up
    return {
        "epoch_seconds": [round(h["seconds"], 2) for h in history],
        "seed_nodes_per_s": [round(h["seed_nodes_per_s"]) for h in history],
        "mean_epoch_seconds": round(float(np.mean([h["seconds"] for h in steady])), 2),
        "mean_seed_nodes_per_s": round(float(np.mean([h["seed_nodes_per_s"] for h in steady]))),
    }


def run_job(table: str, out_dir: Path, workers: int, args) -> dict:
    from agc_ray.distributed.train import TrainJobConfig, run_training

    cfg = TrainJobConfig(
        input=table, output=str(out_dir / f"model_{workers}w"), num_workers=workers, use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker, epochs=args.epochs, batch_size=args.batch_size, k=args.k,
        val_fraction=args.val_fraction, seed=args.seed, overwrite=True,
    )
    t0 = time.perf_counter()
    s = run_training(cfg)
    last = s["history"][-1]
    return {
        "workers": workers, "use_gpu": args.use_gpu, "job_seconds": round(time.perf_counter() - t0, 1),
        "prepare_seconds": round(s["prepare_seconds"], 1), "fit_seconds": round(s["fit_seconds"], 1),
        **epoch_figures(s["history"]),
        "loss_conn": [round(h["loss_conn"], 4) for h in s["history"]],
        "val": {k: round(last[k], 4) for k in ("val_fp", "val_fb", "val_nmi")},
    }


def run_core(x: np.ndarray, y: np.ndarray, args) -> dict:
    """``HiLander.fit`` on the job's training rows, scored on the job's held-out rows."""
    from agc_ray import HiLander
    from agc_ray.core.knn import l2_normalize
    from agc_ray.distributed.train import split_by_class
    from agc_ray.metrics import evaluate

    import torch

    torch.set_num_threads(max(1, int(args.cpus_per_worker)))  # the same threads as one worker
    x = l2_normalize(x)  # what the job trains on (ids are 0..N-1, so id order is row order)
    val = split_by_class(y, args.val_fraction, args.seed)
    est = HiLander(epochs=args.epochs, batch_size=args.batch_size, k=args.k, seed=args.seed,
                   device="cuda" if args.use_gpu else "cpu")
    t0 = time.perf_counter()
    est.fit(x[~val], y[~val])
    fit_seconds = time.perf_counter() - t0
    scores = evaluate(y[val], est.predict(x[val]))
    history = [{**h, "seed_nodes_per_s": h.get("seed_nodes_per_s", 0)} for h in est.history_]
    return {
        "workers": "core", "fit_seconds": round(fit_seconds, 1),
        "epoch_seconds": [round(h["seconds"], 2) for h in history],
        "loss_conn": [round(h["loss_conn"], 4) for h in history],
        "val": {"val_fp": round(scores["fp"], 4), "val_fb": round(scores["fb"], 4), "val_nmi": round(scores["nmi"], 4)},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--num-cpus", type=float, default=None, help="logical CPUs of the local Ray instance")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="seed of the split, weights, batches (job and core)")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--skip-core", action="store_true", help="skip the single-process HiLander.fit")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    import ray

    from agc_ray.core.synthetic import make_faces

    workers = [int(w) for w in args.workers.split(",")]
    num_cpus = args.num_cpus or max(os.cpu_count() or 1, max(workers) * args.cpus_per_worker + 1)
    x, y = make_faces(args.rows, dim=args.dim, seed=1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        table = write_table(Path(tmp) / "table.parquet", x, y)
        ray.init(address="local", num_cpus=num_cpus, num_gpus=None, include_dashboard=False, logging_level="WARNING")
        try:
            for w in workers:
                rows.append(run_job(table, Path(tmp), w, args))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            ray.shutdown()
    if not args.skip_core:
        rows.append(run_core(x, y, args))
        print(json.dumps(rows[-1]), flush=True)
    result = {"rows": args.rows, "dim": args.dim, "epochs": args.epochs, "batch_size": args.batch_size, "k": args.k,
              "seed": args.seed,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "runs": rows}
    print(f"\n{args.rows} x {args.dim}, {args.epochs} epochs, global batch {args.batch_size}")
    print(f"{'run':>8} {'epoch s (each)':>22} {'seed nodes/s':>14} {'job s':>7} {'val Fp':>7} {'val Fb':>7} {'NMI':>6}")
    for r in rows:
        name = f"{r['workers']}w" if r["workers"] != "core" else "core"
        nps = r.get("mean_seed_nodes_per_s", "-")
        print(f"{name:>8} {str(r['epoch_seconds']):>22} {nps:>14} {r.get('job_seconds', r['fit_seconds']):>7} "
              f"{r['val']['val_fp']:>7} {r['val']['val_fb']:>7} {r['val']['val_nmi']:>6}")
    out = args.out or RESULTS / f"train_{args.rows}{'_gpu' if args.use_gpu else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
