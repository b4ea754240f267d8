"""Ray-free pieces of the distributed training job: batch split, class split, schedule, fingerprint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agc_ray.core.train import training_phases
from agc_ray.distributed.train import (
    InputError,
    TrainJobConfig,
    data_fingerprint,
    epoch_batches,
    rank_share,
    split_by_class,
)


class _G:
    def __init__(self, n):
        self.n = self.seeds_per_epoch = n


def test_epoch_batches_are_identical_per_seed_and_epoch_and_cover_every_node():
    graphs = [_G(1000), _G(130)]
    a, b = epoch_batches(graphs, 256, seed=3, epoch=1), epoch_batches(graphs, 256, seed=3, epoch=1)
    assert [(gi, s.tolist()) for gi, s in a] == [(gi, s.tolist()) for gi, s in b]
    other_epoch = epoch_batches(graphs, 256, seed=3, epoch=2)
    assert [(gi, s.tolist()) for gi, s in a] != [(gi, s.tolist()) for gi, s in other_epoch]
    for gi, g in enumerate(graphs):
        seen = torch.cat([s for i, s in a if i == gi])
        assert sorted(seen.tolist()) == list(range(g.n))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_shares_partition_the_global_batch(world):
    seeds = torch.randperm(101)
    shares = [rank_share(seeds, r, world) for r in range(world)]
    assert all(w == 1.0 for _, w in shares)
    assert torch.equal(torch.cat([s for s, _ in shares]), seeds)


def test_rank_share_of_a_batch_smaller_than_the_world_has_zero_weight():
    mine, weight = rank_share(torch.tensor([7]), 1, 2)
    assert weight == 0.0 and mine.tolist() == [7]


def test_split_by_class_holds_out_whole_classes():
    y = np.repeat(np.arange(50), 4)
    val = split_by_class(y, 0.2, seed=0)
    assert np.unique(y[val]).size == 10
    assert not set(y[val]) & set(y[~val])
    assert (val == split_by_class(y, 0.2, seed=0)).all()
    assert not split_by_class(y, 0.0, seed=0).any()


def test_phases_are_the_ones_hilander_fit_trains(faces_split):
    """The worker runs core.train.training_phases; HiLander.fit's history shows the same split (each
    phase's epochs numbered from 1)."""
    from agc_ray import HiLander

    x_train, y_train, _, _ = faces_split
    for epochs, self_training in ((3, True), (2, False)):
        est = HiLander(epochs=epochs, self_training=self_training, batch_size=512).fit(x_train[:1500], y_train[:1500])
        phases = [p for p in training_phases(epochs, self_training) if p is not None]
        assert [h["epoch"] for h in est.history_] == [e + 1 for p in phases for e in range(p.epochs)]
        assert sum(p.epochs for p in phases) == epochs and phases[0].start == 0
    assert [(p.start, p.stop) for p in training_phases(6, True)] == [(0, 3), (3, 6)]


def test_fingerprint_depends_on_every_column():
    ids, x, y = np.arange(5), np.ones((5, 3), np.float32), np.zeros(5, np.int64)
    base = data_fingerprint(ids, x, y)
    assert base == data_fingerprint(ids.copy(), x.copy(), y.copy())
    assert base != data_fingerprint(ids + 1, x, y)
    assert base != data_fingerprint(ids, x * 2, y)
    assert base != data_fingerprint(ids, x, y + 1)


@pytest.mark.parametrize("field,value,message", [
    ("epochs", 0, "--epochs must be"),
    ("num_workers", 0, "--num-workers must be"),
    ("val_fraction", 0.95, "--val-fraction must be"),
    ("conv", "gcn", "--conv must be one of"),
    ("output", "s3://bucket/model", "--output must be a local directory"),
])
def test_config_validation_names_the_flag(field, value, message):
    cfg = TrainJobConfig(**{"input": "t.parquet", "output": "m", field: value})
    with pytest.raises(InputError, match=message):
        cfg.validate()


def test_model_dir_replaced_meanwhile_is_a_conflict(tmp_path):
    from agc_ray import HiLander
    from agc_ray.distributed.commit import OutputConflict
    from agc_ray.distributed.train import check_output, write_model_dir

    cfg = TrainJobConfig(input="unused", output=str(tmp_path / "model"), overwrite=True, hidden_channels=8)
    model = HiLander(**cfg.model_params()).new_model(4)
    state = {"model": model.state_dict(), "history": []}
    (tmp_path / ".model.staging-0123456789ab").mkdir()  # a killed run's staging: removed by the next check
    loser_saw, winner_saw = check_output(cfg), check_output(cfg)  # two runs start on an empty output
    assert not (tmp_path / ".model.staging-0123456789ab").exists()
    winner = {"run": {"id": "winner", "started": "2026-12-01T00:00:00Z"}}
    write_model_dir(cfg, state, 4, winner, winner_saw)
    with pytest.raises(OutputConflict, match=r"run winner \(started 2026-12-01T00:00:00Z\)"):
        write_model_dir(cfg, state, 4, {"run": {"id": "loser", "started": "2026-12-01T00:00:01Z"}}, loser_saw)
    import json

    assert json.loads((tmp_path / "model" / "config.json").read_text())["training"]["run"]["id"] == "winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # a run that saw the winner's directory replaces it
    write_model_dir(cfg, state, 4, {"run": {"id": "next", "started": "2026-12-01T00:00:02Z"}}, check_output(cfg))
    assert json.loads((tmp_path / "model" / "config.json").read_text())["training"]["run"]["id"] == "next"
