"""Benchmark: the clustering job from 100K to 10M rows on one machine, growth per size.

    python benchmarks/bench_scale.py --sizes 100000,1000000,10000000 --dim 128
    python benchmarks/bench_scale.py --sizes 100000 --train-rows 20000 --epochs 1     # a quick check
    python benchmarks/bench_scale.py --sizes 1000000,10000000 --knn-recall 0.75    # the job's recall target

For each size: a labelled make_faces table (seed 2) written as Parquet files of 262,144 rows each,
generated chunk by chunk (:func:`agc_ray.core.synthetic.iter_faces`: the table is never in memory
as a whole); a model trained once on 100K rows of other identities (seed 1; or --model). Then
``jobs/cluster.py`` through its command line on a private local Ray (object spilling as Ray
configures it). Reported per size: wall time, peak memory (PSS of the whole process tree: driver,
Ray's processes and workers, the object store), the manifest's stage timings, per level nodes,
clusters, kNN probes and recall, Fp / Fb / NMI against the labels; and the growth of time and memory
from each size to the next. JSON: benchmarks/results/scale_DIM.json (rewritten after each size).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_estimate import longest_silence, run_cli  # noqa: E402

ROWS_PER_FILE = 262_144


def write_table(path: Path, n: int, dim: int) -> Path:
    """A labelled n x dim make_faces table (seed 2), one Parquet file per chunk; kept across runs."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from agc_ray.core.synthetic import iter_faces

    done = path / "_complete"
    if done.exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    for i, (start, x, y) in enumerate(iter_faces(n, dim, seed=2, chunk_rows=ROWS_PER_FILE)):
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)
        ids = np.arange(start, start + x.shape[0], dtype=np.int64)
        pq.write_table(pa.table({"id": ids, "embedding": emb, "label": y}), path / f"part-{i:05d}.parquet")
    done.write_text(str(n))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000,10000000")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--model", help="a saved model directory (default: trained once on --train-rows rows)")
    p.add_argument("--train-rows", type=int, default=100_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--knn-recall", type=float, help="the job's --knn-recall (default: the model's, 0.95)")
    p.add_argument("--work", default=str(ROOT / "agc_output" / "bench_scale"))
    p.add_argument("--json", help="results file (default: benchmarks/results/scale_DIM.json)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else work / f"model_{args.dim}_{args.train_rows}"
    if not (model / "config.json").exists():
        from agc_ray import HiLander
        from agc_ray.core.synthetic import make_faces

        x, y = make_faces(args.train_rows, dim=args.dim, seed=1)
        HiLander(epochs=args.epochs).fit(x, y).save(model)
        del x, y
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    out = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / f"scale_{args.dim}.json"
    results = []
    for n in [int(s) for s in args.sizes.split(",") if s]:
        table = write_table(work / f"table_{n}_{args.dim}", n, args.dim)
        output = work / f"out_{n}_{args.dim}"
        run = run_cli(["--input", str(table), "--output", str(output), "--model", str(model), "--overwrite",
                       "--num-cpus", str(args.num_cpus)]
                      + (["--knn-recall", str(args.knn_recall)] if args.knn_recall is not None else []), env)
        if run["rc"] != 0:
            raise SystemExit(f"the run at n={n} failed with exit code {run['rc']}")
        manifest = json.loads((output / "manifest.json").read_text())
        gap, _ = longest_silence(run["stamped"])
        entry = {"rows": n, "dim": args.dim, "num_cpus": args.num_cpus, "knn_recall_target": args.knn_recall,
                 "wall_seconds": round(run["wall_seconds"], 1),
                 "peak_memory_gb": round(run["peak_memory_gb"], 2), "timings": manifest["timings"],
                 "longest_silence_seconds": round(gap, 1),
                 "levels": [{key: lv.get(key) for key in ("nodes", "clusters", "knn_method", "knn_nprobe", "knn_probe_margin",
                                                          "knn_probes_mean", "knn_recall", "knn_seconds", "score_seconds")}
                            | {m: round(lv.get("metrics", {}).get(m, float("nan")), 4) for m in ("fp", "fb", "nmi")}
                            for lv in manifest["levels"]],
                 "selected_level": manifest.get("selected_level")}
        if results:
            entry["time_growth"] = round(entry["wall_seconds"] / results[-1]["wall_seconds"], 2)
            entry["memory_growth"] = round(entry["peak_memory_gb"] / results[-1]["peak_memory_gb"], 2)
        results.append(entry)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=float))
        print(f"{n} rows: {entry['wall_seconds']} s, peak {entry['peak_memory_gb']} GB, "
              f"levels {[(lv['clusters'], lv['knn_probes_mean'] or lv['knn_nprobe'], lv['knn_recall'], lv['fp']) for lv in entry['levels']]}",
              flush=True)

    print("\n| rows | wall s | growth | peak GB | growth | level-0 kNN s (cells a row, recall) | Fp per level |")
    print("|---|---|---|---|---|---|---|")
    for e in results:
        lv0 = e["levels"][0]
        fps = " / ".join(f"{lv['fp']:.3f}" for lv in e["levels"])
        print(f"| {e['rows']} | {e['wall_seconds']} | {e.get('time_growth', '')} | {e['peak_memory_gb']} | "
              f"{e.get('memory_growth', '')} | {lv0['knn_seconds']:.1f} ({lv0['knn_probes_mean'] or lv0['knn_nprobe']}, {lv0['knn_recall']}) | "
              f"{fps} |")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
