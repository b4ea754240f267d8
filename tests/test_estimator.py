import copy
import json

import numpy as np
import pytest
import scipy.sparse
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from agc_ray import HiLander
from agc_ray.core.validation import check_labels
from agc_ray.core.baselines import best_threshold
from agc_ray.core.knn import knn_graph
from agc_ray.metrics import pairwise

from conftest import assert_coarsening


def test_trained_model_beats_threshold_baseline(faces_split, trained):
    _, _, x_test, y_test = faces_split
    levels = trained.predict_hierarchy(x_test)
    assert len(levels) >= 2
    assert_coarsening(levels)
    for lv in levels:
        assert lv.shape == (x_test.shape[0],) and lv.dtype == np.int64
    nbr, sim = knn_graph(x_test, 10)
    _, base = best_threshold(nbr, sim, y_test)  # threshold chosen with the test labels
    best_model = max(pairwise(y_test, lv)[2] for lv in levels)
    assert best_model > pairwise(y_test, base)[2] + 0.02
    assert len(trained.history_) == trained.epochs == 6
    assert trained.history_[-1]["loss_conn"] < trained.history_[0]["loss_conn"]


def test_predict_is_deterministic_and_last_level(faces_split, trained):
    _, _, x_test, _ = faces_split
    a = trained.predict_hierarchy(x_test)
    b = trained.predict_hierarchy(x_test)
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(trained.predict(x_test), a[-1])


def test_same_seed_same_model(faces_split):
    x_train, y_train, x_test, _ = faces_split
    kw = dict(epochs=1, seed=3)
    a = HiLander(**kw).fit(x_train[:1500], y_train[:1500]).predict_hierarchy(x_test[:1000])
    b = HiLander(**kw).fit(x_train[:1500], y_train[:1500]).predict_hierarchy(x_test[:1000])
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_fit_trains_on_an_identity_subsampled_copy_too(faces_split):
    """Both training phases see the copy: its ground-truth graphs and its own levels (more level graphs
    than the table alone gives), and the trained weights differ from a fit without it."""
    from agc_ray.core.train import subsampled_identities

    x_train, y_train, _, _ = faces_split
    x, y = x_train[:1500], y_train[:1500]
    est = HiLander(epochs=2, seed=0).fit(x, y)
    alone = copy.deepcopy(est)
    alone.subsample_identities = False
    own, own_alone = est.own_levels(x, y), alone.own_levels(x, y)
    assert len(own) > len(own_alone)
    assert all(a.n == b.n for a, b in zip(own, own_alone))  # the table's own levels come first
    assert own[len(own_alone)].n < subsampled_identities(x, y, 0)[0].shape[0]  # then the copy's level 1
    plain = HiLander(epochs=2, seed=0, subsample_identities=False).fit(x, y)
    assert any(not torch.equal(a, b) for a, b in zip(est.model_.state_dict().values(),
                                                     plain.model_.state_dict().values()))


def test_save_load_round_trip(tmp_path, faces_split, trained):
    _, _, x_test, _ = faces_split
    path = trained.save(tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    assert config["params"]["k"] == trained.k and config["n_features_in"] == x_test.shape[1]
    loaded = HiLander.load(path)
    assert loaded.get_params() == trained.get_params()
    for u, v in zip(trained.predict_hierarchy(x_test), loaded.predict_hierarchy(x_test)):
        np.testing.assert_array_equal(u, v)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="not a HiLander model directory"):
        HiLander.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid HiLander config"):
        HiLander.load(tmp_path)


def test_small_inputs(trained):
    rng = np.random.default_rng(0)
    one = trained.predict_hierarchy(rng.standard_normal((1, 256)))
    assert len(one) == 1 and one[0].tolist() == [0]
    # N <= k: every row's neighbours are all the others; two near-duplicate pairs and a stranger
    a, b, c = rng.standard_normal((3, 256))
    few = np.stack([a, a + 0.01 * rng.standard_normal(256), b, b + 0.01 * rng.standard_normal(256), c])
    top = trained.predict(few)
    assert top[0] == top[1] and top[2] == top[3]
    assert len({top[0], top[2], top[4]}) == 3


