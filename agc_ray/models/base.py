"""The encoder + cluster-head model base (PyAGC's ``ClusteringModel``) and the argument dispatch
that lets any :class:`~agc_ray.clusters.BaseClusterHead` be dropped into any model."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch_geometric.data import Data

from agc_ray.data.validation import Graph, check_graph, check_n_clusters

#: What a model can hand to a head's ``forward`` besides ``z``, by parameter name.
HEAD_ARGUMENTS: dict[str, Callable[[Graph, Data], Any]] = {
    "edge_index": lambda g, data: g.edge_index,
    "edge_weight": lambda g, data: g.edge_weight,
    "adj": lambda g, data: adjacency(g),
    "adjacency": lambda g, data: adjacency(g),
    "graph": lambda g, data: data,
    "data": lambda g, data: data,
    "x": lambda g, data: g.x,
    "num_nodes": lambda g, data: g.x.shape[0],
}


def adjacency(g: Graph) -> Tensor:
    """The (N, N) sparse COO adjacency of a graph (edge weights or ones; duplicates summed)."""
    n = g.x.shape[0]
    w = g.edge_weight
    if w is None:
        w = torch.ones(g.edge_index.shape[1], dtype=g.x.dtype, device=g.edge_index.device)
    return torch.sparse_coo_tensor(g.edge_index, w, (n, n), check_invariants=False).coalesce()


def as_data(data: Any) -> Data:
    """A PyG ``Data`` for a ``Data`` (returned as is), a Data-like object or an ``(x, edge_index[, y])``
    tuple as :func:`agc_ray.data.get_dataset` returns."""
    if isinstance(data, Data):
        return data
    if isinstance(data, (tuple, list)):
        if len(data) not in (2, 3):
            raise ValueError(f"a graph tuple must be (x, edge_index[, y]), got {len(data)} items")
        return Data(x=data[0], edge_index=data[1], y=data[2] if len(data) == 3 else None)
    x, edge_index, edge_weight = check_graph(data)
    return Data(x=x, edge_index=edge_index, edge_weight=edge_weight, y=getattr(data, "y", None))


def resolve_head_arguments(
    forward: Callable, z: Tensor, g: Graph, data: Data, owner: str
) -> tuple[list, dict]:
    """The ``(args, kwargs)`` to call a head with: ``z`` first, then exactly the further parameters
    that ``forward`` names among :data:`HEAD_ARGUMENTS`. A required parameter the model cannot
    supply is a ValueError; optional ones it does not know keep their defaults."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):  # no introspectable signature: just z
        return [z], {}
    args: list[Any] = [z]
    kwargs: dict[str, Any] = {}
    rest = params[1:] if params and params[0].kind != inspect.Parameter.VAR_POSITIONAL else []
    for p in rest:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if p.name in HEAD_ARGUMENTS:
            value = HEAD_ARGUMENTS[p.name](g, data)
            if p.kind == inspect.Parameter.POSITIONAL_ONLY:
                args.append(value)
            else:
                kwargs[p.name] = value
        elif p.default is inspect.Parameter.empty:
            raise ValueError(
                f"{owner}.forward has a required parameter {p.name!r} that the model cannot supply; "
                f"it can pass z and any of {sorted(HEAD_ARGUMENTS)}"
            )
    return args, kwargs


def call_head(head: torch.nn.Module, z: Tensor, g: Graph, data: Data) -> Tensor:
    """Run ``head(z, ...)`` with only the arguments ``head.forward`` names (see
    :func:`resolve_head_arguments`) and check that the result is a scalar loss (a tuple or list of
    losses, as some PyAGC heads return, is summed)."""
    owner = type(head).__name__
    args, kwargs = resolve_head_arguments(head.forward, z, g, data, owner)
    return check_loss(head(*args, **kwargs), owner)


def check_loss(loss: Any, owner: str) -> Tensor:
    """A head's loss as a 0-dim tensor; ValueError if it is not a single number."""
    if (
        isinstance(loss, (tuple, list))
        and loss
        and all(isinstance(t, Tensor) and t.numel() == 1 for t in loss)
    ):
        loss = torch.stack([t.reshape(()) for t in loss]).sum()
    if not isinstance(loss, Tensor):
        raise ValueError(f"{owner}.forward must return a scalar loss tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{owner}.forward must return a scalar loss tensor, got shape {tuple(loss.shape)}")
    return loss.reshape(())


def check_assignments(out: Any, n_nodes: int, soft: bool, n_clusters: int | None, owner: str) -> Tensor:
    """Check what ``cluster(z, soft)`` returned: (N,) integer labels, or (N, K) probabilities."""
    what = f"{owner}.cluster(z, soft={soft})"
    if not isinstance(out, Tensor):
        raise ValueError(f"{what} must return a tensor, got {type(out).__name__}")
    if not soft:
        if tuple(out.shape) != (n_nodes,):
            raise ValueError(f"{what} must return labels of shape ({n_nodes},), got shape {tuple(out.shape)}")
        if out.is_floating_point() or out.is_complex() or out.dtype == torch.bool:
            raise ValueError(f"{what} must return integer labels, got dtype {out.dtype}")
        if out.numel() and int(out.min()) < 0:
            raise ValueError(f"{what} returned negative labels (min {int(out.min())})")
        if n_clusters is not None and out.numel() and int(out.max()) >= n_clusters:
            raise ValueError(f"{what} returned label {int(out.max())} >= n_clusters={n_clusters}")
        return out.long()
    k = "K" if n_clusters is None else str(n_clusters)
    if out.dim() != 2 or out.shape[0] != n_nodes or (n_clusters is not None and out.shape[1] != n_clusters):
        raise ValueError(
            f"{what} must return probabilities of shape ({n_nodes}, {k}), got shape {tuple(out.shape)}"
        )
    if not out.is_floating_point():
        raise ValueError(f"{what} must return floating probabilities, got dtype {out.dtype}")
    if out.numel() and (not bool(torch.isfinite(out).all()) or float(out.min()) < -1e-6):
        raise ValueError(f"{what} must return finite non-negative probabilities")
    row = out.sum(dim=1)
    if out.numel() and not bool(torch.allclose(row, torch.ones_like(row), atol=1e-4)):
        worst = int((row - 1).abs().argmax())
        raise ValueError(f"{what} rows must sum to 1; row {worst} sums to {float(row[worst]):.6f}")
    return out


