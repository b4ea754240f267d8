import numpy as np
import pytest

from agc_ray.core.synthetic import make_faces, make_subspace_clusters


def test_shapes_norms_and_determinism():
    x, y = make_faces(3000, dim=64, seed=7)
    assert x.shape == (3000, 64) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    x2, y2 = make_faces(3000, dim=64, seed=7)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, _ = make_faces(3000, dim=64, seed=8)
    assert not np.allclose(x, x3)


def test_structure_long_tail_and_distractors():
    x, y = make_faces(20000, seed=0, distractor_fraction=0.05)
    sizes = np.bincount(y)
    assert (sizes == 1).sum() >= 1000  # distractor singletons
    members = sizes[sizes > 1]
    assert members.max() > 5 * np.median(members)  # long tail
    assert not np.all(np.diff(y) >= 0), "rows are shuffled"
    # same-identity pairs are more similar than random pairs
    i = np.flatnonzero(y == np.argmax(sizes))
    same = (x[i] @ x[i].T)[np.triu_indices(i.size, 1)].mean()
    rand = (x[:500] @ x[500:1000].T).mean()
    assert same > rand + 0.2


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        make_faces(0)
    with pytest.raises(ValueError, match="dim must be >= 2"):
        make_faces(10, dim=1)


def test_mode_labels_refine_identities_on_the_same_rows():
    x, y = make_faces(6000, dim=32, max_modes=4, distractor_fraction=0.05, seed=5)
    xm, modes = make_faces(6000, dim=32, max_modes=4, distractor_fraction=0.05, seed=5, label_by="mode")
    np.testing.assert_array_equal(x, xm)
    # every mode lies within one identity; identities of several modes exist
    pairs = np.unique(np.stack([modes, y]), axis=1)
    assert np.unique(pairs[0]).size == pairs.shape[1]
    n_ids, n_modes = np.unique(y).size, np.unique(modes).size
    assert n_ids < n_modes <= 4 * n_ids
    # distractors stay singletons under either labelling
    assert (np.bincount(modes) == 1).sum() >= (np.bincount(y) == 1).sum()
    # rows of one mode are closer to each other than to the rest of their identity
    modes_of = np.bincount(pairs[1], minlength=y.max() + 1)
    big = np.argmax(np.where(modes_of > 1, np.bincount(y), 0))
    rows = np.flatnonzero(y == big)
    same_mode = modes[rows][:, None] == modes[rows][None, :]
    sims = x[rows] @ x[rows].T
    off = ~np.eye(rows.size, dtype=bool)
    assert sims[same_mode & off].mean() > sims[~same_mode].mean() + 0.1
    with pytest.raises(ValueError, match="label_by must be 'identity' or 'mode'"):
        make_faces(10, label_by="pose")


def test_iter_faces_chunks_are_make_faces_rows():
    from agc_ray.core.synthetic import iter_faces, make_faces

    x, y = make_faces(40000, dim=16, anisotropy=0.5, seed=3)
    chunks = list(iter_faces(40000, 16, anisotropy=0.5, seed=3, chunk_rows=20000))  # rounded up to 16384 * 2
    assert [c[0] for c in chunks] == [0, 32768]
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), x)
    np.testing.assert_array_equal(np.concatenate([c[2] for c in chunks]), y)
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        next(iter_faces(0))


def test_subspace_clusters_stretch_along_their_own_subspace():
    x, y = make_subspace_clusters(3000, dim=64, mean_cluster_size=30, subspace_dim=4, seed=3)
    assert x.shape == (3000, 64) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert 80 <= np.unique(y).size <= 100  # Zipf sizes: a few of the 100 clusters may draw no row
    again, y_again = make_subspace_clusters(3000, dim=64, mean_cluster_size=30, subspace_dim=4, seed=3)
    np.testing.assert_array_equal(x, again)
    np.testing.assert_array_equal(y, y_again)
    # a big cluster's deviations from its mean span about subspace_dim directions, not 64
    big = x[y == np.bincount(y).argmax()]
    sv = np.linalg.svd(big - big.mean(0), compute_uv=False)
    assert (sv[:4] ** 2).sum() / (sv**2).sum() > 0.9
    with pytest.raises(ValueError, match="subspace_dim"):
        make_subspace_clusters(10, dim=4, subspace_dim=5)
