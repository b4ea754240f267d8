"""Chinese whispers, its validation threshold, and make_faces' anisotropy (the regime suite's additions)."""

import hashlib

import numpy as np
import pytest

from agc_ray.core.baselines import _threshold_grid, chinese_whispers, chinese_whispers_on_validation
from agc_ray.core.knn import knn_graph
from agc_ray.core.synthetic import make_faces
from agc_ray.metrics.clustering import pairwise


def _blobs(n_per=40, dim=16, seed=0):
    """Two tight, well-separated blobs: (2 n_per, dim) unit rows and their labels."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim, dtype=np.float32)[:2]
    x = np.repeat(centres, n_per, axis=0) + 0.05 * rng.standard_normal((2 * n_per, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.repeat(np.arange(2), n_per)


def test_chinese_whispers_two_blobs():
    x, y = _blobs()
    nbr, sim = knn_graph(x, 10)
    labels = chinese_whispers(nbr, sim, 0.5)
    assert labels.dtype == np.int64 and labels.shape == y.shape
    assert np.unique(labels).size == 2
    assert pairwise(y, labels)[2] == 1.0
    assert labels[0] == 0  # canonical: first row's class is 0


def test_chinese_whispers_threshold_above_every_similarity_gives_singletons():
    x, _ = _blobs()
    nbr, sim = knn_graph(x, 10)
    labels = chinese_whispers(nbr, sim, float(sim.max()) + 1e-3)
    np.testing.assert_array_equal(labels, np.arange(x.shape[0]))


def test_chinese_whispers_padding_and_determinism():
    x, y = make_faces(1500, dim=32, mean_identity_size=10, seed=4)
    nbr, sim = knn_graph(x, 10)
    nbr[:5], sim[:5] = -1, 0.0  # rows without a neighbour of their own
    a = chinese_whispers(nbr, sim, 0.4, seed=3)
    np.testing.assert_array_equal(a, chinese_whispers(nbr, sim, 0.4, seed=3))
    assert pairwise(y, a)[2] > 0.3
    b = chinese_whispers(nbr, sim, 0.4, seed=4)
    assert pairwise(a, b)[2] > 0.8  # another visiting order, nearly the same partition


def test_chinese_whispers_on_validation_picks_a_grid_threshold():
    x, y = make_faces(1500, dim=32, mean_identity_size=10, seed=5)
    nbr, sim = knn_graph(x, 10)
    t = chinese_whispers_on_validation(nbr, sim, y)
    assert isinstance(t, float) and t in set(_threshold_grid(None).tolist())
    grid = [0.2, 0.5, 0.99]
    t = chinese_whispers_on_validation(nbr, sim, y, thresholds=grid)
    assert t in grid and t != 0.99  # all singletons is never the best


def test_make_faces_anisotropy():
    x0, y0 = make_faces(2000, dim=32, seed=3)
    x1, y1 = make_faces(2000, dim=32, seed=3, anisotropy=1.0)
    np.testing.assert_array_equal(y0, y1)  # same identities and rows: only the deviations' shape moves
    assert not np.allclose(x0, x1)
    np.testing.assert_allclose(np.linalg.norm(x1, axis=1), 1.0, atol=1e-5)
    x2, _ = make_faces(2000, dim=32, seed=3, anisotropy=0.0)
    np.testing.assert_array_equal(x0, x2)
    with pytest.raises(ValueError, match="anisotropy must be >= 0"):
        make_faces(10, anisotropy=-1.0)


@pytest.mark.parametrize(
    "kwargs, labels_sha256, corner, abs_sum",
    [
        # Fingerprints of make_faces before `anisotropy` existed (exact labels; features to float
        # tolerance, which survives BLAS differences between machines).
        (dict(n_samples=3000, seed=0), "2f4e995242092b97",
         [[-0.06832, 0.02127, -0.11363], [0.08582, 0.00655, -0.03985]], 38356.1),
        (dict(n_samples=2000, dim=64, mean_identity_size=5, distractor_fraction=0.1, seed=7), "509f4b4674e74a65",
         [[0.24506, -0.00817, 0.15828], [0.01942, -0.0088, 0.01841]], 12840.5),
        (dict(n_samples=20000, dim=32, isotropic=1.0, seed=3), "f926d99fc0fec0c5",
         [[0.29791, 0.03464, -0.06284], [0.18897, 0.34952, 0.19876]], 90951.5),
    ],
)
def test_make_faces_default_output_unchanged(kwargs, labels_sha256, corner, abs_sum):
    x, y = make_faces(**kwargs)
    assert hashlib.sha256(y.tobytes()).hexdigest()[:16] == labels_sha256
    np.testing.assert_allclose(x[:2, :3], corner, atol=1e-4)
    assert float(np.abs(x).sum()) == pytest.approx(abs_sum, abs=0.5)