def test_identical_vectors(trained):
    v = np.random.default_rng(1).standard_normal(256)
    x = np.vstack([np.tile(v, (30, 1)), np.random.default_rng(2).standard_normal((30, 256))])
    levels = trained.predict_hierarchy(x)
    assert all(lv.shape == (60,) for lv in levels)
    # identical rows have identical neighbourhoods up to ties; they must never be split from each other
    # across more than a few clusters
    assert np.unique(levels[-1][:30]).size <= 3


def test_unsupervised_mode_needs_no_labels(faces_split):
    _, _, x_test, y_test = faces_split
    model = HiLander(unsupervised=True, tau=0.35)
    levels = model.predict_hierarchy(x_test)  # no fit needed
    assert_coarsening(levels)
    assert pairwise(y_test, levels[-1])[2] > 0.3
    assert model.fit(x_test).predict(x_test).shape == (x_test.shape[0],)


@pytest.mark.parametrize(
    "X, y, message",
    [
        (np.ones(10), np.zeros(10, dtype=int), "Expected 2D array, got 1D array instead"),
        (np.empty((0, 4)), np.empty(0, dtype=int), r"0 sample\(s\) \(shape=\(0, 4\)\) while a minimum of 2 is required"),
        (np.ones((1, 4)), np.zeros(1, dtype=int), r"1 sample\(s\) \(shape=\(1, 4\)\) while a minimum of 2 is required"),
        (np.array([[1.0, np.nan], [1.0, 2.0]]), np.array([0, 1]), "NaN or Inf in 1 rows \\(first at row 0\\)"),
        (np.array([[1.0, 2.0], [np.inf, 2.0]]), np.array([0, 1]), "NaN or Inf in 1 rows \\(first at row 1\\)"),
        (np.array([[1.0, 2.0], [0.0, 0.0]]), np.array([0, 1]), "1 all-zero rows \\(first at row 1\\)"),
        (np.ones((3, 2)), np.array([0, 1]), "different numbers of rows: 3 vs 2"),
        (np.ones((3, 2)), np.array([0.5, 1.0, 2.0]), "class labels .* got continuous values"),
        (np.ones((3, 2)), np.array([4, 4, 4]), "single class"),
        (np.ones((3, 2)), None, "requires y to be passed"),
        (np.array([["a", "b"], ["c", "d"]]), np.array([0, 1]), "could not convert string to float"),
        (np.ones((2, 2)) + 1j, np.array([0, 1]), "Complex data not supported"),
    ],
)
def test_bad_fit_input(X, y, message):
    with pytest.raises(ValueError, match=message):
        HiLander(epochs=1).fit(X, y)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"k": 0}, "k must be >= 1"),
        ({"tau": 1.5}, "tau must be in"),
        ({"levels": 0}, "levels must be >= 1"),
        ({"device": "tpu"}, "device must be one of"),
        ({"knn": "lsh"}, "knn must be one of"),
        ({"epochs": 2.5}, "epochs must be an integer"),
    ],
)
def test_bad_params(params, message):
    with pytest.raises(ValueError, match=message):
        HiLander(**params).fit(np.eye(3), np.array([0, 1, 1]))


def test_predict_errors(trained):
    with pytest.raises(NotFittedError, match="not fitted yet"):
        HiLander().predict(np.eye(3))
    with pytest.raises(ValueError, match="X has 8 features, but HiLander is expecting 256 features"):
        trained.predict(np.ones((4, 8)))
    with pytest.raises(TypeError, match="Sparse data was passed"):
        trained.predict(scipy.sparse.csr_matrix(np.ones((4, 256))))


def test_labels_of_any_discrete_type():
    np.testing.assert_array_equal(check_labels(np.array(["b", "a", "b"]), 3), [1, 0, 1])
    np.testing.assert_array_equal(check_labels(np.array([2.0, 7.0, 2.0]), 3), [0, 1, 0])
    np.testing.assert_array_equal(check_labels(np.array([7, 2, 7]), 3), [7, 2, 7])  # integers kept as they are


def test_predict_leaves_the_estimator_unchanged(faces_split, trained):
    _, _, x_test, _ = faces_split
    weights = copy.deepcopy(trained.model_.state_dict())
    for est in (trained, HiLander(unsupervised=True)):
        before = {key: value for key, value in est.__dict__.items() if key != "model_"}
        before = copy.deepcopy(before)
        result = est.hierarchy(x_test[:500])
        np.testing.assert_array_equal(est.predict(x_test[:500]), result.labels)
        after = {key: value for key, value in est.__dict__.items() if key != "model_"}
        assert after == before
    assert all(torch.equal(weights[key], value) for key, value in trained.model_.state_dict().items())


