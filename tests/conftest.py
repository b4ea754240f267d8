import numpy as np
import pytest

from agc_ray.core.synthetic import make_faces


#: A regime where 4000 training rows hold enough identities (~190) to learn from in seconds: small
#: identities, isotropic spread. The benchmark uses the defaults (MS-Celeb-like identity sizes).
SMALL_REGIME = dict(
    mean_identity_size=20, distractor_fraction=0.05, spread=(1.0, 2.0), look_alike=0.8, mode_spread=0.8,
    max_modes=3, isotropic=1.0,
)


@pytest.fixture(scope="session")
def faces_split():
    """A small labelled train split and a test split with different seeds (other identities)."""
    x_train, y_train = make_faces(4000, seed=1, **SMALL_REGIME)
    x_test, y_test = make_faces(4000, seed=2, **SMALL_REGIME)
    return x_train, y_train, x_test, y_test


@pytest.fixture(scope="session")
def trained(faces_split):
    from agc_ray import HiLander

    x_train, y_train, _, _ = faces_split
    # The default 6 epochs: best level Fp 0.76 / 0.75 / 0.85 for seeds 0 / 1 / 2 (the threshold baseline
    # with the test labels: 0.66). 4 epochs of 4000 rows are too few for the member-cohesion edge features:
    # seed 0's level 0 then linked 10 % of the rows at tau 0.9 (best level 0.60; without them 0.77).
    return HiLander(seed=0).fit(x_train, y_train)


def assert_coarsening(levels):
    """Each level's partition is a coarsening of the one before."""
    for fine, coarse in zip(levels, levels[1:]):
        pairs = np.unique(np.stack([fine, coarse]), axis=1)
        assert np.unique(pairs[0]).size == pairs.shape[1], "a fine cluster is split across coarse clusters"
