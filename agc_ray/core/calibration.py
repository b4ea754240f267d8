"""Decode thresholds and the hierarchy's depth chosen on held-out identities (the paper's protocol).

A model's edge probabilities are calibrated on the ground-truth hierarchy it was trained on, not on the
noisier super-nodes it builds itself, so one fixed tau for every level merges too little at level 0 and
too much above it. :func:`select_levels` walks the hierarchy of a labelled validation split (identities
that training never saw) and, level by level, keeps the tau whose clustering scores best; it stops at
the first level that no tau improves, so the returned level is the best one on validation rather than
whatever the last level happened to merge.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from agc_ray.core.hierarchy import LevelGraph, build_hierarchy, forest_components
from agc_ray.metrics.clustering import bcubed, pairwise

log = logging.getLogger("agc_ray")

#: Decode thresholds tried per level: p_ij is a probability, so the grid spans (0, 1).
TAU_GRID = tuple(float(t) for t in np.round(np.arange(0.05, 0.999, 0.05), 2)) + (0.97, 0.99)
#: A level is kept only when it improves the validation score by more than this.
MIN_GAIN = 1e-3
#: Scores this close to a level's best count as ties (broken towards the higher tau).
TOLERANCE = 5e-3


def holdout_classes(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean (N,) mask of the validation rows: a seeded ``fraction`` of the classes, whole.

    Held-out *classes* (not rows) measure what clustering needs: generalising to unseen identities.
    """
    classes = np.unique(y)
    n_val = int(round(fraction * classes.size))
    if n_val == 0:
        return np.zeros(y.shape[0], dtype=bool)
    val_classes = np.random.default_rng(seed).choice(classes, size=n_val, replace=False)
    return np.isin(y, val_classes)


def clustering_score(y: np.ndarray, labels: np.ndarray) -> dict:
    """Pairwise and BCubed F of a clustering and their mean (the selection objective)."""
    fp = pairwise(y, labels)[2]
    fb = bcubed(y, labels)[2]
    return {"fp": float(fp), "fb": float(fb), "score": float((fp + fb) / 2)}


def select_levels(
    x_val: np.ndarray,
    y_val: np.ndarray,
    score_level: Callable[[LevelGraph], tuple],
    decode: Callable[..., np.ndarray],
    *,
    k: int,
    max_levels: int,
    knn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    grid: tuple[float, ...] = TAU_GRID,
    min_gain: float = MIN_GAIN,
    tolerance: float = TOLERANCE,
) -> dict:
    """Per-level tau and the number of levels that maximise the validation score, greedily.

    Args:
        x_val, y_val: (N, D) held-out rows and their (N,) classes. (Running the hierarchy over the
            training rows too, as confusers, scored only on these, was worse: the model recognises
            its training identities, so held-out rows still clustered as in a small table.)
        score_level: ``score_level(graph) -> (p, density)`` of one level graph (the model's scores).
        decode: ``decode(p, density, nbr, sim, tau=...) -> parent`` (the estimator's decode mode).
        k, max_levels, knn: the hierarchy's settings (as in :func:`build_hierarchy`).
        grid: taus tried per level; min_gain: the improvement a level must bring to be kept.

    Each level is scored once; every tau costs one decode, one components pass and the metrics over
    N rows. Returns ``{"taus": [...], "levels": L, "scores": [per level: tau, fp, fb, score, clusters],
    "rows": N, "seconds": s}`` with L = len(taus) >= 1.
    """
    t0 = time.perf_counter()
    n = x_val.shape[0]
    node_of_row = np.arange(n, dtype=np.int64)
    best_so_far = clustering_score(y_val, node_of_row)["score"]  # all singletons
    chosen: list[dict] = []

    def decode_level(g: LevelGraph, level: int) -> np.ndarray:
        nonlocal node_of_row, best_so_far
        p, density = score_level(g)
        tried = []
        for tau in grid:
            parent = decode(p, density, g.nbr, g.sim, tau=tau)
            if not (parent >= 0).any():
                continue
            comp, peaks = forest_components(parent)
            rows = comp[node_of_row]
            s = clustering_score(y_val, rows)
            tried.append((s | {"tau": tau, "clusters": int(peaks.size)}, parent, rows))
        best = None
        if tried:
            # Levels above can merge what this one leaves apart, never split what it merges: among the
            # taus within `tolerance` of the best score, the most conservative (highest) one.
            top = max(t[0]["score"] for t in tried)
            best = max((t for t in tried if t[0]["score"] >= top - tolerance), key=lambda t: t[0]["tau"])
        log.debug("validation level %d: %s", level, [(t[0]["tau"], round(t[0]["score"], 4)) for t in tried])
        # A level that does not improve on the one below is not kept (its edges would only over-merge).
        if best is None or (chosen and best[0]["score"] <= best_so_far + min_gain):
            log.info("validation: level %d does not improve (best %s), %d level(s) kept", level,
                     None if best is None else round(best[0]["score"], 4), len(chosen))
            return np.full(g.n, -1, dtype=np.int64)
        chosen.append({"level": level} | best[0])
        best_so_far = best[0]["score"]
        node_of_row = best[2]
        log.info("validation: level %d tau %.2f Fp %.4f Fb %.4f (%d clusters)", level, best[0]["tau"],
                 best[0]["fp"], best[0]["fb"], best[0]["clusters"])
        return best[1]

    build_hierarchy(x_val, decode_level, k=k, levels=max_levels, early_stop=False, knn=knn)
    if not chosen:  # nothing links at any tau: keep the most conservative threshold
        chosen.append({"level": 0, "tau": grid[-1], "fp": 0.0, "fb": 0.0, "score": 0.0, "clusters": n})
    return {"taus": [c["tau"] for c in chosen], "levels": len(chosen), "scores": chosen, "rows": int(n),
            "seconds": round(time.perf_counter() - t0, 2)}
