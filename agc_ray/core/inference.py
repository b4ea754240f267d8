"""LANDER inference on one level graph, in two chunked stages that a shard can run on its own rows.

1. :func:`node_embeddings`: per node, the conv's embedding h (needs the node's own and its neighbours'
   features).
2. :func:`edge_probabilities`: per edge, the linkage probability from the edge-head projections of
   both ends (computed chunk by chunk from h) and the edge features; then the parameter-free density
   and the decode.

Memory: h is (n, hidden_channels), what is held for all nodes between the stages (the three
projections would be (n, 3 edge_channels): 1.5 KB a row instead of 0.5 KB at the defaults, a table's
size again at D = 256); the neighbours' [src | metric] projections are computed per chunk from their h,
which reads a third of the bytes per neighbour and takes no longer (300K x 256 rows: 8.1-8.8 s against
8.9-10.2 s for the stored projections, the same probabilities to the bit).

:class:`LevelDecoder` decodes the levels of one hierarchy run of an estimator (with or without a
model), and :class:`Hierarchy` is what the run returns.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from agc_ray.core.cells import SCRATCH_BYTES
from agc_ray.core.graph import mean_valid
from agc_ray.core.hierarchy import (
    AdaptiveSchedule, LevelGraph, adaptive_similarity_threshold, background_rows, best_links, linkage_parents,
    linkage_threshold, select_parents, unsupervised_parents,
)
from agc_ray.core.lander import Lander, predicted_density
from agc_ray.core.params import DECODE_MODES


#: Most nodes per chunk (see :func:`chunk_rows`).
MAX_CHUNK = 1 << 14


def chunk_rows(model: Lander, k: int, device: torch.device | str = "cpu") -> int:
    """Nodes per chunk: on CPU a power of two near the count whose neighbour rows ((k + 1) a node, as wide
    as the wider of the features and the 3E projections) take :data:`~agc_ray.core.cells.SCRATCH_BYTES`
    (1024 at D = 256, k = 10, E = 128: 300K nodes scored in 5.0 s, in chunks of 4096 in 6.8 s, the same
    probabilities); on a GPU (no page faults, a launch per kernel) :data:`MAX_CHUNK`. A power of two up to
    :data:`MAX_CHUNK`: products over chunks of other sizes can differ in the last bit, and the job's
    blocks of rows are a multiple of it."""
    if torch.device(device).type != "cpu":
        return MAX_CHUNK
    width = max(model.in_features, 3 * model.edge_head.hidden_channels)
    return min(MAX_CHUNK, 1 << round(math.log2(max(1.0, SCRATCH_BYTES / (4 * (k + 1) * width)))))


@torch.no_grad()
def node_embeddings(model: Lander, x_id, x_mean, nbr, sim, rows: torch.Tensor | None = None,
                    report=None) -> torch.Tensor:
    """The conv's embeddings h of ``rows`` (default all), (M, hidden_channels).

    ``x_id`` / ``x_mean``: tensors, arrays, or any object whose ``[ids]`` returns those rows as a tensor
    (only the rows of ``rows`` and their neighbours are read).

    ``report``: called with the number of rows of each chunk done (progress of a long call).
    """
    same = x_mean is x_id  # level 0: the conv folds its weights on this identity
    x_id = torch.as_tensor(x_id) if isinstance(x_id, np.ndarray) else x_id  # or any row-indexable (n, D)
    x_mean = x_id if same else torch.as_tensor(x_mean) if isinstance(x_mean, np.ndarray) else x_mean
    nbr, sim = torch.as_tensor(nbr), torch.as_tensor(sim)
    rows = torch.arange(nbr.shape[0], device=nbr.device) if rows is None else torch.as_tensor(rows, device=nbr.device)
    out = torch.empty((rows.shape[0], model.edge_head.proj.in_features), device=nbr.device)
    step = chunk_rows(model, nbr.shape[1], nbr.device)
    for start in range(0, rows.shape[0], step):  # filled in place: no list of chunks plus a copy
        h = model.embed(x_id, x_mean, nbr, sim, rows[start : start + step])
        out[start : start + step] = h
        if report is not None:
            report(h.shape[0])
    return out


def embedding_logits(model: Lander, h_j: torch.Tensor, h_i: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Edge logits from embeddings (:func:`node_embeddings`): the edge head's projections of both ends
    (of the far ends only the [src | metric] part) and the raw edge features.

    Shapes:
        h_j (S, k, hidden), h_i (S, hidden), f (S, k, F) -> (S, k).
    """
    head = model.edge_head
    return head.neighbour_logits(head.project_neighbours(h_j), head.project(h_i), model.normalize_features(f))