class ClusteringModel(torch.nn.Module):
    r"""Base of encoder + cluster-head models (PyAGC's ``ClusteringModel``).

    A subclass calls ``super().__init__(encoder, n_features, n_clusters)`` (or ``super().__init__()``
    and sets ``self.encoder`` itself) and sets ``self.cluster_head`` (any
    :class:`~agc_ray.clusters.BaseClusterHead`); it may override :meth:`forward` and
    :meth:`infer_full`. The defaults:

    - :meth:`embed`: checks the graph and returns ``z = encoder(x, edge_index)``;
    - :meth:`forward`: the head's loss on ``z``, the head getting only the arguments its ``forward``
      names (``edge_index``, ``edge_weight``, ``adj``/``adjacency``, ``graph``/``data``, ``x``,
      ``num_nodes``), so ``cluster_head``, a plain attribute, may be replaced by any
      :class:`~agc_ray.clusters.BaseClusterHead`;
    - :meth:`infer_full`: (N,) int64 labels of every node (or (N, K) probabilities with
      ``soft=True``), checked for shape and type.

    ``data`` is a :class:`torch_geometric.data.Data` with ``x`` (N, F) and ``edge_index`` (2, E)
    (optional ``edge_weight``), or a tuple ``(x, edge_index[, y])``.

    Args:
        encoder (torch.nn.Module, optional): called as ``encoder(x, edge_index)``, returns (N, n_features).
        n_features (int, optional): the encoder's output dimension; enables the check of ``z``'s columns.
        n_clusters (int, optional): number of clusters K; enables the check that K <= N.
    """

    n_clusters: int | None = None
    n_features: int | None = None

    def __init__(self, encoder: torch.nn.Module | None = None, n_features: int | None = None,
                 n_clusters: int | None = None):
        super().__init__()
        if encoder is not None:
            self.encoder = encoder
        if n_features is not None:
            self.n_features = n_features
        if n_clusters is not None:
            self.n_clusters = check_n_clusters(n_clusters, owner=type(self).__name__)

    def _part(self, name: str) -> torch.nn.Module:
        part = getattr(self, name, None)
        if part is None:
            raise ValueError(f"{type(self).__name__} has no {name}: set self.{name} after super().__init__()")
        return part

    def _embed(self, data: Any) -> tuple[Tensor, Graph, Data]:
        data = as_data(data)
        g = check_graph(data)
        if self.n_clusters is not None:
            check_n_clusters(self.n_clusters, g.x.shape[0], type(self).__name__)
        encoder = self._part("encoder")
        z = _encode(encoder, g)
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[0] != g.x.shape[0]:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(
                f"{type(encoder).__name__} must return embeddings of shape (N={g.x.shape[0]}, F), got {shape}"
            )
        if self.n_features is not None and z.shape[1] != self.n_features:
            raise ValueError(
                f"{type(encoder).__name__} returns {z.shape[1]} features but {type(self).__name__} "
                f"was built with n_features={self.n_features}"
            )
        return z, g, data

    def reset_parameters(self):
        """Reset the encoder's and the cluster head's parameters (each that has ``reset_parameters``)."""
        for module in (getattr(self, "encoder", None), getattr(self, "cluster_head", None)):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def embed(self, data: Any) -> Tensor:
        """Node embeddings z = encoder(x, edge_index), shape (N, F)."""
        return self._embed(data)[0]

    def forward(self, data: Any) -> Tensor:
        """The training loss (a scalar tensor)."""
        z, g, data = self._embed(data)
        return call_head(self._part("cluster_head"), z, g, data)

    @torch.no_grad()
    def infer_full(self, data: Any, soft: bool = False) -> Tensor:
        """Cluster every node in eval mode: (N,) int64 labels, or (N, K) probabilities if ``soft``."""
        was_training = self.training
        self.eval()
        try:
            z = self.embed(data)
            head = self._part("cluster_head")
            out = head.cluster(z, soft=soft)
        finally:
            self.train(was_training)
        return check_assignments(out, z.shape[0], soft, self.n_clusters, type(head).__name__)

    def train_full(
        self, data: Any, optimizer: torch.optim.Optimizer, epoch: int | None = None, verbose: bool = False
    ) -> float:
        """One full-batch optimisation step (PyAGC's ``train_full``); returns the loss."""
        self.train()
        optimizer.zero_grad()
        loss = self(data)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        if verbose:
            print(f"Epoch: {epoch if epoch is not None else '-':>03} Loss: {value:.4f}")
        return value


def _encode(encoder: torch.nn.Module, g: Graph) -> Tensor:
    """``encoder(x, edge_index)``, adding ``edge_weight=`` when the graph has weights and the
    encoder's forward names that parameter."""
    if g.edge_weight is not None:
        try:
            names = inspect.signature(encoder.forward).parameters
        except (TypeError, ValueError):
            names = {}
        if "edge_weight" in names:
            return encoder(g.x, g.edge_index, edge_weight=g.edge_weight)
    return encoder(g.x, g.edge_index)
