"""Hierarchical training of LANDER: ground-truth level graphs, seed-node mini-batches, one model.

For each (k, levels) setting the ground-truth hierarchy is built from the labels (each node linked to
its most similar same-label neighbour of higher true density), and every level graph becomes
training data. One model is trained across all of them: each epoch shuffles seed-node batches of all
level graphs together. A batch needs its seeds and their direct neighbours only (see
:func:`agc_ray.core.lander.node_inputs`), so batches are cheap dense gathers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
import warnings

import numpy as np
import torch

from agc_ray.core.hierarchy import LevelGraph, build_hierarchy, ground_truth_parents
from agc_ray.core.knn import knn_graph
from agc_ray.core.lander import Lander, connectivity_loss, ground_truth_density, predicted_density
from agc_ray.core.params import DEFAULTS

log = logging.getLogger("agc_ray")


#: cuBLAS' reproducible workspace settings (either); torch's deterministic mode refuses cuBLAS without one.
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


def cuda_can_be_deterministic() -> bool:
    """Whether cuBLAS runs reproducibly in this process: ``CUBLAS_WORKSPACE_CONFIG`` is set to one of
    :data:`CUBLAS_DETERMINISTIC`, or CUDA has not started yet and it is set now (cuBLAS reads it when
    it starts)."""
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") in CUBLAS_DETERMINISTIC:
        return True
    if "CUBLAS_WORKSPACE_CONFIG" in os.environ or torch.cuda.is_initialized():
        return False
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC[0]
    return True


@contextlib.contextmanager
def deterministic_training(device: torch.device | str = "cpu"):
    """Torch's deterministic kernels for the duration (restored after).

    The backward of the edge head's gathers (``proj[nbr]``) accumulates into shared rows from many
    threads; the order of those float additions varied between runs, so two fits with one seed gave
    different weights. The deterministic kernels cost nothing measurable here (CPU, 20K rows, 2
    epochs: 19-20 s either way; one H200, 50K rows: 5.2 s against 4.8-6.4 s). On CUDA, cuBLAS also
    needs ``CUBLAS_WORKSPACE_CONFIG`` before it starts (:func:`cuda_can_be_deterministic`); where a
    process started CUDA without it, GPU training stays reproducible to float tolerance only.
    """
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda") or (kind == "cuda" and not cuda_can_be_deterministic()):
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@dataclasses.dataclass
class TrainGraph:
    """Tensors of one ground-truth level graph used for training."""

    x_id: torch.Tensor  # (n, D)
    x_mean: torch.Tensor  # (n, D), the same tensor as x_id at level 0
    nbr: torch.Tensor  # (n, k) int64, -1 padded
    sim: torch.Tensor  # (n, k)
    feats: torch.Tensor  # (n, k, F)
    same: torch.Tensor  # (n, k) bool: same label as the neighbour
    denser: torch.Tensor  # (n, k) bool: valid and neighbour strictly denser (true density)
    density: torch.Tensor  # (n,) true density
    k: int
    level: int
    passes: float = 1.0  # seeds drawn per epoch, in passes over the nodes (0.5: a random half)

    @property
    def n(self) -> int:
        return self.nbr.shape[0]

    @property
    def seeds_per_epoch(self) -> int:
        return int(round(self.passes * self.n))

    def to(self, device) -> "TrainGraph":
        moved = {f: getattr(self, f).to(device) for f in ("x_id", "nbr", "sim", "feats", "same", "denser", "density")}
        moved["x_mean"] = moved["x_id"] if self.x_mean is self.x_id else self.x_mean.to(device)
        return TrainGraph(**moved, k=self.k, level=self.level, passes=self.passes)


def to_train_graph(g: LevelGraph, k: int, level: int) -> TrainGraph:
    with warnings.catch_warnings():  # read-only arrays (memory maps, Ray's object store) are only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        nbr, sim, labels, x_id = (torch.from_numpy(a) for a in (g.nbr, g.sim, g.labels, g.x_id))
        x_mean = x_id if g.is_base else torch.from_numpy(g.x_mean)
        feats = g.edge_features()
    valid = nbr >= 0
    density = ground_truth_density(labels, nbr, sim)
    return TrainGraph(
        x_id=x_id,
        x_mean=x_mean,
        nbr=nbr,
        sim=sim,
        feats=feats,
        same=(labels[nbr.clamp_min(0)] == labels[:, None]) & valid,
        denser=valid & (density[nbr.clamp_min(0)] > density[:, None]),
        density=density,
        k=k,
        level=level,
    )


#: Levels of the ground-truth hierarchy that are trained on. Its level 1 already joins every pair of
#: same-class nodes that the kNN graph connects, so the graphs above hold almost only negatives (0.2 %
#: positive edges at level 2, size20 regime) among similar super-nodes, and teach the opposite of what
#: inference needs: an edge classifier trained on ground-truth level 2 ranked the edges of a test
#: table's level 1 with ROC AUC 0.34, one trained on level 1 with 0.88. Higher levels come from
#: self-training (:func:`self_training_graphs`).
GROUND_TRUTH_LEVELS = 2
#: Self-training: passes per epoch over the model's own level graphs, and over the level-0 graphs.
#: The levels above 0 hold a fraction of level 0's nodes; with one pass each they stayed undertrained
#: (test level-1 edges: ROC AUC 0.868 against 0.93 of gradient-boosted trees on the same edge
#: features); three passes with half of level 0 gave 0.897 at no more training time (size20: level-1
#: Fp 0.726 -> 0.798; size5 0.786 where one pass of own levels with all of level 0 gave 0.77).
OWN_LEVEL_PASSES = 3.0
BASE_LEVEL_PASSES = 0.5


def self_training_graphs(graphs: list[TrainGraph], own: list[TrainGraph]) -> list[TrainGraph]:
    """The training graphs of the self-training phase: the ground-truth ``graphs`` and the model's
    ``own`` higher levels, with their passes per epoch (:data:`OWN_LEVEL_PASSES`,
    :data:`BASE_LEVEL_PASSES`). New objects: the tensors are shared, the inputs are unchanged."""
    base = [dataclasses.replace(g, passes=BASE_LEVEL_PASSES) if g.level == 0 else g for g in graphs]
    return base + [dataclasses.replace(g, passes=OWN_LEVEL_PASSES) for g in own]


#: Identity subsampling: each class of the training copy keeps ``ceil(n * u ** SUBSAMPLE_POWER)`` of its
#: n rows (u uniform per class, at least one row): a third of an identity's rows on average, a tenth or
#: less for a third of the identities.
SUBSAMPLE_POWER = 2.0
#: The copy's share of the table's rows, roughly (0.38 of make_faces' mean identity size 60, more where
#: identities are small: a singleton stays whole); the training job's estimate counts it.
SUBSAMPLE_SHARE = 0.4


def subsampled_identities(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded copy of a labelled table in which every class keeps a random share of its rows.

    A model trained on one table learns that table's identity sizes, its level-1 fragments and how
    crowded a row's neighbourhood is; the tables it clusters have others (smaller identities, more of a
    row's neighbours from other identities). Training also on this copy, where every identity keeps
    ``ceil(n * u ** SUBSAMPLE_POWER)`` of its n rows (u uniform, drawn per class; at least one row, so
    every identity stays), shows it those.

    Shapes:
        x (N, D), y (N,) -> x_sub (M, D), y_sub (M,), rows in the table's order.
    """
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    kept = np.maximum(1, np.ceil(counts * rng.random(classes.size) ** SUBSAMPLE_POWER)).astype(np.int64)
    order = np.lexsort((rng.random(y.shape[0]), inverse))  # by class, in random order within each
    rank = np.empty(y.shape[0], dtype=np.int64)
    rank[order] = np.arange(y.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
    keep = rank < kept[inverse]
    return x[keep], y[keep]


def training_tables(x: np.ndarray, y: np.ndarray, *, subsample: bool, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The labelled tables a model is trained on: ``(x, y)``, and with ``subsample`` its
    :func:`subsampled_identities` copy (when that keeps more than one row)."""
    tables = [(x, y)]
    if subsample:
        x_sub, y_sub = subsampled_identities(x, y, seed)
        if x_sub.shape[0] > 1:
            tables.append((x_sub, y_sub))
    return tables


def ground_truth_graphs(
    x: np.ndarray, y: np.ndarray, settings: tuple[tuple[int, int], ...], *, knn_method: str = "auto", seed: int = 0,
    first_graph: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[TrainGraph]:
    """Level graphs of the ground-truth hierarchies for several (k, levels) settings, at most
    :data:`GROUND_TRUTH_LEVELS` levels each.

    The level-0 kNN search runs once at the largest k; smaller k take its first columns.
    ``first_graph``: a precomputed level-0 graph (nbr, sim) of at least the largest k (e.g. from the
    distributed sharded kNN); the search is then skipped.
    """
    k_max = max(k for k, _ in settings)
    t0 = time.perf_counter()
    if first_graph is not None and first_graph[0].shape[1] < k_max:
        raise ValueError(f"first_graph has {first_graph[0].shape[1]} neighbours per row, k={k_max} needed")
    nbr0, sim0 = first_graph if first_graph is not None else knn_graph(x, k_max, method=knn_method, seed=seed)
    log.info("training kNN graph: %d rows, k=%d, %.1fs", x.shape[0], k_max, time.perf_counter() - t0)
    graphs: list[TrainGraph] = []
    for k, levels in settings:
        collected: list[TrainGraph] = []
        build_hierarchy(
            x,
            lambda g, level: ground_truth_parents(g),
            k=k,
            levels=min(levels, GROUND_TRUTH_LEVELS),
            early_stop=False,
            labels=y,
            knn=lambda feats, below=None, k=k: knn_graph(feats, k, method=knn_method, seed=seed, normalize=False,
                                                         below=below),
            on_level=lambda level, g, k=k: collected.append(to_train_graph(g, k, level)),
            first_graph=(np.ascontiguousarray(nbr0[:, :k]), np.ascontiguousarray(sim0[:, :k])),
        )
        graphs.extend(collected)
        log.info("ground truth k=%d: %s nodes per level", k, [c.n for c in collected])
    return graphs


def batch_loss(
    model: Lander, g: TrainGraph, seeds: torch.Tensor, *, balance: bool = True, focal_gamma: float = 0.0,
    all_edges: bool = False,
):
    """Connectivity + density loss of a batch of seed nodes of one level graph."""
    nb = g.nbr[seeds]
    valid = nb >= 0
    nodes, inverse = torch.unique(torch.cat([seeds, nb[valid]]), return_inverse=True)
    h = model.embed(g.x_id, g.x_mean, g.nbr, g.sim, nodes)
    seed_pos = inverse[: seeds.shape[0]]
    nbr_pos = torch.zeros_like(nb)
    nbr_pos[valid] = inverse[seeds.shape[0] :]
    logits = model.edge_logits(h, seed_pos, nbr_pos, g.feats[seeds])
    mask = valid if all_edges else g.denser[seeds]
    # Class balance at level 0 only: above it, the probabilities keep each level's own (falling) share
    # of same-class edges, so one threshold does not over-merge the residual, mostly negative, edges
    # of the top levels (balanced there, a test table's level-2 merges were 35 % right at p ~ 0.94).
    conn = connectivity_loss(logits, g.same[seeds], mask, balance=balance and g.level == 0, focal_gamma=focal_gamma)
    d_hat = predicted_density(torch.sigmoid(logits), g.sim[seeds], valid)
    den = torch.nn.functional.mse_loss(d_hat, g.density[seeds])
    return conn, den


def epoch_batches(graphs: list[TrainGraph], batch_size: int, gen: torch.Generator) -> list[tuple[int, torch.Tensor]]:
    """One epoch's batches ``[(graph_index, seeds)]``: each graph's ``seeds_per_epoch`` seeds (whole
    permutations of its nodes, then the start of one more) cut into batches, the batches of all graphs
    shuffled together (draws from ``gen`` in a fixed order)."""
    batches = []
    for gi, g in enumerate(graphs):
        want = g.seeds_per_epoch
        perm = torch.cat([torch.randperm(g.n, generator=gen) for _ in range(max(1, -(-want // max(g.n, 1))))])[:want]
        batches.extend((gi, perm[i : i + batch_size]) for i in range(0, want, batch_size))
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


def optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, total_steps: int):
    """AdamW and its one-cycle cosine schedule over ``total_steps`` (warm-up: the first 10 %).

    Torch divides by the warm-up's length in steps minus one, so a run of 10 steps or fewer (a few
    thousand rows) warms up over 2.5 steps instead of failing with a ZeroDivisionError.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total = max(4, total_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=total, pct_start=0.1 if total > 10 else 2.5 / total, anneal_strategy="cos"
    )
    return opt, sched


def epoch_steps(graphs: list[TrainGraph], batch_size: int) -> int:
    """Number of batches in one epoch of :func:`epoch_batches`."""
    return sum(math.ceil(g.seeds_per_epoch / batch_size) for g in graphs)


def fit_normalization(model: Lander, graphs: list[TrainGraph], gen: torch.Generator, sample: int = 20000) -> None:
    """Fit the model's input standardisation on a seeded sample of nodes of every graph."""
    from agc_ray.core.lander import node_inputs

    feats, rels = [], []
    for g in graphs:
        rows = torch.randperm(g.n, generator=gen)[:sample]
        f = g.feats[rows]
        feats.append(f[g.nbr[rows] >= 0])
        rels.append(node_inputs(g.x_id, g.x_mean, g.nbr, g.sim, rows)[1])
    model.fit_normalization(torch.cat(feats), torch.cat(rels))


def train_lander(
    model: Lander,
    graphs: list[TrainGraph],
    *,
    epochs: int,
    batch_size: int = DEFAULTS.batch_size,
    lr: float = DEFAULTS.lr,
    weight_decay: float = DEFAULTS.weight_decay,
    balance: bool = DEFAULTS.balance,
    focal_gamma: float = DEFAULTS.focal_gamma,
    seed: int = DEFAULTS.seed,
    progress: bool = False,
    all_edges: bool = DEFAULTS.conn_edges == "all",
    device: torch.device | str = "cpu",
    refit_normalization: bool = True,
) -> list[dict]:
    """Train ``model`` on all level graphs; AdamW, one-cycle cosine schedule. Returns per-epoch losses."""
    gen = torch.Generator().manual_seed(seed)
    if refit_normalization:
        fit_normalization(model, graphs, gen)
    model.to(device)
    graphs = [g.to(device) for g in graphs]
    steps_per_epoch = epoch_steps(graphs, batch_size)
    opt, sched = optimizer(model, lr=lr, weight_decay=weight_decay, total_steps=epochs * steps_per_epoch)
    history = []
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        batches = epoch_batches(graphs, batch_size, gen)
        sums = {"conn": 0.0, "den": 0.0}
        iterator = batches
        if progress:
            from tqdm import tqdm

            iterator = tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        for gi, seeds in iterator:
            seeds = seeds.to(device)
            conn, den = batch_loss(
                model, graphs[gi], seeds, balance=balance, focal_gamma=focal_gamma, all_edges=all_edges
            )
            loss = conn + den
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums["conn"] += conn.item()
            sums["den"] += den.item()
        rec = {
            "epoch": epoch + 1,
            "loss_conn": sums["conn"] / len(batches),
            "loss_den": sums["den"] / len(batches),
            "seconds": time.perf_counter() - t0,
        }
        history.append(rec)
        log.info("epoch %d/%d: conn %.4f den %.4f (%.1fs)", epoch + 1, epochs, rec["loss_conn"], rec["loss_den"], rec["seconds"])
    return history


@dataclasses.dataclass(frozen=True)
class Phase:
    """Epochs ``start`` (0-based) to ``stop`` (exclusive) of one training phase."""

    index: int
    start: int
    stop: int

    @property
    def epochs(self) -> int:
        return self.stop - self.start


def training_phases(epochs: int, self_training: bool) -> tuple[Phase, Phase | None]:
    """The training schedule: the first half of the epochs on the ground-truth levels, the rest with
    the model's own levels added (``None`` without self-training or with a single epoch)."""
    first = max(1, epochs // 2) if self_training and epochs > 1 else epochs
    return Phase(0, 0, first), (Phase(1, first, epochs) if first < epochs else None)
