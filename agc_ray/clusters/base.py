"""The cluster-head contract (PyAGC's ``BaseClusterHead``)."""

from __future__ import annotations

import abc

import torch
from torch import Tensor


class BaseClusterHead(torch.nn.Module, metaclass=abc.ABCMeta):
    r"""Base class of cluster heads: modules that turn node embeddings :math:`\mathbf{Z}` into a
    clustering loss (training) and into cluster assignments (inference).

    A subclass calls ``super().__init__()`` and implements two methods:

    - ``forward(z, ...)``: a scalar loss tensor. Besides ``z`` it may name what it needs, and a
      :class:`~agc_ray.models.ClusteringModel` passes exactly that: ``edge_index`` (2, E),
      ``edge_weight`` (E,) or None, ``adj``/``adjacency`` (a sparse (N, N) tensor), ``graph``/``data``
      (the input graph object), ``x`` (N, F_in) or ``num_nodes``.
    - ``cluster(z, soft=False)``: (N,) int64 labels, or with ``soft=True`` an (N, K) matrix of
      probabilities whose rows sum to 1.

    :meth:`predict` is an alias of :meth:`cluster`.

    Shapes:
        - **input:** node embeddings :math:`(|\mathcal{V}|, F)`
        - **output:** ``forward``: scalar; ``cluster``: :math:`(|\mathcal{V}|,)` or
          :math:`(|\mathcal{V}|, K)`
    """

    @abc.abstractmethod
    def forward(self, z: Tensor, *args, **kwargs) -> Tensor:
        """Clustering loss of the embeddings ``z`` (a scalar tensor)."""

    @abc.abstractmethod
    def cluster(self, z: Tensor, soft: bool = False) -> Tensor:
        """Hard labels (N,) int64, or soft assignments (N, K) with rows summing to 1."""

    def predict(self, z: Tensor, soft: bool = False) -> Tensor:
        """Alias of :meth:`cluster`."""
        return self.cluster(z, soft=soft)
