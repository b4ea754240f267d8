"""Benchmark: the kNN graph's IVF search on CPU (cells searched as matrix products, each row probing
the cells within a tuned margin of its best centroid) against the same search with a fixed number of
probes a row and faiss' IndexIVFFlat over the same centroids, all against exact search, on one table.

    python benchmarks/bench_knn.py --rows 100000,1000000 --regimes default,ann_hard,ann_hard_small --dim 128

Per regime and size: a make_faces table (seed 0); exact search timed on 2000 sampled rows and
extrapolated to every row (its recall is 1 by definition); the IVF quantizer trained once (timed) and
shared by: ``cell_graph`` with the recall target 0.95 (the probe margin tuned on 1000 seeded rows);
``cell_graph`` with 4, 8, 16, ... probes a row (the search before the margin), up to the first whose
recall reaches the margin search's (the same recall: the cost of each); with ``--faiss``, faiss'
``IndexIVFFlat`` (add + search) with those probes, and (``--faiss16``) with 16. Recall of each graph
on 2000 other rows (another seed than the tuning sample's). End to end = quantizer + search.
JSON: benchmarks/results/knn.json.
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


def run(n: int, dim: int, regime: str, faiss_same: bool, faiss16: bool, per_cell: list[int],
        nlist_factors: list[float] = (), fixed: bool = True) -> dict:
    import faiss

    from agc_ray.core import knn
    from agc_ray.core.knn import cell_graph, ivf_centroids, ivf_index, ivf_train_rows, knn_recall, search, unit_rows
    from agc_ray.core.recall import sample_rows
    from agc_ray.core.synthetic import make_faces

    x = unit_rows(make_faces(n, dim=dim, seed=0, **REGIMES[regime])[0])
    out = {"rows": n, "dim": dim, "regime": regime, "k": K}
    rows = sample_rows(n, 2000, 123)
    t0 = time.perf_counter()
    faiss.knn(np.ascontiguousarray(x[rows]), x, K + 1, metric=faiss.METRIC_INNER_PRODUCT)
    out["exact_seconds_estimate"] = round((time.perf_counter() - t0) * n / rows.size, 1)

    def quantizer():
        t0 = time.perf_counter()
        train = ivf_train_rows(n, 0)
        centroids = ivf_centroids(x if train is None else x[train], n, 0)
        return centroids, round(time.perf_counter() - t0, 1)

    def measure(name, graph):
        t0 = time.perf_counter()
        info = {}
        nbr = graph(info)
        out[name] = {"seconds": round(time.perf_counter() - t0, 1), "nprobe": info.get("knn_nprobe"),
                     "probe_margin": info.get("knn_probe_margin"), "probes_mean": info.get("knn_probes_mean"),
                     "method": info.get("knn_method"), "recall_tuning_sample": info.get("knn_recall"),
                     "recall": round(knn_recall(x, nbr, sample=2000, seed=123, normalize=False), 4)}
        print(f"  {regime} {n} {name}: {out[name]}", flush=True)

    def faiss_ivf(nprobe):
        def graph(info):
            index = ivf_index(centroids, nprobe)
            index.add(x)
            info.update(knn_nprobe=nprobe, knn_method="ivf")
            return search(index, x, K)[0]
        return graph

    default = knn.IVF_TRAIN_PER_CELL
    for rows_a_cell in per_cell[1:]:  # other training sample sizes: quantizer + tuned search only
        knn.IVF_TRAIN_PER_CELL = rows_a_cell
        centroids, seconds = quantizer()
        name = f"cells_recall_0.95_train_{rows_a_cell}_a_cell"
        measure(name, lambda info: cell_graph(x, centroids, K, recall=0.95, info=info)[0])
        out[name]["quantizer_seconds"] = seconds
    library_nlist = knn.ivf_nlist
    for factor in nlist_factors:  # other cell counts: quantizer + tuned search only (the choice of ivf_nlist)
        knn.ivf_nlist = lambda rows, f=factor: max(16, int(library_nlist(rows) * f))
        try:
            centroids, seconds = quantizer()
        finally:
            knn.ivf_nlist = library_nlist
        name = f"cells_recall_0.95_nlist_{centroids.shape[0]}_factor_{factor}"
        measure(name, lambda info: cell_graph(x, centroids, K, recall=0.95, info=info)[0])
        out[name].update(quantizer_seconds=seconds, nlist=centroids.shape[0])
    knn.IVF_TRAIN_PER_CELL = per_cell[0]
    centroids, out["quantizer_seconds"] = quantizer()
    knn.IVF_TRAIN_PER_CELL = default
    out["train_per_cell"] = per_cell[0]
    measure("cells_recall_0.95", lambda info: cell_graph(x, centroids, K, recall=0.95, info=info)[0])
    target, nprobe = out["cells_recall_0.95"]["recall"], 4
    while fixed and nprobe <= centroids.shape[0] // 8:  # fixed probes a row, up to the margin search's recall
        name = f"cells_{nprobe}_probes"
        measure(name, lambda info: cell_graph(x, centroids, K, nprobe=nprobe, recall=None, info=info)[0])
        if out[name]["recall"] >= target:
            out["cells_fixed_probes"] = out[name]
            break
        nprobe *= 2
    if faiss_same and "cells_fixed_probes" in out:
        measure("faiss_same_probes", faiss_ivf(out["cells_fixed_probes"]["nprobe"]))
    if faiss16:
        measure("faiss_16_probes", faiss_ivf(16))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="100000,1000000", help="table sizes, comma separated")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--regimes", default=",".join(REGIMES), help=f"comma list of {', '.join(REGIMES)}")
    p.add_argument("--faiss", action="store_true", help="also faiss with the fixed probes that reach the margin's recall")
    p.add_argument("--faiss16", action="store_true", help="also faiss with 16 probes (slow at 1M: minutes)")
    p.add_argument("--train-per-cell", default=None,
                   help="IVF training rows per cell, comma list (default: the library's): the first is compared with faiss, the others "
                        "measured as quantizer + tuned search (the choice of IVF_TRAIN_PER_CELL)")
    p.add_argument("--nlist-factor", default="",
                   help="comma list of factors on the library's IVF cell count (ivf_nlist), each measured as "
                        "quantizer + tuned search before the library's own")
    p.add_argument("--no-fixed", action="store_true", help="skip the searches with fixed probes a row")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "knn.json"))
    args = p.parse_args()
    from agc_ray.core.knn import IVF_TRAIN_PER_CELL

    per_cell = [int(v) for v in args.train_per_cell.split(",")] if args.train_per_cell else [IVF_TRAIN_PER_CELL]
    results = []
    for regime in args.regimes.split(","):
        for n in (int(v) for v in args.rows.split(",")):
            factors = [float(v) for v in args.nlist_factor.split(",") if v]
            results.append(run(n, args.dim, regime, args.faiss, args.faiss16, per_cell, factors, not args.no_fixed))
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2))
    print("\n| regime | rows | exact (est.) | quantizer | margin, target 0.95: s / cells a row / recall | fixed probes, "
          "same recall: s / nprobe / recall | faiss, same probes: s / recall |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        a, b, f = r["cells_recall_0.95"], r.get("cells_fixed_probes"), r.get("faiss_same_probes")
        fixed = f"{b['seconds']} s / {b['nprobe']} / {b['recall']}" if b else "-"
        faiss_col = f"{f['seconds']} s / {f['recall']}" if f else "-"
        print(f"| {r['regime']} | {r['rows']} | {r['exact_seconds_estimate']} s | {r['quantizer_seconds']} s | "
              f"{a['seconds']} s / {a['probes_mean'] or a['method']} / {a['recall']} | {fixed} | {faiss_col} |")
    print("\n| regime | rows | cells | quantizer | search: s / cells a row / recall | end to end |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for key in [key for key in r if key.startswith("cells_recall_0.95_nlist_")] + ["cells_recall_0.95"]:
            a = r[key]
            q = a.get("quantizer_seconds", r["quantizer_seconds"])
            print(f"| {r['regime']} | {r['rows']} | {a.get('nlist', 'library')} | {q} s | {a['seconds']} s / "
                  f"{a['probes_mean'] or a['method']} / {a['recall']} | {q + a['seconds']:.1f} s |")
    sweep = [(r, key) for r in results for key in r if key.startswith("cells_recall_0.95_train_")]
    if sweep:
        print("\n| regime | rows | training rows a cell | quantizer | search: s / cells a row / recall | end to end |")
        print("|---|---|---|---|---|---|")
        for r in results:
            rows = [(r["train_per_cell"], r["quantizer_seconds"], r["cells_recall_0.95"])]
            rows += [(int(key.split("_")[4]), r[key]["quantizer_seconds"], r[key]) for rr, key in sweep if rr is r]
            for per_cell, q, a in sorted(rows, key=lambda t: -t[0]):
                print(f"| {r['regime']} | {r['rows']} | {per_cell} | {q} s | {a['seconds']} s / "
                      f"{a['probes_mean'] or a['method']} / {a['recall']} | {q + a['seconds']:.1f} s |")


if __name__ == "__main__":
    main()
