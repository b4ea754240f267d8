"""The next level's kNN graph from the level below (agc_ray.core.coarse) against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from agc_ray.core.coarse import coarse_graph, coarse_rows, first_round_recall, out_of_reach, refine_rows
from agc_ray.core.knn import knn_graph, knn_recall, l2_normalize


def _unit(n, d, seed):
    return l2_normalize(np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32))


def _best(x, a, candidates, k):
    """Brute force: the k best of ``candidates`` for node a (similarity desc, then id asc)."""
    cand = sorted(set(int(c) for c in candidates) - {a})
    sims = [float(x[a] @ x[c]) for c in cand]
    order = sorted(range(len(cand)), key=lambda i: (-sims[i], cand[i]))[:k]
    return [cand[i] for i in order]


@pytest.fixture(scope="module")
def level_below():
    """A level-L graph over 600 nodes, their clusters (150, each non-empty) and the clusters' features."""
    rng = np.random.default_rng(0)
    n, c, k_below = 600, 150, 4
    comp = np.concatenate([np.arange(c), rng.integers(0, c, n - c)])
    nbr = rng.integers(0, n, (n, k_below))
    nbr[rng.random((n, k_below)) < 0.1] = -1  # padding
    return _unit(c, 12, 1), nbr, comp


def test_coarse_rows_are_the_best_clusters_joined_by_an_edge(level_below):
    x, nbr, comp = level_below
    k = 5
    got, sim = coarse_rows(x.__getitem__, x.shape[0], nbr, comp, k, 0, x.shape[0])
    joined = {a: set() for a in range(x.shape[0])}
    for i, row in enumerate(nbr):
        for j in row[row >= 0]:
            joined[comp[i]].add(comp[j])
            joined[comp[j]].add(comp[i])
    for a in range(x.shape[0]):
        want = _best(x, a, joined[a], k)
        assert got[a, :len(want)].tolist() == want
        assert (got[a, len(want):] == -1).all() and (sim[a, len(want):] == 0).all()
        np.testing.assert_allclose(sim[a, :len(want)], x[want] @ x[a], atol=1e-6)


def test_refine_rows_are_the_best_neighbours_of_neighbours(level_below):
    x, nbr, comp = level_below
    graph, _ = coarse_rows(x.__getitem__, x.shape[0], nbr, comp, 5, 0, x.shape[0])
    got, sim = refine_rows(x.__getitem__, graph, 0, x.shape[0])
    for a in range(x.shape[0]):
        first = graph[a][graph[a] >= 0]
        second = graph[first].ravel()
        want = _best(x, a, np.concatenate([first, second[second >= 0]]), 5)
        assert got[a, :len(want)].tolist() == want
    assert (sim[:, :-1] >= sim[:, 1:]).all()


@pytest.mark.parametrize("blocks", ["one block", "small blocks"])
def test_node_ranges_give_the_whole_graph(level_below, blocks, monkeypatch):
    """Any split of the nodes into ranges (the job's shards) gives the same rows, bit for bit, and so do
    blocks of the level-below edges and of the candidate pairs smaller than the graph."""
    from agc_ray.core import cells, coarse

    x, nbr, comp = level_below
    c = x.shape[0]
    whole = coarse_rows(x.__getitem__, c, nbr, comp, 5, 0, c)
    refined = refine_rows(x.__getitem__, whole[0], 0, c)
    if blocks == "small blocks":  # compared with the one-block graphs computed above
        monkeypatch.setattr(coarse, "EDGE_BLOCK", 7)
        # pairs in blocks of 50, the refinement 1 node a block (5 + 25 candidates)
        monkeypatch.setattr(cells, "SCRATCH_BYTES", 4 * x.shape[1] * 50)
    parts = [coarse_rows(x.__getitem__, c, nbr, comp, 5, lo, hi) for lo, hi in ((0, 37), (37, 100), (100, c))]
    for i in range(2):
        np.testing.assert_array_equal(np.concatenate([p[i] for p in parts]), whole[i])
    parts = [refine_rows(x.__getitem__, whole[0], lo, hi) for lo, hi in ((0, 64), (64, c))]
    for i in range(2):
        np.testing.assert_array_equal(np.concatenate([p[i] for p in parts]), refined[i])