@torch.no_grad()
def edge_probabilities(model: Lander, h_of, h_rows, nbr_rows, feats_rows, report=None) -> torch.Tensor:
    """p_ij for the edges of some rows.

    Args:
        h_of: tensor (or callable) giving the embeddings (:func:`node_embeddings`) of neighbour ids
            (global ids).
        h_rows: (M, hidden) embeddings of the rows; nbr_rows (M, k) neighbour ids (-1 padded);
        feats_rows: (M, k, F) edge features, or a callable ``(start, stop) -> (stop - start, k, F)``
            that computes them per chunk (so that they are never held for all rows).
        report: called with the number of rows of each chunk done (progress of a long call).

    Returns:
        (M, k) float32 probabilities, 0 on padded edges.
    """
    nbr_rows = torch.as_tensor(nbr_rows)
    out = torch.empty(nbr_rows.shape, dtype=torch.float32, device=nbr_rows.device)
    step = chunk_rows(model, nbr_rows.shape[1], nbr_rows.device)
    for start in range(0, nbr_rows.shape[0], step):
        stop = start + step
        nb = nbr_rows[start:stop]
        h_j = h_of(nb.clamp_min(0)) if callable(h_of) else h_of[nb.clamp_min(0)]
        f = feats_rows(start, min(stop, nbr_rows.shape[0])) if callable(feats_rows) else feats_rows[start:stop]
        logits = embedding_logits(model, h_j, h_rows[start:stop], f)
        out[start:stop] = torch.sigmoid(logits)
        if report is not None:
            report(nb.shape[0])
    out[nbr_rows < 0] = 0.0
    return out


@torch.no_grad()
def score_level(model: Lander, g: LevelGraph, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Edge probabilities (n, k) and predicted densities (n,) of a whole level graph (CPU tensors)."""
    model.eval().to(device)
    nbr, sim = torch.as_tensor(g.nbr), torch.as_tensor(g.sim)
    x_id = torch.as_tensor(g.x_id).to(device)
    x_mean = x_id if g.x_mean is g.x_id else torch.as_tensor(g.x_mean).to(device)
    h = node_embeddings(model, x_id, x_mean, nbr.to(device), sim.to(device))
    mean_sim = mean_valid(sim, nbr >= 0)
    feats = lambda start, stop: g.edge_features(start=start, stop=stop, mean_sim=mean_sim).to(device)  # noqa: E731
    p = edge_probabilities(model, h, h, nbr.to(device), feats).cpu()
    return p, predicted_density(p, sim, nbr >= 0)


def decode(p, density, nbr, sim, *, tau: float, mode: str = "prob") -> np.ndarray:
    """Hi-LANDER decode: parent = best denser neighbour with p_ij > tau ('prob') or s_ij > tau ('sim')."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
    score = p if mode == "prob" else torch.as_tensor(sim)
    return select_parents(score, nbr, density, threshold=tau)


@dataclass
class Hierarchy:
    """One clustering of a table: every level's (N,) int64 labels (finest first, each coarsening the
    last), each level's counts and timings (kNN, model inference, decode, tau), and the level that
    ``predict`` returns."""

    levels: list[np.ndarray]
    stats: list[dict]
    selected_level: int

    @property
    def labels(self) -> np.ndarray:
        """The selected level's labels (what ``predict`` returns)."""
        return self.levels[self.selected_level]


class LevelDecoder:
    """Parents of the levels of one hierarchy run: ``decoder(graph, level) -> (parent, info)`` with
    ``info`` the level's ``tau`` (and ``inference_seconds`` with a model; ``linkage``, the threshold of
    a label-free level decoded by average linkage, where tau guards the peaks).

    Unsupervised without a tau, level 0's rows fix the table's threshold schedule once
    (:class:`~agc_ray.core.hierarchy.AdaptiveSchedule`), which the levels above decode on; the
    schedule belongs to the run, not to the estimator. ``tau``: one threshold for every level
    (default: the estimator's per-level :meth:`HiLander.level_tau`).
    """

    def __init__(self, est, tau: float | None = None):  # est: a HiLander
        self.est = est
        self.tau = tau
        self.schedule: AdaptiveSchedule | None = None

    def __call__(self, g, level: int) -> tuple[np.ndarray, dict]:
        est = self.est
        tau = est.level_tau(level) if self.tau is None else self.tau
        if est.unsupervised:
            if tau is not None:
                return unsupervised_parents(g, tau), {"tau": tau}
            # Re-deriving tau_0 from a level of peaks, whose neighbours are other clusters, merged
            # look-alikes at once: the levels above decode peaks on level 0's scale.
            if level == 0 or self.schedule is None:
                self.schedule = AdaptiveSchedule(*adaptive_similarity_threshold(
                    g.sim, g.x_id[background_rows(g.n, est.seed)], seed=est.seed))
            while True:
                tau, info = self.schedule.tau(), {}
                if self.schedule.uses_linkage():
                    info["linkage"] = linkage_threshold(best_links(g.average_links, g.size), self.schedule.linkage_floor())
                    parent = linkage_parents(g, info["linkage"], tau)
                else:
                    parent = unsupervised_parents(g, tau)
                if self.schedule.accept(level, g.n, int((parent >= 0).sum())):
                    return parent, {"tau": tau} | info
        t0 = time.perf_counter()
        p, density = score_level(est.model_, g, device=est._torch_device())
        info = {"tau": tau, "inference_seconds": time.perf_counter() - t0}
        return decode(p, density, g.nbr, g.sim, tau=tau, mode=est.decode), info

    def selected_level(self, n_levels: int) -> int:
        """The level ``predict`` returns out of ``n_levels``: unsupervised with the adaptive thresholds,
        the schedule's (the average-linkage level above the last one one step below tau_0, the
        table's best guess; the levels above are coarser options); otherwise the top level (validated
        depth, or the user's)."""
        if self.est.uses_adaptive_thresholds() and self.schedule is not None:
            return self.schedule.selected(n_levels)
        return n_levels - 1