def test_clone_gives_an_unfitted_copy_of_the_parameters(trained):
    twin = clone(trained)
    assert twin.get_params() == trained.get_params()
    assert not hasattr(twin, "model_")
    with pytest.raises(NotFittedError):
        twin.predict(np.eye(3, 256))


def test_unsupervised_fit_clusters_its_table(faces_split):
    _, _, x_test, _ = faces_split
    est = HiLander(unsupervised=True, tau=0.35)
    assert est.fit_predict(x_test[:2000]) is est.labels_
    np.testing.assert_array_equal(est.labels_, HiLander(unsupervised=True, tau=0.35).predict(x_test[:2000]))
    assert est.n_features_in_ == x_test.shape[1]


def test_unsupervised_hierarchy_coarsens_past_its_selected_level(faces_split):
    """The adaptive thresholds fall level by level, so the early-stop ratio (made for one threshold)
    does not end the hierarchy at level 2: the levels above the selected one are coarser options, each
    with fewer clusters, down to the level budget (6 by default, the user's ``levels``); a fixed tau
    keeps the ratio rule."""
    _, _, x_test, _ = faces_split
    result = HiLander(unsupervised=True).hierarchy(x_test)
    assert len(result.levels) == 6 and result.selected_level < len(result.levels) - 2  # the default budget
    assert len(HiLander(unsupervised=True, levels=8).hierarchy(x_test).levels) == 8
    clusters = [np.unique(lv).size for lv in result.levels]
    assert all(coarse < fine for fine, coarse in zip(clusters, clusters[1:])), clusters
    taus = [st["tau"] for st in result.stats]
    assert all(lower < higher for higher, lower in zip(taus[1:], taus[2:])), taus
    assert_coarsening(result.levels)
    fixed = HiLander(unsupervised=True, tau=0.35, levels=6)
    assert fixed.stops_early() and not HiLander(unsupervised=True).stops_early()
    assert not HiLander(unsupervised=True, tau=0.35, early_stop=False).stops_early()


def test_gat_conv_and_focal_loss_train_and_predict(faces_split):
    x_train, y_train, x_test, y_test = faces_split
    model = HiLander(conv="gat", focal_gamma=2.0, conn_edges="denser", epochs=2, self_training=False)
    model.fit(x_train[:2000], y_train[:2000])
    levels = model.predict_hierarchy(x_test[:2000])
    assert_coarsening(levels)
    assert np.isfinite([h["loss_conn"] for h in model.history_]).all()
    assert pairwise(y_test[:2000], levels[-1])[2] > 0.3


#: scikit-learn's estimator checks that cannot apply, and why (both modes).
_NOT_APPLICABLE = {
    "check_estimators_dtypes": "its integer-cast random data has all-zero rows, which have no cosine similarity: "
                               "HiLander refuses them by name",
    "check_methods_sample_order_invariance": "cluster ids are numbered by row order (the clustering itself does not "
                                             "depend on it): a permuted table gets permuted ids",
    "check_methods_subset_invariance": "predict clusters the rows it is given together (transductive): a subset of "
                                       "the rows is another table",
}


@pytest.mark.parametrize("unsupervised", [False, True])
def test_scikit_learn_estimator_checks(unsupervised):
    from sklearn.base import is_clusterer
    from sklearn.utils.estimator_checks import check_estimator

    est = HiLander(unsupervised=True) if unsupervised else HiLander(epochs=1, knn="exact")
    # scikit-learn's clusterer checks fit without labels: they apply to the unsupervised mode only
    assert is_clusterer(est) == unsupervised
    expected = _NOT_APPLICABLE
    results = check_estimator(est, expected_failed_checks=expected, on_fail=None)
    failed = {r["check_name"] for r in results if r["status"] == "failed"}
    assert not failed, failed
    xfailed = {r["check_name"] for r in results if r["status"] == "xfail"}
    assert xfailed <= set(expected)
    if unsupervised:  # check_estimator runs it on ClusterMixin subclasses only
        from sklearn.utils.estimator_checks import check_clustering

        check_clustering("HiLander", est)
