"""Incremental assignment: new rows join a finished hierarchy without re-clustering its rows.

At each level, the new nodes are decoded exactly as the full run decodes a node, against the
finished level's state (:class:`BaseLevel`: its nodes' features, kNN graph, densities, clusters):

1. kNN of each new node among the base nodes and the other new nodes (top k of the union).
2. The base neighbours' lists get the new nodes that rank in their top k (the reverse of step 1's
   edges, as a kNN search over base + new would find them), so that projections, mutual-ness and
   shared-neighbour counts see the neighbourhood a full run would see; the base nodes' own decode
   (densities, parents, clusters) stays as it was.
3. Edge probabilities (or similarities, label-free), the new nodes' densities, and the one decode
   rule: each new node links to its best denser neighbour above tau, base or new (at a label-free
   run's linkage level: by average link above the run's linkage threshold, tau guarding the peaks;
   the base clusters' member sums and the threshold stay the base run's, as the model's edge features
   keep the base's sums too).
4. A tree of new nodes that ends in a base node joins that node's cluster at this level and at every
   level above; the other trees are new clusters, whose super-nodes (peak identity, member sum and
   size, as in aggregation) go on to the next level. Ties in density go to the base node (lower id).

Everything is over arrays, one process; the Ray layer (:mod:`agc_ray.distributed.assign`) loads the
state and writes the output.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from agc_ray.core.graph import edge_features, mean_valid, member_cohesion
from agc_ray.core.hierarchy import (
    LevelGraph, aggregate, average_links, forest_components, linkage_allowed, node_best_links, select_parents,
    similarity_density,
)
from agc_ray.core.knn import MarginIVF, l2_normalize, search


@dataclass
class BaseLevel:
    """The decode state of one level of a finished hierarchy (n nodes; node ids 0 .. n - 1).

    Attributes:
        x_id: (n, D) unit identity features (a super-node's peak's at levels > 0).
        x_sum: (n, D) member feature sums; None at level 0 (every node its own only member).
        size: (n,) member rows; None at level 0.
        nbr, sim: (n, k) the level's kNN graph.
        density: (n,) the densities the run decoded with.
        comp: (n,) each node's cluster at this level (the next level's node id).
        p: (n, k) the run's edge probabilities (None for a label-free run).
        index: a faiss inner-product index over ``x_id`` (ids = node ids); None: exact, built on use.
        probe_margin: (an IVF index) each query probes the cells within it of its best, at most the
            index's nprobe, as the run did (:class:`~agc_ray.core.knn.MarginIVF`); None: nprobe cells.
        linkage: the run's average-linkage threshold where this level decoded by linkage (label-free,
            :func:`~agc_ray.core.hierarchy.linkage_parents`, its tau the peaks' guard); None otherwise.
    """

    x_id: np.ndarray
    x_sum: np.ndarray | None
    size: np.ndarray | None
    nbr: np.ndarray
    sim: np.ndarray
    density: np.ndarray
    comp: np.ndarray
    p: np.ndarray | None = None
    index: object = None
    probe_margin: float | None = None
    linkage: float | None = None

    @property
    def n(self) -> int:
        return int(self.x_id.shape[0])

    @property
    def k(self) -> int:
        return int(self.nbr.shape[1])

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None):
        """``(nbr, sim)`` (m, k) of external queries among the base nodes, skipping ``exclude`` ids."""
        import faiss

        if self.index is None:
            self.index = faiss.IndexFlatIP(self.x_id.shape[1])
            self.index.add(np.ascontiguousarray(self.x_id, dtype=np.float32))
        index, ivf, params, sel = self.index, isinstance(self.index, faiss.IndexIVF), None, None
        if exclude is not None and exclude.size:
            sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.ascontiguousarray(exclude, dtype=np.int64)))
            params = faiss.SearchParametersIVF(sel=sel, nprobe=index.nprobe) if ivf else faiss.SearchParameters(sel=sel)
        if ivf and self.probe_margin is not None:
            index = MarginIVF(index, self.probe_margin, params, sel)
        elif params is not None:
            index = _WithParams(index, params, sel)
        return search(index, np.ascontiguousarray(queries, dtype=np.float32), k, query_offset=None)


class _WithParams:
    """A faiss index whose searches carry fixed search parameters (an id selector)."""

    def __init__(self, index, params, keep_alive):
        self.index, self.params, self._keep = index, params, keep_alive

    def search(self, q, k):
        return self.index.search(q, k, params=self.params)


@dataclass
class Assignment:
    """Where the new rows went, per level of the base hierarchy.

    Attributes:
        cluster: per level, (m,) int64 cluster of each new row in the base run's numbering at that
            level; ``base_clusters[l] + j`` is the j-th new cluster of level l.
        base_clusters: per level, the base's number of clusters.
        new_clusters: per level, the number of new clusters.
        joined_rows: per level, new rows that joined a base cluster at that level (first time).
        nodes: per level, the new nodes decoded there (ids ``base.n + i``) as arrays named like
            :class:`BaseLevel`'s (x_id, x_sum, size, nbr, sim, density, comp) and their peak rows
            (``peak_row``, into the new rows); None where no new node was left. Appended to the
            base's state, they make base + new a base for the next assignment.
        new_peaks: per level, (new_clusters,) the peak row (into the new rows) of each new cluster.
    """

    cluster: list
    base_clusters: list
    new_clusters: list
    joined_rows: list
    nodes: list
    new_peaks: list


def merge_neighbours(nbr_a, sim_a, nbr_b, sim_b, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k most similar of two candidate lists (-1 padding last; stable: ties to ``a``)."""
    nbr = np.concatenate([nbr_a, nbr_b], axis=1)
    sim = np.concatenate([sim_a, sim_b], axis=1).astype(np.float32)
    key = np.where(nbr >= 0, -sim.astype(np.float64), np.inf)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    nbr, sim = np.take_along_axis(nbr, order, 1), np.take_along_axis(sim, order, 1)
    sim[nbr < 0] = 0.0
    return nbr, sim


