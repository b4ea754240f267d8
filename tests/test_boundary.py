"""The boundary merge above level 0: exact sums over any split of the rows, the rule, and what it changes."""

import numpy as np
import pytest

from agc_ray import HiLander
from agc_ray.core.boundary import (
    BOUNDARY_CLOSENESS, add_tables, boundary_links, boundary_tables, largest_parts, merge_boundaries, nearest_similarity,
)
from agc_ray.core.knn import knn_graph
from agc_ray.core.synthetic import make_faces, make_subspace_clusters
from agc_ray.metrics.clustering import pairwise


def _graph(n=400, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 16)).astype(np.float32)
    return knn_graph(x, 6, method="exact")


def test_tables_of_row_subsets_add_up_to_the_whole(monkeypatch):
    from agc_ray.core import boundary

    nbr, sim = _graph()
    cluster = np.random.default_rng(1).integers(0, 60, nbr.shape[0])
    nearest = nearest_similarity(nbr, sim)
    whole = boundary_tables(nbr, sim, cluster, nearest)
    cuts = [0, 37, 200, 201, nbr.shape[0]]
    parts = [boundary_tables(nbr[a:b], sim[a:b], cluster, nearest, rows=np.arange(a, b)) for a, b in zip(cuts, cuts[1:])]
    monkeypatch.setattr(boundary, "ROW_BLOCK", 64)  # the whole table summed in blocks of rows
    blocked = boundary_tables(nbr, sim, cluster, nearest)
    for added in (add_tables(parts), add_tables(parts[::-1]), blocked):  # exact: any split, any order
        for name in ("inside_sum", "inside_count", "pairs", "cross_sum", "cross_count", "nearest_sum"):
            np.testing.assert_array_equal(getattr(added, name), getattr(whole, name), err_msg=name)
    # against the edges counted one by one
    a, b = cluster[np.repeat(np.arange(nbr.shape[0]), nbr.shape[1])], cluster[nbr.ravel()]
    assert whole.inside_count.sum() == (a == b).sum() and whole.cross_count.sum() == (a != b).sum()
    c = whole.n_clusters
    lo, hi = np.minimum(a, b)[a != b], np.maximum(a, b)[a != b]
    np.testing.assert_array_equal(whole.pairs, np.unique(lo * c + hi))


def test_links_join_the_halves_of_a_stretched_cluster_not_two_clusters():
    # rows along a line (each row's nearest rows are its two sides), cut in two halves; and a tight cluster
    # of its own near the line's end: the halves touch as closely as their insides, the other cluster does not
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 60)
    line = np.stack([np.cos(t), np.sin(t), np.zeros_like(t)], 1) + 0.002 * rng.normal(size=(60, 3))
    blob = np.array([np.cos(1.15), np.sin(1.15), 0.0]) + 0.01 * rng.normal(size=(30, 3))
    x = np.concatenate([line, blob]).astype(np.float32)
    nbr, sim = knn_graph(x, 5, method="exact")
    cluster = np.r_[np.zeros(30, int), np.ones(30, int), np.full(30, 2)]
    merged, links = merge_boundaries(nbr, sim, cluster, chance=0.0)
    assert links >= 1 and merged[0] == merged[1] != merged[2]
    # a boundary below the closeness asked for joins nothing
    merged, links = merge_boundaries(nbr, sim, cluster, chance=0.0, closeness=1.0)
    assert links == 0 and len(set(merged)) == 3


def test_each_cluster_keeps_one_partner_and_largest_parts_keep_their_peaks():
    nbr, sim = _graph()
    cluster = np.random.default_rng(2).integers(0, 60, nbr.shape[0])
    t = boundary_tables(nbr, sim, cluster, nearest_similarity(nbr, sim))
    a, b = boundary_links(t, chance=-1.0, closeness=0.0)  # every boundary qualifies
    assert np.unique(a).size == a.size == t.n_clusters  # one link per cluster with a boundary
    assert not np.any(a == b)
    merged = np.array([0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(largest_parts(merged, np.array([3, 5, 2, 2, 1, 7])), [1, 2, 5])


def test_merge_joins_subspace_clusters_and_leaves_faces_alone():
    x, y = make_subspace_clusters(3000, spread=(0.35, 0.6), seed=5)
    on = HiLander(unsupervised=True, knn="exact").hierarchy(x)
    off = HiLander(unsupervised=True, knn="exact", boundary_closeness=None).hierarchy(x)
    assert [s.get("boundary_links") for s in off.stats] == [None] * len(off.stats)
    assert on.stats[1]["boundary_links"] > 0
    assert pairwise(y, on.labels)[2] > pairwise(y, off.labels)[2] + 0.05
    # look-alike identities: the merge must not join them (Fp within a point of the decode alone)
    x, y = make_faces(3000, mean_identity_size=20, look_alike=0.95, group_size=12, seed=5)
    on = HiLander(unsupervised=True, knn="exact").hierarchy(x)
    off = HiLander(unsupervised=True, knn="exact", boundary_closeness=None).hierarchy(x)
    assert pairwise(y, on.labels)[2] >= pairwise(y, off.labels)[2] - 0.01
    assert HiLander().boundary_closeness == BOUNDARY_CLOSENESS


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_closeness_is_checked(bad):
    with pytest.raises(ValueError, match="boundary_closeness"):
        HiLander(unsupervised=True, boundary_closeness=bad).fit(np.random.default_rng(0).normal(size=(50, 4)))
