import numpy as np
import pytest

from agc_ray.core.hierarchy import (
    AdaptiveSchedule,
    LevelGraph,
    aggregate,
    build_hierarchy,
    canonical_labels,
    forest_components,
    select_parents,
    unsupervised_parents,
)
from agc_ray.core.inference import decode
from agc_ray.core.synthetic import make_faces

from conftest import assert_coarsening


def test_select_parents_known_answer():
    nbr = np.array([[1, 2], [2, 0], [0, 1], [2, -1]])
    density = np.array([0.1, 0.5, 0.9, 0.2])
    score = np.array([[0.7, 0.9], [0.8, 0.99], [0.9, 0.9], [0.6, 0.99]], dtype=np.float32)
    # node 0: both neighbours denser, best score 0.9 -> 2; node 1: only 2 is denser; node 2: peak;
    # node 3: only real neighbour 2 (the padded column never counts, whatever its score)
    np.testing.assert_array_equal(select_parents(score, nbr, density), [2, 2, -1, 2])
    # threshold removes node 3's only candidate (0.6) and node 0's weaker one
    np.testing.assert_array_equal(select_parents(score, nbr, density, threshold=0.65), [2, 2, -1, -1])
    # equal densities (duplicated rows) are ordered by id: the lower id is the denser, so duplicates
    # join one tree and no cycle is possible
    np.testing.assert_array_equal(select_parents(score, nbr, np.zeros(4)), [-1, 0, 0, 2])
    parent = select_parents(score, nbr, np.zeros(4))
    assert forest_components(parent)[1].tolist() == [0]
    # a block of rows 2..3 with global ids, as a shard decodes it: the same parents as the whole graph
    np.testing.assert_array_equal(select_parents(score[2:], nbr[2:], density, start=2), [-1, 2])


def test_decode_modes():
    nbr = np.array([[1, 2], [0, 2], [0, 1]])
    sim = np.array([[0.9, 0.5], [0.9, 0.7], [0.5, 0.7]], dtype=np.float32)
    p = np.array([[0.2, 0.95], [0.3, 0.9], [0.9, 0.9]], dtype=np.float32)
    density = np.array([0.0, 0.1, 0.2])
    # prob mode: node 0 picks the highest p (node 2); sim mode: the most similar (node 1)
    np.testing.assert_array_equal(decode(p, density, nbr, sim, tau=0.1, mode="prob"), [2, 2, -1])
    np.testing.assert_array_equal(decode(p, density, nbr, sim, tau=0.1, mode="sim"), [1, 2, -1])
    np.testing.assert_array_equal(decode(p, density, nbr, sim, tau=0.8, mode="sim"), [1, -1, -1])
    with pytest.raises(ValueError, match="decode mode"):
        decode(p, density, nbr, sim, tau=0.5, mode="max")