def test_equal_similarities_keep_the_smaller_id_first():
    x = _unit(4, 8, 3)
    x = np.concatenate([x[:1], x[1:2], x[1:2], x[1:2]])  # nodes 1, 2, 3 identical
    nbr = np.array([[3], [2], [1], [0]])  # edges 0-3, 1-2 (and the reverse)
    comp = np.arange(4)
    got, sim = coarse_rows(x.__getitem__, 4, nbr, comp, 2, 0, 4)
    assert got[1].tolist() == [2, -1]  # only 1-2 is joined
    refined, _ = refine_rows(x.__getitem__, np.array([[3, -1], [2, -1], [3, 1], [2, 0]]), 0, 4)
    assert refined[0].tolist() == [2, 3]  # 2 (found through 3) and 3 (first hop) tie: smaller id first
    assert refined[2].tolist() == [1, 3]  # 1 and 3 tie for node 2: smaller id first


def test_nothing_merged_gives_the_exact_graph():
    """When every cluster is one node, the level below's exact graph is the answer: no round needed."""
    x = _unit(3000, 16, 4)
    nbr, sim = knn_graph(x, 8, method="exact")
    info = {}
    got = coarse_graph(x, nbr, np.arange(3000), 8, recall=0.95, seed=0, info=info)
    assert info == {"knn_method": "coarse", "knn_rounds": 0, "knn_recall": 1.0}
    np.testing.assert_array_equal(got[0], nbr)
    np.testing.assert_allclose(got[1], sim, atol=1e-6)


def test_knn_graph_uses_the_level_below_only_when_it_holds_the_recall():
    rng = np.random.default_rng(5)
    x = _unit(3000, 16, 6)
    exact = knn_graph(x, 8, method="exact")
    good, bad = {}, {}
    got = knn_graph(x, 8, method="ivf", below=(exact[0], np.arange(3000)), info=good)
    assert good["knn_method"] == "coarse" and good["knn_recall"] == 1.0
    np.testing.assert_array_equal(got[0], exact[0])
    # a level below unrelated to these features: the candidates miss, the index is searched
    got = knn_graph(x, 8, method="ivf", below=(rng.integers(0, 3000, (3000, 2)), np.arange(3000)), info=bad)
    assert bad["knn_coarse_recall"] < 0.5
    assert bad["knn_method"] in ("ivf", "exact") and bad["knn_recall"] >= 0.95
    assert knn_recall(x, got[0]) >= 0.9
    # an explicit exact search never takes the shortcut
    info = {}
    knn_graph(x, 8, method="exact", below=(exact[0], np.arange(3000)), info=info)
    assert info == {"knn_method": "exact"}


@pytest.mark.parametrize("seed", [0, 1])
def test_first_round_recall_of_a_sample_is_the_whole_graphs(level_below, seed):
    """The sampled clusters' rows alone give the recall that the whole first graph has on them."""
    from agc_ray.core.recall import exact_kth, recall_at

    x, nbr, comp = level_below
    k = 5
    rows = np.random.default_rng(seed).choice(x.shape[0], size=40, replace=False)  # unsorted, as recall_rows
    kth = exact_kth(x, rows, k)
    whole, sim = coarse_rows(x.__getitem__, x.shape[0], nbr, comp, k, 0, x.shape[0])
    expected = recall_at(sim[rows], whole[rows] >= 0, kth)
    assert 0.0 < expected < 1.0
    assert first_round_recall(x.__getitem__, x.shape[0], nbr, comp, k, rows, kth) == expected


def test_a_first_graph_out_of_reach_is_not_built(monkeypatch):
    """Far below the target (no round would be tried) the whole graph is not built: the sample says so."""
    from agc_ray.core import coarse

    rng = np.random.default_rng(5)
    x = _unit(3000, 16, 6)
    unrelated = (rng.integers(0, 3000, (3000, 2)), np.arange(3000))
    assert out_of_reach(0.95, 0.5) and not out_of_reach(0.95, 0.92) and not out_of_reach(None, 0.1)
    built = []
    monkeypatch.setattr(coarse, "coarse_rows", lambda *a, **kw: built.append(a) or coarse_rows(*a, **kw))
    info = {}
    assert coarse_graph(x, *unrelated, 8, recall=0.95, info=info) is None
    assert info["knn_recall"] < 0.5 and info["knn_rounds"] == 0 and not built
    assert coarse_graph(x, *unrelated, 8, recall=None) is not None and built  # nothing measured: built
