"""An MLP encoder that takes (and ignores) the graph, so it plugs in wherever a GNN does."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch_geometric.nn.models import MLP as _PyGMLP


class MLP(_PyGMLP):
    r"""PyG's :class:`torch_geometric.nn.models.MLP` with the constructor order of PyG's GNN models
    and their call signature ``encoder(x, edge_index)``; the edges are ignored.

    Args:
        in_channels (int): input features F_in.
        hidden_channels (int): hidden features.
        num_layers (int): number of linear layers (>= 1).
        out_channels (int, optional): output features (default: ``hidden_channels``).
        dropout (float, optional): dropout between layers. (default: ``0.0``)
        act (str or callable, optional): activation. (default: ``"relu"``)
        norm (str or callable, optional): normalisation between layers; ``None`` (unlike PyG's
            MLP, whose default is batch norm) to match PyG's GNN models. (default: ``None``)
        **kwargs: further arguments of PyG's MLP (``plain_last``, ``bias``, ...).

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F_{in})`, edge indices
          :math:`(2, |\mathcal{E}|)` *(ignored)*
        - **output:** :math:`(|\mathcal{V}|, F_{out})`
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        num_layers: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        act: Any = "relu",
        norm: Any = None,
        **kwargs: Any,
    ):
        if num_layers < 1:
            raise ValueError(f"MLP: num_layers must be >= 1, got {num_layers}")
        super().__init__(
            in_channels=in_channels,
            hidden_channels=hidden_channels,
            out_channels=hidden_channels if out_channels is None else out_channels,
            num_layers=num_layers,
            dropout=dropout,
            act=act,
            norm=norm,
            **kwargs,
        )

    def forward(self, x: Tensor, edge_index: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        return super().forward(x)