def test_forest_components_and_peaks():
    parent = np.array([2, 2, -1, -1, 3, 0])
    comp, peaks = forest_components(parent)
    np.testing.assert_array_equal(comp, [0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(peaks, [2, 3])


def test_canonical_labels_first_occurrence():
    np.testing.assert_array_equal(canonical_labels(np.array([7, 3, 7, 9, 3])), [0, 1, 0, 2, 1])


def test_aggregate_peak_identity_and_member_mean():
    x = np.eye(4, dtype=np.float32)
    g = LevelGraph(x_id=x, x_sum=x, size=np.ones(4, dtype=np.int64), nbr=np.zeros((4, 1), dtype=np.int64),
                   sim=np.zeros((4, 1), dtype=np.float32), peak_row=np.arange(4), labels=np.array([5, 5, 6, 6]))
    comp = np.array([0, 0, 1, 1])
    x_id, x_sum, size, peak_row, labels = aggregate(g, comp, np.array([1, 2]))
    np.testing.assert_array_equal(x_id, x[[1, 2]])
    np.testing.assert_array_equal(x_sum, [[1, 1, 0, 0], [0, 0, 1, 1]])
    np.testing.assert_array_equal(size, [2, 2])
    np.testing.assert_array_equal(peak_row, [1, 2])
    np.testing.assert_array_equal(labels, [5, 6])


def _scripted(edges_per_level):
    """A decoder that links the first E nodes of level l pairwise (2j+1 -> 2j): E edges, a forest."""

    def decode_level(g, level):
        parent = np.full(g.n, -1, dtype=np.int64)
        e = edges_per_level[level] if level < len(edges_per_level) else 0
        child = 2 * np.arange(e) + 1
        parent[child] = child - 1
        return parent

    return decode_level


def test_stop_rules():
    x, _ = make_faces(200, dim=16, seed=0)
    # no edge at level 0: one level of singletons
    levels = build_hierarchy(x, _scripted([0]), k=3, levels=5)
    assert len(levels) == 1 and np.unique(levels[0]).size == 200
    # level limit
    assert len(build_hierarchy(x, _scripted([50, 40, 30]), k=3, levels=2, early_stop=False)) == 2
    # early stop: 50 then 20 edges, 50 / 20 = 2.5 < k = 3 -> stop after keeping level 1
    assert len(build_hierarchy(x, _scripted([50, 20, 5]), k=3, levels=10)) == 2
    assert len(build_hierarchy(x, _scripted([50, 20, 5]), k=3, levels=10, early_stop=False)) == 3
    # 60 / 5 = 12 >= 3: no early stop; the fourth level adds nothing and is not kept
    levels = build_hierarchy(x, _scripted([60, 5, 1]), k=3, levels=10)
    assert len(levels) == 3
    assert [np.unique(lv).size for lv in levels] == [140, 135, 134]
    assert_coarsening(levels)
    # too few nodes for the next level's kNN graph (<= k): stop
    assert len(build_hierarchy(x[:8], _scripted([4, 1]), k=4, levels=10, early_stop=False)) == 1
    # fewer than 1 % of a level's nodes merged (1 of 135) and the next level at no lower threshold: stop
    # there; at a lower one (or unknown, as the unsupervised schedule's), go on
    steady, falling = (lambda level: 0.9), (lambda level: 0.9 - 0.1 * level)
    assert len(build_hierarchy(x, _scripted([60, 5, 1, 1]), k=3, levels=10, level_tau=steady)) == 3
    assert len(build_hierarchy(x, _scripted([60, 5, 1, 1]), k=3, levels=10, level_tau=steady, early_stop=False)) == 4
    assert len(build_hierarchy(x, _scripted([60, 5, 1, 1]), k=3, levels=10, level_tau=falling)) == 4
    assert len(build_hierarchy(x, _scripted([60, 5, 1, 1]), k=3, levels=10, level_tau=lambda level: None)) == 4


def test_unsupervised_hierarchy_groups_identities():
    x, y = make_faces(3000, seed=5)
    levels = build_hierarchy(x, lambda g, level: unsupervised_parents(g, 0.35), k=10, levels=5)
    assert len(levels) >= 1
    assert_coarsening(levels)
    from agc_ray.metrics import pairwise

    assert pairwise(y, levels[-1])[2] > 0.4


def test_adaptive_schedule_selects_one_step_below_tau_0():
    schedule = AdaptiveSchedule(0.6, 0.2, decay=0.5, linkage=False)
    assert schedule.tau() == 0.6
    assert schedule.accept(0, nodes=1000, edges=500)  # merges at tau_0: level 0 kept, selected
    assert schedule.selected_level == 0 and schedule.tau() == 0.6
    assert not schedule.accept(1, nodes=500, edges=2)  # under 1 %: decode level 1 again, one step down
    assert schedule.tau() == pytest.approx(0.4)
    assert schedule.accept(1, nodes=500, edges=100)
    assert schedule.selected_level == 1  # one step below tau_0
    assert schedule.tau() == pytest.approx(0.3) and not schedule.uses_linkage()
    assert schedule.accept(2, nodes=400, edges=100)
    assert schedule.selected_level == 1  # two steps below: a coarser option, not selected
    assert schedule.tau() == pytest.approx(0.25)


def test_adaptive_schedule_selects_the_linkage_level_above_one_step_below_tau_0():
    schedule = AdaptiveSchedule(0.6, 0.2, decay=0.5)
    assert schedule.linkage_floor() == pytest.approx(0.4)  # halfway from chance to tau_0
    assert schedule.accept(0, nodes=1000, edges=500) and not schedule.uses_linkage()
    assert not schedule.accept(1, nodes=500, edges=2) and not schedule.uses_linkage()  # one step down
    assert schedule.accept(1, nodes=500, edges=100) and schedule.selected_level == 1
    assert schedule.uses_linkage() and schedule.tau() == pytest.approx(0.3)  # the guard: two steps below
    assert schedule.accept(2, nodes=400, edges=100) and schedule.selected_level == 2
    assert not schedule.uses_linkage() and schedule.tau() == pytest.approx(0.25)  # the levels above: peaks again
    assert schedule.accept(3, nodes=300, edges=100) and schedule.selected_level == 2

    nothing = AdaptiveSchedule(0.6, 0.2, decay=0.5)
    assert nothing.accept(0, nodes=1000, edges=500) and not nothing.accept(1, nodes=500, edges=2)
    assert nothing.accept(1, nodes=500, edges=100)
    assert nothing.uses_linkage() and not nothing.accept(2, nodes=400, edges=0)  # no link: decode again
    assert not nothing.uses_linkage() and nothing.tau() == pytest.approx(0.3)  # by the peaks, same step
    assert nothing.accept(2, nodes=400, edges=50) and nothing.selected_level == 1


def test_linkage_decode_joins_fragments_by_their_members_not_their_peaks():
    """Two fragments of one cluster whose peaks are far apart but whose members are close merge; two
    clusters whose peaks are close but whose members are not stay apart; the guard keeps apart
    fragments whose peaks are below it, however close their members."""
    from agc_ray.core.hierarchy import average_links, best_links, linkage_parents, linkage_threshold

    e = np.eye(4, dtype=np.float32)
    x_id = e  # the peaks: orthogonal, similarity 0 between any two
    x_sum = np.stack([e[0] * 3, e[0] * 2, e[2] * 2, e[3] * 2])  # nodes 0, 1: members alike
    size = np.array([3, 2, 2, 2])
    nbr = np.array([[1, 2], [0, 3], [3, 0], [2, 1]])
    sim = np.array([[0.5, 0.45], [0.5, 0.1], [0.48, 0.45], [0.48, 0.1]], dtype=np.float32)  # peaks' similarities
    g = LevelGraph(x_id=x_id, x_sum=x_sum, size=size, nbr=nbr, sim=sim, peak_row=np.arange(4))
    link = average_links(x_sum, size, nbr, lambda ids: x_sum[ids], lambda ids: size[ids])
    assert link[0, 0] == pytest.approx(1.0) and link[2, 0] == pytest.approx(0.0)
    np.testing.assert_array_equal(link, g.average_links)
    gamma = linkage_threshold(best_links(link, size), floor=0.3)
    assert gamma == pytest.approx(0.5)  # the median of best links 1, 1, 0, 0
    parent = linkage_parents(g, gamma, guard=0.4)
    assert (parent[0] == 1 or parent[1] == 0) and parent[2] == -1 and parent[3] == -1
    assert (linkage_parents(g, gamma, guard=0.5) == -1).all()  # the peaks (0.5) not above the guard
    assert linkage_threshold(np.zeros(0, np.float32), floor=0.3) == 0.3
    assert linkage_threshold(best_links(link, size), floor=0.7) == 0.7  # the floor above the median
    singles = np.array([3, 1, 2, 1])
    np.testing.assert_array_equal(best_links(link, singles), link[[0, 2]].max(axis=1))  # multi-member nodes only


def test_linkage_edges_need_the_far_end_to_link_back_nearly_as_well():
    """An edge is admitted where its link is within LINKAGE_MUTUAL of the far end's own best link (the
    far end would pick it too) and its peaks pass the guard."""
    from agc_ray.core.hierarchy import LINKAGE_MUTUAL, linkage_allowed

    best = np.array([0.6, 0.8, 0.9, -0.2], dtype=np.float32)
    link = np.array([[0.5, 0.9, -0.2]], dtype=np.float32)
    nbr = np.array([[1, 2, 3]])
    sim = np.array([[0.7, 0.7, 0.7]], dtype=np.float32)
    assert 0.5 < LINKAGE_MUTUAL * 0.8 <= 0.9 * LINKAGE_MUTUAL < 0.9
    np.testing.assert_array_equal(linkage_allowed(link, sim, nbr, best, guard=0.6), [[False, True, True]])
    np.testing.assert_array_equal(linkage_allowed(link, sim, nbr, best, guard=0.7), [[False, False, False]])


def test_linkage_level_that_links_nothing_decodes_by_its_peaks(monkeypatch):
    """Where no edge passes the linkage threshold, the level decodes by its peaks at the same step, and
    the selected level is the one below it (the linkage level's retry, not a stop)."""
    from agc_ray import HiLander
    from agc_ray.core import inference

    x, _ = make_faces(3000, seed=2, mean_identity_size=20)
    usual = HiLander(unsupervised=True).hierarchy(x)
    linkage = [i for i, st in enumerate(usual.stats) if "linkage" in st]
    assert linkage == [usual.selected_level]
    monkeypatch.setattr(inference, "linkage_threshold", lambda best, floor: np.inf)
    result = HiLander(unsupervised=True).hierarchy(x)
    assert not any("linkage" in st for st in result.stats)
    assert result.selected_level == usual.selected_level - 1 and len(result.levels) == len(usual.levels)
    for a, b in zip(result.levels[:result.selected_level + 1], usual.levels):
        np.testing.assert_array_equal(a, b)
    assert result.stats[usual.selected_level]["tau"] == pytest.approx(usual.stats[usual.selected_level]["tau"])


def test_member_sums_do_not_depend_on_the_split_of_the_members():
    """aggregate's member sums (fixed point) are the same to the bit when the members are summed in
    parts, in any order: what the job's shards add (split_members / assemble_next, called here as
    plain functions) equals the single process's, and each part holds a row per cluster, not per member."""
    from agc_ray.core.hierarchy import LevelGraph, aggregate, fixed_point_sums, from_fixed_point
    from agc_ray.distributed import level as lv

    rng = np.random.default_rng(3)
    x = rng.standard_normal((5000, 16)).astype(np.float32)
    comp = rng.integers(0, 700, 5000)
    comp[:700] = np.arange(700)  # every cluster has a member
    peaks = np.array([np.flatnonzero(comp == c)[0] for c in range(700)])
    g = LevelGraph(x_id=x, x_sum=x * 2, size=np.ones(5000, np.int64), nbr=np.zeros((5000, 1), np.int64),
                   sim=np.zeros((5000, 1), np.float32), peak_row=np.arange(5000))
    x_sum = aggregate(g, comp, peaks)[1]
    ref = np.zeros((700, 16))
    np.add.at(ref, comp, 2 * x.astype(np.float64))
    np.testing.assert_allclose(x_sum, ref, rtol=1e-6, atol=1e-6)
    order = rng.permutation(5000)
    parts = [fixed_point_sums(2 * x, comp[p], 700, rows=p) for p in np.array_split(order, 4)]
    np.testing.assert_array_equal(from_fixed_point(sum(parts[::-1])), x_sum)
    # the job's two steps over 3 old shards and 2 new ones
    offsets, bounds = np.array([0, 1500, 3200, 5000]), np.array([0, 350, 700])
    level = {"comp": comp, "peaks": peaks, "size": np.bincount(comp), "peak_row": peaks}
    split = [list(lv.split_members.fn(s, offsets, level, 2 * x[offsets[s]:offsets[s + 1]], x[offsets[s]:offsets[s + 1]],
                                      bounds)) for s in range(3)]
    assert all(part[0].size == part[1].shape[0] == np.unique(part[0]).size <= 350 for parts in split for part in parts)
    built = [lv.assemble_next.fn(t, bounds, level, *[parts[t] for parts in split]) for t in range(2)]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in built]), x_sum)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in built]), x[peaks])
