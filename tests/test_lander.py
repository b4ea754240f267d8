import numpy as np
import pytest
import torch

from agc_ray.core.graph import EDGE_FEATURES, edge_features, member_cohesion, weighted_neighbor_mean
from agc_ray.core.knn import knn_graph, l2_normalize
from agc_ray.core.lander import (
    Lander, connectivity_loss, ground_truth_density, input_dropout, predicted_density,
)
from agc_ray.core.synthetic import make_faces


def test_level0_weight_folding_matches_full_input():
    x, _ = make_faces(400, dim=16, seed=0)
    nbr, sim = (torch.from_numpy(a) for a in knn_graph(x, 5))
    model = Lander(16, 5).eval()
    xt = torch.from_numpy(x)
    rows = torch.arange(400)
    folded = model.embed(xt, xt, nbr, sim, rows)  # x_mean is x_id: level-0 fast path
    full = model.embed(xt, xt.clone(), nbr, sim, rows)  # same values, general path
    torch.testing.assert_close(folded, full, atol=1e-5, rtol=1e-5)
    assert folded.shape == (400, model.conv.out_channels)


class _Rows:
    """A row-indexable feature store (like the job's sharded rows): ``[ids]`` returns a tensor."""

    def __init__(self, x):
        self.x = x

    def __getitem__(self, ids):
        return self.x[torch.as_tensor(ids)]


def test_weighted_neighbor_mean_known_answer_and_row_stores():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]])
    nbr = torch.tensor([[1, 2], [0, -1], [2, 2]])
    w = torch.tensor([[0.5, 0.25], [1.0, 0.0], [0.5, 0.5]])
    expected = torch.tensor([[1.0, 2.0], [1.0, 0.0], [4.0, 4.0]])  # the padded entry adds nothing
    torch.testing.assert_close(weighted_neighbor_mean(x, nbr, w), expected)
    # a larger graph: the gather-then-sum reference, and the same bits from a row store and by chunks
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 24, generator=gen)
    nbr = torch.randint(-1, 500, (300, 7), generator=gen)
    w = torch.rand(300, 7, generator=gen) * (nbr >= 0)
    ref = torch.einsum("mk,mkf->mf", w, x[nbr.clamp_min(0)])
    out = weighted_neighbor_mean(x, nbr, w)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(weighted_neighbor_mean(_Rows(x), nbr, w), out)
    assert torch.equal(torch.cat([weighted_neighbor_mean(x, nbr[i:i + 64], w[i:i + 64]) for i in range(0, 300, 64)]), out)
    assert weighted_neighbor_mean(x, nbr[:0], w[:0]).shape == (0, 24)
    assert torch.equal(weighted_neighbor_mean(x, nbr[:, :0], w[:, :0]), torch.zeros(300, 24))  # no neighbours
    assert torch.allclose(weighted_neighbor_mean(x.double(), nbr.int(), w), ref.double(), atol=1e-5)


def test_input_dropout_zeroes_a_share_and_keeps_the_mean():
    x = torch.ones(400, 500)
    assert input_dropout(x, 0.5, training=False) is x
    assert input_dropout(x, 0.0, training=True) is x
    torch.manual_seed(0)
    out = input_dropout(x, 0.3, training=True)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - 0.3) < 0.01  # 200K draws: the standard error is 0.001
    assert torch.all((out == 0) | torch.isclose(out, torch.tensor(1 / 0.7)))
    assert abs(out.mean().item() - 1.0) < 0.02
    torch.manual_seed(0)
    assert torch.equal(input_dropout(x, 0.3, training=True), out)  # seeded


def test_densities_known_answer():
    nbr = torch.tensor([[1, 2], [0, -1], [0, 1]])
    sim = torch.tensor([[0.8, 0.4], [0.8, 0.0], [0.4, 0.1]])
    p = torch.tensor([[1.0, 0.0], [0.75, 0.3], [0.5, 0.5]])
    d = predicted_density(p, sim, nbr >= 0)
    # padded edge excluded from the mean; p = 0.5 contributes nothing
    torch.testing.assert_close(d, torch.tensor([(0.8 - 0.4) / 2, 0.8 * 0.5, 0.0]))
    labels = np.array([0, 0, 1])
    gt = ground_truth_density(labels, nbr, sim)
    torch.testing.assert_close(gt, torch.tensor([(0.8 - 0.4) / 2, 0.8, (-0.4 - 0.1) / 2]))


def test_edge_features_known_answer():
    # 0 <-> 1 mutual; 2 lists 0 but 0 does not list 2
    nbr = np.array([[1, 3], [0, 3], [0, 1], [0, 1]])
    sim = np.array([[0.9, 0.5], [0.9, 0.6], [0.7, 0.2], [0.5, 0.6]], dtype=np.float32)
    f = edge_features(nbr, sim).numpy()
    col = {name: i for i, name in enumerate(EDGE_FEATURES)}
    assert f.shape == (4, 2, len(EDGE_FEATURES))
    assert f[0, 0, col["mutual"]] == 1 and f[2, 0, col["mutual"]] == 0
    # N(0) = {1, 3}, N(1) = {0, 3}: shared {3} -> 1 / k
    assert f[0, 0, col["shared"]] == pytest.approx(0.5)
    np.testing.assert_allclose(f[..., col["sim"]], sim)
    np.testing.assert_allclose(f[..., col["sim_of_means"]], sim)  # level 0
    # single rows: the mean similarity of member pairs is the similarity, each its own only member
    np.testing.assert_allclose(f[..., col["avg_link"]], sim)
    assert (f[..., [col["cohesion_i"], col["cohesion_j"]]] == 1).all()


