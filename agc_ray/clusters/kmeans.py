"""k-means with faiss (or scikit-learn), and the post-hoc k-means cluster head."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from agc_ray.clusters.base import BaseClusterHead
from agc_ray.data.validation import check_features, check_n_clusters

BACKENDS = ("faiss", "sklearn", "torch")


def kmeans(
    z,
    n_clusters: int,
    *,
    n_init: int = 10,
    max_iter: int = 300,
    random_state: int | None = 0,
    backend: str = "faiss",
) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's k-means on the rows of ``z`` (N, F), best of ``n_init`` seeded restarts.

    Args:
        z: (N, F) tensor or array, finite.
        n_clusters: K, 1 <= K <= N.
        n_init: restarts (the lowest-inertia run is kept).
        max_iter: Lloyd iterations per restart.
        random_state: seed (None: 0 for faiss, random for scikit-learn).
        backend: 'faiss' (default; 'torch', PyAGC's default name, runs faiss as well) or 'sklearn'.

    Returns:
        ``(centers, labels, inertia)``: (K, F) float32, (N,) int64 and the mean squared distance of a
        row to its centre.
    """
    if backend not in BACKENDS:
        raise ValueError(f"kmeans: backend must be one of {BACKENDS}, got {backend!r}")
    if n_init < 1 or max_iter < 1:
        raise ValueError(
            f"kmeans: n_init and max_iter must be >= 1, got n_init={n_init}, max_iter={max_iter}"
        )
    if isinstance(z, Tensor):
        z = z.detach().cpu()
    x = np.ascontiguousarray(check_features(z, "z").numpy(), dtype=np.float32)
    n, d = x.shape
    n_clusters = check_n_clusters(n_clusters, n, "kmeans")
    if backend == "sklearn":
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters, n_init=n_init, max_iter=max_iter, random_state=random_state).fit(x)
        centers = km.cluster_centers_.astype(np.float32)
        labels = km.labels_.astype(np.int64)
    else:
        import faiss

        km = faiss.Kmeans(
            d,
            n_clusters,
            niter=max_iter,
            nredo=n_init,
            seed=0 if random_state is None else int(random_state),
            min_points_per_centroid=1,  # no warning for small N; all rows are used below
            max_points_per_centroid=n,  # no subsampling
            verbose=False,
        )
        km.train(x)
        centers = km.centroids.astype(np.float32)
        _, idx = km.index.search(x, 1)
        labels = idx[:, 0].astype(np.int64)
    inertia = float(np.square(x - centers[labels]).sum(axis=1).mean())
    return centers, labels, inertia


class KMeansClusterHead(BaseClusterHead):
    r"""Post-hoc k-means on the embeddings (faiss by default), with the centres kept for inference.

    There is no trainable clustering loss: :meth:`forward` refits k-means on ``z`` (detached) and
    returns the inertia, the mean squared distance of each row to its nearest centre, as a tensor
    that is differentiable in ``z`` so that the head still fits the contract. :meth:`cluster` assigns
    rows to the stored centres; on a head that has not been fitted it fits on ``z`` first.

    Args:
        n_clusters (int): number of clusters K.
        backend (str, optional): ``"faiss"``, ``"sklearn"``, or ``"torch"`` (PyAGC's default name;
            runs faiss here). (default: ``"faiss"``)
        n_init (int, optional): restarts. (default: ``10``)
        max_iter (int, optional): iterations per restart. (default: ``300``)
        random_state (int, optional): seed. (default: ``0``)

    Shapes:
        - **input:** :math:`(|\mathcal{V}|, F)`
        - **output:** ``forward``: scalar inertia; ``cluster``: :math:`(|\mathcal{V}|,)` or
          :math:`(|\mathcal{V}|, K)` (softmax of the negative distances)
    """

    def __init__(
        self,
        n_clusters: int,
        backend: str = "faiss",
        n_init: int = 10,
        max_iter: int = 300,
        random_state: int | None = 0,
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"KMeansClusterHead: backend must be one of {BACKENDS}, got {backend!r}")
        self.n_clusters = check_n_clusters(n_clusters, owner="KMeansClusterHead")
        self.backend = backend
        self.n_init = n_init
        self.max_iter = max_iter
        self.random_state = random_state
        self.register_buffer("cluster_centers", torch.empty(0))

    @property
    def fitted(self) -> bool:
        return self.cluster_centers.numel() > 0

    @torch.no_grad()
    def fit(self, z: Tensor) -> KMeansClusterHead:
        """Fit k-means on ``z`` and store the centres."""
        centers, _, _ = kmeans(
            z,
            self.n_clusters,
            n_init=self.n_init,
            max_iter=self.max_iter,
            random_state=self.random_state,
            backend=self.backend,
        )
        self.cluster_centers = torch.from_numpy(centers).to(device=z.device, dtype=z.dtype)
        return self

    @torch.no_grad()
    def fit_predict(self, z: Tensor) -> Tensor:
        """Fit k-means on ``z`` and return its (N,) int64 labels."""
        return self.fit(z).cluster(z)

    def _sq_dist(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.cluster_centers.shape[1]:
            raise ValueError(
                f"KMeansClusterHead: z must have shape (N, {self.cluster_centers.shape[1]}) like the "
                f"fitted centres, got {tuple(z.shape)}"
            )
        return torch.cdist(z, self.cluster_centers.to(z.dtype)).square()

    def forward(self, z: Tensor) -> Tensor:
        self.fit(z.detach())
        return self._sq_dist(z).min(dim=1).values.mean()

    @torch.no_grad()
    def cluster(self, z: Tensor, soft: bool = False) -> Tensor:
        if not self.fitted:
            self.fit(z)
        dist = self._sq_dist(z)
        if soft:
            return (-dist.sqrt()).softmax(dim=-1)
        return dist.argmin(dim=-1)

    def extra_repr(self) -> str:
        return f"n_clusters={self.n_clusters}, backend={self.backend!r}"
