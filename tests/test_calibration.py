"""Decode thresholds and levels chosen on held-out identities; the adaptive unsupervised threshold;
reproducible training."""

import copy
import json
import os

import numpy as np
import pytest
import torch

from agc_ray import HiLander
from agc_ray.core.calibration import TAU_GRID, holdout_classes
from agc_ray.core.estimator import DEFAULT_LEVELS, DEFAULT_TAUS, LEGACY_TAU
from agc_ray.core.graph import N_EDGE_FEATURES, N_EDGE_FEATURES_V1
from agc_ray.core.knn import knn_graph
from agc_ray.metrics import pairwise


@pytest.fixture(scope="module")
def validated(faces_split):
    x_train, y_train, _, _ = faces_split
    return HiLander(epochs=2, seed=0, validation_fraction=0.25).fit(x_train, y_train)


def test_validation_classes_are_disjoint_from_training(faces_split, validated):
    _, y_train, _, _ = faces_split
    val = holdout_classes(y_train, 0.25, seed=0)
    assert 0 < val.sum() < y_train.size
    assert np.intersect1d(y_train[val], y_train[~val]).size == 0  # whole classes held out
    assert validated.validation_["rows"] == int(val.sum())
    assert not holdout_classes(y_train, 0.0, seed=0).any()


def test_validation_chooses_a_tau_per_level(faces_split, validated):
    _, _, x_test, _ = faces_split
    assert validated.n_levels_ == len(validated.taus_) >= 1
    assert set(validated.taus_) <= set(TAU_GRID)
    scores = [s["score"] for s in validated.validation_["scores"]]
    assert scores == sorted(scores)  # every kept level improved the held-out score
    result = validated.hierarchy(x_test)
    levels = result.levels
    assert len(levels) <= validated.n_levels_
    assert [st["tau"] for st in result.stats][: len(levels)] == validated.taus_[: len(levels)]
    assert validated.max_levels() == validated.n_levels_


def test_chosen_tau_and_level_round_trip(tmp_path, faces_split, validated):
    _, _, x_test, _ = faces_split
    loaded = HiLander.load(validated.save(tmp_path / "m"))
    assert loaded.taus_ == validated.taus_ and loaded.n_levels_ == validated.n_levels_
    for a, b in zip(validated.predict_hierarchy(x_test), loaded.predict_hierarchy(x_test)):
        np.testing.assert_array_equal(a, b)


def test_user_tau_and_levels_override_the_chosen_ones(faces_split, validated):
    _, _, x_test, _ = faces_split
    est = copy.deepcopy(validated).set_params(tau=0.42, levels=3)
    result = est.hierarchy(x_test)
    assert est.level_tau(0) == est.level_tau(7) == 0.42 and est.max_levels() == 3
    assert {st["tau"] for st in result.stats} == {0.42} and len(result.levels) <= 3


def test_model_directory_without_validation_still_loads(tmp_path, faces_split, trained):
    """A directory saved before the validation pass and the per-level defaults: no validation block,
    no default_taus (trained class-balanced at every level): tau 0.9 at every level, as then."""
    _, _, x_test, _ = faces_split
    path = trained.save(tmp_path / "old")
    config = json.loads((path / "config.json").read_text())
    config.pop("validation")
    config.pop("default_taus")
    config["params"].pop("validation_fraction")
    (path / "config.json").write_text(json.dumps(config))
    old = HiLander.load(path)
    assert old.taus_ is None and old.max_levels() == DEFAULT_LEVELS
    assert old.level_tau(0) == old.level_tau(1) == old.level_tau(5) == LEGACY_TAU == 0.9
    as_then = copy.deepcopy(trained).set_params(tau=0.9)
    for a, b in zip(old.predict_hierarchy(x_test), as_then.predict_hierarchy(x_test)):
        np.testing.assert_array_equal(a, b)


def test_model_directory_of_ten_edge_features_still_loads(tmp_path, faces_split, trained):
    """Weights saved before the member-cohesion features (an edge head over the first ten) load and score
    as a model that reads all of them with zero weights on the added ones."""
    _, _, x_test, _ = faces_split
    path = trained.save(tmp_path / "old")
    state = torch.load(path / "weights.pt", weights_only=True)
    for name in ("feat_mean", "feat_std"):
        state[name] = state[name][:N_EDGE_FEATURES_V1].clone()
    state["edge_head.feat.weight"] = state["edge_head.feat.weight"][:, :N_EDGE_FEATURES_V1].clone()
    torch.save(state, path / "weights.pt")
    old = HiLander.load(path)
    assert old.model_.n_edge_features == N_EDGE_FEATURES_V1 < N_EDGE_FEATURES
    as_then = copy.deepcopy(trained)
    with torch.no_grad():
        as_then.model_.edge_head.feat.weight[:, N_EDGE_FEATURES_V1:] = 0.0
    levels = old.predict_hierarchy(x_test)
    assert len(levels) >= 2  # levels above 0, where the added features vary
    for a, b in zip(levels, as_then.predict_hierarchy(x_test), strict=True):
        np.testing.assert_array_equal(a, b)


