"""Benchmark: incremental assignment (``jobs/assign.py``) against a full recluster of base + new rows.

    python benchmarks/bench_assign.py --cases 100000:100,1000000:10000
    python benchmarks/bench_assign.py --cases 100000:1000 --regime ann_hard

For each case BASE:NEW: a labelled make_faces table of BASE + NEW rows (seed 2) whose NEW rows, drawn at
random, are held out; a model trained once on another split (or --model). Then, each through its
command line on a private local Ray, as a user runs them:
(1) ``jobs/cluster.py`` on the base rows (the nightly run);
(2) ``jobs/assign.py --base`` that output with the new rows (the hourly run);
(3) ``jobs/cluster.py`` on base + new rows (the full recluster the assignment stands in for).
Reported: wall time and peak memory (PSS of each run's process tree) of each; assign / full time; per
level, how the new rows' clusters agree with the full run's: pairwise F of the new rows' two partitions
(pairs of new rows), pairwise F over all pairs that involve a new row (new-new and new-base), and the
share of new rows whose cluster maps to their full-run cluster (by plurality); the same pairwise F against the true labels, for the assignment and the full run; and,
for scale, the full run's own agreement with the base run on the base rows (how much a full run moves
rows that did not change). JSON: benchmarks/results/assign.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_estimate import run_cli  # noqa: E402

REGIMES = {"default": {}, "ann_hard": {"isotropic": 1.0, "spread": (1.0, 2.0)}}


def contingency_f(pred: np.ndarray, true: np.ndarray, rows: np.ndarray) -> float:
    """Pairwise F over the pairs (i, j), i in ``rows``, j any other row: same cluster in ``pred`` vs ``true``."""
    _, p = np.unique(pred, return_inverse=True)
    _, t = np.unique(true, return_inverse=True)
    joint = p.astype(np.int64) * (t.max() + 1) + t
    uj, ij = np.unique(joint, return_inverse=True)
    n_joint = np.bincount(ij)[ij]
    n_p, n_t = np.bincount(p)[p], np.bincount(t)[t]
    tp = (n_joint[rows] - 1).sum()
    precision = tp / max((n_p[rows] - 1).sum(), 1)
    recall = tp / max((n_t[rows] - 1).sum(), 1)
    return float(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))


def plurality_agreement(pred: np.ndarray, ref: np.ndarray, rows: np.ndarray, base: np.ndarray) -> float:
    """Share of ``rows`` whose ``pred`` cluster maps to their ``ref`` cluster; a cluster maps to the ``ref``
    cluster holding most of its base rows (most of its rows if it has none)."""
    _, p = np.unique(pred, return_inverse=True)
    _, r = np.unique(ref, return_inverse=True)
    weight = np.where(base, 1_000_000, 1)
    key = p.astype(np.int64) * (r.max() + 1) + r
    uk, ik = np.unique(key, return_inverse=True)
    score = np.bincount(ik, weights=weight)
    cl, target = uk // (r.max() + 1), uk % (r.max() + 1)
    order = np.lexsort((-score, cl))
    first = np.r_[True, cl[order][1:] != cl[order][:-1]]
    best = np.empty(p.max() + 1, np.int64)
    best[cl[order][first]] = target[order][first]
    return float((best[p[rows]] == r[rows]).mean())


def read_levels(output: Path, ids: np.ndarray) -> list[np.ndarray]:
    """Every level's cluster_id of the rows ``ids``, in that order."""
    import pyarrow.dataset as pds

    table = pds.dataset(str(output / "assignments"), format="parquet", partitioning="hive").to_table()
    out = []
    for level in sorted(set(table.column("level").to_pylist())):
        part = table.filter(pds.field("level") == level)
        have = part.column("id").to_numpy()
        order = np.argsort(have)
        out.append(part.column("cluster_id").to_numpy()[order[np.searchsorted(have[order], ids)]])
    return out