def new_node_graph(base: BaseLevel, x_q: np.ndarray, exclude: np.ndarray | None = None):
    """kNN lists of new nodes over base ids ``0 .. n - 1`` and new ids ``n + i`` (self excluded).

    Shapes:
        x_q (m, D) unit rows -> nbr (m, k) int64, sim (m, k) float32.
    """
    import faiss

    k = base.k
    nbr_b, sim_b = base.search(x_q, k, exclude)
    among = faiss.IndexFlatIP(x_q.shape[1])
    among.add(np.ascontiguousarray(x_q, dtype=np.float32))
    nbr_q, sim_q = search(among, np.ascontiguousarray(x_q, dtype=np.float32), k, query_offset=0)
    nbr_q = np.where(nbr_q >= 0, nbr_q + base.n, -1)
    return merge_neighbours(nbr_b, sim_b, nbr_q, sim_q, k)


def _reverse_lists(base: BaseLevel, rows: np.ndarray, nbr_q: np.ndarray, sim_q: np.ndarray):
    """The base ``rows``' kNN lists with the new nodes that rank in their top k inserted."""
    k = base.k
    q, col = np.nonzero((nbr_q >= 0) & (nbr_q < base.n))
    j, s = nbr_q[q, col], sim_q[q, col]
    weakest = np.where(base.nbr[j, -1] >= 0, base.sim[j, -1], -np.inf)
    enters = s > weakest
    q, j, s = q[enters], j[enters], s[enters]
    nbr, sim = base.nbr[rows].copy(), base.sim[rows].copy()
    if q.size == 0:
        return nbr, sim
    pos = np.searchsorted(rows, j)
    order = np.lexsort((-s, pos))  # per base row, most similar first
    pos, q, s = pos[order], q[order], s[order]
    rank = np.arange(pos.size) - np.searchsorted(pos, pos)
    keep = rank < k
    extra_nbr = np.full((rows.size, k), -1, np.int64)
    extra_sim = np.zeros((rows.size, k), np.float32)
    extra_nbr[pos[keep], rank[keep]] = q[keep] + base.n
    extra_sim[pos[keep], rank[keep]] = s[keep]
    return merge_neighbours(nbr, sim, extra_nbr, extra_sim, k)