def test_default_taus_per_level_round_trip(tmp_path, faces_split, trained):
    _, _, x_test, _ = faces_split
    assert trained.taus_ is None and [trained.level_tau(i) for i in range(4)] == [0.9, 0.5, 0.95, 0.95]
    loaded = HiLander.load(trained.save(tmp_path / "m"))
    assert loaded.default_taus() == list(DEFAULT_TAUS) == [0.9, 0.5, 0.95]
    stats = loaded.hierarchy(x_test).stats
    assert [st["tau"] for st in stats] == [0.9, 0.5, 0.95, 0.95][: len(stats)]
    assert loaded.set_params(tau=0.7).level_tau(0) == loaded.level_tau(3) == 0.7  # a user's tau wins


def _blobs(n_clusters: int, size: int, dim: int, within: float, seed: int):
    """Unit rows around random centres whose members' cosine to each other is about ``within``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.repeat(np.arange(n_clusters), size)
    # centre weight c and noise of norm r: cos(member, member) ~ c^2 / (c^2 + r^2)
    r = np.sqrt((1 - within) / within)
    noise = rng.standard_normal((y.size, dim)) * (r / np.sqrt(dim))
    x = centres[y] + noise
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


@pytest.mark.parametrize("within", [0.3, 0.8])
def test_unsupervised_finds_clusters_at_any_scale_without_tau(within):
    x, y = _blobs(40, 30, 256, within, seed=int(within * 10))
    est = HiLander(unsupervised=True)
    result = est.hierarchy(x)
    levels = result.levels
    taus = [st["tau"] for st in result.stats][: len(levels)]
    nearest = knn_graph(x, 10)[1][:, 0]
    assert 0.0 < taus[0] < np.median(nearest)  # between chance (~0 in 256 dimensions) and a nearest neighbour
    selected = result.labels
    np.testing.assert_array_equal(est.predict(x), selected)
    assert pairwise(y, selected)[2] > 0.95
    assert np.unique(selected).size <= 2 * 40
    # the levels above the selected one coarsen, at thresholds stepping down towards chance
    counts = [np.unique(lv).size for lv in levels]
    assert all(a > b for a, b in zip(counts, counts[1:]))
    assert all(a >= b for a, b in zip(taus, taus[1:]))


def test_unsupervised_finds_clusters_where_random_pairs_span_the_whole_range():
    """Two dimensions, or two clusters holding every row: random pairs' similarities spread so widely
    that median + 3 robust deviations lies above the neighbours (above 1 in 2 dimensions), where nothing
    would merge at any level; the median pair stands for chance instead."""
    from sklearn.datasets import make_blobs
    from sklearn.preprocessing import StandardScaler

    x, y = make_blobs(n_samples=50, random_state=1)  # scikit-learn's check_clustering table
    x = StandardScaler().fit_transform(x)
    result = HiLander(unsupervised=True).hierarchy(x)
    assert -1.0 < result.stats[0]["tau"] < np.median(knn_graph(x, 10)[1][:, 0])
    assert pairwise(y, result.labels)[2] > 0.9
    x, y = _blobs(2, 500, 64, 0.8, seed=0)
    result = HiLander(unsupervised=True).hierarchy(x)
    assert -1.0 < result.stats[0]["tau"] < np.median(knn_graph(x, 10)[1][:, 0])
    precision, recall, _ = pairwise(y, result.levels[0])
    assert precision > 0.99 and np.unique(result.levels[0]).size <= 10  # was 1000 singletons


def test_adaptive_thresholds_follow_the_table_scale():
    low = HiLander(unsupervised=True).hierarchy(_blobs(40, 30, 256, 0.3, seed=1)[0])
    high = HiLander(unsupervised=True).hierarchy(_blobs(40, 30, 256, 0.8, seed=1)[0])
    assert high.stats[0]["tau"] > low.stats[0]["tau"] + 0.1


def test_two_fits_with_one_seed_are_identical(faces_split, validated):
    """A second fit with the module's fit's parameters (seed 0, 2 epochs, validation included) is
    identical to it: same weights, same hierarchy, though other fits ran in between."""
    x_train, y_train, x_test, _ = faces_split
    fits = [validated, HiLander(**validated.get_params()).fit(x_train, y_train)]
    a, b = (f.model_.state_dict() for f in fits)
    assert all(torch.equal(a[key], b[key]) for key in a)
    for u, v in zip(*(f.predict_hierarchy(x_test) for f in fits)):
        np.testing.assert_array_equal(u, v)
    assert not torch.are_deterministic_algorithms_enabled()  # the global setting is restored


def test_cublas_reproducible_setting_before_cuda_starts(monkeypatch):
    """Deterministic CUDA training needs cuBLAS' workspace setting before CUDA starts: set when absent
    (CUDA not started in this process), kept when reproducible, and a user's other setting is left alone
    (training then stays reproducible to float tolerance only)."""
    from agc_ray.core.train import CUBLAS_DETERMINISTIC, cuda_can_be_deterministic

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA already started in this process")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert cuda_can_be_deterministic()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC[0]
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    assert cuda_can_be_deterministic()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    assert not cuda_can_be_deterministic()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":0:0"
