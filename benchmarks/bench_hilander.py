"""Hi-LANDER core benchmark: train once, cluster a held-out split, compare with baselines in-process.

    python benchmarks/bench_hilander.py --n 100000          # 100K x 256 (about 10-15 min on 2 cores)
    python benchmarks/bench_hilander.py --n 1000000         # 1M x 256 test split, 100K train split

Train and test splits come from make_faces with different seeds (disjoint identities). The
clustering runs in a fresh child process (so its peak RSS is its own), followed in that same process
by the baselines: the kNN threshold components with the best threshold (picked with the test
labels) and a gradient-boosted edge classifier (tau picked on a validation split).
Prints a table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it is not inherited from a forking parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def metrics(y, labels):
    from agc_ray.metrics import evaluate

    e = evaluate(y, labels)
    return {k: round(e[k], 4) for k in ("fp", "fb", "nmi", "pairwise_precision", "pairwise_recall")} | {
        "n_clusters": e["n_clusters"]
    }


def train(args) -> dict:
    from agc_ray import HiLander
    from agc_ray.core.synthetic import make_faces

    x, y = make_faces(args.n_train, dim=args.dim, seed=1)
    est = HiLander(epochs=args.epochs, seed=0) if args.epochs else HiLander(seed=0)
    t0 = time.perf_counter()
    est.fit(x, y)
    fit_seconds = time.perf_counter() - t0
    est.save(args.model)
    return {"n_train": args.n_train, "fit_seconds": round(fit_seconds, 1), "epochs": est.epochs,
            "history": est.history_, "train_peak_rss_mb": round(peak_rss_mb())}


def cluster(args) -> dict:
    from agc_ray import HiLander
    from agc_ray.core.baselines import EdgeClassifierBaseline, best_threshold
    from agc_ray.core.knn import knn_graph, knn_recall
    from agc_ray.core.synthetic import make_faces

    x, y = make_faces(args.n, dim=args.dim, seed=2)
    rss_data = peak_rss_mb()
    est = HiLander.load(args.model)
    t0 = time.perf_counter()
    result = est.hierarchy(x)
    levels = result.levels
    total = time.perf_counter() - t0
    rss_cluster = peak_rss_mb()
    out = {
        "n": args.n,
        "dim": args.dim,
        "feature_mb": round(x.nbytes / 2**20),
        "cluster_seconds": round(total, 1),
        "cluster_peak_rss_mb": round(rss_cluster),
        "rss_after_data_mb": round(rss_data),
        "rss_target_mb": round(3 * x.nbytes / 2**20 + 1024),
        "levels": [st | metrics(y, lv) for st, lv in zip(result.stats, levels)],
    }
    if args.skip_baselines:
        return out
    # level-0 graph again, once, for recall and the baselines (same method as the model used)
    t0 = time.perf_counter()
    nbr, sim = knn_graph(x, est.k, method=est.knn, seed=est.seed)
    out["baseline_knn_seconds"] = round(time.perf_counter() - t0, 1)
    out["knn_recall"] = round(knn_recall(x, nbr, sample=2000), 4)
    t0 = time.perf_counter()
    thr, labels = best_threshold(nbr, sim, y)
    out["threshold_baseline"] = {"threshold": thr, "seconds": round(time.perf_counter() - t0, 1)} | metrics(y, labels)
    if not args.skip_gbdt:
        xt, yt = make_faces(min(args.n, 100_000), dim=args.dim, seed=1)
        xv, yv = make_faces(20_000, dim=args.dim, seed=3)
        t0 = time.perf_counter()
        gb = EdgeClassifierBaseline().fit(*knn_graph(xt, est.k), yt, val=(*knn_graph(xv, est.k), yv))
        labels = gb.predict(nbr, sim)
        out["edge_classifier_baseline"] = {"tau": round(gb.tau_, 3), "seconds": round(time.perf_counter() - t0, 1)} | metrics(y, labels)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="test split rows")
    ap.add_argument("--n-train", type=int, default=100_000, help="train split rows")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=0, help="0: HiLander's default")
    ap.add_argument("--skip-gbdt", action="store_true", help="no gradient-boosted edge-classifier baseline")
    ap.add_argument("--skip-baselines", action="store_true", help="clustering figures only (no recall, no baselines)")
    ap.add_argument("--model", help="model directory: reused when it holds a saved model, else trained and saved there")
    ap.add_argument("--phase", choices=("all", "cluster"), default="all", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.phase == "cluster":
        print(json.dumps(cluster(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.model = args.model or str(Path(tmp) / "model")
        if (Path(args.model) / "config.json").is_file():
            result = {"train": {"reused_model": args.model}}
        else:
            result = {"train": train(args)}
        cmd = [sys.executable, __file__, "--phase", "cluster", "--model", args.model, "--n", str(args.n),
               "--dim", str(args.dim)] + (["--skip-gbdt"] if args.skip_gbdt else []) + (
               ["--skip-baselines"] if args.skip_baselines else [])
        proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        result["cluster"] = json.loads(proc.stdout.strip().splitlines()[-1])
    c = result["cluster"]
    t = result["train"]
    trained = f"trained on {t['n_train']} rows in {t['fit_seconds']}s" if "n_train" in t else f"model {t['reused_model']}"
    print(f"\nHi-LANDER on {c['n']} x {c['dim']} ({trained}): clustering {c['cluster_seconds']}s, peak RSS "
          f"{c['cluster_peak_rss_mb']} MB (target {c['rss_target_mb']} MB), kNN recall {c.get('knn_recall')}")
    print(f"{'level':>5} {'nodes':>9} {'clusters':>9} {'kNN s':>7} {'infer s':>8} {'decode s':>8} {'Fp':>6} {'Fb':>6} {'NMI':>6}")
    for lv in c["levels"]:
        print(f"{lv['level']:>5} {lv['nodes']:>9} {lv['clusters']:>9} {lv['knn_seconds']:>7.1f} "
              f"{lv.get('inference_seconds', 0):>8.1f} {lv['decode_seconds']:>8.1f} {lv['fp']:>6.3f} {lv['fb']:>6.3f} {lv['nmi']:>6.3f}")
    for name in ("threshold_baseline", "edge_classifier_baseline"):
        if name in c:
            b = c[name]
            print(f"{name:>28}: Fp {b['fp']:.3f} Fb {b['fb']:.3f} NMI {b['nmi']:.3f} clusters {b['n_clusters']}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"hilander_{c['n']}{'_cluster_only' if args.skip_baselines else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