@torch.no_grad()
def decode_new_nodes(model, base: BaseLevel, x_q: np.ndarray, xsum_q: np.ndarray | None, size_q: np.ndarray | None,
                     *, tau: float, mode: str, exclude: np.ndarray | None = None):
    """Parents of new nodes against one base level (see the module docstring, steps 1-3).

    Args:
        model: the :class:`~agc_ray.core.lander.Lander` of the base run, or None (label-free decode:
            similarity densities and similarities).
        x_q, xsum_q, size_q: (m, D) unit identity features, (m, D) member sums and (m,) sizes of the new
            nodes (the last two None at level 0).
        tau, mode: the base run's threshold and decode mode at this level ('prob' or 'sim'); where
            ``base.linkage`` is set (label-free linkage level), tau is the peaks' guard.

    Returns:
        ``(parent, nbr, sim, density, p)``: parent (m,) over base ids and new ids ``n + i`` (-1: a
        peak); the new nodes' kNN lists, densities and edge probabilities (None label-free).
    """
    n = base.n
    nbr_q, sim_q = new_node_graph(base, x_q, exclude)
    hop1 = np.unique(nbr_q[(nbr_q >= 0) & (nbr_q < n)])
    nbr1, sim1 = _reverse_lists(base, hop1, nbr_q, sim_q)
    if model is None:
        density_q = similarity_density(nbr_q, sim_q).numpy()
        p = p1 = None
    else:
        p, density_q, p1 = _new_node_scores(model, base, x_q, xsum_q, size_q, nbr_q, sim_q, hop1, nbr1, sim1)
    score = sim_q if model is None or mode == "sim" else p
    density = np.concatenate([np.asarray(base.density, dtype=np.float32), density_q.astype(np.float32)])
    density[hop1] = _updated_densities(base, hop1, nbr1, sim1, p1)
    _equal_duplicate_densities(density, nbr_q, sim_q, n)
    density_q = density[n:]
    if model is None and base.linkage is not None:  # the run's linkage decode; tau guards the peaks
        link, best = _new_node_links(base, x_q, xsum_q, size_q, nbr_q, hop1, nbr1)
        parent = select_parents(link, nbr_q, density, base.linkage,
                                allowed=linkage_allowed(link, sim_q, nbr_q, best, tau), start=n)
    else:
        parent = select_parents(score, nbr_q, density, tau, start=n)
    return parent, nbr_q, sim_q, density_q, p


def _new_node_links(base: BaseLevel, x_q, xsum_q, size_q, nbr_q, hop1, nbr1) -> tuple[np.ndarray, np.ndarray]:
    """``(link, best)``: (m, k) average links (:func:`~agc_ray.core.hierarchy.average_links`) of the new
    nodes' edges, to base nodes (ids < n) and new ones; (n + m,) the best link of the new nodes and of
    the base nodes ``hop1`` over their lists with the new nodes inserted (``nbr1``, as a full run would
    see them; the other base nodes are no candidates of a new node)."""
    n, m = base.n, x_q.shape[0]
    sums = _Rows(base.x_id if base.x_sum is None else base.x_sum, x_q if xsum_q is None else xsum_q)
    sizes = np.concatenate([np.ones(n, np.int64) if base.size is None else base.size,
                            np.ones(m, np.int64) if size_q is None else size_q])
    sums_of, sizes_of = (lambda ids: sums[ids].numpy()), (lambda ids: sizes[ids])
    link = average_links(sums.new, sizes[n:], nbr_q, sums_of, sizes_of)
    best = np.full(n + m, -np.inf, np.float32)
    best[n:] = node_best_links(link)
    best[hop1] = node_best_links(average_links(sums[hop1].numpy(), sizes[hop1], nbr1, sums_of, sizes_of))
    return link, best


