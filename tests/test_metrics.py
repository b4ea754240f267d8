import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from agc_ray.metrics import ari, bcubed, evaluate, nmi, pairwise


def brute_pairwise(y, c):
    same_y = y[:, None] == y[None, :]
    same_c = c[:, None] == c[None, :]
    off = ~np.eye(y.size, dtype=bool)
    tp = (same_y & same_c & off).sum()
    return tp / (same_c & off).sum(), tp / (same_y & off).sum()


def brute_bcubed(y, c):
    p = np.mean([((c == c[i]) & (y == y[i])).sum() / (c == c[i]).sum() for i in range(y.size)])
    r = np.mean([((c == c[i]) & (y == y[i])).sum() / (y == y[i]).sum() for i in range(y.size)])
    return p, r


def test_known_answer_pairwise_and_bcubed():
    y = np.array([0, 0, 0, 1, 1, 2])
    c = np.array([5, 5, 7, 7, 7, 9])
    # predicted pairs (ordered): {0,1} and {2,3,4}: 2 + 6 = 8; true-positive pairs: {0,1} and {3,4}: 4
    p, r, f = pairwise(y, c)
    assert p == pytest.approx(4 / 8)
    assert r == pytest.approx(4 / 8)  # true pairs: {0,1,2}: 6 + {3,4}: 2 = 8
    bp, br, _ = bcubed(y, c)
    assert bp == pytest.approx((1 + 1 + 1 / 3 + 2 / 3 + 2 / 3 + 1) / 6)
    assert br == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 1 + 1 + 1) / 6)


def test_random_labelings_match_brute_force_and_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, size=300)
    c = rng.integers(0, 11, size=300)
    assert pairwise(y, c)[:2] == pytest.approx(brute_pairwise(y, c))
    assert bcubed(y, c)[:2] == pytest.approx(brute_bcubed(y, c))
    assert nmi(y, c) == pytest.approx(normalized_mutual_info_score(y, c))
    assert ari(y, c) == pytest.approx(adjusted_rand_score(y, c))


@pytest.mark.parametrize("classes, clusters", [(7, 11), (1, 1), (1, 5), (5, 1), (300, 300), (40, 3)])
def test_evaluate_equals_sklearn_to_the_bit(classes, clusters):
    """evaluate computes NMI and ARI from its one contingency table: scikit-learn's numbers exactly,
    its limit cases included (one class and one cluster; one of either), with string labels too."""
    rng = np.random.default_rng(classes * 1000 + clusters)
    y = rng.integers(0, classes, size=300)
    c = np.array([f"c{v}" for v in rng.integers(0, clusters, size=300)])
    e = evaluate(y, c)
    assert e["nmi"] == normalized_mutual_info_score(y, c)
    assert e["ari"] == adjusted_rand_score(y, c)
    assert e["n_clusters"] == np.unique(c).size


def test_perfect_and_singletons():
    y = np.array([3, 3, 1, 1, 1])
    e = evaluate(y, np.array([0, 0, 9, 9, 9]))
    assert e["fp"] == pytest.approx(1.0) and e["fb"] == pytest.approx(1.0) and e["nmi"] == pytest.approx(1.0)
    p, r, _ = pairwise(y, np.arange(5))
    assert p == 1.0 and r == 0.0


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="differ in length: 3 vs 2"):
        pairwise([0, 1, 2], [0, 1])
