"""How far the quality suite's tables let any method go: ceilings beside what HiLander returns.

    python benchmarks/bench_ceiling.py --regimes look_alike,size60,subspace --seeds 0,1

The tables are the quality suite's (``bench_quality.generate``: the same regimes, seeds and 20K rows).
Every "oracle" figure below picks its threshold or setting with the test labels: a ceiling for that
family of rules, not a method. Per regime:

- pose modes (make_faces tables): the partition into the identities' pose modes (every mode found,
  none joined: where the one-threshold baselines stop), and the best partition reachable by linking
  each mode to its most similar mode (cosine of the member means) above an oracle threshold; an identity's
  modes lie about as far apart as those of the look-alike identities around it;
- per training seed, HiLander fitted with its defaults: the returned level; the best returned level over
  a grid of boundary closeness x per-level taus (oracle); the returned level's clusters linked to their most
  similar cluster mean above an oracle threshold;
- label-free: single linkage of the kNN graph (components of the edges above t) at the unsupervised
  schedule's thresholds (tau_0 and the steps below it), and how many of the unsupervised level's fragments
  and whole clusters would join their main partner if a cluster joined the cluster that receives at least
  half of its rows' kNN edges (Chameleon's relative interconnectivity).

Prints each figure and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402

RESULTS = bq.RESULTS
K = bq.K
#: Boundary closeness x per-level taus searched with the test labels (None: the boundary merge off).
CLOSENESS = (None, 0.5, 0.6, 0.7, 0.8)
TAUS = ((0.9, 0.5, 0.95), (0.7, 0.5, 0.95), (0.9, 0.3, 0.95), (0.9, 0.5, 0.5), (0.9, 0.7, 0.95))
THRESHOLDS = np.round(np.arange(0.30, 0.95, 0.01), 2)
#: Share of a cluster's kNN edges that the relative-interconnectivity rule asks of its main partner.
RI_SHARE = 0.5


def unit_means(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(C, D) unit mean of the rows of each cluster 0..C-1."""
    sums = sp.csr_matrix((np.ones(labels.size), (labels, np.arange(labels.size)))) @ x.astype(np.float64)
    return (sums / np.linalg.norm(sums, axis=1, keepdims=True)).astype(np.float32)


