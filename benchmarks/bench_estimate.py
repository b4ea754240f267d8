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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_job import _tree_pss  # noqa: E402

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) (.*)$")


def run_cli(args: list[str], env: dict | None = None) -> dict:
    """Run ``jobs/cluster.py ARGS``; sample its process tree's PSS each 0.5 s; stamp each stderr line."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "cluster.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    peak, lines, done = [0], [], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_pss(proc.pid))
            done.wait(0.5)

    def read_err():
        for line in proc.stderr:
            lines.append((time.perf_counter(), line.rstrip("\n")))
            sys.stderr.write(line)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for t in threads:
        t.start()
    out = proc.stdout.read()
    proc.wait()
    wall = time.perf_counter() - t0
    done.set()
    for t in threads:
        t.join()
    return {"rc": proc.returncode, "wall_seconds": wall, "peak_memory_gb": peak[0] / 2**30, "stdout": out,
            "stderr": [text for _, text in lines], "stamped": [(s - t0, text) for s, text in lines]}


def longest_silence(stamped: list) -> tuple[float, str]:
    """The longest gap between two of the job's stage/progress lines (from "input:" to "committed")."""
    ours = [(s, text) for s, text in stamped if " INFO " in text or text.startswith(("level", "input"))]
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
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
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

    print(f"\n{'rows':>9} {'dry s':>6} {'est GB':>7} {'peak GB':>8} {'ratio':>6} {'est s':>7} {'run s':>7} "
          f"{'ratio':>6} {'silence s':>9}")
    for e in results:
        plan = e.get("dry_run", {}).get("plan", {})
        print(f"{e['n']:>9} {e.get('dry_run', {}).get('wall_seconds', float('nan')):>6.1f} "
              f"{plan.get('peak_memory_gb_per_node', float('nan')):>7.2f} {e['run']['peak_memory_gb']:>8.2f} "
              f"{e.get('memory_estimate_over_measured', float('nan')):>6.2f} {plan.get('run_seconds', float('nan')):>7.0f} "
              f"{e['run']['wall_seconds']:>7.0f} {e.get('time_estimate_over_measured', float('nan')):>6.2f} "
              f"{e['run']['longest_silence_seconds']:>9.1f}")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
