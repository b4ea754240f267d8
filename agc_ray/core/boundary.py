"""Merging clusters whose boundary in the level-0 kNN graph is as tight as their insides.

Above level 0 Hi-LANDER sees a cluster through its peak and its member mean. A cluster stretched along a
direction (a manifold, an identity spread along a few axes) leaves level 0 in fragments whose peaks and
means lie far apart although the fragments touch: many of their rows are each other's nearest
neighbours, as similar to each other as to their own fragment's rows. Chameleon's relative closeness
(Karypis, Han & Kumar, IEEE Computer 1999) measures that: the mean similarity of the kNN edges across the
boundary of two clusters against that of the edges inside them, here both measured from chance, so that
the rule follows a table's scale and no absolute threshold enters. Two distinct clusters meet along a
boundary looser than their insides (their rows' nearest rows are their own).

:func:`boundary_tables` sums what the rule needs over any subset of the rows' edges (a shard's) in exact
integer arithmetic, so that partial tables added in any order give the same totals; :func:`boundary_links`
turns the totals into each cluster's merge partner; :func:`merge_boundaries` is both over one table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Share of the gap between chance and a pair's inside similarity that its boundary must reach. Chosen on
#: the levels returned at 20K rows (seed 0) of 12 make_faces regimes and a subspace generator, label-free,
#: and of four of them supervised: 0.6 joins look-alike identities (supervised 0.661 -> 0.645), 0.8
#: leaves stretched fragments apart (subspace 0.991 against 0.995 at 0.7). Requiring also a share of
#: boundary edges (Chameleon's relative interconnectivity, 0.3) spared size5's small identities 0.3
#: points but undid the anisotropic regime's gain. Regime suite, 3 seeds: see README (Quality).
BOUNDARY_CLOSENESS = 0.7
#: Similarities are summed in fixed point: integers add in any order to the same total (and through
#: float64 bincounts exactly, while a sum stays below 2^53: 5 * 10^8 edges of |s| <= 1).
_SCALE = float(1 << 24)
#: Rows whose edges are summed at once (~10 arrays of their k edges: 100 MB at k = 10), the tables added.
ROW_BLOCK = 1 << 18


@dataclass(frozen=True)
class BoundaryRule:
    """When clusters merge across a boundary: at relative ``closeness``, from the chance similarity of
    the table (:func:`~agc_ray.core.hierarchy.background_similarity` of its rows at
    :func:`~agc_ray.core.hierarchy.background_rows` for ``seed``, as the unsupervised threshold reads it)."""

    closeness: float = BOUNDARY_CLOSENESS
    seed: int = 0


@dataclass
class BoundaryTables:
    """Sums over kNN edges ``i -> j`` of rows in clusters ``a = c(i)``, ``b = c(j)``.

    Attributes:
        inside_sum, inside_count: (C,) per cluster, its inside edges' similarity sum (fixed point) and count.
        pairs: (P,) sorted keys ``a * C + b`` (a < b) of the cluster pairs joined by an edge either way.
        cross_sum, cross_count: (P,) their boundary edges' similarity sum and count.
        nearest_sum: (P,) sum over those edges of the two rows' mean nearest-neighbour similarity (the
            pair's inside similarity where neither cluster has an inside edge: two single rows).
    """

    inside_sum: np.ndarray
    inside_count: np.ndarray
    pairs: np.ndarray
    cross_sum: np.ndarray
    cross_count: np.ndarray
    nearest_sum: np.ndarray

    @property
    def n_clusters(self) -> int:
        return self.inside_sum.shape[0]


def _fixed(values: np.ndarray) -> np.ndarray:
    return np.rint(np.asarray(values, dtype=np.float64) * _SCALE).astype(np.int64)


def _total(index: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    return np.rint(np.bincount(index, weights=values, minlength=size)).astype(np.int64)


def _sum_by_key(keys: np.ndarray, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    uniq, inv = np.unique(keys, return_inverse=True)
    return (uniq, *[_total(inv, col, uniq.size) for col in columns])


def boundary_tables(nbr: np.ndarray, sim: np.ndarray, cluster: np.ndarray, nearest: np.ndarray,
                    rows: np.ndarray | None = None) -> BoundaryTables:
    """The edge sums of the rows ``rows`` (default all) of a level-0 graph, :data:`ROW_BLOCK` rows at a time.

    Args:
        nbr, sim: (M, k) the rows' neighbours (global row ids, -1 padded) and similarities.
        cluster: (N,) cluster of every row of the table (0..C-1).
        nearest: (N,) every row's nearest-neighbour similarity.
        rows: (M,) global ids of the graph's rows (default 0..M-1).

    Cost: O(M k log(M k)) (sorts of the boundary edges' keys); memory: the pairs' table and one block.
    """
    rows = np.arange(np.shape(nbr)[0]) if rows is None else np.asarray(rows)
    blocks = [_block_tables(nbr[i:i + ROW_BLOCK], sim[i:i + ROW_BLOCK], cluster, nearest, rows[i:i + ROW_BLOCK])
              for i in range(0, max(rows.size, 1), ROW_BLOCK)]
    return blocks[0] if len(blocks) == 1 else add_tables(blocks)


def _block_tables(nbr, sim, cluster, nearest, rows) -> BoundaryTables:
    nbr = np.asarray(nbr)
    n_clusters = int(cluster.max()) + 1 if cluster.size else 0
    valid = nbr >= 0
    src = np.broadcast_to(rows[:, None], nbr.shape)[valid]
    dst = nbr[valid]
    s = _fixed(np.asarray(sim)[valid])
    a, b = cluster[src], cluster[dst]
    inside = a == b
    inside_sum = _total(a[inside], s[inside], n_clusters)
    inside_count = np.bincount(a[inside], minlength=n_clusters).astype(np.int64)
    cross = ~inside
    lo, hi = np.minimum(a, b)[cross], np.maximum(a, b)[cross]
    near = _fixed((nearest[src[cross]] + nearest[dst[cross]]) / 2)
    pairs, cross_sum, cross_count, nearest_sum = _sum_by_key(
        lo.astype(np.int64) * n_clusters + hi, s[cross], np.ones(lo.size, dtype=np.int64), near)
    return BoundaryTables(inside_sum, inside_count, pairs, cross_sum, cross_count, nearest_sum)


def add_tables(parts: list[BoundaryTables]) -> BoundaryTables:
    """The sums of several row subsets' tables (over the same clusters): the whole table's, exactly."""
    pairs, cross_sum, cross_count, nearest_sum = _sum_by_key(
        np.concatenate([p.pairs for p in parts]), *[np.concatenate([getattr(p, c) for p in parts])
                                                    for c in ("cross_sum", "cross_count", "nearest_sum")])
    return BoundaryTables(sum(p.inside_sum for p in parts), sum(p.inside_count for p in parts), pairs, cross_sum,
                          cross_count, nearest_sum)


def boundary_links(t: BoundaryTables, chance: float,
                   closeness: float = BOUNDARY_CLOSENESS) -> tuple[np.ndarray, np.ndarray]:
    """Each cluster's merge partner: of the clusters it shares a boundary with at relative closeness
    ``(s_boundary - chance) / (s_inside - chance) >= closeness``, the one with the most similar boundary
    (ties: the lower id). s_inside is the mean similarity of both clusters' inside edges.

    Returns ``(a, b)``: (L,) cluster ids to join.
    """
    if t.pairs.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    c = t.n_clusters
    a, b = t.pairs // c, t.pairs % c
    in_count = t.inside_count[a] + t.inside_count[b]
    inside = np.where(in_count > 0, (t.inside_sum[a] + t.inside_sum[b]) / np.maximum(in_count, 1),
                      t.nearest_sum / t.cross_count) / _SCALE
    boundary = t.cross_sum / t.cross_count / _SCALE
    ok = (inside > chance) & (boundary - chance >= closeness * (inside - chance))
    a, b, boundary = a[ok], b[ok], boundary[ok]
    ends, other, score = np.concatenate([a, b]), np.concatenate([b, a]), np.concatenate([boundary, boundary])
    order = np.lexsort((other, -score, ends))  # per cluster: most similar boundary first, then lower id
    ends, other = ends[order], other[order]
    first = np.r_[True, ends[1:] != ends[:-1]] if ends.size else np.zeros(0, dtype=bool)
    return ends[first], other[first]


def merged_clusters(t: BoundaryTables, chance: float, closeness: float = BOUNDARY_CLOSENESS) -> tuple[np.ndarray, int]:
    """``(merged, links)``: merged (C,) the new cluster of each of the tables' C clusters (0..C'-1,
    numbered by first cluster) after :func:`boundary_links`, and how many links joined them."""
    from agc_ray.core.hierarchy import canonical_labels, weak_components

    a, b = boundary_links(t, chance, closeness)
    return canonical_labels(weak_components(a, b, t.n_clusters)), int(a.size)


def nearest_similarity(nbr: np.ndarray, sim: np.ndarray) -> np.ndarray:
    """(N,) each row's most similar valid neighbour's similarity (-inf without any)."""
    return np.where(np.asarray(nbr) >= 0, sim, -np.inf).max(axis=1)


def merge_boundaries(nbr: np.ndarray, sim: np.ndarray, cluster: np.ndarray, chance: float,
                     closeness: float = BOUNDARY_CLOSENESS,
                     nearest: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """:func:`merged_clusters` of the clusters ``cluster`` (N,) of the rows of the level-0 graph ``(nbr, sim)``
    (``nearest``: its :func:`nearest_similarity`, computed here when not given)."""
    nearest = nearest_similarity(nbr, sim) if nearest is None else nearest
    return merged_clusters(boundary_tables(nbr, sim, cluster, nearest), chance, closeness)


def largest_parts(merged: np.ndarray, cluster_rows: np.ndarray) -> np.ndarray:
    """(C',) for each merged cluster the index of its largest part among the C clusters merged by
    ``merged`` (C,) (in rows ``cluster_rows`` (C,); ties: the lower index): whose peak it keeps."""
    order = np.lexsort((np.arange(merged.size), -np.asarray(cluster_rows), merged))
    first = np.r_[True, merged[order][1:] != merged[order][:-1]]
    return order[first]
