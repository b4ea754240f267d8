import math

import numpy as np
import pytest

from agc_ray.core.knn import knn_graph, knn_recall, l2_normalize
from agc_ray.core.synthetic import make_faces


def brute_knn(x, k):
    x = l2_normalize(x)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(s, idx, axis=1)


def test_exact_matches_brute_force():
    x, _ = make_faces(500, dim=32, seed=3)
    nbr, sim = knn_graph(x, 7, method="exact")
    ref_idx, ref_sim = brute_knn(x, 7)
    assert nbr.shape == (500, 7) and nbr.dtype == np.int64 and sim.dtype == np.float32
    np.testing.assert_allclose(sim, ref_sim, atol=1e-5)
    assert (nbr == ref_idx).mean() > 0.99  # ties aside, identical neighbours
    assert not (nbr == np.arange(500)[:, None]).any(), "self must be excluded"
    assert (np.diff(sim, axis=1) <= 1e-6).all(), "sorted by decreasing similarity"


def test_fewer_rows_than_k_pads():
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    nbr, sim = knn_graph(x, 10)
    assert nbr.shape == (4, 10)
    assert (nbr[:, :3] >= 0).all() and (nbr[:, 3:] == -1).all()
    assert (sim[:, 3:] == 0).all()
    for i in range(4):
        assert sorted(nbr[i, :3]) == sorted(set(range(4)) - {i})


def test_one_row():
    nbr, sim = knn_graph(np.ones((1, 5), dtype=np.float32), 3)
    assert (nbr == -1).all() and (sim == 0).all()


