"""Clustering quality across data regimes: Hi-LANDER (supervised and unsupervised) against its baselines.

    python benchmarks/bench_quality.py                      # every regime, seeds 0,1,2, 20K rows (hours on 2 cores)
    python benchmarks/bench_quality.py --regimes size20 --seeds 0 --n-train 3000 --n-test 3000 --n-val 1500 --epochs 2

A regime is a set of make_faces arguments, or another generator's (REGIMES); a transfer case trains on
one regime and tests on another (TRANSFERS). Train, validation and test splits come from different seeds (1, 3, 2:
disjoint identities); the validation split is drawn from the training regime, because in a transfer the
target's labels are not available: every threshold or resolution a baseline needs is chosen on it.

Per case and training seed: HiLander fitted on the train split (its returned level, i.e. what predict
gives, the same on the train split itself (in-sample: how much the model fits its training identities),
and the best level by Fp of a full 10-level hierarchy), the gradient-boosted edge classifier
(seeded, tau on the validation split) and the unsupervised mode (no labels, no model). Once per case
(independent of the seed): Chinese whispers (threshold on the validation split), the oracle threshold
components (threshold chosen with the test labels), on make_faces tables the partition into the
identities' pose modes (a reference, not a method: every mode found and none joined, where the
one-threshold baselines stop; what lies above needs modes of one identity joined) and, when leidenalg
is installed, Leiden with modularity and with CPM (resolution on the validation split), both on the
similarity-weighted kNN graph. Every figure: pairwise F (Fp), BCubed F (Fb), NMI and the cluster count.

Prints a table per case (mean and [min, max] over seeds) and a summary, and rewrites the JSON after every
step: rerunning with the same --out skips what it already holds (use --fresh to start over).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"

#: make_faces arguments of each regime (make_faces' own defaults: mean identity size 60, 256-d); a
#: ``generator`` key names another generator (see ``generate``) and the rest are its arguments.
REGIMES = {
    "size5": dict(mean_identity_size=5),
    "size20": dict(mean_identity_size=20),
    "size60": {},
    "heavy_tail": dict(size_sigma=1.8),
    "look_alike": dict(look_alike=0.95, group_size=12),
    "wide": dict(spread=(0.6, 1.0)),
    "anisotropic": dict(anisotropy=1.0),
    "distractors": dict(distractor_fraction=0.10),
    "dim128": dict(dim=128),
    "dim512": dict(dim=512),
    "ann_hard": dict(isotropic=1.0),
    # another generator (make_subspace_clusters): clusters stretched along their own 8-dim subspace
    "subspace": dict(generator="subspace", spread=(0.35, 0.6)),
}
#: (train regime, test regime) of each transfer case.
TRANSFERS = {
    "size60_to_size5": ("size60", "size5"),
    "size5_to_size60": ("size5", "size60"),
    "size60_to_wide": ("size60", "wide"),
    "size60_to_anisotropic": ("size60", "anisotropic"),
}
TRAIN_SEED, TEST_SEED, VAL_SEED = 1, 2, 3
K = 10  # kNN degree of the baselines' graphs (HiLander's default k)
FULL_LEVELS = 10
CPM_RESOLUTIONS = np.round(np.geomspace(0.001, 1.0, 16), 4)


def cases() -> dict[str, tuple[str, str]]:
    return {name: (name, name) for name in REGIMES} | TRANSFERS


def metrics(y, labels) -> dict:
    from agc_ray.metrics import evaluate

    e = evaluate(y, labels)
    return {k: round(e[k], 4) for k in ("fp", "fb", "nmi", "pairwise_precision", "pairwise_recall")} | {
        "n_clusters": e["n_clusters"]
    }


def hierarchy_report(result, y, seconds: float) -> dict:
    """Every level's metrics (with the run's per-level stats) and the best level by Fp."""
    levels = result.levels
    stats = list(result.stats) + [{}] * (len(levels) - len(result.stats))
    per_level = [{k: v for k, v in st.items() if np.isscalar(v)} | metrics(y, lv) for st, lv in zip(stats, levels)]
    best = int(np.argmax([lv["fp"] for lv in per_level]))
    return {"predict_seconds": round(seconds, 2), "n_levels": len(levels), "best_index": best,
            "best": per_level[best], "levels": per_level}


def predict_with_full(est, x, y) -> dict:
    """The returned (last) level of ``est`` and the best level of its full FULL_LEVELS-level hierarchy."""
    t0 = time.perf_counter()
    result = est.hierarchy(x)
    seconds = time.perf_counter() - t0
    selected = result.selected_level  # what predict returns
    out = {"returned": metrics(y, result.labels) | {"index": selected},
           "hierarchy": hierarchy_report(result, y, seconds), "predict_seconds": round(seconds, 2)}
    if est.get_params()["levels"] == FULL_LEVELS:
        out["full"] = out["hierarchy"]  # the same call: predict is deterministic
        return out
    try:
        full = copy.deepcopy(est)
        full.set_params(levels=FULL_LEVELS)
        t0 = time.perf_counter()
        out["full"] = hierarchy_report(full.hierarchy(x), y, time.perf_counter() - t0)
    except Exception as e:  # the returned level still counts; say why the full hierarchy is missing
        logging.warning("full hierarchy failed: %r", e)
        out["full"] = {"error": repr(e)}
    return out


def _brief(v, most: int = 64):
    """``v`` for the JSON, with any array or list longer than ``most`` replaced by its length."""
    if isinstance(v, dict):
        return {str(k): _brief(x, most) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return f"<{len(v)} items>" if len(v) > most else [_brief(x, most) for x in v]
    return v.item() if isinstance(v, np.generic) else v


def fitted_choices(est) -> dict:
    """What the estimator chose (new API: per-level taus and level count on validation) or was given."""
    params = est.get_params()
    return _brief({"tau": params.get("tau"), "levels": params.get("levels"),
                   "taus_": getattr(est, "taus_", None), "n_levels_": getattr(est, "n_levels_", None),
                   "validation_": getattr(est, "validation_", None)})


def leiden_labels(nbr, sim, resolution=None, seed=0) -> np.ndarray:
    """Leiden on the similarity-weighted kNN graph (edges with s > 0): modularity, or CPM at ``resolution``."""
    import igraph as ig
    import leidenalg as la
    import scipy.sparse as sp

    from agc_ray.core.baselines import similarity_graph
    from agc_ray.core.hierarchy import canonical_labels

    w = sp.triu(similarity_graph(nbr, sim, 0.0), k=1).tocoo()
    g = ig.Graph(n=nbr.shape[0], edges=np.column_stack([w.row, w.col]).tolist(), edge_attrs={"weight": w.data.tolist()})
    if resolution is None:
        part = la.find_partition(g, la.ModularityVertexPartition, weights="weight", seed=seed)
    else:
        part = la.find_partition(g, la.CPMVertexPartition, weights="weight", resolution_parameter=float(resolution), seed=seed)
    return canonical_labels(np.asarray(part.membership))


def baselines(data: dict, rec: dict, skip_leiden: bool) -> None:
    """Seed-independent baselines into ``rec`` (skipping those already there)."""
    from agc_ray.core.baselines import best_threshold, chinese_whispers, chinese_whispers_on_validation
    from agc_ray.metrics.clustering import pairwise

    y = data["y_test"]
    if "pose_modes" not in rec:
        modes = data["modes_test"]
        rec["pose_modes"] = None if modes is None else metrics(y, modes)
    if "oracle_threshold" not in rec:
        t0 = time.perf_counter()
        t, labels = best_threshold(*data["g_test"], y)
        rec["oracle_threshold"] = {"threshold": t, "seconds": round(time.perf_counter() - t0, 2)} | metrics(y, labels)
    if "chinese_whispers" not in rec:
        t0 = time.perf_counter()
        t = chinese_whispers_on_validation(*data["g_val"], data["y_val"])
        t1 = time.perf_counter()
        labels = chinese_whispers(*data["g_test"], t)
        rec["chinese_whispers"] = {"threshold": t, "val_seconds": round(t1 - t0, 2),
                                   "seconds": round(time.perf_counter() - t1, 2)} | metrics(y, labels)
    if skip_leiden or ("leiden_modularity" in rec and "leiden_cpm" in rec):
        return
    try:
        import leidenalg  # noqa: F401
    except ImportError:
        rec["leiden_note"] = "leidenalg not installed: Leiden skipped"
        return
    rec.pop("leiden_note", None)
    t0 = time.perf_counter()
    rec["leiden_modularity"] = {"seconds": None} | metrics(y, leiden_labels(*data["g_test"]))
    rec["leiden_modularity"]["seconds"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    scores = {float(r): pairwise(data["y_val"], leiden_labels(*data["g_val"], r))[2] for r in CPM_RESOLUTIONS}
    r = max(scores, key=scores.get)
    t1 = time.perf_counter()
    labels = leiden_labels(*data["g_test"], r)
    rec["leiden_cpm"] = {"resolution": r, "val_seconds": round(t1 - t0, 2),
                         "seconds": round(time.perf_counter() - t1, 2)} | metrics(y, labels)


def seed_run(data: dict, seed: int, epochs: int | None) -> dict:
    """HiLander supervised and unsupervised, and the seeded edge-classifier baseline, for one seed."""
    from threadpoolctl import threadpool_limits

    from agc_ray import HiLander
    from agc_ray.core.baselines import EdgeClassifierBaseline

    x, y = data["x_test"], data["y_test"]
    est = HiLander(seed=seed, **({"epochs": epochs} if epochs else {}))
    t0 = time.perf_counter()
    est.fit(data["x_train"], data["y_train"])
    out = {"hilander": {"fit_seconds": round(time.perf_counter() - t0, 2), "epochs": est.epochs}}
    out["hilander"] |= fitted_choices(est) | predict_with_full(est, x, y)
    # what predict returns on the training table itself: the gap to the test table is how much the
    # model fits its training identities rather than the regime (look-alikes: 0.808 against 0.647)
    out["hilander"]["train_table"] = metrics(data["y_train"], est.predict(data["x_train"]))

    # One OpenMP thread: with torch's libgomp loaded next to scikit-learn's, the first gradient-boosting
    # fit took 100-240 s instead of 1 s on 2 busy cores (threadpool_limits(1) or OMP_WAIT_POLICY=passive
    # avoid it).
    t0 = time.perf_counter()
    with threadpool_limits(1, user_api="openmp"):
        gb = EdgeClassifierBaseline(seed=seed).fit(*data["g_train"], data["y_train"], val=(*data["g_val"], data["y_val"]))
        t1 = time.perf_counter()
        labels = gb.predict(*data["g_test"])
    out["gbdt"] = {"tau": round(gb.tau_, 3), "fit_seconds": round(t1 - t0, 2),
                   "predict_seconds": round(time.perf_counter() - t1, 2)} | metrics(y, labels)

    out["unsupervised"] = unsupervised_run(x, y, seed)
    return out


def unsupervised_run(x, y, seed: int) -> dict:
    """The unsupervised mode with its defaults (no labels, no model, no tau)."""
    from agc_ray import HiLander

    un = HiLander(unsupervised=True, seed=seed)
    return predict_with_full(un, x, y) | fitted_choices(un)


def generator_of(regime: str) -> tuple[str, dict]:
    """``(generator, kwargs)`` of a regime: 'faces' (make_faces) unless its arguments name another."""
    kwargs = dict(REGIMES[regime])
    return kwargs.pop("generator", "faces"), kwargs


def generate(regime: str, n: int, seed: int):
    """``(x, y)`` of ``n`` rows of a regime (make_faces unless its arguments name another generator)."""
    from agc_ray.core.synthetic import make_faces, make_subspace_clusters

    name, kwargs = generator_of(regime)
    return {"faces": make_faces, "subspace": make_subspace_clusters}[name](n, seed=seed, **kwargs)


def pose_modes(regime: str, n: int, seed: int) -> np.ndarray | None:
    """(n,) the pose mode of each row of :func:`generate`'s table (make_faces ``label_by='mode'``), None
    for another generator."""
    from agc_ray.core.synthetic import make_faces

    name, kwargs = generator_of(regime)
    return make_faces(n, seed=seed, label_by="mode", **kwargs)[1] if name == "faces" else None


def make_data(train: str, test: str, args) -> dict:
    from agc_ray.core.knn import knn_graph

    d = {}
    d["x_train"], d["y_train"] = generate(train, args.n_train, TRAIN_SEED)
    d["x_val"], d["y_val"] = generate(train, args.n_val, VAL_SEED)
    d["x_test"], d["y_test"] = generate(test, args.n_test, TEST_SEED)
    d["modes_test"] = pose_modes(test, args.n_test, TEST_SEED)
    for split in ("train", "val", "test"):
        d[f"g_{split}"] = knn_graph(d[f"x_{split}"], K, seed=0)
    return d


# -- reporting -----------------------------------------------------------------------------------------
def _span(values, fmt) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(float(np.mean(values)), fmt)} [{format(min(values), fmt)}, {format(max(values), fmt)}]"


def rows(rec: dict) -> list[tuple[str, list[dict], str]]:
    """(method, per-seed metric dicts, note) for the table."""
    seeds = [rec["seeds"][s] for s in sorted(rec["seeds"], key=int)]
    b = rec.get("baselines", {})

    def get(path):
        out = []
        for s in seeds:
            v = s
            for p in path:
                v = v.get(p, {}) if isinstance(v, dict) else {}
            out.append(v)
        return [v for v in out if "fp" in v]

    def idx(path):
        return [v.get("index", v.get("best_index")) for v in get(path)]

    out = [
        ("hilander", get(("hilander", "returned")), f"level {_span(idx(('hilander', 'returned')), 'g')}"),
        ("hilander, train table", get(("hilander", "train_table")), "in-sample"),
        ("hilander best of full", get(("hilander", "full", "best")),
         f"level {_span([s['hilander']['full'].get('best_index') for s in seeds if 'best_index' in s['hilander'].get('full', {})], 'g')}"),
        ("gbdt edge classifier", get(("gbdt",)), f"tau {_span([s['gbdt']['tau'] for s in seeds], '.2f')}"),
        ("unsupervised", get(("unsupervised", "returned")), f"level {_span(idx(('unsupervised', 'returned')), 'g')}"),
        ("unsupervised best of full", get(("unsupervised", "full", "best")),
         f"level {_span([s['unsupervised']['full'].get('best_index') for s in seeds if 'best_index' in s['unsupervised'].get('full', {})], 'g')}"),
    ]
    for name, key, note in (("chinese whispers", "chinese_whispers", "threshold"),
                            ("oracle threshold", "oracle_threshold", "threshold"),
                            ("pose modes (reference)", "pose_modes", None),
                            ("leiden modularity", "leiden_modularity", None),
                            ("leiden cpm", "leiden_cpm", "resolution")):
        if b.get(key) is not None:
            out.append((name, [b[key]], f"{note} {b[key][note]}" if note else ""))
    return out


def print_case(name: str, rec: dict) -> None:
    print(f"\n== {name}: train {rec['train_regime']} -> test {rec['test_regime']}; test {rec['n_test']} rows, "
          f"{rec['n_true_clusters']} true clusters; seeds {','.join(sorted(rec['seeds'], key=int)) or '-'} ==")
    print(f"{'method':<26} {'Fp':<22} {'Fb':<22} {'NMI':<22} {'clusters':<20} note")
    for method, vals, note in rows(rec):
        if not vals:
            continue
        cells = [_span([v[k] for v in vals], ".3f") for k in ("fp", "fb", "nmi")]
        print(f"{method:<26} {cells[0]:<22} {cells[1]:<22} {cells[2]:<22} {_span([v['n_clusters'] for v in vals], '.0f'):<20} {note}")
    h = [s["hilander"] for s in rec["seeds"].values()]
    if h:
        print(f"{'':<26} hilander fit {_span([v['fit_seconds'] for v in h], '.1f')} s, predict "
              f"{_span([v['predict_seconds'] for v in h], '.1f')} s; n_levels_ {[v.get('n_levels_') for v in h]}, "
              f"taus_ {[v.get('taus_') for v in h]}")
    if "leiden_note" in rec.get("baselines", {}):
        print(f"{'':<26} {rec['baselines']['leiden_note']}")


SHORT = {"hilander, train table": "hl train", "hilander best of full": "hl best", "gbdt edge classifier": "gbdt",
         "unsupervised": "unsup", "unsupervised best of full": "unsup best", "chinese whispers": "whispers",
         "oracle threshold": "oracle", "pose modes (reference)": "modes", "leiden modularity": "leiden mod"}


def print_summary(result: dict) -> None:
    names = [n for n in result["cases"] if result["cases"][n].get("seeds")]
    if not names:
        return
    methods = [m for m, _, _ in rows(result["cases"][names[0]])]
    print("\nmean Fp per case")
    print(f"{'case':<24} " + " ".join(f"{SHORT.get(m, m)[:11]:>11}" for m in methods))
    for n in names:
        by = {m: vals for m, vals, _ in rows(result["cases"][n])}
        print(f"{n:<24} " + " ".join(f"{np.mean([v['fp'] for v in by[m]]):>11.3f}" if by.get(m) else f"{'-':>11}" for m in methods))


def save(result: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", default="all", help=f"comma list of cases (default all): {', '.join(cases())}")
    ap.add_argument("--seeds", default="0,1,2", help="HiLander / edge-classifier training seeds")
    ap.add_argument("--n-train", type=int, default=20_000)
    ap.add_argument("--n-test", type=int, default=20_000)
    ap.add_argument("--n-val", type=int, default=5_000, help="validation rows (baselines' thresholds)")
    ap.add_argument("--epochs", type=int, default=None, help="default: HiLander's")
    ap.add_argument("--skip-leiden", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / f"quality_{datetime.date.today():%Y%m%d}.json")
    ap.add_argument("--fresh", action="store_true", help="ignore what --out already holds")
    ap.add_argument("--verbose", action="store_true", help="log training progress")
    ap.add_argument("--redo-unsupervised", action="store_true",
                    help="recompute the unsupervised figures of the seeds already held (after a change to that mode)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")

    all_cases = cases()
    names = list(all_cases) if args.regimes == "all" else [r.strip() for r in args.regimes.split(",") if r.strip()]
    unknown = [n for n in names if n not in all_cases]
    if unknown:
        ap.error(f"unknown regimes {unknown}; known: {', '.join(all_cases)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    setup = {"n_train": args.n_train, "n_test": args.n_test, "n_val": args.n_val, "epochs": args.epochs,
             "k": K, "data_seeds": {"train": TRAIN_SEED, "val": VAL_SEED, "test": TEST_SEED}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"setup": setup, "cases": {}}
    if args.out.is_file() and not args.fresh:
        result = json.loads(args.out.read_text())
        if result.get("setup") != json.loads(json.dumps(setup)):
            ap.error(f"{args.out} holds a run with setup {result.get('setup')}: pass another --out or --fresh")
        print(f"resuming {args.out}")

    for name in names:
        train, test = all_cases[name]
        rec = result["cases"].setdefault(name, {
            "train_regime": train, "test_regime": test, "train_kwargs": REGIMES[train], "test_kwargs": REGIMES[test],
            "n_test": args.n_test, "seeds": {}, "baselines": {}})
        todo = [s for s in seeds if str(s) not in rec["seeds"]]
        redo = [s for s in seeds if str(s) in rec["seeds"]] if args.redo_unsupervised else []
        base_done = all(k in rec["baselines"] for k in ("oracle_threshold", "chinese_whispers", "pose_modes")) and (
            args.skip_leiden or "leiden_cpm" in rec["baselines"] or "leiden_note" in rec["baselines"])
        if todo or redo or not base_done:
            t0 = time.perf_counter()
            data = make_data(train, test, args)
            rec["n_true_clusters"] = int(np.unique(data["y_test"]).size)
            print(f"[{name}] data and kNN graphs {time.perf_counter() - t0:.1f} s", flush=True)
            if not base_done:
                t0 = time.perf_counter()
                baselines(data, rec["baselines"], args.skip_leiden)
                save(result, args.out)
                print(f"[{name}] baselines {time.perf_counter() - t0:.1f} s", flush=True)
            for s in redo:
                rec["seeds"][str(s)]["unsupervised"] = unsupervised_run(data["x_test"], data["y_test"], s)
                save(result, args.out)
            for s in todo:
                t0 = time.perf_counter()
                rec["seeds"][str(s)] = seed_run(data, s, args.epochs)
                save(result, args.out)
                print(f"[{name}] seed {s} {time.perf_counter() - t0:.1f} s", flush=True)
            del data
        print_case(name, rec)
    print_summary({"cases": {n: result["cases"][n] for n in names}})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
