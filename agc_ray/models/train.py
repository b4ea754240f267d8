"""Full-batch training loop with a progress bar."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from agc_ray.data.validation import check_graph
from agc_ray.models.base import as_data


def fit(
    model: torch.nn.Module,
    data: Any,
    epochs: int = 200,
    lr: float = 1e-3,
    *,
    weight_decay: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
    callback: Callable[[int, float], Any] | None = None,
) -> list[float]:
    """Train ``model`` full-batch: each epoch is one step on ``loss = model(data)``.

    Args:
        model: a :class:`~agc_ray.models.ClusteringModel` (any module whose ``forward(data)``
            returns a scalar loss).
        data: a PyG ``Data`` with ``x`` and ``edge_index`` or a tuple ``(x, edge_index[, y])``;
            checked once, moved to the model's device.
        epochs: number of steps (>= 0).
        lr: Adam learning rate (> 0), unless ``optimizer`` is given.
        weight_decay: Adam weight decay (>= 0), unless ``optimizer`` is given.
        optimizer: an optimiser over the model's parameters (default: Adam).
        progress: show a tqdm progress bar with the current loss.
        callback: called as ``callback(epoch, loss)`` after each step (epoch counts from 1).

    Returns:
        The loss of every epoch (floats).

    Raises:
        ValueError: bad arguments or graph; FloatingPointError: the loss became NaN or infinite.
    """
    from tqdm.auto import tqdm

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"fit: epochs must be an int >= 0, got {epochs!r}")
    if optimizer is None:
        if not lr > 0:
            raise ValueError(f"fit: lr must be > 0, got {lr!r}")
        if not weight_decay >= 0:
            raise ValueError(f"fit: weight_decay must be >= 0, got {weight_decay!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"fit: {type(model).__name__} has no trainable parameters")
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    data = as_data(data)
    check_graph(data)
    param = next(model.parameters(), None)
    if param is not None:
        data = data.to(param.device)

    losses: list[float] = []
    model.train()
    bar = tqdm(range(1, epochs + 1), desc=f"fit {type(model).__name__}", disable=not progress, leave=False)
    for epoch in bar:
        optimizer.zero_grad()
        loss = model(data)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"fit: the loss of {type(model).__name__} is {value} at epoch {epoch}")
        loss.backward()
        optimizer.step()
        losses.append(value)
        if progress:
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if callback is not None:
            callback(epoch, value)
    bar.close()
    model.eval()
    return losses