def majority(y: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(C,) the most frequent class of each cluster 0..C-1."""
    counts = sp.csr_matrix((np.ones(labels.size), (labels, y))).toarray()
    return counts.argmax(axis=1)


def best_mean_links(x, y, labels) -> dict:
    """Clusters ``labels`` (0..C-1) joined to their most similar cluster mean above the threshold that
    scores best (mean of Fp and Fb) with the test labels."""
    from agc_ray.core.baselines import components_of_edges
    from agc_ray.core.knn import knn_graph

    nbr, sim = knn_graph(unit_means(x, labels), 1, seed=0, normalize=False)
    best = None
    for t in THRESHOLDS:
        joined = components_of_edges(nbr, (nbr >= 0) & (sim > t))[labels]
        m = bq.metrics(y, joined)
        if best is None or m["fp"] + m["fb"] > best["fp"] + best["fb"]:
            best = {"threshold": float(t)} | m
    return best


def modes_ceiling(x, y, modes) -> dict:
    modes = np.unique(modes, return_inverse=True)[1]
    return {"pose_modes": bq.metrics(y, modes), "pose_modes_linked_oracle": best_mean_links(x, y, modes)}


def hilander_ceiling(x_train, y_train, x, y, seed: int) -> dict:
    from agc_ray import HiLander

    t0 = time.perf_counter()
    est = HiLander(seed=seed).fit(x_train, y_train)
    out = {"fit_seconds": round(time.perf_counter() - t0, 1)}
    labels = est.predict(x)
    out["returned"] = bq.metrics(y, labels)
    grid, weights = [], est.model_.state_dict()
    for closeness in CLOSENESS:
        for taus in TAUS:
            variant = HiLander.from_weights(weights, x.shape[1], seed=seed, boundary_closeness=closeness)
            variant.default_taus_ = list(taus)
            grid.append({"boundary_closeness": closeness, "taus": list(taus)} | bq.metrics(y, variant.predict(x)))
    out["settings_oracle"] = max(grid, key=lambda m: m["fp"] + m["fb"])
    out["settings_oracle_best_fb"] = max(grid, key=lambda m: m["fb"])
    out["returned_linked_oracle"] = best_mean_links(x, y, labels)
    return out


def label_free(x, y, seed: int) -> dict:
    from agc_ray import HiLander
    from agc_ray.core.baselines import threshold_components
    from agc_ray.core.hierarchy import ADAPTIVE_DECAY, adaptive_similarity_threshold, background_rows, unit_rows
    from agc_ray.core.knn import knn_graph

    xu = unit_rows(x)
    nbr, sim = knn_graph(xu, K, seed=0, normalize=False)
    tau_0, chance = adaptive_similarity_threshold(sim, xu[background_rows(x.shape[0], seed)], seed=seed)
    single = []
    for step in range(4):
        t = chance + (tau_0 - chance) * ADAPTIVE_DECAY**step
        labels = threshold_components(nbr, sim, t)
        single.append({"step": step, "threshold": round(float(t), 4)} | bq.metrics(y, labels))
    labels = np.unique(HiLander(unsupervised=True, seed=seed).predict(x), return_inverse=True)[1]
    # relative interconnectivity: each cluster's share of its rows' kNN edges that reach its main partner
    size = np.bincount(labels)
    src, dst = np.repeat(labels, nbr.shape[1]), labels[np.maximum(nbr, 0).ravel()]
    cross = (src != dst) & (nbr.ravel() >= 0)
    c = size.size
    pairs = sp.csr_matrix((np.ones(int(cross.sum())), (src[cross], dst[cross])), shape=(c, c)).tocsr()
    partner = np.asarray(pairs.argmax(axis=1)).ravel()
    share = np.asarray(pairs.max(axis=1).todense()).ravel() / (nbr.shape[1] * size)
    cls = majority(y, labels)
    order = np.lexsort((-size, cls))
    largest = np.zeros(c, dtype=bool)  # each class's largest cluster; the others are its fragments
    largest[order[np.r_[True, cls[order][1:] != cls[order][:-1]]]] = True
    joins = share >= RI_SHARE
    right = cls[partner] == cls
    return {
        "tau_0": round(float(tau_0), 4), "chance": round(float(chance), 4), "single_linkage": single,
        "unsupervised": bq.metrics(y, labels),
        "interconnectivity": {"share": RI_SHARE, "fragments": int((~largest).sum()),
                              "fragments_joined_right": int((joins & right & ~largest).sum()),
                              "joined_wrong": int((joins & ~right).sum()),
                              "whole_clusters_joined_wrong": int((joins & ~right & largest).sum())},
    }


def fmt(m: dict) -> str:
    return f"Fp {m['fp']:.4f} Fb {m['fb']:.4f} ({m['n_clusters']} clusters)"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", default="look_alike,size60,subspace", help=f"comma list of {', '.join(bq.REGIMES)}")
    ap.add_argument("--seeds", default="0,1", help="HiLander training seeds")
    ap.add_argument("--n-train", type=int, default=20_000)
    ap.add_argument("--n-test", type=int, default=20_000)
    ap.add_argument("--out", type=Path, default=RESULTS / f"ceiling_{datetime.date.today():%Y%m%d}.json")
    args = ap.parse_args()
    names = [r.strip() for r in args.regimes.split(",") if r.strip()]
    unknown = [r for r in names if r not in bq.REGIMES]
    if unknown:
        ap.error(f"unknown regimes {unknown}; known: {', '.join(bq.REGIMES)}")
    result = {"setup": vars(args) | {"out": str(args.out)}, "regimes": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        x_train, y_train = bq.generate(name, args.n_train, bq.TRAIN_SEED)
        x, y = bq.generate(name, args.n_test, bq.TEST_SEED)
        rec = result["regimes"][name] = {"n_true_clusters": int(np.unique(y).size)}
        modes = bq.pose_modes(name, args.n_test, bq.TEST_SEED)
        print(f"== {name}: {args.n_test} test rows, {rec['n_true_clusters']} true clusters", flush=True)
        if modes is not None:
            rec |= modes_ceiling(x, y, modes)
            print(f"   pose modes, none joined:        {fmt(rec['pose_modes'])}")
            print(f"   pose modes linked (oracle t):   {fmt(rec['pose_modes_linked_oracle'])}", flush=True)
        rec["label_free"] = label_free(x, y, 0)
        for s in rec["label_free"]["single_linkage"]:
            print(f"   single linkage, step {s['step']} (t {s['threshold']}): {fmt(s)}")
        print(f"   unsupervised: {fmt(rec['label_free']['unsupervised'])}; interconnectivity >= {RI_SHARE}: "
              f"{rec['label_free']['interconnectivity']}", flush=True)
        rec["seeds"] = {}
        for seed in (int(s) for s in args.seeds.split(",")):
            h = rec["seeds"][str(seed)] = hilander_ceiling(x_train, y_train, x, y, seed)
            so = h["settings_oracle"]
            print(f"   seed {seed}: returned {fmt(h['returned'])}; settings oracle {fmt(so)} (closeness "
                  f"{so['boundary_closeness']}, taus {so['taus']}); best Fb of the grid "
                  f"{h['settings_oracle_best_fb']['fb']:.4f}; returned + mean links (oracle t) "
                  f"{fmt(h['returned_linked_oracle'])}", flush=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