def _updated_densities(base: BaseLevel, hop1: np.ndarray, nbr1: np.ndarray, sim1: np.ndarray, p1=None) -> np.ndarray:
    """Densities of the base nodes ``hop1`` over their lists with the new nodes inserted.

    A full run over base + new sees these lists: a node that gains a close new neighbour gets denser,
    and may then be a new node's parent where the base run's density would rule it out. Label-free:
    the mean similarity of the list. With a model: the new edges' probabilities ``p1`` (rows of hop1,
    read where the neighbour is new) and the base run's ``p`` for the edges kept (the projection of the
    node itself moves a little with its new neighbour; that second-order change is not followed).
    Nodes whose list did not change keep the base run's density exactly.
    """
    n = base.n
    changed = (nbr1 >= n).any(axis=1)
    out = np.asarray(base.density, dtype=np.float32)[hop1].copy()
    if not changed.any():
        return out
    nb, s = nbr1[changed], sim1[changed]
    valid = nb >= 0
    if p1 is None:
        out[changed] = mean_valid(torch.from_numpy(s), torch.from_numpy(valid)).numpy()
        return out
    if base.p is None:  # a state without the run's probabilities: the base densities stay
        return out
    base_nbr, base_p = base.nbr[hop1[changed]], base.p[hop1[changed]]
    pos = (nb[:, :, None] == base_nbr[:, None, :]).argmax(axis=2)
    p = np.where(nb >= n, p1[changed], np.take_along_axis(base_p, pos, axis=1))
    out[changed] = mean_valid(torch.from_numpy(s * (2 * p - 1)), torch.from_numpy(valid)).numpy()
    return out


#: Cosine above which two unit rows count as the same vector.
DUPLICATE_SIMILARITY = 1.0 - 1e-6


def _equal_duplicate_densities(density: np.ndarray, nbr_q: np.ndarray, sim_q: np.ndarray, n: int) -> None:
    """A new node that duplicates an earlier node (its nearest neighbour, lower id) takes its density.

    In a full run, duplicated rows have identical neighbourhoods and so equal densities, and the tie
    goes to the lower id (:func:`~agc_ray.core.hierarchy.select_parents`): duplicates join one tree.
    A new node's density is computed with its twin among its neighbours while the base node's was not,
    so the tie is restored here. In place on ``density`` (base nodes, then new nodes ``n + i``).
    """
    first, ids = nbr_q[:, 0], n + np.arange(nbr_q.shape[0])
    dup = (first >= 0) & (first < ids) & (sim_q[:, 0] >= DUPLICATE_SIMILARITY)
    for _ in range(8):  # chains of new duplicates settle in a few passes
        before = density[ids[dup]].copy()
        density[ids[dup]] = density[first[dup]]
        if np.array_equal(before, density[ids[dup]]):
            break


class _Rows:
    """Rows of the base nodes' features (ids < n) and the new nodes' (ids >= n) as one indexable
    (n + m, D) array, without concatenating them: ``rows[ids]`` gathers from both."""

    def __init__(self, base: np.ndarray, new: np.ndarray):
        self.base, self.new, self.n = base, new, base.shape[0]
        self.shape = (base.shape[0] + new.shape[0], base.shape[1])
        self.dtype, self.device = torch.float32, torch.device("cpu")

    def __getitem__(self, ids):
        ids = np.asarray(ids)
        out = np.empty(ids.shape + (self.shape[1],), np.float32)
        is_new = ids >= self.n
        out[~is_new] = self.base[ids[~is_new]]
        out[is_new] = self.new[ids[is_new] - self.n]
        return torch.from_numpy(out)


