"""DEC on a graph encoder: Student-t self-training, kept from collapsing by graph reconstruction."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from agc_ray.clusters.dec import DECClusterHead
from agc_ray.models.base import ClusteringModel, call_head


def edge_reconstruction_loss(z: Tensor, edge_index: Tensor) -> Tensor:
    r"""Inner-product graph reconstruction loss (as in GAE): binary cross-entropy of
    :math:`\sigma(\mathbf{z}_i^\top \mathbf{z}_j)` on the edges against as many uniformly random
    node pairs as negatives (in a sparse graph almost all of them are non-edges). O(E F)."""
    n = z.shape[0]
    src, dst = edge_index
    neg = torch.randint(0, n, (2, src.numel()), device=z.device)
    pos_logit = (z[src] * z[dst]).sum(dim=1)
    neg_logit = (z[neg[0]] * z[neg[1]]).sum(dim=1)
    return F.binary_cross_entropy_with_logits(
        pos_logit, torch.ones_like(pos_logit)
    ) + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))


class DEC(ClusteringModel):
    r"""Deep Embedded Clustering (`Xie et al., ICML 2016 <https://arxiv.org/abs/1511.06335>`_) on a
    graph encoder: ``encoder`` followed by a :class:`~agc_ray.clusters.DECClusterHead`.

    The loss is the head's KL self-training loss plus ``recon_weight`` times the graph reconstruction
    loss of :func:`edge_reconstruction_loss` on the same embeddings (the DAEGC recipe), which keeps
    the embeddings from collapsing onto the centres; ``recon_weight=0`` gives plain DEC. The
    centres are initialised by k-means on the first embeddings the head sees; :meth:`pretrain`
    first trains the encoder on reconstruction alone and then initialises them (DEC's two-stage
    recipe), which is optional.

    ``cluster_head`` may be replaced by any head (see :class:`~agc_ray.models.ClusteringModel`).

    Args:
        encoder, n_features, n_clusters: as :class:`~agc_ray.models.ClusteringModel`'s.
        alpha (float, optional): Student-t degrees of freedom. (default: ``1.0``)
        recon_weight (float, optional): weight of the reconstruction loss. (default: ``1.0``)

    Shapes:
        - **input:** ``data`` with x :math:`(|\mathcal{V}|, F_{in})` and edge_index
          :math:`(2, |\mathcal{E}|)`
        - **output:** ``forward``: scalar loss (KL plus ``recon_weight`` times reconstruction);
          ``infer_full``: :math:`(|\mathcal{V}|,)`
    """

    def __init__(self, encoder: torch.nn.Module, n_features: int, n_clusters: int, alpha: float = 1.0,
                 recon_weight: float = 1.0):
        if not recon_weight >= 0:
            raise ValueError(f"DEC: recon_weight must be >= 0, got {recon_weight}")
        super().__init__(encoder, n_features, n_clusters)
        self.alpha = alpha
        self.recon_weight = float(recon_weight)
        self.cluster_head = DECClusterHead(n_clusters, n_features, alpha=alpha)

    def forward(self, data: Any) -> Tensor:
        z, g, data = self._embed(data)
        loss = call_head(self.cluster_head, z, g, data)
        if self.recon_weight > 0:
            loss = loss + self.recon_weight * edge_reconstruction_loss(z, g.edge_index)
        return loss

    def pretrain(self, data: Any, epochs: int = 100, lr: float = 5e-3, progress: bool = False) -> list[float]:
        """Train the encoder on graph reconstruction alone, then initialise the head's centres by
        k-means on the embeddings (when the head has ``init_centers``). Returns the losses."""
        from agc_ray.models.train import fit

        class _Recon(torch.nn.Module):
            def __init__(self, model: DEC):
                super().__init__()
                self.model = model

            def forward(self, d):
                z, g, _ = self.model._embed(d)
                return edge_reconstruction_loss(z, g.edge_index)

        wrapper = _Recon(self)
        losses = fit(wrapper, data, epochs=epochs, lr=lr, progress=progress)  # the head gets no gradient
        if hasattr(self.cluster_head, "init_centers"):
            with torch.no_grad():
                self.eval()
                self.cluster_head.init_centers(self.embed(data))
        return losses
