"""Benchmark: ``jobs/cluster.py --dry-run``'s estimate against the real run, and the real run's progress.

    python benchmarks/bench_estimate.py --sizes 100000,1000000
    python benchmarks/bench_estimate.py --sizes 1000000 --dim 128 --model agc_output/bench_estimate/model

For each size: a synthetic labelled n x dim table (make_faces, seed 2, 16 files) and a model trained once
on another split (or --model). Then, each through the command line as a user runs it:
(1) ``--dry-run``: its wall time and the plan's estimates (peak memory per node, run time);
(2) the real run: wall time, peak memory (PSS summed over the whole process tree: driver, Ray's
    processes and workers, the object store), the manifest's stage timings, and the longest silence
    between two log lines from the first stage line to the commit (the operator's "is it hung?").
Reported per size: estimate / measured for memory and time. JSON: benchmarks/results/estimate.json;
with --calibrate, the per-row costs fitted from these runs (see agc_ray.distributed.plan) too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_job import PeakPss  # noqa: E402

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\s(INFO|WARNING|ERROR|DEBUG)\s")


def run_cli(args: list[str], env: dict | None = None, script: str = "cluster.py") -> dict:
    """Run ``jobs/SCRIPT ARGS``; sample its process tree's PSS each 0.5 s; stamp each stderr line."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines = []

    def read_err():
        for line in proc.stderr:
            lines.append((time.perf_counter(), line.rstrip("\n")))
            sys.stderr.write(line)

    t0 = time.perf_counter()
    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    with PeakPss(proc.pid, every=0.5) as peak:
        out = proc.stdout.read()
        proc.wait()
    wall = time.perf_counter() - t0
    reader.join()
    return {"rc": proc.returncode, "wall_seconds": wall, "peak_memory_gb": peak.bytes / 2**30, "stdout": out,
            "stderr": [text for _, text in lines], "stamped": [(s - t0, text) for s, text in lines]}


def longest_silence(stamped: list) -> tuple[float, str]:
    """The longest gap between two logged lines, the job's or Ray Data's progress (from "input:" to "committed")."""
    ours = [(s, text) for s, text in stamped if _STAMP.match(text)]
    start = next((i for i, (_, t) in enumerate(ours) if "input:" in t), 0)
    end = next((i for i, (_, t) in enumerate(ours) if "committed" in t), len(ours) - 1)
    window = ours[start:end + 1]
    gaps = [(b[0] - a[0], b[1]) for a, b in zip(window, window[1:])]
    return max(gaps, default=(0.0, ""))


