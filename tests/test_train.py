"""Core training schedule: which level graphs are trained on and how many seeds each gives an epoch."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from agc_ray.core.synthetic import make_faces
from agc_ray.core.train import (
    BASE_LEVEL_PASSES,
    GROUND_TRUTH_LEVELS,
    OWN_LEVEL_PASSES,
    epoch_batches,
    epoch_steps,
    ground_truth_graphs,
    self_training_graphs,
    subsampled_identities,
    training_tables,
)


def _graphs():
    x, y = make_faces(1500, dim=32, mean_identity_size=10, seed=4)
    return ground_truth_graphs(x, y, ((5, 4),), seed=0)


def test_ground_truth_hierarchy_is_cut_at_its_informative_levels():
    graphs = _graphs()
    assert [g.level for g in graphs] == list(range(GROUND_TRUTH_LEVELS))
    assert graphs[1].n < graphs[0].n
    # level 1 still has same-class edges to learn from
    assert graphs[1].same[graphs[1].nbr >= 0].any()


def test_passes_set_the_seeds_of_an_epoch():
    g = _graphs()[0]
    half, thrice = dataclasses.replace(g, passes=0.5), dataclasses.replace(g, passes=3.0)
    batches = epoch_batches([half, thrice], 64, torch.Generator().manual_seed(0))
    assert len(batches) == epoch_steps([half, thrice], 64)
    seeds = {gi: torch.cat([s for i, s in batches if i == gi]) for gi in (0, 1)}
    assert seeds[0].numel() == round(g.n / 2) and seeds[0].unique().numel() == seeds[0].numel()
    assert np.array_equal(np.bincount(seeds[1].numpy(), minlength=g.n), np.full(g.n, 3))


def test_one_pass_draws_as_before():
    graphs = _graphs()
    batches = epoch_batches(graphs, 64, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    perms = [torch.randperm(g.n, generator=gen) for g in graphs]
    for gi, perm in enumerate(perms):
        assert sorted(tuple(s.tolist()) for i, s in batches if i == gi) == sorted(
            tuple(perm[j:j + 64].tolist()) for j in range(0, perm.numel(), 64))


def test_self_training_weights_own_levels_without_touching_the_inputs():
    gt = _graphs()
    own = [dataclasses.replace(gt[1], level=2)]
    mixed = self_training_graphs(gt, own)
    assert [g.passes for g in mixed] == [BASE_LEVEL_PASSES, 1.0, OWN_LEVEL_PASSES]
    assert [g.passes for g in gt + own] == [1.0, 1.0, 1.0]
    assert mixed[0].nbr is gt[0].nbr


def test_only_level_0_is_trained_class_balanced():
    from agc_ray.core.lander import Lander
    from agc_ray.core.train import batch_loss

    graphs = _graphs()
    torch.manual_seed(0)
    model = Lander(32, 5).eval()  # no dropout: the two calls see the same logits
    losses = {}
    for g in graphs:
        seeds = torch.arange(g.n)
        losses[g.level] = [batch_loss(model, g, seeds, balance=b)[0] for b in (True, False)]
    assert not torch.allclose(*losses[0])  # level 0 balanced (its classes are far from equal)
    assert torch.equal(*losses[1])


def test_schedule_of_a_few_steps_runs_to_its_end():
    from agc_ray.core.train import optimizer

    model = torch.nn.Linear(2, 1)
    for total in (1, 4, 7, 10, 11, 40):
        opt, sched = optimizer(model, lr=1e-2, weight_decay=0.0, total_steps=total)
        lrs = []
        for _ in range(total):
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        assert max(lrs) <= 1e-2 + 1e-12
        assert total < 4 or lrs[-1] < max(lrs)  # warmed up, then annealed


def test_subsampled_identities_keep_a_seeded_share_of_every_identity():
    x, y = make_faces(6000, dim=16, mean_identity_size=30, seed=3)
    x_sub, y_sub = subsampled_identities(x, y, seed=7)
    classes, counts = np.unique(y, return_counts=True)
    kept = np.array([(y_sub == c).sum() for c in classes])
    assert (kept >= 1).all() and (kept <= counts).all()  # every identity stays, none grows
    large = counts >= 20
    assert (kept[large] < counts[large] / 10).sum() >= large.sum() / 5  # many shrink to a tenth or less
    assert 0.2 < y_sub.size / y.size < 0.5
    # The copy's rows are the table's own, in the table's order.
    row_ids, _ = subsampled_identities(np.arange(y.size)[:, None], y, seed=7)
    assert (np.diff(row_ids[:, 0]) > 0).all() and np.array_equal(y[row_ids[:, 0]], y_sub)
    assert np.array_equal(x[row_ids[:, 0]], x_sub)
    again = subsampled_identities(x, y, seed=7)
    assert np.array_equal(again[0], x_sub) and np.array_equal(again[1], y_sub)
    assert not np.array_equal(subsampled_identities(x, y, seed=8)[1], y_sub)


def test_training_tables_add_the_subsampled_copy_only_when_asked():
    x, y = make_faces(1500, dim=16, mean_identity_size=10, seed=4)
    alone = training_tables(x, y, subsample=False, seed=0)
    assert len(alone) == 1 and alone[0][0] is x
    both = training_tables(x, y, subsample=True, seed=0)
    assert len(both) == 2 and both[0][0] is x
    assert np.array_equal(both[1][1], subsampled_identities(x, y, seed=0)[1])