def prepare(work: Path, n: int, m: int, dim: int, regime: str) -> dict:
    from agc_ray.core.synthetic import make_faces
    from agc_ray.distributed.demo import write_table

    d = work / f"{regime}_{n}_{m}_{dim}"
    meta = d / "split.npz"
    if not meta.exists():
        x, y = make_faces(n + m, dim=dim, seed=2, **REGIMES[regime])
        new = np.zeros(n + m, bool)
        new[np.random.default_rng(0).choice(n + m, m, replace=False)] = True
        ids = np.arange(n + m, dtype=np.int64)
        write_table(d / "base", x[~new], y[~new], ids=ids[~new], files=16)
        write_table(d / "new", x[new], ids=ids[new], files=1)
        order = np.concatenate([np.flatnonzero(~new), np.flatnonzero(new)])
        write_table(d / "all", x[order], y[order], ids=ids[order], files=16)
        del x
        np.savez(meta, y=y, new=new)
    split = np.load(meta)
    return {"dir": d, "y": split["y"], "new": split["new"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="100000:100,1000000:10000", help="BASE:NEW row counts, comma separated")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--regime", choices=sorted(REGIMES), default="default")
    p.add_argument("--model", help="a saved model directory (default: trained once on --train-rows rows)")
    p.add_argument("--train-rows", type=int, default=30_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--work", default=str(ROOT / "agc_output" / "bench_assign"))
    p.add_argument("--reuse", action="store_true",
                   help="rerun only the assignment: the base and full runs' outputs and figures from the last JSON")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else work / f"model_{args.regime}_{args.dim}"
    if not (model / "config.json").exists():
        from agc_ray import HiLander
        from agc_ray.core.synthetic import make_faces

        x, y = make_faces(args.train_rows, dim=args.dim, seed=1, **REGIMES[args.regime])
        HiLander(epochs=args.epochs).fit(x, y).save(model)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    results = []
    out_json = ROOT / "benchmarks" / "results" / "assign.json"
    earlier = {(e["base_rows"], e["new_rows"], e["regime"]): e for e in json.loads(out_json.read_text())} \
        if args.reuse and out_json.exists() else {}
    for case in args.cases.split(","):
        n, m = (int(v) for v in case.split(":"))
        data = prepare(work, n, m, args.dim, args.regime)
        d, y, new = data["dir"], data["y"], data["new"]
        common = ["--model", str(model), "--overwrite", "--num-cpus", str(args.num_cpus)]
        runs = {}
        for name, script, argv in (
            ("base", "cluster.py", ["--input", str(d / "base"), "--output", str(d / "out_base"), *common]),
            ("assign", "assign.py", ["--base", str(d / "out_base"), "--input", str(d / "new"),
                                     "--output", str(d / "out_assign"), "--overwrite", "--num-cpus", str(args.num_cpus)]),
            ("full", "cluster.py", ["--input", str(d / "all"), "--output", str(d / "out_full"), *common]),
        ):
            if name != "assign" and (n, m, args.regime) in earlier:
                runs[name] = earlier[(n, m, args.regime)]["runs"][name] | {"reused": True}
                continue
            t0 = time.perf_counter()
            r = run_cli(argv, env, script=script)
            if r["rc"] != 0:
                raise SystemExit(f"{script} failed ({r['rc']}) on case {case}")
            warnings = [line for line in r["stderr"] if " WARNING " in line or " ERROR " in line]
            manifest = json.loads((d / f"out_{name}" / "manifest.json").read_text())
            runs[name] = {"wall_seconds": r["wall_seconds"], "peak_memory_gb": r["peak_memory_gb"],
                          "timings": manifest["timings"], "warning_lines": warnings,
                          "cluster_counts": manifest["cluster_counts"]}
            print(f"[{case}] {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        from agc_ray.metrics import evaluate

        all_ids = np.arange(n + m, dtype=np.int64)
        inc, full = read_levels(d / "out_assign", all_ids), read_levels(d / "out_full", all_ids)
        base_ids = all_ids[~new]
        base_levels = read_levels(d / "out_base", base_ids)
        rows_new, rows_base = np.flatnonzero(new), np.flatnonzero(~new)
        levels = []
        for lvl in range(min(len(inc), len(full))):
            levels.append({
                "level": lvl,
                "new_only_pairwise_f": evaluate(full[lvl][rows_new], inc[lvl][rows_new])["fp"],
                "new_vs_full_pairwise_f": contingency_f(inc[lvl], full[lvl], rows_new),
                "new_rows_agreeing": plurality_agreement(inc[lvl], full[lvl], rows_new, ~new),
                "new_vs_truth_pairwise_f_assign": contingency_f(inc[lvl], y, rows_new),
                "new_vs_truth_pairwise_f_full": contingency_f(full[lvl], y, rows_new),
                "base_rows_full_vs_base_pairwise_f": contingency_f(full[lvl][~new], base_levels[lvl],
                                                                   np.arange(rows_base.size)),
            })
        assign_manifest = json.loads((d / "out_assign" / "manifest.json").read_text())
        entry = {"base_rows": n, "new_rows": m, "dim": args.dim, "regime": args.regime, "num_cpus": args.num_cpus,
                 "runs": runs, "assign_over_full_time": runs["assign"]["wall_seconds"] / runs["full"]["wall_seconds"],
                 "selected_level": assign_manifest.get("selected_level"), "incremental": assign_manifest["incremental"],
                 "levels": levels}
        results.append(entry)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=2, default=float))

    print(f"\n{'case':>15} {'base s':>7} {'assign s':>8} {'full s':>7} {'ratio':>6} {'assign GB':>9} {'full GB':>8}")
    for e in results:
        r = e["runs"]
        print(f"{e['base_rows']:>9}+{e['new_rows']:<5} {r['base']['wall_seconds']:>7.1f} {r['assign']['wall_seconds']:>8.1f} "
              f"{r['full']['wall_seconds']:>7.1f} {e['assign_over_full_time']:>6.3f} {r['assign']['peak_memory_gb']:>9.2f} "
              f"{r['full']['peak_memory_gb']:>8.2f}")
        print(f"{'':>15} level  F(new only)  F(new vs full)  agreeing  F(new vs truth): assign / full   "
              "full-vs-base F (base rows)")
        for lv in e["levels"]:
            print(f"{'':>15} {lv['level']:>5}  {lv['new_only_pairwise_f']:>11.4f}  {lv['new_vs_full_pairwise_f']:>14.4f}  "
                  f"{lv['new_rows_agreeing']:>8.4f}  "
                  f"{lv['new_vs_truth_pairwise_f_assign']:>14.4f} / {lv['new_vs_truth_pairwise_f_full']:.4f}   "
                  f"{lv['base_rows_full_vs_base_pairwise_f']:.4f}")
        print(f"{'':>15} selected level {e['selected_level']}; warning lines: "
              f"{sum(len(r[k]['warning_lines']) for k in r)}")
    print(f"results: {out_json}")


if __name__ == "__main__":
    main()