def parse_estimate(stdout: str) -> dict:
    """The dry run's JSON plan (its last stdout line)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def fit_costs(results: list[dict], hidden: int = 128) -> dict:
    """Per-row costs of :data:`agc_ray.distributed.plan.COSTS` from these runs (one dimension).

    Memory: a line through the two smallest runs' peaks (intercept: base + workers; slope per row),
    so that the largest run is a prediction, not a fit. Time: each stage's CPU-seconds over its
    measured work (all levels) in the largest run.
    """
    from agc_ray.core.knn import IVF_NPROBE, ivf_nlist, resolve_method
    from agc_ray.distributed.plan import COSTS

    runs = sorted(results, key=lambda e: e["n"])
    a, b = runs[0], runs[1] if len(runs) > 1 else runs[0]
    slope = (b["run"]["peak_memory_gb"] - a["run"]["peak_memory_gb"]) * 2**30 / max(1, b["n"] - a["n"])
    intercept = a["run"]["peak_memory_gb"] - slope * a["n"] / 2**30
    big = runs[-1]
    dim, cpus, t = big["dim"], big["num_cpus"], big["run"]["timings"]
    levels = big["run"]["levels"]
    scanned = knn_work = score_work = rows_work = 0.0
    for i, lv in enumerate(levels):
        n = lv["nodes"]
        method = resolve_method(lv.get("knn_method") or "auto", n)
        scanned = n if method == "exact" else IVF_NPROBE * n / ivf_nlist(n) + ivf_nlist(n)
        knn_work += n * scanned * dim
        score_work += n * (dim + hidden)
        rows_work += n
    ratios = [levels[i + 1]["nodes"] / levels[i]["nodes"] for i in range(len(levels) - 1)]
    rest = sum(t.get(k, 0.0) for k in ("decode_seconds", "aggregate_seconds", "write_seconds", "stable_ids_seconds"))
    costs = dict(COSTS)
    costs.update(
        base_gb=intercept - COSTS["worker_gb"] * a["num_cpus"],
        bytes_per_row_float=(slope - COSTS["bytes_per_row"]) / dim,
        read_s=t["read_seconds"] * cpus / (big["n"] * dim),
        knn_s=t["knn_seconds"] * cpus / knn_work,
        score_s=t["score_seconds"] * cpus / score_work,
        rest_s=rest * cpus / rows_work,
    )
    # Then one scale and one fixed part (Ray start-up, per-level task overheads, report, commit) by least
    # squares over every run's wall time, so that small runs are not all overhead-free.
    from agc_ray.distributed.plan import estimate

    work = np.array([estimate(e["n"], e["dim"], 1, e["num_cpus"], "auto", dict(costs, fixed_s=0.0))[1] for e in runs])
    wall = np.array([e["run"]["wall_seconds"] for e in runs])
    scale, fixed = np.polyfit(work, wall, 1) if len(runs) > 1 else (1.0, wall[0] - work[0])
    for key in ("read_s", "knn_s", "score_s", "rest_s"):
        costs[key] *= scale
    costs["fixed_s"] = fixed
    costs["measured_level_ratio"] = ratios[0] if ratios else None
    return costs


def train_runs(work: Path, sizes: list[int], args, env: dict) -> None:
    """The training job's dry run vs its real run (one worker on every CPU); prints the fitted TRAIN_COSTS."""
    entries = []
    for n in sizes:
        table = prepare(work, n, args.dim)
        common = ["--input", str(table), "--output", str(work / f"trained_{n}"), "--overwrite", "--epochs",
                  str(args.train_epochs), "--num-cpus", str(args.num_cpus), "--cpus-per-worker", str(args.num_cpus),
                  "--storage-path", str(work / f"checkpoints_{n}_{time.time_ns()}")]
        dry = run_cli(common + ["--dry-run"], env, "train.py")
        real = run_cli(common, env, "train.py")
        if real["rc"] != 0:
            raise SystemExit(f"the training run at n={n} failed with exit code {real['rc']}")
        plan = parse_estimate(dry["stdout"])
        entries.append({"n": n, "dry_run_seconds": dry["wall_seconds"], "plan": plan, "wall_seconds": real["wall_seconds"],
                        "peak_memory_gb": real["peak_memory_gb"], "train_rows": plan.get("train_rows", n)})
        print(f"train {n}: dry run {dry['wall_seconds']:.1f}s, estimate {plan.get('peak_memory_gb_per_node', 0):.2f} GiB "
              f"/ {plan.get('run_seconds', 0):.0f}s, measured {real['peak_memory_gb']:.2f} GiB / {real['wall_seconds']:.0f}s")
    out = ROOT / "benchmarks" / "results" / f"estimate_train_{args.dim}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(entries, indent=2, default=float))
    if len(entries) > 1:
        from agc_ray.core.params import DEFAULTS
        from agc_ray.distributed.plan import TRAIN_COSTS, counted_training_rows

        a, b = entries[0], entries[-1]
        # rows as the estimate counts them (the runs train with the default identity-subsampled copy)
        (rows_a, train_a), (rows_b, train_b) = (
            counted_training_rows(e["n"], e["train_rows"], DEFAULTS.subsample_identities) for e in (a, b))
        slope = (b["peak_memory_gb"] - a["peak_memory_gb"]) * 2**30 / (rows_b - rows_a)
        work_a, work_b = (t * args.train_epochs * args.dim / 256 / args.num_cpus for t in (train_a, train_b))
        per_row = (b["wall_seconds"] - a["wall_seconds"]) / (work_b - work_a)
        costs = dict(TRAIN_COSTS, base_gb=a["peak_memory_gb"] - slope * rows_a / 2**30 - TRAIN_COSTS["worker_gb"],
                     bytes_per_row_float=(slope - TRAIN_COSTS["bytes_per_row"]) / args.dim, epoch_s_per_row=per_row,
                     fixed_s=a["wall_seconds"] - per_row * work_a)
        print("TRAIN_COSTS fitted on these runs:", json.dumps({k: float(f"{v:.3g}") for k, v in costs.items()}))


