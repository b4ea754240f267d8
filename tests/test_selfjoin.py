"""Exact kNN graph as a self-join (agc_ray.core.selfjoin) against brute force and faiss."""

from __future__ import annotations

import numpy as np
import pytest

from agc_ray.core import selfjoin
from agc_ray.core.knn import knn_graph, l2_normalize


def _brute(x, k):
    """Best k by inner product (self excluded), ties by smaller id; -1 / 0 padded."""
    n = x.shape[0]
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    nbr = np.full((n, k), -1, dtype=np.int64)
    sim = np.zeros((n, k), dtype=np.float32)
    for r in range(n):
        others = np.delete(np.arange(n), r)
        order = others[np.lexsort((others, -s[r, others]))][:k]
        nbr[r, :order.size], sim[r, :order.size] = order, s[r, order]
    return nbr, sim


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(selfjoin, "BLOCK", 16)


def _integer_rows(n, d, seed):
    # small integers: every product exact in float32, so many exact ties, all decided by id
    return np.random.default_rng(seed).integers(-2, 3, (n, d)).astype(np.float32)


@pytest.mark.parametrize("n", [5, 16, 50, 71])
@pytest.mark.parametrize("width", [0, 64])
def test_self_join_is_the_exact_graph_with_ties_by_id(small_blocks, n, width, monkeypatch):
    """Candidates merged padded row-wise or, above ``PADDED_MERGE_WIDTH`` a row (0: always), by one flat sort."""
    monkeypatch.setattr(selfjoin, "PADDED_MERGE_WIDTH", width)
    x = _integer_rows(n, 3, n)
    got = selfjoin.self_join_graph(x, 6)
    want = _brute(x, 6)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_any_split_into_ranges_and_shards_gives_the_same_graph(small_blocks, parts):
    """The job's split (ranges of blocks as tasks, rows merged per shard) gives the single process's graph."""
    x = _integer_rows(100, 4, 1)
    whole = selfjoin.self_join_graph(x, 5)
    ranges = selfjoin.balanced_ranges(100, parts)
    assert ranges[0][0] == 0 and ranges[-1][1] == selfjoin.n_blocks(100)
    assert all(a < b for a, b in ranges) and all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
    results = [(b0, *selfjoin.join_range(x.__getitem__, 100, 5, b0, b1)) for b0, b1 in ranges]
    shards = [(0, 33), (33, 34), (34, 100)]
    merged = [selfjoin.merge_best(100, 5, results, lo, hi) for lo, hi in shards]
    for i in range(2):
        np.testing.assert_array_equal(np.concatenate([m[i] for m in merged]), whole[i])


def test_balanced_ranges_share_the_work():
    nb = selfjoin.n_blocks(1_000_000)
    ranges = selfjoin.balanced_ranges(1_000_000, 4)
    work = [sum(nb - i for i in range(a, b)) for a, b in ranges]
    assert len(ranges) == 4 and max(work) < 1.1 * min(work)


def test_exact_knn_graph_equals_faiss_flat_search():
    import faiss

    x = l2_normalize(np.random.default_rng(3).normal(size=(9000, 32)).astype(np.float32))  # 3 blocks
    nbr, sim = knn_graph(x, 10, method="exact")
    s, i = faiss.knn(x, x, 11, metric=faiss.METRIC_INNER_PRODUCT)
    assert (nbr == i[:, 1:]).mean() > 0.999
    np.testing.assert_allclose(sim, s[:, 1:], atol=2e-6)