def test_member_cohesion_features_known_answer():
    """Above level 0: c^2 is the mean similarity of a node's member pairs, and avg_link the mean
    similarity of the pairs across two nodes (brute force over the members)."""
    rng = np.random.default_rng(0)
    rows = l2_normalize(rng.standard_normal((9, 6)).astype(np.float32))
    members = [rows[:4], rows[4:7], rows[7:]]
    x_sum = np.stack([m.sum(0) for m in members])
    size = np.array([m.shape[0] for m in members])
    nbr = np.array([[1, 2], [0, 2], [0, 1]])
    sim = np.full((3, 2), 0.5, dtype=np.float32)
    cohesion = member_cohesion(x_sum, size)
    f = edge_features(nbr, sim, l2_normalize(x_sum), size, cohesion=cohesion).numpy()
    with pytest.raises(ValueError, match="size and cohesion"):
        edge_features(nbr, sim, l2_normalize(x_sum), size)
    col = {name: i for i, name in enumerate(EDGE_FEATURES)}
    for i, m in enumerate(members):
        assert cohesion[i] ** 2 == pytest.approx((m @ m.T).mean(), rel=1e-5)
        for slot, j in enumerate(nbr[i]):
            assert f[i, slot, col["cohesion_i"]] == pytest.approx(cohesion[i], abs=1e-6)
            assert f[i, slot, col["cohesion_j"]] == pytest.approx(cohesion[j], abs=1e-6)
            assert f[i, slot, col["avg_link"]] == pytest.approx((m @ members[j].T).mean(), abs=1e-5)


def test_connectivity_loss_masks_and_balances():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    target = torch.tensor([[True, False, True], [False, True, False]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    plain = connectivity_loss(logits, target, mask, balance=False)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    torch.testing.assert_close(plain, bce(logits[mask], target[mask].float()))
    balanced = connectivity_loss(logits, target, mask, balance=True)
    pos = bce(torch.tensor([2.0]), torch.tensor([1.0]))
    neg = bce(torch.tensor([-1.0, 0.0]), torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(balanced, 0.5 * pos + 0.5 * neg)
    focal = connectivity_loss(logits, target, mask, balance=False, focal_gamma=2.0)
    assert 0 < focal < plain
    assert connectivity_loss(logits, target, torch.zeros_like(mask)) == 0


def test_gradients_reach_every_parameter():
    x, y = make_faces(300, dim=16, seed=1)
    nbr, sim = knn_graph(x, 5)
    model = Lander(16, 5)
    xt = torch.from_numpy(x)
    rows = torch.arange(300)
    h = model.embed(xt, xt, torch.from_numpy(nbr), torch.from_numpy(sim), rows)
    logits = model.edge_logits(h, rows, torch.from_numpy(nbr).clamp_min(0), edge_features(nbr, sim))
    logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    # the x_mean halves of the conv weight get gradients through the folded level-0 weights too
    assert missing == []


def test_inference_reports_every_row_once_per_stage(monkeypatch):
    """The chunked inference calls ``report`` with each chunk's rows (progress inside a shard's task)."""
    from agc_ray.core import inference
    from agc_ray.core.hierarchy import LevelGraph

    model = Lander(16, 5).eval()
    chunk = inference.chunk_rows(model, 5)
    assert chunk & (chunk - 1) == 0  # a power of two, dividing the job's blocks of node embeddings
    from agc_ray.distributed.level import EMBEDDING_BLOCK

    assert EMBEDDING_BLOCK % inference.MAX_CHUNK == 0
    monkeypatch.setattr(inference, "SCRATCH_BYTES", 1 << 40)
    assert inference.chunk_rows(model, 5) == inference.MAX_CHUNK  # capped
    assert inference.chunk_rows(model, 5, "cuda") == inference.MAX_CHUNK  # a GPU takes the largest chunks
    monkeypatch.undo()
    x, _ = make_faces(chunk + 300, dim=16, seed=0)  # two chunks
    nbr, sim = knn_graph(x, 5)
    seen = []
    h = inference.node_embeddings(model, torch.from_numpy(x), torch.from_numpy(x), torch.from_numpy(nbr),
                                  torch.from_numpy(sim), report=seen.append)
    assert seen == [chunk, 300]
    g = LevelGraph(x_id=x, x_sum=x, size=np.ones(len(x), dtype=np.int64), nbr=nbr, sim=sim,
                   peak_row=np.arange(len(x)))
    feats = g.edge_features()
    seen.clear()
    p = inference.edge_probabilities(model, h, h, torch.from_numpy(nbr), feats, report=seen.append)
    assert seen == [chunk, 300]
    torch.testing.assert_close(p, inference.score_level(model, g)[0])  # reporting changes nothing