@torch.no_grad()
def _new_node_scores(model, base: BaseLevel, x_q, xsum_q, size_q, nbr_q, sim_q, hop1, nbr1, sim1):
    """Edge probabilities (m, k) and densities (m,) of the new nodes, and the probabilities (h, k) of the
    base neighbours' (``hop1``) edges where they point at a new node.

    Over the graph of base + new nodes (ids ``n + i``) in which the base neighbours have their lists
    ``nbr1`` (the new nodes inserted): features are gathered from the base's and the new nodes' arrays
    (never concatenated), embeddings are computed for hop1 and the new nodes only.
    """
    from agc_ray.core.inference import edge_probabilities, embedding_logits, node_embeddings
    from agc_ray.core.lander import predicted_density

    n, m = base.n, x_q.shape[0]
    nbr_all = np.concatenate([base.nbr, nbr_q])
    sim_all = np.concatenate([base.sim, sim_q]).astype(np.float32, copy=False)
    nbr_all[hop1], sim_all[hop1] = nbr1, sim1
    x_id = _Rows(base.x_id, x_q)
    if base.x_sum is None:
        x_mean, x_mean_all, size, cohesion = x_id, None, None, None
    else:  # levels above 0 hold one node per cluster: small enough to concatenate
        x_sum_all = np.concatenate([base.x_sum, xsum_q])
        x_mean_all = l2_normalize(x_sum_all)
        x_mean = torch.from_numpy(x_mean_all)
        size = np.concatenate([base.size, size_q])
        cohesion = member_cohesion(x_sum_all, size)
    nbr_t, sim_t = torch.from_numpy(nbr_all), torch.from_numpy(sim_all)
    model = model.cpu().eval()
    rows = np.concatenate([hop1, n + np.arange(m)])
    h_rows = node_embeddings(model, x_id, x_mean, nbr_t, sim_t, torch.from_numpy(rows))
    position = np.full(n + m, -1, np.int64)
    position[rows] = np.arange(rows.size)

    def h_of(ids):  # the new nodes' neighbours are hop1 or new: all embedded
        return h_rows[torch.from_numpy(position[ids.numpy()])]

    mean_sim = mean_valid(sim_t, nbr_t >= 0)
    feats = edge_features(nbr_all, sim_all, x_mean_all, size, start=n, stop=n + m, mean_sim=mean_sim, cohesion=cohesion)
    p = edge_probabilities(model, h_of, h_rows[hop1.size:], nbr_t[n:], feats)
    density = predicted_density(p, torch.from_numpy(sim_q), torch.from_numpy(nbr_q >= 0))
    # hop1's edges to new nodes (the only ones read)
    row, col = np.nonzero(nbr1 >= n)
    p1 = np.zeros(nbr1.shape, np.float32)
    if row.size:
        with_new = np.unique(row)
        feats1 = edge_features(nbr_all, sim_all, x_mean_all, size, rows=hop1[with_new], mean_sim=mean_sim,
                               cohesion=cohesion)
        f = feats1[torch.from_numpy(np.searchsorted(with_new, row)), torch.from_numpy(col)]
        nb = torch.from_numpy(nbr1[row, col])
        logits = embedding_logits(model, h_of(nb)[:, None], h_rows[torch.from_numpy(row)], f[:, None])
        p1[row, col] = torch.sigmoid(logits[:, 0]).numpy()
    return p.numpy(), density.numpy(), p1


def assign_new_rows(model, levels: list[BaseLevel], x_new: np.ndarray, taus: list[float], *, mode: str = "prob",
                    exclude: np.ndarray | None = None) -> Assignment:
    """Place new rows in every level of a finished hierarchy (see the module docstring).

    Args:
        model: the base run's Lander, or None for a label-free (unsupervised) base.
        levels: the base hierarchy's :class:`BaseLevel` states, finest first.
        x_new: (m, D) unit features of the new rows.
        taus: the base run's threshold per level.
        mode: the base run's decode mode ('prob' or 'sim'; label-free always decodes on similarity).
        exclude: level-0 base node ids that new rows may not link to (rows being replaced).

    Returns:
        :class:`Assignment`.
    """
    m = x_new.shape[0]
    cluster = [np.full(m, -1, np.int64) for _ in levels]
    base_clusters = [int(b.comp.max()) + 1 if b.n else 0 for b in levels]
    new_clusters, joined, nodes, new_peaks = [], [], [], []
    peak_q = np.arange(m)  # each new node's peak row
    node_of_row = np.arange(m)  # each still-unplaced row's new node at the current level (-1: placed)
    x_q, xsum_q, size_q = np.ascontiguousarray(x_new, dtype=np.float32), None, None
    for lvl, base in enumerate(levels):
        active = node_of_row >= 0
        if not active.any():
            new_clusters.append(0)
            joined.append(0)
            nodes.append(None)
            new_peaks.append(np.zeros(0, np.int64))
            continue
        parent, nbr_q, sim_q, density_q, p_q = decode_new_nodes(
            model, base, x_q, xsum_q, size_q, tau=taus[lvl], mode=mode if model is not None else "sim",
            exclude=exclude if lvl == 0 else None)
        n, q = base.n, x_q.shape[0]
        among = np.where(parent >= n, parent - n, -1)
        comp, peaks = forest_components(among)
        attach = parent[peaks]  # a tree's root links to a base node or to nothing
        is_new = attach < 0
        # each new node's cluster at this level: its tree's base node's, or a new one (numbered in tree order)
        node_comp = np.where(is_new, base_clusters[lvl] + np.cumsum(is_new) - 1,
                             base.comp[np.maximum(attach, 0)])[comp]
        nodes.append({"x_id": x_q, "x_sum": xsum_q, "size": size_q, "nbr": nbr_q, "sim": sim_q,
                      "density": density_q.astype(np.float32), "p": p_q, "comp": node_comp,
                      "peak_row": peak_q})
        rows = np.flatnonzero(active)
        node = node_of_row[rows]
        cluster[lvl][rows] = node_comp[node]
        joins = ~is_new[comp[node]]
        jr = rows[joins]
        for up in range(lvl + 1, len(levels)):  # joined rows follow their base cluster upwards
            cluster[up][jr] = levels[up].comp[cluster[up - 1][jr]]
        joined.append(int(jr.size))
        new_clusters.append(int(is_new.sum()))
        # the new clusters are the next level's new nodes (aggregation, as in the full run)
        keep_comp = np.flatnonzero(is_new)
        renum = np.full(peaks.size, -1, np.int64)
        renum[keep_comp] = np.arange(keep_comp.size)
        nr = rows[~joins]
        node_of_row = np.full(m, -1, np.int64)
        node_of_row[nr] = renum[comp[node[~joins]]]
        # the full run's aggregation, over the members of the new clusters
        members = np.flatnonzero(is_new[comp])
        g = LevelGraph(x_id=x_q[members], x_sum=(x_q if xsum_q is None else xsum_q)[members],
                       size=(np.ones(q, np.int64) if size_q is None else size_q)[members],
                       nbr=nbr_q[members], sim=sim_q[members], peak_row=peak_q[members])
        x_q, xsum_q, size_q, peak_q, _ = aggregate(g, renum[comp[members]], np.searchsorted(members, peaks[keep_comp]))
        new_peaks.append(peak_q)
    return Assignment(cluster, base_clusters, new_clusters, joined, nodes, new_peaks)


