"""Exact graphs of a level's super-nodes derived from the level below's deeper exact lists."""

from __future__ import annotations

import numpy as np
import pytest

from agc_ray.core import subset
from agc_ray.core.knn import l2_normalize
from agc_ray.core.selfjoin import self_join_graph


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(0)
    return l2_normalize(rng.standard_normal((5000, 24)).astype(np.float32))


def _peaks(n: int, share: float, seed: int = 1) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, int(share * n), replace=False))


def test_derived_graph_is_the_exact_graph_of_the_subset(table):
    nbr, sim = self_join_graph(table, 20)
    peaks = _peaks(table.shape[0], 0.8)
    info = {}
    got_nbr, got_sim = subset.subset_graph(table[peaks], nbr, sim, peaks, 10, info=info)
    assert got_nbr.shape == (peaks.size, 20)
    assert info["knn_method"] == "derived" and 0 < info["knn_rescanned"] < 0.5 * peaks.size
    want_nbr, want_sim = self_join_graph(table[peaks], 20)
    np.testing.assert_array_equal(got_nbr[:, :10], want_nbr[:, :10])
    np.testing.assert_allclose(got_sim[:, :10], want_sim[:, :10], atol=1e-6)
    kept = got_nbr >= 0  # past k, a row's list holds what it kept: the exact ranks as far as it goes
    np.testing.assert_array_equal(got_nbr[kept], want_nbr[kept])
    assert (kept.sum(axis=1) >= 10).all()


def test_rescans_do_not_depend_on_how_the_blocks_are_split(table, monkeypatch):
    monkeypatch.setattr(subset, "RESCAN_BLOCK", 128)
    rows = _peaks(table.shape[0], 0.3, seed=2)
    blocks = subset.rescan_blocks(rows.size)
    assert blocks > 4
    whole = subset.rescan_rows(table.__getitem__, table.shape[0], rows, 12, 0, blocks)
    parts = [subset.rescan_rows(table.__getitem__, table.shape[0], rows, 12, a, b) for a, b in ((0, 1), (1, 4), (4, blocks))]
    np.testing.assert_array_equal(whole[0], np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(whole[1], np.concatenate([p[1] for p in parts]))
    exact = self_join_graph(table, 12)[0][rows]
    np.testing.assert_array_equal(whole[0], exact)


def test_too_many_short_rows_are_searched_afresh(table, caplog):
    from agc_ray.core.knn import Below, knn_graph

    nbr, sim = self_join_graph(table, 20)
    peaks = _peaks(table.shape[0], 0.2)  # four in five neighbours gone: nearly every row short
    assert subset.subset_graph(table[peaks], nbr, sim, peaks, 10) is None
    # knn_graph says so and searches the level afresh: the exact graph
    comp = np.searchsorted(peaks, np.arange(table.shape[0])).clip(max=peaks.size - 1)  # any clusters do here
    info = {}
    with caplog.at_level("INFO", logger="agc_ray.core.knn"):
        got_nbr, _ = knn_graph(table[peaks], 10, normalize=False, info=info,
                               below=Below(nbr[:, :10], comp, peaks, (nbr, sim)))
    assert f"kNN: {subset.searched_afresh(peaks.size)}" in caplog.text and info["knn_method"] == "exact"
    np.testing.assert_array_equal(got_nbr[:, :10], self_join_graph(table[peaks], 10)[0])


def test_lists_keep_peaks_only_renumbered_in_order():
    nbr = np.array([[1, 2, 3], [0, 3, -1], [3, 0, 1], [2, 1, 0]])
    sim = np.array([[0.9, 0.8, 0.7], [0.9, 0.5, 0.0], [0.8, 0.8, 0.6], [0.8, 0.5, 0.7]], dtype=np.float32)
    got_nbr, got_sim, kept = subset.subset_lists(nbr, sim, np.array([0, 2, 3]), 3)
    np.testing.assert_array_equal(got_nbr, [[1, 2, -1], [2, 0, -1], [1, 0, -1]])
    np.testing.assert_array_equal(got_sim, np.array([[0.8, 0.7, 0], [0.8, 0.8, 0], [0.8, 0.7, 0]], dtype=np.float32))
    np.testing.assert_array_equal(kept, [2, 2, 2])
    np.testing.assert_array_equal(subset.short_rows(kept, 3, 3), [])  # two real neighbours is all a node of three has
    np.testing.assert_array_equal(subset.short_rows(kept, 3, 4), [0, 1, 2])


def test_hierarchy_levels_derived_equal_fresh_exact_search(monkeypatch):
    """With deep lists at every level above 0 (the row limit lowered), levels 2+ are derived, exactly:
    the same labels as searching each level afresh."""
    from agc_ray import HiLander
    from agc_ray.core.synthetic import make_faces

    x, _ = make_faces(3000, mean_identity_size=4, seed=5)
    params = dict(unsupervised=True, decode="sim", knn="exact", levels=4, boundary_closeness=None)
    fresh = HiLander(**params).hierarchy(x)
    monkeypatch.setattr(subset, "DEEP_MIN_ROWS", 0)
    derived = HiLander(**params).hierarchy(x)
    methods = [st["knn_method"] for st in derived.stats]
    assert methods[:2] == ["exact", "exact"] and len(methods) >= 3 and set(methods[2:]) == {"derived"}
    assert [st["knn_method"] for st in fresh.stats] == ["exact"] * len(fresh.stats)
    assert len(fresh.levels) == len(derived.levels)
    for a, b in zip(fresh.levels, derived.levels):
        np.testing.assert_array_equal(a, b)
