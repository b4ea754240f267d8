"""Benchmark: the kNN graph's search against exact search, with a fixed number of IVF probes (the old
default, 16) and with the recall target (the default, 0.95), side by side on the same table.

    python benchmarks/bench_knn.py --rows 100000,1000000 --regimes default,ann_hard,ann_hard_small

Per regime and size: a make_faces table (seed 0); exact search timed on 2000 sampled rows and
extrapolated to every row (its recall is 1 by definition); ``knn_graph(method='ivf')`` with
``recall=None`` (16 probes) and with ``recall=0.95`` (probes tuned on 1000 seeded rows), each timed end to
end (quantizer training, index build, tuning, search of every row); the recall of each graph measured
on 2000 other rows (another seed than the tuning sample's). JSON: benchmarks/results/knn.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: make_faces arguments: the default generator, isotropic spread (neighbours straddle IVF cells), and
#: isotropic with small identities (the hardest measured: 16 probes reach recall ~0.87 at 10K rows).
REGIMES = {"default": {}, "ann_hard": {"isotropic": 1.0}, "ann_hard_small": {"isotropic": 1.0, "mean_identity_size": 5}}
K = 10


def run(n: int, dim: int, regime: str) -> dict:
    import faiss

    from agc_ray.core.knn import knn_graph, knn_recall, sample_rows
    from agc_ray.core.synthetic import make_faces

    x, _ = make_faces(n, dim=dim, seed=0, **REGIMES[regime])
    out = {"rows": n, "dim": dim, "regime": regime, "k": K}
    rows = sample_rows(n, 2000, 123)
    t0 = time.perf_counter()
    faiss.knn(np.ascontiguousarray(x[rows]), x, K + 1, metric=faiss.METRIC_INNER_PRODUCT)
    out["exact_seconds_estimate"] = round((time.perf_counter() - t0) * n / rows.size, 1)
    for name, recall in (("ivf_16_probes", None), ("ivf_recall_0.95", 0.95)):
        info = {}
        t0 = time.perf_counter()
        nbr, _ = knn_graph(x, K, method="ivf", recall=recall, info=info)
        seconds = time.perf_counter() - t0
        out[name] = {"seconds": round(seconds, 1), "nprobe": info.get("knn_nprobe"),
                     "recall_tuning_sample": info.get("knn_recall"),
                     "recall": round(knn_recall(x, nbr, sample=2000, seed=123, normalize=False), 4)}
        print(f"  {regime} {n} {name}: {out[name]}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="100000,1000000", help="table sizes, comma separated")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--regimes", default=",".join(REGIMES), help=f"comma list of {', '.join(REGIMES)}")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "knn.json"))
    args = p.parse_args()
    results = []
    for regime in args.regimes.split(","):
        for n in (int(v) for v in args.rows.split(",")):
            results.append(run(n, args.dim, regime))
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\n| regime | rows | exact (est.) | 16 probes: s / recall | target 0.95: s / nprobe / recall | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in results:
        a, b = r["ivf_16_probes"], r["ivf_recall_0.95"]
        print(f"| {r['regime']} | {r['rows']} | {r['exact_seconds_estimate']} s | {a['seconds']} s / {a['recall']} | "
              f"{b['seconds']} s / {b['nprobe']} / {b['recall']} | {a['seconds'] / b['seconds']:.2f}x |")


if __name__ == "__main__":
    main()
