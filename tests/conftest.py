import numpy as np
import pytest

from agc_ray.core.synthetic import make_faces


@pytest.fixture(scope="session")
def faces_split():
    """A small labelled train split and a test split with different seeds (other identities)."""
    x_train, y_train = make_faces(4000, seed=1)
    x_test, y_test = make_faces(4000, seed=2)
    return x_train, y_train, x_test, y_test


@pytest.fixture(scope="session")
def trained(faces_split):
    from agc_ray import HiLander

    x_train, y_train, _, _ = faces_split
    return HiLander(epochs=4, seed=0).fit(x_train, y_train)


def assert_coarsening(levels):
    """Each level's partition is a coarsening of the one before."""
    for fine, coarse in zip(levels, levels[1:]):
        pairs = np.unique(np.stack([fine, coarse]), axis=1)
        assert np.unique(pairs[0]).size == pairs.shape[1], "a fine cluster is split across coarse clusters"