def hierarchy_state(est, X) -> tuple[list[np.ndarray], list[BaseLevel], list[float]]:
    """Cluster X with a fitted :class:`~agc_ray.core.estimator.HiLander` and keep what assignment needs.

    The single-process counterpart of the state the Ray job writes: the same decode as
    ``est.predict_hierarchy`` (same labels), with each level's densities and components kept.

    Returns:
        ``(labels, levels, taus)``: per kept level the (N,) labels in the run's own cluster numbering
        (``levels[l].comp`` composed), the :class:`BaseLevel` states and the thresholds used.
    """
    from agc_ray.core.hierarchy import build_hierarchy
    from agc_ray.core.inference import decode, score_level
    from agc_ray.core.knn import unit_rows

    est._check_fitted()
    x = unit_rows(np.asarray(X))
    states, taus = [], []
    decoder = est.level_decoder()
    torch.manual_seed(est.seed)

    def decode_level(g, level):
        p, info = None, {}
        if est.unsupervised:
            parent, info = decoder(g, level)
            density, tau = similarity_density(g.nbr, g.sim).numpy(), info["tau"]
        else:
            tau = est.level_tau(level)
            p, density = score_level(est.model_, g, device=est._torch_device())
            parent, density, p = decode(p, density, g.nbr, g.sim, tau=tau, mode=est.decode), density.numpy(), p.numpy()
        base = g.is_base
        states.append(BaseLevel(g.x_id, None if base else g.x_sum, None if base else g.size, g.nbr, g.sim,
                                density, forest_components(parent)[0], p, linkage=info.get("linkage")))
        taus.append(tau)
        return parent

    def clusters(level, comp):  # after the boundary merge: the clusters the levels' labels have
        states[level] = replace(states[level], comp=comp)

    kept = build_hierarchy(x, decode_level, k=est.k, levels=est.max_levels(), early_stop=est.stops_early(),
                           knn=est._knn, level_tau=est.level_tau, boundary=est.boundary_rule(), on_clusters=clusters)
    states, taus = states[:len(kept)], taus[:len(kept)]
    labels, lab = [], None
    for s in states:
        lab = s.comp if lab is None else s.comp[lab]
        labels.append(lab)
    return labels, states, taus
