"""The Ray Train worker: one process per rank, under ``TorchTrainer`` (gloo on CPU, NCCL on GPU).

The core's training schedule is kept (AdamW + one-cycle cosine per phase, the second half of the
epochs with the model's own levels added: "self-training"). Each step takes one global batch of
``batch_size`` seed nodes of one level graph, identical on every rank (a per-epoch seeded shuffle),
and every rank computes the loss of its own contiguous slice of it; DDP averages the gradients, so N
workers follow the single-worker trajectory with 1/N of the work each. Rank 0 validates after every
epoch and saves a checkpoint; batch order and dropout are re-seeded from (seed, epoch, rank) every
epoch, so a resumed run follows exactly the trajectory of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from agc_ray.distributed import progress
from agc_ray.distributed.train.data import graph_from_arrays

log = logging.getLogger("agc_ray")

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def _loss_module(lander, graphs, *, balance, focal_gamma, all_edges):
    """An ``nn.Module`` whose ``forward(graph_index, seeds)`` is :func:`agc_ray.core.train.batch_loss`.

    DDP synchronises gradients only through ``forward`` of the wrapped module, and ``batch_loss``
    calls the Lander's ``embed`` / ``edge_logits`` methods: this wrapper gives it a ``forward``.
    The level graphs are a plain attribute (not buffers): DDP neither broadcasts nor moves them.
    """
    import torch

    from agc_ray.core.train import batch_loss

    class BatchLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lander = lander
            self.graphs = graphs

        def forward(self, gi: int, seeds: torch.Tensor):
            return batch_loss(
                self.lander, self.graphs[gi], seeds, balance=balance, focal_gamma=focal_gamma, all_edges=all_edges
            )

    return BatchLoss()


def epoch_batches(graphs, batch_size: int, seed: int, epoch: int):
    """The global batch list of an epoch: ``[(graph_index, seeds)]`` in a seeded shuffled order.

    Identical on every rank (and across restarts) for the same (seed, epoch): the core's
    :func:`~agc_ray.core.train.epoch_batches` with a generator seeded by (seed, epoch).
    """
    import torch

    from agc_ray.core.train import epoch_batches as core_epoch_batches

    return core_epoch_batches(graphs, batch_size, torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def rank_share(seeds, rank: int, world: int):
    """This rank's contiguous slice of a global batch and its loss weight (0 for an empty slice).

    A rank whose slice is empty still runs a step (DDP needs every rank in every all-reduce) on one
    seed with weight 0.
    """
    mine = seeds.tensor_split(world)[rank]
    if mine.numel() == 0:
        return seeds[:1], 0.0
    return mine, 1.0


def _estimator(params: dict, weights: dict, dim: int, device) -> "HiLander":  # noqa: F821
    """A fitted HiLander of the job's parameters around a copy of ``weights`` (a Lander state dict)."""
    from agc_ray.core.estimator import HiLander

    return HiLander.from_weights(weights, dim, **{**params, "device": "cuda" if device.type == "cuda" else "cpu"})


def _validate_epoch(lander, val_graphs, x_val, y_val, params, batch_size, device) -> dict:
    """Held-out loss (ground-truth val graphs) and Fp / Fb / NMI of clustering the held-out rows."""
    import torch

    from agc_ray.core.train import batch_loss
    from agc_ray.metrics import evaluate

    if x_val is None:
        return {}
    lander.eval()
    sums, count = np.zeros(2), 0
    with torch.no_grad():
        for g in val_graphs:
            for start in range(0, g.n, batch_size):
                seeds = torch.arange(start, min(start + batch_size, g.n), device=device)
                conn, den = batch_loss(
                    lander, g, seeds, balance=params["balance"], focal_gamma=params["focal_gamma"],
                    all_edges=params["conn_edges"] == "all",
                )
                sums += (conn.item(), den.item())
                count += 1
    t0 = time.perf_counter()
    est = _estimator(params, lander.state_dict(), x_val.shape[1], device)
    levels = est.predict_hierarchy(x_val)
    scores = evaluate(y_val, levels[-1])
    lander.train()
    return {
        "val_loss_conn": float(sums[0] / max(count, 1)),
        "val_loss_den": float(sums[1] / max(count, 1)),
        "val_fp": float(scores["fp"]),
        "val_fb": float(scores["fb"]),
        "val_nmi": float(scores["nmi"]),
        "val_levels": len(levels),
        "val_clusters": int(np.unique(levels[-1]).size),
        "val_seconds": time.perf_counter() - t0,
    }