def test_duplicates_exclude_self_once():
    base = np.random.default_rng(1).standard_normal((20, 16)).astype(np.float32)
    x = np.repeat(base, 3, axis=0)  # every vector three times
    nbr, sim = knn_graph(x, 4, method="exact")
    rows = np.arange(x.shape[0])[:, None]
    assert not (nbr == rows).any()
    # the two other copies are the nearest neighbours, at similarity 1
    twins = (nbr[:, :2] // 3) == (rows // 3)
    assert twins.all()
    np.testing.assert_allclose(sim[:, :2], 1.0, atol=1e-5)


@pytest.mark.parametrize("method", ["exact", "ivf"])
def test_deterministic(method):
    x, _ = make_faces(3000, dim=32, seed=4)
    a = knn_graph(x, 10, method=method, seed=5)
    b = knn_graph(x, 10, method=method, seed=5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_ivf_recall_is_measured():
    x, _ = make_faces(5000, seed=6)
    exact, _ = knn_graph(x, 10, method="exact")
    approx, _ = knn_graph(x, 10, method="ivf")
    assert knn_recall(x, exact) == pytest.approx(1.0)
    r = knn_recall(x, approx)
    assert 0.8 < r <= 1.0


def test_bad_method():
    with pytest.raises(ValueError, match="knn method must be one of"):
        knn_graph(np.ones((3, 2), dtype=np.float32), 2, method="lsh")


def test_unit_rows_copies_only_when_needed():
    from agc_ray.core.knn import unit_rows

    x, _ = make_faces(50, dim=8, seed=0)
    assert unit_rows(x) is x  # already unit float32: no copy
    y = 3 * x
    z = unit_rows(y)
    assert z is not y and np.allclose(np.linalg.norm(z, axis=1), 1) and np.allclose(y, 3 * x)


@pytest.mark.parametrize("n,size", [(10, 3), (100, 90), (100, 200), (1_000_000, 5000)])
def test_sample_rows_distinct_sorted_seeded(n, size):
    from agc_ray.core.recall import sample_rows

    rows = sample_rows(n, size, seed=3)
    assert rows.size == min(n, size)
    assert rows.min() >= 0 and rows.max() < n
    assert (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(rows, sample_rows(n, size, seed=3))


def test_sample_rows_uniform_and_small():
    """Every row equally likely; memory follows the sample, not n (no arange(n) at n = 10^8)."""
    import tracemalloc

    from agc_ray.core.recall import sample_rows

    counts = np.zeros(500)
    for seed in range(2000):
        counts[sample_rows(500, 10, seed)] += 1
    expected = 2000 * 10 / 500
    assert abs(counts.mean() - expected) < 1e-9
    assert counts.std() < 1.5 * np.sqrt(expected)  # binomial spread; a biased sampler piles up rows
    tracemalloc.start()
    rows = sample_rows(10**8, 100_000, seed=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rows.size == 100_000 and peak < 50 * 2**20


def test_ivf_nlist_keeps_up_with_rows():
    """~4 sqrt(N) cells (powers of two) up to 1M rows, then a cell for every ~IVF_ROWS_PER_CELL rows: with
    4 sqrt(N) cells the cells fall behind the table's groups (an identity over 8.8 cells at 3M)."""
    from agc_ray.core.knn import IVF_ROWS_PER_CELL, ivf_nlist

    assert [ivf_nlist(n) for n in (10**4, 10**5, 10**6)] == [256, 1024, 4096]  # as measured up to 1M
    for n in (2 * 10**6, 3 * 10**6, 10**7, 10**8):
        cells = ivf_nlist(n)
        assert cells & (cells - 1) == 0, cells
        assert IVF_ROWS_PER_CELL / 2**0.5 <= n / cells <= IVF_ROWS_PER_CELL * 2**0.5, (n, cells)
    assert ivf_nlist(3 * 10**6) == 16384 and ivf_nlist(10**7) == 32768
    for n in (100, 800, 5000):  # small tables: at least 39 training rows a cell (faiss' minimum), 16 cells at least
        assert 16 <= ivf_nlist(n) <= max(16, n // 39)


def test_ivf_centroids_equal_faiss_ivf_training_and_report_each_iteration():
    """Iteration by iteration (for progress) gives exactly the centroids of IndexIVFFlat.train."""
    import faiss

    from agc_ray.core.knn import IVF_TRAIN_ITERATIONS, ivf_centroids, ivf_nlist

    x = l2_normalize(make_faces(6000, dim=16, seed=0)[0])
    nlist = ivf_nlist(len(x))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(16), 16, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 3
    index.train(x)
    seen = []
    np.testing.assert_array_equal(ivf_centroids(x, len(x), 3, report=seen.append), index.quantizer.reconstruct_n(0, nlist))
    assert seen == [1] * IVF_TRAIN_ITERATIONS == [1] * index.cp.niter


# -- recall target: the IVF search probes as many cells as the data needs ---------------------------
def test_ivf_meets_recall_target_on_ann_hard_data():
    from agc_ray.core.knn import ivf_nlist

    # small identities in isotropic spread: neighbours straddle cells (16 probes: recall 0.87)
    x, _ = make_faces(10000, dim=64, isotropic=1.0, mean_identity_size=5, seed=8)
    fixed = {}
    nbr_fixed, _ = knn_graph(x, 10, method="ivf", recall=None, nprobe=1, info=fixed)
    assert fixed == {"knn_method": "ivf", "knn_nprobe": 1}
    assert knn_recall(x, nbr_fixed, seed=3) < 0.9  # one cell is not enough here: the tuning has work to do
    info = {}
    nbr, sim = knn_graph(x, 10, method="ivf", recall=0.9, info=info)
    assert info["knn_method"] == "ivf" and info["knn_recall"] >= 0.9
    # the margin climbed: rows probe several cells on average, none more than the share IVF may probe
    assert info["knn_probes_mean"] > 4 and info["knn_probe_margin"] > 0 and info["knn_nprobe"] == ivf_nlist(10000) // 8
    # an independent sample (other seed, other rows) agrees with the tuning sample
    assert knn_recall(x, nbr, sample=3000, seed=11) >= 0.88


def test_target_out_of_ivf_reach_searches_exactly():
    """0.95 needs more than an eighth of the cells on this table: the graph is the exact one."""
    x, _ = make_faces(10000, dim=64, isotropic=1.0, mean_identity_size=5, seed=8)
    info = {}
    nbr, sim = knn_graph(x, 10, method="ivf", recall=0.95, info=info)
    assert info["knn_method"] == "exact" and info["knn_recall"] == 1.0 and info["knn_ivf_recall"] < 0.95
    exact_nbr, exact_sim = knn_graph(x, 10, method="exact")
    np.testing.assert_array_equal(nbr, exact_nbr)
    np.testing.assert_allclose(sim, exact_sim, atol=1e-6)


def test_widest_probing_reach_is_known_before_the_rows_cells(monkeypatch):
    """The recall of the widest probing, from the cells of the sample's exact neighbours
    (:func:`probe_reach`), is what searching the lists with it measures; a target beyond it is searched
    exactly before any row's cells are listed, with that recall reported."""
    from agc_ray.core import cells
    from agc_ray.core.cells import CellLists, cell_probes, probe_pairs
    from agc_ray.core.knn import drop_self, ivf_centroids, ivf_nlist, ivf_train_rows, unit_rows
    from agc_ray.core.recall import (RECALL_SAMPLE, exact_neighbours, kth_without_self, margin_probe_cap, probe_reach,
                                     recall_at, recall_rows)

    x = unit_rows(make_faces(10000, dim=64, isotropic=1.0, mean_identity_size=5, seed=8)[0])
    n, nlist = x.shape[0], ivf_nlist(10000)
    centroids = ivf_centroids(x[ivf_train_rows(n, 0)], n, 0)  # knn_graph's quantizer
    rows = recall_rows(n, RECALL_SAMPLE, 0)
    sim, idx = exact_neighbours(x, rows, 10)
    cap = margin_probe_cap(nlist, n)
    reach = probe_reach(x[rows], rows, sim, idx, x[idx.reshape(-1)], centroids, cap, 10)
    lists = CellLists(x, cell_probes(x, centroids, 1)[:, 0], nlist)
    found_sim, found = lists.search(x[rows], probe_pairs(cell_probes(x[rows], centroids, cap), cap), 11)
    nbr, found_sim = drop_self(found, found_sim, rows)
    assert 0.5 < reach < 0.95
    assert reach == pytest.approx(recall_at(found_sim, nbr >= 0, kth_without_self(sim, idx, rows, 10)), abs=2e-3)

    built = []
    monkeypatch.setattr(cells, "CellLists", lambda *a, **kw: built.append(1) or CellLists(*a, **kw))
    info = {}
    knn_graph(x, 10, method="ivf", recall=0.95, normalize=False, info=info)
    assert built == [] and info["knn_method"] == "exact" and info["knn_ivf_recall"] == pytest.approx(reach)
    knn_graph(x, 10, method="ivf", recall=0.5, normalize=False)
    assert built == [1]  # within reach: the lists are built and searched as before


def test_target_out_of_ivf_reach_on_a_table_too_large_for_exact_search_keeps_ivf(monkeypatch, caplog):
    """Over EXACT_FALLBACK_MAX_ROWS (5000 here) a row may probe a quarter of the cells: the 0.95 that
    an eighth missed on this table (searched exactly in the test above) is reached; 0.98 is not, and
    the IVF graph with the most probes is kept below it: the info says so and a warning says what to change."""
    from agc_ray.core import knn as core_knn
    from agc_ray.core import recall as core_recall
    from agc_ray.core.recall import probe_cap

    monkeypatch.setattr(core_recall, "EXACT_FALLBACK_MAX_ROWS", 5000)
    x, _ = make_faces(10000, dim=64, isotropic=1.0, mean_identity_size=5, seed=8)
    info = {}
    knn_graph(x, 10, method="ivf", recall=0.95, info=info)
    assert info["knn_method"] == "ivf" and info["knn_recall"] >= 0.95 and "knn_recall_target_met" not in info
    info = {}
    with caplog.at_level("WARNING", logger="agc_ray.core.knn"):
        nbr, _ = knn_graph(x, 10, method="ivf", recall=0.98, info=info)
    assert info["knn_method"] == "ivf" and info["knn_recall_target_met"] is False
    assert info["knn_nprobe"] == probe_cap(core_knn.ivf_nlist(10000), 10000, max_share=1 / 4)
    assert 0.9 < info["knn_recall"] < 0.98
    assert "below the target 0.98" in caplog.text and "--knn-recall" in caplog.text
    capped, _ = knn_graph(x, 10, method="ivf", recall=None, nprobe=info["knn_nprobe"])
    np.testing.assert_array_equal(nbr, capped)  # the graph of the capped probes, not the exact one


def test_tuned_graph_is_deterministic_and_default_target_is_used():
    x, _ = make_faces(3000, dim=32, seed=4)
    a_info, b_info = {}, {}
    a = knn_graph(x, 10, method="ivf", seed=5, info=a_info)
    b = knn_graph(x, 10, method="ivf", seed=5, info=b_info)
    np.testing.assert_array_equal(a[0], b[0])
    assert a_info == b_info and a_info["knn_recall"] >= 0.95  # KNN_RECALL by default


def test_probe_cap_bounds_the_rows_a_query_scans():
    """An eighth of the cells, and no more than IVF_MAX_SCAN_ROWS rows a query once the table's size is known."""
    from agc_ray.core.recall import IVF_MAX_SCAN_ROWS, probe_cap

    assert probe_cap(1024) == probe_cap(1024, 100_000) == 128  # 98 rows a cell: the share binds
    assert probe_cap(16384) == 2048
    ten_million = probe_cap(16384, 10_000_000)  # 610 rows a cell: the scan bound binds
    assert ten_million == IVF_MAX_SCAN_ROWS * 16384 // 10_000_000 and ten_million * 10_000_000 / 16384 <= IVF_MAX_SCAN_ROWS
    assert probe_cap(16, 10**9) == 4  # never below the first step


def test_margin_probe_share_widens_where_a_miss_keeps_the_ivf_graph():
    """An eighth of the cells a row where a miss is searched exactly, a quarter above (the mean scan
    bounds the cost there); the ladder's cap follows the table's size."""
    from agc_ray.core.recall import EXACT_FALLBACK_MAX_ROWS, PROBE_MARGINS, margin_probe_share, tune_margin

    assert margin_probe_share(0) == margin_probe_share(EXACT_FALLBACK_MAX_ROWS) == 1 / 8
    assert margin_probe_share(EXACT_FALLBACK_MAX_ROWS + 1) == 1 / 4
    kth = np.full(4, 0.5, dtype=np.float32)
    caps = []

    def search_sample(margin, nprobe):  # every neighbour found at once, 4 cells a row
        caps.append(nprobe)
        return np.zeros((4, 4), dtype=np.int64), np.full((4, 4), 0.9, dtype=np.float32), 16

    for n, cap in [(EXACT_FALLBACK_MAX_ROWS, 256), (EXACT_FALLBACK_MAX_ROWS + 1, 512)]:
        assert tune_margin(search_sample, kth, 0.95, 2048, n) == (PROBE_MARGINS[0], cap, 1.0, 4.0)
    assert caps == [256, 512]


def test_tune_nprobe_ladder():
    from agc_ray.core.recall import tune_nprobe

    kth = np.full(4, 0.5, dtype=np.float32)
    tried = []

    def search_sample(nprobe):  # recall grows with the probes: 1/4 of the neighbours per 4 cells
        tried.append(nprobe)
        sim = np.zeros((4, 4), dtype=np.float32)
        sim[:, : min(4, nprobe // 4)] = 0.9
        return np.zeros((4, 4), dtype=np.int64), sim

    assert tune_nprobe(search_sample, kth, 0.5, 64) == (8, 0.5)
    assert tried == [4, 8]
    tried.clear()
    assert tune_nprobe(search_sample, kth, 1.0, 96) == (12, 0.75)  # capped at an eighth of the cells
    assert tried == [4, 8, 12]
    tried.clear()
    assert tune_nprobe(search_sample, kth, 1.0, 12, max_share=1.0) == (12, 0.75)  # or at every cell
    assert tried == [4, 8, 12]


def test_tune_margin_ladder():
    """The first margin whose recall reaches the target; else the last tried, where the sample's mean
    probes reach the scan bound or the cap, or the last within the scan bound when a step passes it."""
    from agc_ray.core.recall import IVF_MAX_SCAN_ROWS, PROBE_MARGINS, tune_margin

    kth = np.full(4, 0.5, dtype=np.float32)
    tried = []

    def search_sample(margin, nprobe):  # a quarter of the neighbours found per margin step, 2 probes a step
        tried.append((margin, nprobe))
        sim = np.zeros((4, 4), dtype=np.float32)
        sim[:, : min(4, len(tried))] = 0.9
        return np.zeros((4, 4), dtype=np.int64), sim, 4 * min(nprobe, 2 * len(tried))

    assert tune_margin(search_sample, kth, 0.5, 64) == (PROBE_MARGINS[1], 8, 0.5, 4.0)
    assert tried == [(PROBE_MARGINS[0], 8), (PROBE_MARGINS[1], 8)]  # at most an eighth of the cells a row
    tried.clear()
    assert tune_margin(search_sample, kth, 1.0, 32) == (PROBE_MARGINS[1], 4, 0.5, 4.0)  # every row at the cap
    tried.clear()
    # 1024 cells of a table where 5 probes scan IVF_MAX_SCAN_ROWS rows: the third step's 6 would pass it,
    # the second's 4 stay within it (whatever the third's recall: here it would reach the target). Too
    # large to search exactly on a miss: a row may probe a quarter of the cells
    n = IVF_MAX_SCAN_ROWS * 1024 // 5
    tried.clear()
    assert tune_margin(search_sample, kth, 0.75, 1024, n) == (PROBE_MARGINS[1], 256, 0.5, 4.0)
    assert tried == [(PROBE_MARGINS[0], 256), (PROBE_MARGINS[1], 256), (PROBE_MARGINS[2], 256)]
    tried.clear()
    assert tune_margin(search_sample, kth, 0.75, 1024, IVF_MAX_SCAN_ROWS * 1024 // 6)[:3] == (PROBE_MARGINS[2], 256, 0.75)
    tried.clear()
    n = IVF_MAX_SCAN_ROWS * 1024 // 1  # the first margin's 2 probes already pass the scan bound: taken
    assert tune_margin(search_sample, kth, 1.0, 1024, n)[0] == PROBE_MARGINS[0]


def test_tune_margin_tries_the_widest_after_a_miss_when_exact_search_follows():
    """With exact_on_miss, a first margin that misses is followed by the widest: missed there, the
    ladder stops (no margin can reach the target); reached, the ladder goes on as without it."""
    from agc_ray.core.recall import PROBE_MARGINS, tune_margin

    kth = np.full(4, 0.5, dtype=np.float32)
    tried = []

    def sample_finding(most):  # the neighbours found grow with the margin, up to ``most`` of 4
        def search_sample(margin, nprobe):
            tried.append(margin)
            sim = np.zeros((4, 4), dtype=np.float32)
            sim[:, :min(most, PROBE_MARGINS.index(margin) + 1)] = 0.9
            return np.zeros((4, 4), dtype=np.int64), sim, 4
        return search_sample

    assert tune_margin(sample_finding(3), kth, 1.0, 1024, exact_on_miss=True) == (PROBE_MARGINS[-1], 128, 0.75, 1.0)
    assert tried == [PROBE_MARGINS[0], PROBE_MARGINS[-1]]
    tried.clear()
    assert tune_margin(sample_finding(4), kth, 1.0, 1024, exact_on_miss=True)[:3] == (PROBE_MARGINS[3], 128, 1.0)
    assert tried == [PROBE_MARGINS[0], PROBE_MARGINS[-1], *PROBE_MARGINS[1:4]]
    tried.clear()
    assert tune_margin(sample_finding(3), kth, 1.0, 1024)[2] == 0.75  # the whole ladder without it
    assert tried == list(PROBE_MARGINS)


def test_probe_pairs_take_the_cells_within_the_margin():
    """Each row's best MARGIN_MIN_PROBES cells, then the next while within the margin of its best, at
    most nprobe; the rows whose first W cells are all kept get their next ones computed again (the same
    pairs as computing all at once); no margin: the first nprobe cells."""
    from agc_ray.core.cells import MARGIN_MIN_PROBES, cell_probes, probe_pairs

    rng = np.random.default_rng(3)
    x = l2_normalize(rng.standard_normal((400, 16)).astype(np.float32))
    c = l2_normalize(rng.standard_normal((64, 16)).astype(np.float32))
    probes, gaps = cell_probes(x, c, 64, gaps=True)
    sims = x @ c.T
    np.testing.assert_allclose(gaps, sims.max(1, keepdims=True) - np.take_along_axis(sims, probes.astype(int), 1),
                               atol=1e-6)
    for margin, nprobe in [(0.0, 10), (0.1, 10), (0.3, 12), (5.0, 7), (0.0, 2)]:
        query, cell = probe_pairs(probes, nprobe, margin, gaps, x, c)
        assert (np.diff(query) >= 0).all()
        want = ((gaps <= margin) | (np.arange(64) < MARGIN_MIN_PROBES)) & (np.arange(64) < nprobe)
        np.testing.assert_array_equal(np.bincount(query, minlength=400), want.sum(1))
        np.testing.assert_array_equal(cell, probes[want])
        # the first 6 cells computed, the rest again where needed: the same pairs
        narrow = probe_pairs(probes[:, :6], nprobe, margin, gaps[:, :6], x, c)
        np.testing.assert_array_equal(narrow[0], query)
        np.testing.assert_array_equal(narrow[1], cell)
    query, cell = probe_pairs(probes, 5)
    np.testing.assert_array_equal(cell.reshape(400, 5), probes[:, :5])
    with pytest.raises(ValueError, match="8 asked"):
        probe_pairs(probes[:, :4], 8)


def test_cell_lists_search_pairs_as_dense_probes():
    """CellLists.search with (query, cell) pairs equals the search with the same cells as a dense
    (Q, P) array; -1 in a dense array probes nothing."""
    from agc_ray.core.cells import CellLists, cell_probes, probe_pairs

    x = l2_normalize(make_faces(3000, dim=32, seed=5)[0])
    c = x[np.random.default_rng(1).choice(3000, 40, replace=False)]
    probes, gaps = cell_probes(x, c, 8, gaps=True)
    lists = CellLists(x, probes[:, 0], 40)
    q = slice(0, 500)
    dense = lists.search(x[q], probes[q, :3], 11)
    pairs = lists.search(x[q], probe_pairs(probes[q], 3), 11)
    np.testing.assert_array_equal(dense[1], pairs[1])
    np.testing.assert_array_equal(dense[0], pairs[0])
    query, cell = probe_pairs(probes[q], 8, 0.05, gaps[q], x[q], c)
    padded = np.full((500, 8), -1, dtype=np.int64)
    padded[query, np.arange(query.size) - np.searchsorted(query, query)] = cell
    np.testing.assert_array_equal(lists.search(x[q], (query, cell), 11)[1], lists.search(x[q], padded, 11)[1])


@pytest.mark.parametrize("pairs_a_block", [1 << 22, 37])
def test_cell_lists_search_is_the_top_k_of_every_scanned_row(monkeypatch, pairs_a_block):
    """Against brute force over each query's probed rows: cells probed in any order (the first not the
    best), first cells with fewer than kk rows (no bound from them), many equal rows (bounds that keep
    more than kk a query), empty cells, pairs not grouped by query, queries in blocks of pairs."""
    from agc_ray.core import cells as cells_mod

    monkeypatch.setattr(cells_mod, "SEARCH_PAIRS", pairs_a_block)
    rng = np.random.default_rng(7)
    x = l2_normalize(rng.standard_normal((1500, 8)).astype(np.float32))
    x[200:260] = x[200]  # 60 equal rows
    nlist, kk = 40, 11
    cell = rng.integers(0, nlist - 1, 1500)  # the last cell stays empty
    cell[rng.choice(1500, 30, replace=False)] = 7  # ... and cell 5 holds 3 rows only
    cell[cell == 5] = 6
    cell[:3] = 5
    lists = cells_mod.CellLists(x, cell, nlist, offset=10)
    queries = np.concatenate([x[rng.choice(1500, 150, replace=False)], x[200:210]])
    query = np.repeat(np.arange(160), rng.integers(1, 9, 160))
    # each query's cells once, every fourth query's first cell the small one
    others = np.delete(np.arange(nlist), 5)
    probed = np.concatenate([np.r_[5, rng.choice(others, (query == q).sum() - 1, replace=False)] if q % 4 == 0
                             else rng.choice(nlist, (query == q).sum(), replace=False) for q in range(160)])
    shuffle = np.lexsort((np.arange(query.size), -query))  # queries in reverse order, their cells in order
    sim, ids = lists.search(queries, (query[shuffle], probed[shuffle]), kk)
    for q in range(160):
        rows = np.flatnonzero(np.isin(cell, probed[query == q]))
        ref = np.sort(queries[q] @ x[rows].T)[::-1][:kk]
        found = ids[q][ids[q] >= 0] - 10
        assert found.size == min(kk, rows.size) and np.unique(found).size == found.size
        assert np.isin(found, rows).all()
        np.testing.assert_allclose(sim[q, :found.size], ref, atol=1e-6)
        np.testing.assert_allclose(sim[q, :found.size], x[found] @ queries[q], atol=1e-6)
        assert (np.diff(sim[q, :found.size]) <= 0).all()


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_padding_sorts_after_every_id_whatever_the_id_dtype(dtype):
    """The cell lists hold int32 ids: padding (-1) becomes int64's maximum there too (numpy 2.5 raised
    OverflowError on the int32 array, which failed every tie at the k-th place on a GPU machine)."""
    from agc_ray.core.cells import last_if_padding

    ids = np.array([[7, -1, 2], [-1, -1, 0]], dtype=dtype)
    keys = last_if_padding(ids)
    assert keys.dtype == np.int64
    np.testing.assert_array_equal(keys, [[7, np.iinfo(np.int64).max, 2], [np.iinfo(np.int64).max] * 2 + [0]])


@pytest.mark.parametrize("seed", range(4))
def test_cell_lists_ties_at_the_kth_place_go_to_the_smaller_ids(seed):
    """Rows tied at a query's kk-th place: the smallest ids, whatever the cells (the Ray job's shards,
    each searched alike and merged by shard, agree with the single process only so)."""
    from agc_ray.core.cells import CellLists

    rng = np.random.default_rng(seed)
    x = l2_normalize(rng.standard_normal((400, 8)).astype(np.float32))
    copies = np.sort(rng.choice(400, 40, replace=False))
    x[copies] = x[copies[0]]
    lists = CellLists(x, rng.integers(0, 4, 400), nlist=4, offset=7)
    for kk in (5, 11, 39):
        _, ids = lists.search(x[copies[:1]], np.arange(4)[None], kk)
        np.testing.assert_array_equal(ids[0], copies[:kk] + 7)


def test_skip_ivf_searches_exactly_where_the_index_would_be_built():
    from agc_ray.core.recall import EXACT_FALLBACK_MAX_ROWS, ivf_missed

    x = l2_normalize(make_faces(3000, dim=32, seed=4)[0])
    info = {}
    graph = knn_graph(x, 10, method="ivf", normalize=False, skip_ivf=True, info=info)
    assert info == {"knn_method": "exact", "knn_recall": 1.0, "knn_ivf_skipped": True}
    exact = knn_graph(x, 10, method="exact", normalize=False)
    np.testing.assert_array_equal(graph[0], exact[0])
    # without a recall target (a fixed nprobe) the IVF index is built as asked
    info = {}
    knn_graph(x, 10, method="ivf", normalize=False, skip_ivf=True, recall=None, info=info)
    assert info["knn_method"] == "ivf"
    assert ivf_missed({"knn_ivf_recall": 0.7}) and ivf_missed({"knn_recall_target_met": False})
    assert not ivf_missed({"knn_method": "ivf", "knn_recall": 0.96}) and not ivf_missed({"knn_ivf_skipped": True})
    assert EXACT_FALLBACK_MAX_ROWS >= 3000


def test_search_excludes_self_for_scattered_query_rows():
    import faiss

    from agc_ray.core.knn import search

    x = l2_normalize(np.random.default_rng(2).standard_normal((300, 16)).astype(np.float32))
    index = faiss.IndexFlatIP(16)
    index.add(x)
    rows = np.array([250, 3, 77, 199])
    nbr, _ = search(index, x[rows], 5, query_offset=rows)
    assert not (nbr == rows[:, None]).any()
    np.testing.assert_array_equal(nbr, knn_graph(x, 5, method="exact")[0][rows])


# -- the IVF search cell by cell (core.cells) -----------------------------------------------------------
@pytest.mark.parametrize("nprobe", [1, 4, 16])
def test_cell_graph_equals_faiss_ivf_with_the_same_centroids(nprobe):
    """knn_graph's CPU IVF search (one matrix product per cell) returns the graph of faiss' IndexIVFFlat
    over the same centroids and probes: the same neighbours, ties aside, and the same similarities."""
    from agc_ray.core.knn import build_index, search, unit_rows

    x = unit_rows(make_faces(6000, dim=32, seed=11)[0])
    info = {}
    nbr, sim = knn_graph(x, 10, method="ivf", seed=2, nprobe=nprobe, normalize=False, info=info)
    ref_nbr, ref_sim = search(build_index(x, "ivf", seed=2, nprobe=nprobe), x, 10)
    assert info == {"knn_method": "ivf", "knn_nprobe": nprobe}
    assert (nbr == ref_nbr).all(axis=1).mean() >= 0.999
    np.testing.assert_allclose(np.sort(sim, axis=1), np.sort(ref_sim, axis=1), rtol=0, atol=2e-6)


def test_cell_graph_in_blocks_equals_one_block(monkeypatch):
    """Rows searched in blocks (a high nprobe's memory bound, probes computed per block) give the graph
    of one search over every row."""
    from agc_ray.core import knn

    x = knn.unit_rows(make_faces(10000, dim=32, seed=12)[0])
    # a fixed nprobe (probes of the first pass), and a tuned one above them (32: probes per block)
    for params in ({"nprobe": 24, "recall": None}, {"recall": 0.995}):
        monkeypatch.setattr(knn, "PROBE_PAIRS", 1 << 24)
        info = {}
        whole = knn_graph(x, 10, method="ivf", seed=2, normalize=False, info=info, **params)
        assert info["knn_method"] == "ivf" and info["knn_nprobe"] > knn.PROBES_FIRST_PASS
        per_row = math.ceil(2 * info["knn_probes_mean"]) if "knn_probe_margin" in info else info["knn_nprobe"]
        monkeypatch.setattr(knn, "PROBE_PAIRS", per_row * 700)  # blocks of ~700 rows, the last shorter
        blocks = knn_graph(x, 10, method="ivf", seed=2, normalize=False, **params)
        np.testing.assert_array_equal(blocks[0], whole[0])
        np.testing.assert_array_equal(blocks[1], whole[1])
        assert blocks[0].dtype == np.int64 and blocks[1].dtype == np.float32


def test_cell_probes_are_the_best_centroids_in_order():
    from agc_ray.core.cells import cell_probes

    rng = np.random.default_rng(0)
    x, c = (l2_normalize(rng.standard_normal(shape).astype(np.float32)) for shape in ((300, 16), (40, 16)))
    probes = cell_probes(x, c, 5)
    ref = np.argsort(-(x @ c.T), axis=1, kind="stable")[:, :5]
    assert probes.shape == (300, 5) and probes.dtype == np.int32
    assert (probes == ref).mean() > 0.999  # ties aside
    assert cell_probes(x, c, 100).shape == (300, 40)  # at most every cell


def test_cell_lists_search_known_answer_ties_and_padding():
    """Every probed row is scanned, equal similarities come by increasing id, ids are global, and a
    query that scans fewer than kk rows gets -1 with similarity -FLT_MAX."""
    from agc_ray.core.cells import CellLists

    x = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8], [1, 0]], dtype=np.float32)
    cells = np.array([1, 0, 1, 0, 0])
    lists = CellLists(x, cells, nlist=3, offset=100)
    np.testing.assert_array_equal(lists.cells(), cells)
    queries = np.array([[1, 0], [0, 1], [1, 0]], dtype=np.float32)
    probes = np.array([[1, 0], [0, 1], [2, 2]])  # the third probes an empty cell only
    sim, ids = lists.search(queries, probes, 4)
    np.testing.assert_array_equal(ids[0], [100, 102, 104, 103])  # three copies of [1, 0]: by id
    np.testing.assert_allclose(sim[0], [1, 1, 1, 0.6], atol=1e-6)
    assert list(ids[1, :2]) == [101, 103] and set(ids[1, 2:]) < {100, 102, 104} and ids[1, 2] < ids[1, 3]
    assert (ids[2] == -1).all() and (sim[2] == -np.finfo(np.float32).max).all()
    # one probe: the query's own cell only
    sim, ids = lists.search(queries[:1], probes[:1, :1], 4)
    np.testing.assert_array_equal(ids[0], [100, 102, -1, -1])


@pytest.mark.parametrize("per_cell", [16, 32, 64])
def test_recall_sample_is_independent_of_the_ivf_training_sample(monkeypatch, per_cell):
    """The rows that measure recall are not the quantizer's training rows (those find their neighbours
    more easily): their overlap is what two independent samples share, not the whole recall sample
    (drawn from one stream, 956 of 1000 rows were training rows at 32 a cell)."""
    from agc_ray.core import knn
    from agc_ray.core.knn import ivf_train_rows
    from agc_ray.core.recall import recall_rows

    monkeypatch.setattr(knn, "IVF_TRAIN_PER_CELL", per_cell)
    for n in (300_000, 1_000_000):
        train, rows = ivf_train_rows(n, 0), recall_rows(n, 1000, 0)
        shared = np.intersect1d(train, rows).size
        expected = rows.size * train.size / n
        assert shared < expected + 5 * np.sqrt(expected), (n, shared, expected)
