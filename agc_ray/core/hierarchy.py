"""Decode, components, aggregation and the level loop of Hi-LANDER, as vectorised array functions.

One level: every node keeps at most one edge, to its best *denser* candidate neighbour
(:func:`select_parents`); the resulting forest's trees are the clusters (:func:`forest_components`);
each cluster becomes a super-node of the next level (:func:`aggregate`) whose identity feature is its
peak's and whose mean feature is the mean of its original members. The loop
(:func:`build_hierarchy`) repeats until a stop rule fires and keeps every level.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from agc_ray.core.boundary import BoundaryRule, largest_parts, merge_boundaries, nearest_similarity
from agc_ray.core.cells import as_tensor, scratch_rows
from agc_ray.core.graph import edge_features, mean_valid, member_cohesion
from agc_ray.core.knn import Below, knn_graph, l2_normalize, unit_rows
from agc_ray.core.subset import split_deep

log = logging.getLogger("agc_ray")


@dataclass
class LevelGraph:
    """Nodes of one level and their kNN graph.

    Attributes:
        x_id: (n, D) unit identity features (the peak's original feature at levels > 0).
        x_sum: (n, D) sum of the original (unit) features of each node's members.
        size: (n,) number of original rows in each node.
        nbr, sim: (n, k) kNN graph (see :mod:`agc_ray.core.knn`).
        labels: (n,) class of each node (training only; a super-node takes its peak's label).
        peak_row: (n,) original row index of each node's peak.
    """

    x_id: np.ndarray
    x_sum: np.ndarray
    size: np.ndarray
    nbr: np.ndarray
    sim: np.ndarray
    peak_row: np.ndarray
    labels: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.x_id.shape[0]

    @property
    def is_base(self) -> bool:
        """True at level 0, where every node is one original row."""
        return self.x_sum is self.x_id

    def edge_features(self, **rows) -> torch.Tensor:
        """Structural edge features of this level, (n, k, F) or of ``start:stop`` rows (see
        :func:`agc_ray.core.graph.edge_features` for the keyword arguments)."""
        if self.is_base:
            return edge_features(self.nbr, self.sim, **rows)
        return edge_features(self.nbr, self.sim, self.x_mean, self.size, cohesion=self.cohesion, **rows)

    @cached_property
    def x_mean(self) -> np.ndarray:
        # At level 0 every node is its own only member: the mean is the identity feature. Cached: scoring
        # asks for the edge features of a level chunk by chunk.
        return self.x_id if self.is_base else l2_normalize(self.x_sum)

    @cached_property
    def average_links(self) -> np.ndarray:
        """(n, k) average linkage of the graph's edges (:func:`average_links`)."""
        return average_links(self.x_sum, self.size, self.nbr, lambda ids: self.x_sum[ids], lambda ids: self.size[ids])

    @cached_property
    def cohesion(self) -> np.ndarray:
        """(n,) norm of each node's member mean (:func:`~agc_ray.core.graph.member_cohesion`)."""
        return member_cohesion(self.x_sum, self.size)


def select_parents(
    score: np.ndarray | torch.Tensor,
    nbr: np.ndarray | torch.Tensor,
    density: np.ndarray | torch.Tensor,
    threshold: float | None = None,
    allowed: np.ndarray | torch.Tensor | None = None,
    *,
    start: int = 0,
) -> np.ndarray:
    """Each node's one edge: the neighbour with the highest ``score`` among its candidates.

    A candidate of node i is a valid neighbour j that is denser, ``density[j] > density[i]``, or as
    dense with a lower id (equal densities, as duplicated rows have, are ordered by id: a strict
    total order, so the edges form a forest, and duplicates still join one tree), with
    ``score[i, j] > threshold`` (when given) and ``allowed[i, j]`` (when given). Ties go to the nearer
    neighbour (lower column).

    ``score``, ``nbr`` and ``allowed`` may hold a block of rows ``start, start + 1, ...`` (global ids,
    as a shard has them) while ``density`` covers every node.

    Shapes:
        score, nbr, allowed (m, k); density (n,) -> parent (m,) int64, -1 for peaks (no candidate).
    """
    score = torch.as_tensor(score)
    nbr = torch.as_tensor(nbr)
    density = torch.as_tensor(density)
    rows = torch.arange(start, start + nbr.shape[0])
    valid = nbr >= 0
    d_nbr, d_row = density[nbr.clamp_min(0)], density[rows][:, None]
    cand = valid & ((d_nbr > d_row) | ((d_nbr == d_row) & (nbr < rows[:, None])))
    if threshold is not None:
        cand &= score > threshold
    if allowed is not None:
        cand &= torch.as_tensor(allowed)
    masked = torch.where(cand, score.to(torch.float64), torch.tensor(-np.inf, dtype=torch.float64))
    best = masked.argmax(dim=1)
    parent = torch.where(cand.any(dim=1), nbr.gather(1, best[:, None]).squeeze(1), torch.tensor(-1))
    return parent.numpy().astype(np.int64)


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0..C-1 in order of each label's first occurrence (deterministic ids)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse.ravel()]


def weak_components(src: np.ndarray, dst: np.ndarray, n: int) -> np.ndarray:
    """Weakly connected components of the directed edges ``src[e] -> dst[e]`` over nodes ``0..n-1``.

    The one graph-to-components step of the forest decode, the local and global union-find of the
    sharded job and the baselines' edge components. Components are numbered as scipy numbers them;
    :func:`canonical_labels` renumbers them by first node.

    Shapes:
        src, dst (E,) int -> comp (n,) int32.
    """
    graph = sp.csr_matrix((np.ones(src.size, dtype=np.int8), (src, dst)), shape=(n, n))
    return connected_components(graph, directed=True, connection="weak")[1]


def forest_peaks(comp: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """(C,) int64 root of each component ``comp`` (numbered 0..C-1) of a parent forest (-1: a root)."""
    roots = np.flatnonzero(parent < 0)
    peaks = np.empty(int(comp.max()) + 1 if comp.size else 0, dtype=np.int64)
    peaks[comp[roots]] = roots
    return peaks


def forest_components(parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clusters of a parent forest: connected components, numbered by their first node.

    Returns:
        ``(comp, peaks)``: comp (n,) int64 cluster of each node; peaks (C,) the root node of each
        cluster (the node with no parent; exactly one per tree).
    """
    child = np.flatnonzero(parent >= 0)
    comp = canonical_labels(weak_components(child, parent[child], parent.shape[0]))
    return comp, forest_peaks(comp, parent)


def aggregate(g: LevelGraph, comp: np.ndarray, peaks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Super-node features of the next level: the peak's identity, the members' feature sum and size.

    Returns:
        (x_id, x_sum, size, peak_row, labels) of the C super-nodes.
    """
    n_comp = peaks.shape[0]
    x_sum = from_fixed_point(fixed_point_sums(g.x_sum, comp, n_comp))
    size = np.bincount(comp, weights=g.size, minlength=n_comp).astype(np.int64)
    labels = g.labels[peaks] if g.labels is not None else None
    return g.x_id[peaks], x_sum, size, g.peak_row[peaks], labels


#: Unit of the member sums' fixed-point additions (2^-32): integer sums are exact, so a cluster's sum is
#: the same to the bit whatever the split of its members into parts and the order of the parts (the
#: job adds each shard's partial sums; the single process, every member at once). Sums stay exact up
#: to 2^31 in a component (more rows than a cluster holds); a float32 member sum loses nothing above
#: 2^-9 in magnitude.
SUM_UNIT = 2.0 ** -32


def fixed_point_sums(x: np.ndarray, index: np.ndarray, n_out: int, rows: np.ndarray | None = None) -> torch.Tensor:
    """The rows of ``x`` (or ``x[rows]``) summed by ``index`` in units of :data:`SUM_UNIT`, in blocks.

    Shapes:
        x: (N, D) float32, rows: (M,) or None (M = N), index: (M,) in [0, n_out) -> (n_out, D) int64.
    """
    out = torch.zeros((n_out, x.shape[1]), dtype=torch.int64)
    step = scratch_rows(2 * x.shape[1])  # the block's int64 rows
    for lo in range(0, index.shape[0], step):
        block = x[lo:lo + step] if rows is None else np.take(x, rows[lo:lo + step], axis=0)
        block = as_tensor(np.asarray(block, dtype=np.float32))
        out.index_add_(0, as_tensor(np.asarray(index[lo:lo + step], dtype=np.int64)),
                       torch.round(block / SUM_UNIT).to(torch.int64))  # a power of two: the product is exact
    return out


def from_fixed_point(sums: torch.Tensor) -> np.ndarray:
    """(n, D) float32 values of :func:`fixed_point_sums`' int64 sums (through float64, in blocks)."""
    out = np.empty(tuple(sums.shape), dtype=np.float32)
    step = scratch_rows(2 * sums.shape[1])
    for lo in range(0, sums.shape[0], step):
        out[lo:lo + step] = (sums[lo:lo + step].to(torch.float64) * SUM_UNIT).numpy()
    return out


def similarity_density(nbr, sim) -> torch.Tensor:
    """Label-free density: mean similarity to the valid neighbours, (n,)."""
    nbr = as_tensor(nbr)  # the job's graph parts are read-only object-store arrays, only read here
    return mean_valid(as_tensor(sim), nbr >= 0)


#: A level decoder maps a level graph to each node's parent (-1 for peaks).
LevelDecoder = Callable[[LevelGraph, int], np.ndarray]


#: With early stop, a level that merges fewer than this share of its nodes ends the hierarchy when the
#: next level decodes at no lower threshold: the next graph is nearly the same, and so is its decode
#: (1M rows: level 2 merged 1 of 46,397 nodes, and level 3 cost a kNN graph and a scoring pass to add
#: none).
MIN_MERGE_SHARE = 0.01


def next_tau_not_lower(level_tau: Callable[[int], float | None] | None, level: int) -> bool:
    """Whether level ``level + 1`` decodes at a threshold no lower than level ``level``'s (False when
    either is not known in advance, as the unsupervised schedule's)."""
    if level_tau is None:
        return False
    this, following = level_tau(level), level_tau(level + 1)
    return this is not None and following is not None and following >= this


def stop_reason(level: int, n_edges: int, prev_edges: int | None, clusters: int, *, k: int, levels: int,
                early_stop: bool, next_not_lower: bool = False) -> str | None:
    """Why the hierarchy stops after a decoded level with ``n_edges > 0`` edges (None: go on).

    The rules of :func:`build_hierarchy`: the early-stop ratio ``E_prev / E < k``; with early stop, a
    level that merged fewer than :data:`MIN_MERGE_SHARE` of its nodes when the next one decodes at no
    lower threshold (``next_not_lower``, see :func:`next_tau_not_lower`); the level budget; too few
    clusters (<= k) for the next level's kNN graph.
    """
    if early_stop and prev_edges is not None and prev_edges / n_edges < k:
        return f"early stop (E_prev / E = {prev_edges / n_edges:.2f} < k = {k})"
    nodes = clusters + n_edges
    if early_stop and next_not_lower and n_edges < MIN_MERGE_SHARE * nodes:
        return (f"{n_edges} of {nodes} nodes merged (< {MIN_MERGE_SHARE:.0%}) and the next level decodes at no "
                f"lower threshold")
    if level + 1 >= levels:
        return f"maximum of {levels} levels reached"
    if clusters <= k:
        return f"{clusters} clusters left, too few for a {k}-NN graph"
    return None


def build_hierarchy(
    x: np.ndarray,
    decode_level: LevelDecoder,
    *,
    k: int,
    levels: int,
    early_stop: bool = True,
    labels: np.ndarray | None = None,
    knn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
    on_level: Callable[[int, LevelGraph], None] | None = None,
    first_graph: tuple[np.ndarray, np.ndarray] | None = None,
    stats: list[dict] | None = None,
    level_tau: Callable[[int], float | None] | None = None,
    boundary: BoundaryRule | None = None,
    on_clusters: Callable[[int, np.ndarray], None] | None = None,
) -> list[np.ndarray]:
    """Run decode-and-aggregate level after level; return every level's labels of the original rows.

    Args:
        x: (N, D) features (normalised here).
        decode_level: ``decode_level(graph, level) -> parent`` (see :func:`select_parents`).
        k: neighbours per node.
        levels: maximum number of levels.
        early_stop: stop after a level whose added-edge count E satisfies E_prev / E < k (the
            reference's rule with its k counting the node itself, i.e. our k + 1 - 1).
        labels: (N,) classes, carried to super-nodes (ground-truth hierarchy for training).
        knn: ``knn(unit_features, below=None) -> (nbr, sim)``; ``below`` is a
            :class:`~agc_ray.core.knn.Below` above level 0 (:func:`~agc_ray.core.knn.knn_graph`'s). A
            graph with more than k columns is exact lists that deep: the level's graph is their first k,
            and the level above gets them (``Below.deep``). Default: :func:`~agc_ray.core.knn.knn_graph`
            with this k.
        on_level: called with each level's graph before it is decoded (training collects them).
        first_graph: a precomputed level-0 kNN graph (nbr, sim).
        stats: if given, one dict per decoded level is appended: nodes, edges, clusters and the
            seconds spent on its kNN graph and its decode.
        level_tau: each level's decode threshold where known in advance (for the few-merges stop rule
            of :func:`stop_reason`); None: that rule is off.
        boundary: above level 0, also merge the level's clusters whose boundary in the level-0 graph is
            as tight as their insides (:mod:`agc_ray.core.boundary`); None: the decode alone.
        on_clusters: called with each kept level's (n,) clusters of its nodes (after the boundary merge).

    Stop rules, checked after a level is kept: the level limit; a level that added no edge (not kept);
    the early-stop ratio; with early stop, too few merges for the next level at no lower threshold to
    differ; fewer than k + 1 nodes left for the next level's kNN graph.

    Returns:
        list of (N,) int64 label arrays, finest first, each a coarsening of the one before; at least
        one level (all singletons when nothing links).
    """
    x = unit_rows(x)
    n = x.shape[0]
    knn = knn or (lambda feats, below=None: knn_graph(feats, k, normalize=False, below=below))
    t0 = time.perf_counter()
    nbr, sim = first_graph if first_graph is not None else knn(x)
    knn_seconds = time.perf_counter() - t0
    g = LevelGraph(
        x_id=x, x_sum=x, size=np.ones(n, dtype=np.int64), nbr=nbr, sim=sim,
        peak_row=np.arange(n, dtype=np.int64), labels=None if labels is None else np.asarray(labels),
    )
    if boundary is not None:  # what the boundary merge of every level above reads of level 0
        level0 = (nbr, sim)
        chance = background_similarity(x[background_rows(n, boundary.seed)], seed=boundary.seed)
        nearest = nearest_similarity(nbr, sim)
    log.info("level 0 kNN graph: %d nodes, k=%d, %.1fs", n, k, time.perf_counter() - t0)
    node_of_row = np.arange(n, dtype=np.int64)
    out: list[np.ndarray] = []
    prev_edges, deep = None, None
    for level in range(levels):
        t0 = time.perf_counter()
        if on_level is not None:
            on_level(level, g)
        parent = _check_parents(decode_level(g, level), g.n)
        comp, peaks = forest_components(parent)
        links = 0
        if boundary is not None and level > 0:
            merged, links = merge_boundaries(*level0, comp[node_of_row], chance, boundary.closeness, nearest=nearest)
            comp, peaks = merged[comp], peaks[largest_parts(merged, np.bincount(comp, weights=g.size))]
        n_edges = g.n - int(peaks.size)  # forest edges, with the boundary merges
        if stats is not None:
            stats.append({"level": level, "nodes": g.n, "edges": n_edges, "knn_seconds": knn_seconds})
            if boundary is not None and level > 0:
                stats[-1]["boundary_links"] = links
        if n_edges == 0:
            log.info("level %d: no edge added, stop", level)
            break
        node_of_row = comp[node_of_row]
        out.append(node_of_row)
        if on_clusters is not None:
            on_clusters(level, comp)
        if stats is not None:
            stats[-1].update(clusters=int(peaks.size), decode_seconds=time.perf_counter() - t0)
        log.info(
            "level %d: %d nodes -> %d clusters (%d edges), %.1fs",
            level, g.n, peaks.size, n_edges, time.perf_counter() - t0,
        )
        reason = stop_reason(level, n_edges, prev_edges, int(peaks.size), k=k, levels=levels, early_stop=early_stop,
                             next_not_lower=next_tau_not_lower(level_tau, level))
        if reason:
            log.info("level %d: stop: %s", level, reason)
            break
        prev_edges = n_edges
        t0 = time.perf_counter()
        x_id, x_sum, size, peak_row, sup_labels = aggregate(g, comp, peaks)
        nbr, sim = knn(x_id, below=Below(g.nbr, comp, peaks, deep))
        nbr, sim, deep = split_deep(nbr, sim, k)
        knn_seconds = time.perf_counter() - t0
        g = LevelGraph(x_id=x_id, x_sum=x_sum, size=size, nbr=nbr, sim=sim, peak_row=peak_row, labels=sup_labels)
        log.info("level %d kNN graph: %d nodes, %.1fs", level + 1, g.n, time.perf_counter() - t0)
    if not out:
        out.append(np.arange(n, dtype=np.int64))
    return [canonical_labels(lab) for lab in out]


def _check_parents(parent: np.ndarray, n: int) -> np.ndarray:
    parent = np.asarray(parent, dtype=np.int64)
    if parent.shape != (n,):
        raise ValueError(f"decode_level returned shape {parent.shape}, expected ({n},)")
    return parent


def ground_truth_parents(g: LevelGraph) -> np.ndarray:
    """Ground-truth decode: link to the most similar same-label neighbour of higher true density."""
    from agc_ray.core.lander import ground_truth_density

    density = ground_truth_density(g.labels, g.nbr, g.sim)
    same = g.labels[np.maximum(g.nbr, 0)] == g.labels[:, None]
    return select_parents(g.sim, g.nbr, density, allowed=same)


#: Rows sampled (seeded, by global row index: the same for any sharding) and random pairs of them
#: drawn to estimate a table's background similarity.
BACKGROUND_ROWS = 4096
BACKGROUND_PAIRS = 100_000


def background_rows(n: int, seed: int) -> np.ndarray:
    """The sorted row sample of :func:`adaptive_similarity_threshold` for an n-row table."""
    from agc_ray.core.recall import sample_rows

    return sample_rows(n, BACKGROUND_ROWS, seed)


def background_similarity(x_sample: np.ndarray, *, seed: int = 0, spread: float = 3.0) -> float:
    """What two unrelated rows of a table reach by chance: median + ``spread`` robust standard
    deviations (1.4826 MAD) of the cosine similarity of random pairs of its unit rows (m, D).

    Robust statistics because a few random pairs do share a cluster (1 in 40 with 40 clusters): a high
    quantile lands among them, the median and MAD do not. O(pairs D).
    """
    m = x_sample.shape[0]
    if m < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    a = rng.integers(0, m, size=BACKGROUND_PAIRS)
    b = (a + rng.integers(1, m, size=BACKGROUND_PAIRS)) % m  # never a row with itself
    # in blocks: the gathered pairs of every block at once are 2 x 100 MB at D = 256, freshly page-faulted
    # (1.2-2.4 s at 100K rows); the same products per pair, so the same similarities
    step = scratch_rows(2 * x_sample.shape[1])  # a pair's two rows
    sims = np.concatenate([np.einsum("ij,ij->i", x_sample[a[i:i + step]], x_sample[b[i:i + step]])
                           for i in range(0, a.size, step)])
    median = float(np.median(sims))
    return median + spread * 1.4826 * float(np.median(np.abs(sims - median)))


#: Share of the gap between a level's threshold and chance that the next level keeps.
ADAPTIVE_DECAY = 0.85
#: Steps below tau_0 that the levels decoded by their peaks before the linkage level may take (see
#: :class:`AdaptiveSchedule`).
SELECTED_STEPS = 1
#: The linkage level's threshold never lies below this share of the way from chance to tau_0
#: (see :func:`linkage_threshold`).
LINKAGE_FLOOR = 0.5
#: At the linkage level an edge i -> j also needs its link within this share of j's own best link: j
#: (nearly) picks i too. Fragments of one cluster are each other's best links; a look-alike cluster is
#: a neighbour's second choice. Measured (Fp of the selected level, 12 regimes at 20K / 50K rows, one
#: seed, against no such rule): mean +0.14 / +0.38 points, look_alike 0.633 -> 0.649 / 0.613 -> 0.630,
#: ann_hard -0.2 / +0.7, largest loss anisotropic 20K -0.6; 1.0 (strictly mutual): +0.34 / +0.15 with
#: heavy_tail 50K -1.6; nine tables of other generators unchanged.
LINKAGE_MUTUAL = 0.95


def adaptive_similarity_threshold(sim: np.ndarray, x_sample: np.ndarray, *, seed: int = 0) -> tuple[float, float]:
    """Label-free level-0 threshold of a table and its chance similarity: ``(tau_0, chance)``.

    tau_0 lies halfway between chance (:func:`background_similarity` of ``x_sample``, the table's rows
    at :func:`background_rows`) and a typical nearest neighbour (median of ``sim[:, 0]``, the level-0
    kNN similarities). Both ends are measured on the table, so the threshold follows its scale (a
    table whose clusters sit at cosine 0.3 and one at 0.8 get different thresholds) instead of a
    fixed constant. Where the chance estimate reaches the neighbours (few dimensions, or a few
    clusters holding most rows), chance is the median random pair's similarity instead.
    """
    nearest = np.asarray(sim)[:, 0] if sim.ndim == 2 and sim.shape[1] else np.zeros(1, dtype=np.float32)
    nearest = float(np.median(nearest))
    chance = background_similarity(x_sample, seed=seed)
    if chance >= nearest:
        # The spread rule failed: random pairs span the whole range (a table of a few dimensions, or a
        # few clusters holding most rows), so median + 3 robust deviations lies at or above the
        # neighbours (above 1 in 2-8 dimensions), where nothing merges at any level. The typical
        # unrelated pair is then the median one.
        chance = background_similarity(x_sample, seed=seed, spread=0.0)
    return float((chance + nearest) / 2), chance


class AdaptiveSchedule:
    """Per-level thresholds of the label-free mode, from the table's ``(tau_0, chance)``.

    Levels decode at tau_0 (the table's best label-free guess) for as long as that still merges at
    least ``min_merge`` of a level's nodes. Every level above closes ``1 - decay`` more of the gap to
    chance (tau_s = chance + (tau_0 - chance) decay^s, s = 1, 2, ...), so the hierarchy keeps
    coarsening, a choice of granularity, and never reaches chance. Without ``linkage``, the selected
    level (what ``predict`` returns) is the last one decoded at most ``selected_steps`` steps below
    tau_0; with it (the default), the linkage level above that one (see below).

    Why one step: at tau_0 the levels above 0 merge fragments of one cluster at a pairwise precision
    of 0.95-0.999 but leave their recall at 0.5-0.7; one step of 0.85 trades a little precision for
    much recall. Measured (20K rows, no labels, Fp of the selected level, tau_0's level / one step
    below): 11 ``make_faces`` regimes 0.655-0.818 / 0.654-0.896, mean +0.034, none lower by more than
    0.001; four Gaussian-blob tables of another generator (32-128 dims, 400-1500 clusters, one with
    clusters in 8-dim subspaces) and scikit-learn's digits: equal or higher in all five.

    With ``linkage`` (the default), the level after those, the step below, decodes by average linkage
    (:func:`linkage_parents`) and is the selected one: an edge needs its two clusters' mean member-pair
    similarity above :func:`linkage_threshold`, that link within :data:`LINKAGE_MUTUAL` of the far
    cluster's own best link, and its peaks' similarity above this step's ``tau()`` (the guard). Why:
    at the selected peak level a true cluster is still in fragments whose peaks meet at the
    similarity of unrelated clusters' peaks (make_faces, cosine 0.35-0.49 against up to 0.42);
    the mean similarity of their members separates them better. The guard keeps look-alike clusters,
    whose members are as close as siblings, apart where their peaks are not close. Measured (Fp of the
    selected level, 30 tables: 12 ``make_faces`` regimes at 20K and 50K rows, Gaussian blobs, clusters
    on the sphere, subspace clusters, digits): mean +0.018, size5 0.706 -> 0.735, heavy_tail 0.896 ->
    0.924, one table lower by more than 0.005 (look_alike 20K, 0.654 -> 0.633; 0.649 with the
    :data:`LINKAGE_MUTUAL` rule, measured after).

    Use: ``schedule.uses_linkage()`` says which decode; ``tau = schedule.tau()``, decode, then
    ``schedule.accept(level, nodes, edges)``; False means "decode this level again": too few merges at
    tau_0 (the next ``tau()``), or none by linkage (by the peaks at the same step).
    """

    def __init__(self, tau_0: float, chance: float, *, decay: float = ADAPTIVE_DECAY, min_merge: float = 0.01,
                 selected_steps: int = SELECTED_STEPS, linkage: bool = True):
        self.tau_0, self.chance, self.decay, self.min_merge = float(tau_0), float(chance), decay, min_merge
        self.selected_steps, self.linkage = selected_steps, linkage
        self.step = 0
        self.selected_level = 0

    def tau(self) -> float:
        return float(self.chance + (self.tau_0 - self.chance) * self.decay**self.step)

    def uses_linkage(self) -> bool:
        """Whether the level being decoded decodes by average linkage (the one step after the selected
        steps)."""
        return self.linkage and self.step == self.selected_steps + 1

    def linkage_floor(self) -> float:
        """The lowest threshold of :func:`linkage_threshold`: :data:`LINKAGE_FLOOR` of the way from chance."""
        return float(self.chance + (self.tau_0 - self.chance) * LINKAGE_FLOOR)

    def selected(self, n_levels: int) -> int:
        """The selected level of a hierarchy that kept ``n_levels`` levels (its top one where the
        hierarchy stopped below the selected level)."""
        return min(self.selected_level, n_levels - 1)

    def accept(self, level: int, nodes: int, edges: int) -> bool:
        if self.step == 0:
            if edges >= max(1, self.min_merge * nodes):
                self.selected_level = level
                return True
            self.step = 1
            return False
        if self.uses_linkage() and edges == 0:
            self.linkage = False  # nothing linked: this level decodes by its peaks
            return False
        if self.step <= self.selected_steps + self.linkage:
            self.selected_level = level
        self.step += 1  # the next level goes one step further
        return True


def unsupervised_parents(g: LevelGraph, tau: float) -> np.ndarray:
    """Label-free decode: similarity density, candidates with s_ij > tau, most similar wins."""
    return select_parents(g.sim, g.nbr, similarity_density(g.nbr, g.sim), threshold=tau)


def average_links(x_sum_rows: np.ndarray, size_rows: np.ndarray, nbr: np.ndarray, x_sum_of, size_of) -> np.ndarray:
    """Average linkage of kNN edges: the mean cosine similarity of the member pairs across each edge,
    ``x_sum_i . x_sum_j / (size_i size_j)`` (at level 0, the edge's similarity).

    ``x_sum_of(ids)`` / ``size_of(ids)``: the member sums (len, D) and sizes (len,) of global node ids (a
    shard reads its halo's through them). Products of float32 in float64 are exact, so a block's sums
    match another split's to far below float32's last bit.

    Shapes:
        x_sum_rows (m, D), size_rows (m,), nbr (m, k) -> (m, k) float32, -inf on padded edges.
    """
    m, k = nbr.shape
    out = np.full((m, k), -np.inf, dtype=np.float32)
    step = scratch_rows(2 * k * max(1, x_sum_rows.shape[1]))  # a block's float64 neighbour sums
    for lo in range(0, m, step):
        nb = np.asarray(nbr[lo:lo + step])
        valid = nb >= 0
        ids = nb[valid]
        xi = np.asarray(x_sum_rows[lo:lo + step], dtype=np.float64)
        rows = np.broadcast_to(np.arange(nb.shape[0])[:, None], nb.shape)[valid]
        dots = np.einsum("ed,ed->e", xi[rows], np.asarray(x_sum_of(ids), dtype=np.float64))
        sizes = np.asarray(size_rows[lo:lo + step], dtype=np.float64)[rows] * np.asarray(size_of(ids), dtype=np.float64)
        block = out[lo:lo + step]
        block[valid] = (dots / sizes).astype(np.float32)
    return out


def node_best_links(link: np.ndarray) -> np.ndarray:
    """(m,) each node's best average link (:func:`average_links`) to a neighbour (-inf: none)."""
    return link.max(axis=1) if link.shape[1] else np.full(link.shape[0], -np.inf, np.float32)


def best_links(link: np.ndarray, size_rows: np.ndarray) -> np.ndarray:
    """Each multi-member node's best average link (:func:`average_links`) to a neighbour, (#size > 1,)
    float32; the input of :func:`linkage_threshold` (a shard's part of it)."""
    best = node_best_links(link)
    return best[(np.asarray(size_rows) > 1) & np.isfinite(best)]


def linkage_threshold(best: np.ndarray, floor: float) -> float:
    """The linkage level's threshold: the median multi-member node's best link (:func:`best_links`, all
    of a level's nodes), at least ``floor``.

    The median, because at the selected level a typical cluster is a fragment of a true one whose best
    link is to another fragment of it: half of the fragments merge, the best-linked first. The floor
    keeps a level whose clusters are already whole (their best links near chance) from merging them.
    """
    return max(float(np.median(best)) if best.size else -np.inf, float(floor))


def linkage_allowed(link, sim, nbr, best, guard: float) -> np.ndarray:
    """(m, k) the linkage level's admissible edges of m rows: peaks' similarity above ``guard``, and the
    link within :data:`LINKAGE_MUTUAL` of the far end's own best link (``best``: :func:`node_best_links`
    of every node, indexed by global id)."""
    far = np.asarray(best)[np.maximum(np.asarray(nbr), 0)]
    return (np.asarray(sim) > guard) & (link >= np.minimum(far, LINKAGE_MUTUAL * far))


def linkage_parents(g: LevelGraph, gamma: float, guard: float) -> np.ndarray:
    """Label-free decode by average linkage: similarity density; candidates whose average link
    (:func:`average_links`) exceeds ``gamma``, admitted by :func:`linkage_allowed`; the best-linked wins."""
    link = g.average_links
    return select_parents(link, g.nbr, similarity_density(g.nbr, g.sim), threshold=gamma,
                          allowed=linkage_allowed(link, g.sim, g.nbr, node_best_links(link), guard))