def _save_checkpoint(state: dict, meta: dict):
    import torch
    from ray.train import Checkpoint

    tmp = tempfile.mkdtemp(prefix="agc_ckpt_")
    torch.save(state, os.path.join(tmp, STATE_FILE))
    Path(tmp, META_FILE).write_text(json.dumps(meta, indent=1))
    return tmp, Checkpoint.from_directory(tmp)


def _load_checkpoint(checkpoint) -> tuple[dict, dict]:
    import torch

    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        meta = json.loads(Path(d, META_FILE).read_text())
    return state, meta


def _maybe_inject_fault(fault: dict | None, epoch_done: int, rank: int) -> None:
    """Testing hook: kill this worker process once (a lost worker), after epoch ``fault['epoch']``."""
    if not fault or fault.get("epoch") != epoch_done or fault.get("rank", 1) != rank:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(str(epoch_done))
    time.sleep(fault.get("delay_s", 3.0))  # let the controller record the epoch's checkpoint first
    log.warning("fault injection: worker rank %d exits after epoch %d", rank, epoch_done)
    os._exit(1)


class _WorkerRun:
    """One rank's training run: the model, its level graphs, the resumed state and the history."""

    def __init__(self, config: dict):
        import ray
        import ray.train
        import ray.train.torch
        import torch

        from agc_ray.distributed import logs

        logs.configure(config.get("verbose", False))  # this process's loggers, as the driver's (before faiss loads)
        from agc_ray.core.estimator import HiLander

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(config["threads"])
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":  # a worker process of its own: reproducible weights for a seed, as in the core
            torch.use_deterministic_algorithms(True)
        self.config, self.params = config, config["params"]
        self.data = ray.get(config["data"])
        self.graphs = [graph_from_arrays(d, self.device) for d in self.data["train_graphs"]]
        self.val_graphs = [graph_from_arrays(d, self.device) for d in self.data["val_graphs"]] if self.rank == 0 else []
        self.dim = self.data["dim"]
        torch.manual_seed(self.params["seed"])
        self.lander = HiLander(**self.params).new_model(self.dim)
        self.state, self.start, self.history, self.resumes = None, 0, [], []

    def resume_or_initialise(self) -> None:
        """Weights, epoch, history and resumes from Ray Train's checkpoint; else the input standardisation
        fitted on the training graphs, as the core does."""
        import ray.train
        import torch

        from agc_ray.core.train import fit_normalization

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            fit_normalization(self.lander, [graph_from_arrays(d) for d in self.data["train_graphs"]],
                              torch.Generator().manual_seed(self.params["seed"]))
            return
        state, meta = _load_checkpoint(checkpoint)
        if meta["fingerprint"] != self.config["fingerprint"]:
            raise RuntimeError(f"checkpoint {checkpoint.path} was trained on other data ({meta['fingerprint'][:12]})")
        self.lander.load_state_dict(state["model"])
        self.state, self.start = state, int(state["epoch"])
        self.history, self.resumes = list(state["history"]), [*state["resumes"], self.start]
        log.info("rank %d: resumed from the checkpoint of epoch %d", self.rank, self.start)

    def add_own_levels(self, loss_module, boundary: dict | None) -> dict:
        """Self-training: the model's own levels of the training rows, from the weights at the phase
        boundary (kept in checkpoints, so that a resumed run rebuilds the same graphs). Returns them."""
        from agc_ray.core.train import self_training_graphs

        if boundary is None:
            boundary = {k: v.detach().cpu().clone() for k, v in self.lander.state_dict().items()}
        est = _estimator(self.params, boundary, self.dim, self.device)
        own = est.own_levels(self.data["x_train"], self.data["y_train"])
        loss_module.graphs = self_training_graphs(self.graphs, [g.to(self.device) for g in own])
        log.info("rank %d: self-training with %d own level graphs (%s nodes)", self.rank, len(own), [g.n for g in own])
        return boundary

    def train_epoch(self, model, loss_module, opt, sched, epoch: int):
        """One epoch of global batches, this rank's share of each; the loss sums over every rank."""
        import torch
        import torch.distributed as dist

        seed, bs, epochs = self.params["seed"], self.params["batch_size"], self.params["epochs"]
        model.train()
        torch.manual_seed(seed * 7919 + epoch * 131 + self.rank)  # dropout: per rank, per epoch
        batches = epoch_batches(loss_module.graphs, bs, seed, epoch)
        sums = torch.zeros(3, dtype=torch.float64)
        ticker = progress.Ticker(f"epoch {epoch + 1}/{epochs}", len(batches), "batches") if self.rank == 0 else None
        for b, (gi, seeds) in enumerate(batches):
            if ticker is not None:
                ticker.tick(b)
            mine, weight = rank_share(seeds, self.rank, self.world)
            conn, den = model(gi, mine.to(self.device))
            loss = (conn + den) * weight
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums += torch.tensor([conn.item() * weight, den.item() * weight, weight], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            sums = sums.to(self.device)  # NCCL reduces CUDA tensors only
            dist.all_reduce(sums)  # the mean over every rank's batches
            sums = sums.cpu()
        return sums

    def validate_and_checkpoint(self, rec: dict, phase_index: int, opt, sched, boundary):
        """Rank 0: validation metrics into ``rec``, the history, the log line and (every
        ``checkpoint_every`` epochs and after the last) a checkpoint. ``(tmp_dir, checkpoint)``."""
        epoch, epochs = rec["epoch"], self.params["epochs"]
        rec.update(_validate_epoch(self.lander, self.val_graphs, self.data["x_val"], self.data["y_val"], self.params,
                                   self.params["batch_size"], self.device))
        self.history.append(rec)
        recent = self.history[-3:]
        left = (epochs - epoch) * sum(h["seconds"] for h in recent) / len(recent)
        log.info("epoch %d/%d: %s%s", epoch, epochs, {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()},
                 f"; ETA {progress.duration(left)}" if epoch < epochs else "")
        if epoch % self.config["checkpoint_every"] and epoch != epochs:
            return None, None
        state_out = {
            "model": self.lander.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "epoch": epoch, "phase": phase_index, "history": self.history, "resumes": self.resumes,
            "boundary": boundary,
        }
        return _save_checkpoint(state_out, {"fingerprint": self.config["fingerprint"], "epoch": epoch,
                                            "params": self.params})


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function (one process per rank). See the module docstring.

    ``config``: ``params`` (HiLander parameters), ``data`` (ObjectRef of the prepared data with its
    level graphs), ``threads``, ``checkpoint_every``, ``fingerprint``, optional ``fault``.
    """
    import ray.train
    import ray.train.torch

    from agc_ray.core.train import epoch_steps, optimizer, training_phases

    run = _WorkerRun(config)
    run.resume_or_initialise()
    params = run.params
    loss_module = _loss_module(run.lander, run.graphs, balance=params["balance"], focal_gamma=params["focal_gamma"],
                               all_edges=params["conn_edges"] == "all")
    model = ray.train.torch.prepare_model(loss_module)
    state, start = run.state, run.start
    boundary = state.get("boundary") if state else None
    for phase in training_phases(params["epochs"], params["self_training"]):
        if phase is None or phase.stop <= start:
            continue
        if phase.index == 1:
            boundary = run.add_own_levels(loss_module, boundary)
        opt, sched = optimizer(run.lander, lr=params["lr"], weight_decay=params["weight_decay"],
                               total_steps=phase.epochs * epoch_steps(loss_module.graphs, params["batch_size"]))
        if state is not None and state["phase"] == phase.index and phase.start < start:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        for epoch in range(max(start, phase.start), phase.stop):
            t0 = time.perf_counter()
            sums = run.train_epoch(model, loss_module, opt, sched, epoch)
            seconds = time.perf_counter() - t0
            seed_nodes = sum(g.n for g in loss_module.graphs)
            rec = {
                "epoch": epoch + 1, "phase": phase.index,
                "loss_conn": float(sums[0] / sums[2]), "loss_den": float(sums[1] / sums[2]),
                "seconds": seconds, "seed_nodes": int(seed_nodes), "seed_nodes_per_s": seed_nodes / seconds,
            }
            tmp, checkpoint = run.validate_and_checkpoint(rec, phase.index, opt, sched, boundary) \
                if run.rank == 0 else (None, None)
            ray.train.report({**rec, "resumes": run.resumes}, checkpoint=checkpoint)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            _maybe_inject_fault(config.get("fault"), epoch + 1, run.rank)
        state = None  # the next phase starts with a fresh optimiser
