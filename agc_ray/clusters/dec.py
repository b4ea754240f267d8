"""The DEC cluster head: Student-t soft assignments trained towards their sharpened target."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import Parameter

from agc_ray.clusters.base import BaseClusterHead
from agc_ray.clusters.kmeans import kmeans
from agc_ray.data.validation import check_n_clusters


class DECClusterHead(BaseClusterHead):
    r"""The Deep Embedded Clustering head from `"Unsupervised Deep Embedding for Clustering Analysis"
    <https://arxiv.org/abs/1511.06335>`_ (Xie et al., ICML 2016).

    Soft assignments are a Student-t kernel between embeddings and learnable centres
    :math:`\boldsymbol{\mu}_j`,

    .. math::
        q_{ij} = \frac{(1 + \|\mathbf{z}_i - \boldsymbol{\mu}_j\|^2 / \alpha)^{-\frac{\alpha+1}{2}}}
        {\sum_{j'} (1 + \|\mathbf{z}_i - \boldsymbol{\mu}_{j'}\|^2 / \alpha)^{-\frac{\alpha+1}{2}}},

    and the loss is :math:`\mathrm{KL}(P \,\|\, Q)` (mean over nodes) to the sharpened target
    :math:`p_{ij} \propto q_{ij}^2 / \sum_i q_{ij}`, which is held constant (no gradient).

    The centres are initialised by k-means (faiss) on the first ``z`` that :meth:`forward` sees, or
    explicitly by :meth:`init_centers` (k-means on a given ``z``) or :meth:`reset_cluster_centers`.
    :meth:`cluster` uses the current centres as they are.

    Args:
        n_clusters (int): number of clusters K.
        n_features (int): embedding dimension F.
        alpha (float, optional): degrees of freedom of the Student-t kernel. (default: ``1.0``)
        n_init (int, optional): k-means restarts of the initialisation. (default: ``10``)
        random_state (int, optional): k-means seed. (default: ``0``)

    Shapes:
        - **input:** :math:`(|\mathcal{V}|, F)`
        - **output:** ``forward``: scalar KL loss; ``cluster``: :math:`(|\mathcal{V}|,)` or
          :math:`(|\mathcal{V}|, K)` (Student-t assignments)
    """

    def __init__(
        self,
        n_clusters: int,
        n_features: int,
        alpha: float = 1.0,
        n_init: int = 10,
        random_state: int | None = 0,
    ):
        super().__init__()
        self.n_clusters = check_n_clusters(n_clusters, owner="DECClusterHead")
        if n_features < 1:
            raise ValueError(f"DECClusterHead: n_features must be >= 1, got {n_features}")
        if not alpha > 0:
            raise ValueError(f"DECClusterHead: alpha must be > 0, got {alpha}")
        self.n_features = n_features
        self.alpha = float(alpha)
        self.n_init = n_init
        self.random_state = random_state
        self.cluster_centers = Parameter(torch.empty(n_clusters, n_features))
        self.register_buffer("initialized", torch.tensor(False))
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.init.xavier_uniform_(self.cluster_centers)
        self.initialized.fill_(False)

    def _check_z(self, z: Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.n_features:
            raise ValueError(
                f"DECClusterHead: z must have shape (N, n_features={self.n_features}), got {tuple(z.shape)}"
            )

    @torch.no_grad()
    def init_centers(self, z: Tensor) -> DECClusterHead:
        """Set the centres to the k-means centres of ``z`` (N >= n_clusters rows)."""
        self._check_z(z)
        check_n_clusters(self.n_clusters, z.shape[0], "DECClusterHead")
        centers, _, _ = kmeans(z, self.n_clusters, n_init=self.n_init, random_state=self.random_state)
        return self.reset_cluster_centers(torch.from_numpy(centers))

    @torch.no_grad()
    def reset_cluster_centers(self, centers: Tensor) -> DECClusterHead:
        """Set the centres to ``centers`` of shape (n_clusters, n_features)."""
        centers = torch.as_tensor(centers)
        if tuple(centers.shape) != tuple(self.cluster_centers.shape):
            raise ValueError(
                f"DECClusterHead: centers must have shape {tuple(self.cluster_centers.shape)}, "
                f"got {tuple(centers.shape)}"
            )
        self.cluster_centers.copy_(centers)
        self.initialized.fill_(True)
        return self

    def log_soft_assign(self, z: Tensor) -> Tensor:
        """Log of the Student-t soft assignments Q, shape (N, K)."""
        self._check_z(z)
        sq = torch.cdist(z, self.cluster_centers).square()
        return torch.log_softmax(-(self.alpha + 1.0) / 2.0 * torch.log1p(sq / self.alpha), dim=1)

    @staticmethod
    def target_distribution(q: Tensor) -> Tensor:
        """The sharpened target P of soft assignments Q (N, K): p_ij ∝ q_ij^2 / f_j, f_j = Σ_i q_ij."""
        p = q.square() / q.sum(dim=0).clamp_min(1e-12)
        return p / p.sum(dim=1, keepdim=True)

    def forward(self, z: Tensor) -> Tensor:
        if not bool(self.initialized):
            self.init_centers(z.detach())
        log_q = self.log_soft_assign(z)
        p = self.target_distribution(log_q.detach().exp())
        return (p * (torch.log(p.clamp_min(1e-12)) - log_q)).sum(dim=1).mean()

    @torch.no_grad()
    def cluster(self, z: Tensor, soft: bool = False) -> Tensor:
        log_q = self.log_soft_assign(z)
        return log_q.exp() if soft else log_q.argmax(dim=1)

    def extra_repr(self) -> str:
        return f"n_clusters={self.n_clusters}, n_features={self.n_features}, alpha={self.alpha}"
