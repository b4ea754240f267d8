"""Stable cluster ids (agc_ray.core.stable_ids): matching rule, fresh ids, churn counts. No Ray."""

from __future__ import annotations

import numpy as np
import pytest

from agc_ray.core.stable_ids import match_clusters, pair_counts


def _match(new_labels, old_labels, previous_ids=None, next_id=0):
    """Match per-row labels (rows shared by both runs)."""
    new_labels, old_labels = np.asarray(new_labels), np.asarray(old_labels)
    pairs = pair_counts(new_labels, old_labels)
    prev = np.unique(old_labels) if previous_ids is None else previous_ids
    return match_clusters(*pairs, int(new_labels.max()) + 1, prev, next_id)


def test_pair_counts_sums_partials():
    new, old, count = pair_counts([1, 0, 1, 1, 0], [5, 3, 5, 4, 3], [2, 1, 1, 1, 4])
    np.testing.assert_array_equal(new, [0, 1, 1])
    np.testing.assert_array_equal(old, [3, 4, 5])
    np.testing.assert_array_equal(count, [5, 1, 3])


def test_same_partition_keeps_every_id():
    old = np.array([70, 70, 12, 12, 12, 33, 5])  # earlier stable ids, any values
    new = np.array([2, 2, 0, 0, 0, 1, 3])  # the same partition, other numbering
    id_map, churn, nxt = _match(new, old, next_id=71)
    np.testing.assert_array_equal(id_map[new], old)
    assert churn["kept"] == 4 and churn["new"] == churn["merged"] == churn["split"] == churn["gone"] == 0
    assert churn["changed_row_share"] == 0.0 and churn["shared_rows"] == 7
    assert nxt == 71  # nothing issued


def test_split_keeps_the_id_on_its_largest_part():
    old = np.array([9] * 10)
    new = np.array([0] * 4 + [1] * 3 + [2] * 3)  # 40 / 30 / 30
    id_map, churn, nxt = _match(new, old, next_id=10)
    np.testing.assert_array_equal(id_map, [9, 10, 11])
    assert nxt == 12
    assert (churn["kept"], churn["new"], churn["split"], churn["gone"]) == (1, 2, 0, 0)
    assert churn["changed_rows"] == 6


def test_ties_and_merges_are_one_to_one_and_deterministic():
    # old 0 splits evenly into new 0 and 1: the tie goes to new 0.
    # old 1 and 2 (5 rows each) merge into new 2: the tie goes to old 1, which continues.
    # old 3 (2 rows) joins new 3 as a minority of old 4 (3 rows): old 3 is gone, new 3 continues old 4.
    old = np.array([0] * 4 + [1] * 5 + [2] * 5 + [3] * 2 + [4] * 3)
    new = np.array([0, 0, 1, 1] + [2] * 10 + [3] * 5)
    id_map, churn, nxt = _match(new, old, next_id=5)
    np.testing.assert_array_equal(id_map, [0, 5, 1, 4])
    assert (churn["kept"], churn["split"], churn["merged"], churn["new"], churn["gone"]) == (3, 0, 0, 1, 2)
    assert churn["previous_clusters"] == churn["kept"] + churn["split"] + churn["gone"]
    assert churn["clusters"] == churn["kept"] + churn["merged"] + churn["new"]
    assert nxt == 6


def test_split_and_merge_without_continuation():
    # old 0 and old 1 each split in two; new 1 takes the smaller halves of both: merged, not kept
    old = np.array([0] * 6 + [1] * 6)
    new = np.array([0] * 4 + [1] * 2 + [1] * 2 + [2] * 4)
    id_map, churn, _ = _match(new, old, next_id=2)
    np.testing.assert_array_equal(id_map, [0, 2, 1])
    assert (churn["kept"], churn["merged"], churn["new"], churn["split"], churn["gone"]) == (2, 1, 0, 0, 0)


def test_fresh_ids_never_reuse_retired_ids():
    # Cluster 7 existed once and is gone (only in previous_ids' history via next_id=20).
    old = np.array([3, 3, 3])
    new = np.array([0, 0, 0, 1])[:3]
    pairs = pair_counts(new, old)
    id_map, churn, nxt = match_clusters(*pairs, 2, np.array([3, 11]), next_id=20)
    assert id_map[0] == 3 and id_map[1] == 20 and nxt == 21  # cluster 1 has only new rows
    assert churn["gone"] == 1 and churn["new"] == 1
    # next_id below the largest previous id is raised past it
    id_map, _, nxt = match_clusters(*pairs, 2, np.array([3, 11]), next_id=0)
    assert id_map[1] == 12 and nxt == 13


def test_unknown_previous_cluster_is_an_error():
    pairs = pair_counts(np.array([0]), np.array([4]))
    with pytest.raises(ValueError, match="missing from the previous clusters"):
        match_clusters(*pairs, 1, np.array([1, 2]), 3)


def test_small_changes_keep_almost_every_id():
    rng = np.random.default_rng(0)
    old = np.repeat(np.arange(500), rng.integers(2, 30, 500))
    new = old.copy()
    moved = rng.choice(old.size, old.size // 50, replace=False)  # 2 % of rows change cluster
    new[moved] = rng.integers(0, 500, moved.size)
    perm = rng.permutation(500)
    id_map, churn, _ = _match(perm[new], old, next_id=500)
    assert churn["kept"] >= 490
    assert churn["changed_row_share"] < 0.05
