"""The DMoN cluster head: spectral modularity with collapse regularisation."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import Parameter

from agc_ray.clusters.base import BaseClusterHead
from agc_ray.data.validation import check_n_clusters


class DMoNClusterHead(BaseClusterHead):
    r"""The Deep Modularity Networks head from `"Graph Clustering with Graph Neural Networks"
    <https://arxiv.org/abs/2006.16904>`_ (Tsitsulin et al., JMLR 2023).

    Soft assignments :math:`\mathbf{S} = \mathrm{softmax}(\mathbf{Z}\mathbf{W}^\top + \mathbf{b})`
    (dropout on the logits while training) and the loss

    .. math::
        \mathcal{L} = -\frac{1}{2m} \mathrm{Tr}\Big(\mathbf{S}^\top \mathbf{A} \mathbf{S}
        - \frac{\mathbf{S}^\top \mathbf{d}\, \mathbf{d}^\top \mathbf{S}}{2m}\Big)
        + \lambda \Big(\frac{\sqrt{K}}{N} \Big\|\sum_i \mathbf{S}_{i\cdot}\Big\|_2 - 1\Big),

    with :math:`\mathbf{d}` the degrees and :math:`2m` the total edge weight of the graph given to
    :meth:`forward` (undirected: each edge in both directions). Computed over the edge list, O(E K).

    Args:
        n_clusters (int): number of clusters K.
        n_features (int): embedding dimension F.
        lam (float, optional): weight :math:`\lambda` of the collapse regularisation.
            (default: ``1.0``)
        dropout (float, optional): dropout on the assignment logits while training.
            (default: ``0.0``)

    Shapes:
        - **input:** embeddings :math:`(|\mathcal{V}|, F)`, edge indices :math:`(2, |\mathcal{E}|)`,
          edge weights :math:`(|\mathcal{E}|)` *(optional)*
        - **output:** ``forward``: scalar; ``cluster``: :math:`(|\mathcal{V}|,)` or
          :math:`(|\mathcal{V}|, K)`
    """

    def __init__(self, n_clusters: int, n_features: int, lam: float = 1.0, dropout: float = 0.0):
        super().__init__()
        self.n_clusters = check_n_clusters(n_clusters, owner="DMoNClusterHead")
        if n_features < 1:
            raise ValueError(f"DMoNClusterHead: n_features must be >= 1, got {n_features}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"DMoNClusterHead: dropout must be in [0, 1), got {dropout}")
        self.n_features = n_features
        self.lam = float(lam)
        self.dropout = float(dropout)
        self.cluster_centers = Parameter(torch.empty(n_clusters, n_features))
        self.bias = Parameter(torch.empty(n_clusters))
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.init.orthogonal_(self.cluster_centers)
        torch.nn.init.zeros_(self.bias)

    def logits(self, z: Tensor) -> Tensor:
        """Assignment logits, shape (N, K)."""
        if z.dim() != 2 or z.shape[1] != self.n_features:
            raise ValueError(
                f"DMoNClusterHead: z must have shape (N, n_features={self.n_features}), got {tuple(z.shape)}"
            )
        return torch.nn.functional.linear(z, self.cluster_centers, self.bias)

    def losses(
        self, z: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The spectral (modularity) loss and the collapse regularisation, unweighted."""
        n = z.shape[0]
        check_n_clusters(self.n_clusters, n, "DMoNClusterHead")
        logits = torch.nn.functional.dropout(self.logits(z), self.dropout, self.training)
        s = logits.softmax(dim=1)
        src, dst = edge_index[0], edge_index[1]
        w = (
            torch.ones(src.numel(), dtype=s.dtype, device=s.device)
            if edge_weight is None
            else edge_weight.to(s.dtype)
        )
        two_m = w.sum()
        if src.numel() == 0 or not bool(two_m > 0):
            raise ValueError("DMoNClusterHead: the graph has no edges (total edge weight 0)")
        deg = torch.zeros(n, dtype=s.dtype, device=s.device).index_add_(0, src, w)
        trace_sas = (w * (s[src] * s[dst]).sum(dim=1)).sum()
        sd = s.t() @ deg  # (K,)
        spectral = -(trace_sas - sd.square().sum() / two_m) / two_m
        collapse = s.sum(dim=0).norm() / n * math.sqrt(self.n_clusters) - 1.0
        return spectral, collapse

    def forward(self, z: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        spectral, collapse = self.losses(z, edge_index, edge_weight)
        return spectral + self.lam * collapse

    @torch.no_grad()
    def cluster(self, z: Tensor, soft: bool = False) -> Tensor:
        logits = self.logits(z)
        return logits.softmax(dim=1) if soft else logits.argmax(dim=1)

    def extra_repr(self) -> str:
        return f"n_clusters={self.n_clusters}, n_features={self.n_features}, lam={self.lam}"
