"""DMoN: a GNN encoder trained end to end with the spectral-modularity cluster head."""

from __future__ import annotations

import torch

from agc_ray.clusters.dmon import DMoNClusterHead
from agc_ray.models.base import ClusteringModel


class DMoN(ClusteringModel):
    r"""Deep Modularity Networks from `"Graph Clustering with Graph Neural Networks"
    <https://arxiv.org/abs/2006.16904>`_ (Tsitsulin et al., JMLR 2023): ``encoder`` followed by a
    :class:`~agc_ray.clusters.DMoNClusterHead`, trained jointly on the head's loss.

    ``cluster_head`` may be replaced by any head (see :class:`~agc_ray.models.ClusteringModel`).

    Args:
        encoder, n_features, n_clusters: as :class:`~agc_ray.models.ClusteringModel`'s.
        lam (float, optional): weight of the collapse regularisation. (default: ``1.0``)
        dropout (float, optional): dropout on the assignment logits. (default: ``0.0``)

    Shapes:
        - **input:** ``data`` with x :math:`(|\mathcal{V}|, F_{in})` and edge_index
          :math:`(2, |\mathcal{E}|)`
        - **output:** ``forward``: scalar loss (modularity plus collapse regularisation);
          ``infer_full``: :math:`(|\mathcal{V}|,)`
    """

    def __init__(self, encoder: torch.nn.Module, n_features: int, n_clusters: int, lam: float = 1.0,
                 dropout: float = 0.0):
        super().__init__(encoder, n_features, n_clusters)
        self.lam = lam
        self.dropout = dropout
        self.cluster_head = DMoNClusterHead(n_clusters, n_features, lam=lam, dropout=dropout)
