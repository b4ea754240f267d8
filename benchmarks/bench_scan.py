"""Benchmark: ``CellLists.search`` (the IVF scan, cell by cell) of this tree against another tree's, in
one process, the two alternating, so that both see the same machine (its speed drifts between runs).

    git worktree add /tmp/base <rev> && python benchmarks/bench_scan.py --base /tmp/base --threads 1

A make_faces table (seed 0), random rows as centroids, each row filed in its best cell; a seeded
sample of queries probing their 1, 4 and 28 best cells (a job actor's single thread: ``--threads 1``;
the single process: 2). Reported per probe count: the best of ``--repeats`` times of each tree, the
speed-up, and the share of neighbour ids equal in both (ties and last-bit scores aside, 1.0).
JSON: benchmarks/results/scan.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_cells(tree: Path, name: str):
    """The ``agc_ray/core/cells.py`` module of a source tree, under its own module name."""
    spec = importlib.util.spec_from_file_location(name, tree / "agc_ray" / "core" / "cells.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the other source tree (a git worktree of the base revision)")
    p.add_argument("--rows", type=int, default=600_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--queries", type=int, default=100_000)
    p.add_argument("--probes", default="1,4,28")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "scan.json"))
    args = p.parse_args()

    from agc_ray.core.synthetic import make_faces

    torch.set_num_threads(args.threads)
    trees = {"base": load_cells(Path(args.base), "cells_base"), "new": load_cells(ROOT, "cells_new")}
    x, _ = make_faces(n_samples=args.rows, dim=args.dim, seed=0)
    rng = np.random.default_rng(0)
    centroids = x[rng.choice(args.rows, args.nlist, replace=False)]
    probes = trees["new"].cell_probes(x, centroids, max(int(v) for v in args.probes.split(",")))
    queries = rng.choice(args.rows, args.queries, replace=False)
    results = []
    for nprobe in (int(v) for v in args.probes.split(",")):
        pairs = trees["new"].probe_pairs(probes[queries], nprobe)
        best, found = {}, {}
        for _ in range(args.repeats):
            for name, cells in trees.items():
                lists = cells.CellLists(x, probes[:, 0], args.nlist)
                t0 = time.perf_counter()
                found[name] = lists.search(x[queries], pairs, 11)
                best[name] = min(best.get(name, np.inf), time.perf_counter() - t0)
        same = float(np.mean(found["base"][1] == found["new"][1]))
        row = {"rows": args.rows, "dim": args.dim, "nlist": args.nlist, "queries": args.queries, "probes": nprobe,
               "threads": args.threads, "base_seconds": best["base"], "new_seconds": best["new"],
               "speedup": best["base"] / best["new"], "ids_equal": same}
        results.append(row)
        print(f"{nprobe:3d} cells a query: base {best['base']:.2f} s, new {best['new']:.2f} s "
              f"({row['speedup']:.2f}x), ids equal {same:.6f}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
