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