def prepare(work: Path, n: int, dim: int) -> Path:
    import numpy as np

    from agc_ray.core.synthetic import make_faces
    from agc_ray.distributed.demo import write_table

    table = work / f"table_{n}_{dim}"
    if not (table / "part-00015.parquet").exists():
        x, y = make_faces(n, dim=dim, seed=2)
        write_table(table, x, y, files=16)
        del x
        np.save(work / f"labels_{n}_{dim}.npy", y)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--model", help="a saved model directory (default: trained once on --train-rows rows)")
    p.add_argument("--train-rows", type=int, default=30_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--no-dry-run", action="store_true", help="only the real runs")
    p.add_argument("--train-sizes", default="", help="also the training job (jobs/train.py) on these row counts")
    p.add_argument("--train-epochs", type=int, default=2)
    p.add_argument("--work", default=str(ROOT / "agc_output" / "bench_estimate"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else work / f"model_{args.dim}"
    if not (model / "config.json").exists():
        from agc_ray import HiLander
        from agc_ray.core.synthetic import make_faces

        x, y = make_faces(args.train_rows, dim=args.dim, seed=1)
        HiLander(epochs=args.epochs).fit(x, y).save(model)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    if args.train_sizes:
        train_runs(work, [int(v) for v in args.train_sizes.split(",")], args, env)
    results, out = [], None
    for n in [int(s) for s in args.sizes.split(",") if s]:
        table = prepare(work, n, args.dim)
        common = ["--input", str(table), "--output", str(work / f"out_{n}_{args.dim}"), "--model", str(model),
                  "--overwrite", "--num-cpus", str(args.num_cpus)]
        entry = {"n": n, "dim": args.dim, "num_cpus": args.num_cpus}
        if not args.no_dry_run:
            dry = run_cli(common + ["--dry-run"], env)
            entry["dry_run"] = {"rc": dry["rc"], "wall_seconds": dry["wall_seconds"], "plan": parse_estimate(dry["stdout"])}
        real = run_cli(common, env)
        if real["rc"] != 0:
            raise SystemExit(f"the run at n={n} failed with exit code {real['rc']}")
        manifest = json.loads((work / f"out_{n}_{args.dim}" / "manifest.json").read_text())
        gap, after = longest_silence(real["stamped"])
        entry["run"] = {"wall_seconds": real["wall_seconds"], "peak_memory_gb": real["peak_memory_gb"],
                        "timings": manifest["timings"], "levels": [{k: lv.get(k) for k in ("nodes", "clusters",
                        "knn_seconds", "score_seconds", "decode_seconds", "knn_method")} for lv in manifest["levels"]],
                        "longest_silence_seconds": gap, "line_after_silence": after}
        plan = entry.get("dry_run", {}).get("plan", {})
        if plan:
            entry["memory_estimate_over_measured"] = plan["peak_memory_gb_per_node"] / real["peak_memory_gb"]
            entry["time_estimate_over_measured"] = plan["run_seconds"] / real["wall_seconds"]
        results.append(entry)
        out = ROOT / "benchmarks" / "results" / f"estimate_{args.dim}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=float))

    if results:
        print(f"\n{'rows':>9} {'dry s':>6} {'est GB':>7} {'peak GB':>8} {'ratio':>6} {'est s':>7} {'run s':>7} "
              f"{'ratio':>6} {'silence s':>9}")
        for e in results:
            plan = e.get("dry_run", {}).get("plan", {})
            print(f"{e['n']:>9} {e.get('dry_run', {}).get('wall_seconds', float('nan')):>6.1f} "
                  f"{plan.get('peak_memory_gb_per_node', float('nan')):>7.2f} {e['run']['peak_memory_gb']:>8.2f} "
                  f"{e.get('memory_estimate_over_measured', float('nan')):>6.2f} {plan.get('run_seconds', float('nan')):>7.0f} "
                  f"{e['run']['wall_seconds']:>7.0f} {e.get('time_estimate_over_measured', float('nan')):>6.2f} "
                  f"{e['run']['longest_silence_seconds']:>9.1f}")
    if len(results) > 1:
        costs = fit_costs(results)
        print("per-row costs fitted on these runs (memory from the two smallest; see fit_costs):")
        print(json.dumps({k: v if v is None else float(f"{v:.3g}") for k, v in costs.items()}, indent=1))
    if out is not None:
        print(f"results: {out}")


if __name__ == "__main__":
    main()
