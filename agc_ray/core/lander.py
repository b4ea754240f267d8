r"""The LANDER model: a graph conv over the kNN graph, an edge-linkage head and a density head.

Node input (per level): ``[x_id || x_mean]`` (2D) where ``x_id`` is the node's identity feature (its
peak's at higher levels) and ``x_mean`` the normalised mean of its original members (both halves
equal at level 0).

- :class:`LanderConv`: :math:`h_i = \mathrm{ReLU}(W [u_i \,\|\, \sum_j a_{ij} u_j] + b)` with
  :math:`a_{ij} = s_{ij} / \sum_j s_{ij}`. The neighbour mean is over the *inputs* :math:`u`, so it has
  no parameters and is computed once per level graph (:func:`node_inputs`): a mini-batch then needs
  only its seeds and their direct neighbours, never a 2-hop gather.
- :class:`GATLanderConv`: the GAT option (PyG ``GATConv``), with the similarity as an edge attribute.
- :class:`EdgeHead`: :math:`z_{ij} = \mathrm{MLP}(W_s h_j + W_d h_i + W_e f_{ij})`. The two node
  projections are computed once per node (N of them, not N k), and :math:`f_{ij}` are structural
  edge features (similarity, rank, mutual-ness, shared neighbours, ...) that give the head the
  similarity itself, which the reference withholds (it then learns slower than raw cosine ranks).
- :func:`predicted_density`: parameter-free, :math:`\hat d_i = \mathrm{mean}_j\, s_{ij}(2p_{ij}-1)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agc_ray.core.graph import N_EDGE_FEATURES, aggregation_weights, mean_valid, weighted_neighbor_mean
from agc_ray.core.params import DEFAULTS


def node_inputs(x_id: torch.Tensor, x_mean: torch.Tensor, nbr: torch.Tensor, sim: torch.Tensor, rows: torch.Tensor):
    """Inputs of :class:`LanderConv` for ``rows``: features and their similarity-weighted neighbour mean.

    Returns ``(raw, rel)``:

    - raw ``[u_i || sum_j a_ij u_j]`` with ``u = [x_id || x_mean]`` (the reference's input);
    - rel ``[s_i || sum_j a_ij s_j]``, the node's sorted neighbour similarities and its neighbours'
      (a density profile). It describes the neighbourhood, not the identity, so it transfers to
      identities never seen in training where raw embeddings alone overfit.

    The neighbour mean is over inputs, so it is parameter-free: a batch needs its rows and their
    direct neighbours only, gathered here in chunks.

    At level 0 (``x_mean is x_id``) the two halves are equal and raw is returned without the
    duplicate, ``[x_i || sum_j a_ij x_j]`` (M, 2D); :class:`LanderConv` folds its weights to match,
    which halves the cost of the largest level.

    Shapes:
        x_id, x_mean (N, D); nbr, sim (N, k); rows (M,) -> raw (M, 4D) or (M, 2D), rel (M, 2k).
    """
    nb = nbr[rows]
    w = aggregation_weights(sim[rows], nb >= 0)
    agg_id = weighted_neighbor_mean(x_id, nb, w)
    if x_mean is x_id:
        raw = torch.cat([x_id[rows], agg_id], dim=1)
    else:
        raw = torch.cat([x_id[rows], x_mean[rows], agg_id, weighted_neighbor_mean(x_mean, nb, w)], dim=1)
    return raw, relational_profile(nbr, sim, rows, w)


def relational_profile(nbr: torch.Tensor, sim: torch.Tensor, rows: torch.Tensor, weights=None) -> torch.Tensor:
    """``[s_i || sum_j a_ij s_j]``: a node's sorted neighbour similarities and its neighbours' mean profile.

    Shapes:
        nbr, sim (N, k); rows (M,) -> (M, 2k).
    """
    nb, s = nbr[rows], sim[rows]
    weights = aggregation_weights(s, nb >= 0) if weights is None else weights
    return torch.cat([s, weighted_neighbor_mean(sim, nb, weights)], dim=1)


def input_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout: zero each entry with probability ``p``, scale the others by ``1 / (1 - p)``.

    The same distribution as ``F.dropout``, its mask drawn from uniforms in place: torch's CPU dropout
    samples Bernoulli variables at a third of that speed (an 11K x 512 batch input: 69 ms against 20 ms,
    a third of a training step).
    """
    if not training or p == 0.0:
        return x
    return x * torch.rand_like(x).ge_(p).mul_(1.0 / (1.0 - p))


class LanderConv(nn.Module):
    r"""Similarity-weighted mean conv: :math:`h_i = \mathrm{ReLU}(\mathrm{LN}(W [u_i \| \sum_j a_{ij} u_j] + R [r_i \| \sum_j a_{ij} r_j] + b))`.

    Args:
        in_channels: size of u (2D).
        out_channels: size of h.
        rel_channels: size of the relational profile r (k).
        dropout: dropout on the raw-feature input (regularises identity-specific features).

    Shapes:
        raw (M, 2 in_channels) or at level 0 (M, in_channels), rel (M, 2 rel_channels) from
        :func:`node_inputs` -> (M, out_channels).
    """

    def __init__(self, in_channels: int, out_channels: int, rel_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.rel_channels = rel_channels
        self.dropout = dropout
        self.lin = nn.Linear(2 * in_channels, out_channels)
        self.lin_rel = nn.Linear(2 * rel_channels, out_channels, bias=False)
        self.norm = nn.LayerNorm(out_channels)

    def reset_parameters(self):
        self.lin.reset_parameters()
        self.lin_rel.reset_parameters()
        self.norm.reset_parameters()

    def forward(self, raw: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        raw = input_dropout(raw, self.dropout, self.training)
        if raw.shape[1] == self.in_channels:
            # level 0: raw is [x || agg x] and u = [x || x]; fold the weights of the equal halves
            d = self.in_channels // 2
            w = self.lin.weight
            folded = torch.cat([w[:, :d] + w[:, d : 2 * d], w[:, 2 * d : 3 * d] + w[:, 3 * d :]], dim=1)
            out = F.linear(raw, folded, self.lin.bias)
        else:
            out = self.lin(raw)
        return F.relu(self.norm(out + self.lin_rel(rel)))


class GATLanderConv(nn.Module):
    """GAT option: attention over the kNN neighbours (PyG ``GATConv``) with the similarity as an edge
    attribute (the reference's GAT ignores it), plus the node's own input and relational profile.

    Shapes:
        u_src (S, in_channels), u_dst (M, in_channels), edge_index (2, E) with rows (src, dst),
        edge_sim (E,), rel (M, 2 rel_channels) -> (M, out_channels).
    """

    def __init__(self, in_channels: int, out_channels: int, rel_channels: int, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        from torch_geometric.nn import GATConv

        if out_channels % heads:
            raise ValueError(f"GATLanderConv: out_channels ({out_channels}) must be divisible by heads ({heads})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.dropout = dropout
        self.gat = GATConv(in_channels, out_channels // heads, heads=heads, edge_dim=1, add_self_loops=False)
        self.lin_self = nn.Linear(in_channels, out_channels)
        self.lin_rel = nn.Linear(2 * rel_channels, out_channels, bias=False)
        self.norm = nn.LayerNorm(out_channels)

    def reset_parameters(self):
        self.gat.reset_parameters()
        self.lin_self.reset_parameters()
        self.lin_rel.reset_parameters()
        self.norm.reset_parameters()

    def forward(self, u_src, u_dst, edge_index, edge_sim, rel):
        u_src = input_dropout(u_src, self.dropout, self.training)
        u_dst = input_dropout(u_dst, self.dropout, self.training)
        h = self.gat((u_src, u_dst), edge_index, edge_attr=edge_sim[:, None])
        return F.relu(self.norm(h + self.lin_self(u_dst) + self.lin_rel(rel)))


class EdgeHead(nn.Module):
    r"""Edge linkage logits :math:`z_{ij} = \mathrm{MLP}(W_s h_j + W_d h_i + (A h_i) \odot (A h_j) + W_e f_{ij})`.

    The additive part is the reference's head; the product term lets the head compare the two
    endpoints in a learned metric (an additive head can only do that through its nonlinearity, which
    generalises poorly to unseen identities). All three node projections are computed once per node
    (N of them, not N k) and only combined per edge.

    Args:
        in_channels: size of h.
        hidden_channels: width of the edge MLP.
        n_edge_features: size of f_ij.

    Shapes:
        project: h (M, in_channels) -> (M, 3 hidden): the [src | dst | metric] projections.
        project_neighbours: h (..., in_channels) -> (..., 2 hidden): [src | metric].
        forward: proj_j (S, k, 3 hidden), proj_i (S, 3 hidden), f (S, k, F) -> logits (S, k).
    """

    def __init__(self, in_channels: int, hidden_channels: int = DEFAULTS.edge_channels,
                 n_edge_features: int = N_EDGE_FEATURES):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.proj = nn.Linear(in_channels, 3 * hidden_channels)
        self.feat = nn.Linear(n_edge_features, hidden_channels)
        self.mlp = nn.Sequential(
            nn.PReLU(hidden_channels),
            nn.Linear(hidden_channels, hidden_channels),
            nn.PReLU(hidden_channels),
            nn.Linear(hidden_channels, 1),
        )

    def reset_parameters(self):
        self.proj.reset_parameters()
        self.feat.reset_parameters()
        for layer in self.mlp:
            layer.reset_parameters()

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)

    def project_neighbours(self, h: torch.Tensor) -> torch.Tensor:
        """The [src | metric] projections of neighbour embeddings, what an edge reads of its far end:
        h (..., in_channels) -> (..., 2 hidden). Inference keeps h per node (a third of the projections'
        bytes) and projects the neighbours of a chunk of rows here."""
        e, w, b = self.hidden_channels, self.proj.weight, self.proj.bias
        return F.linear(h, torch.cat([w[:e], w[2 * e :]]), torch.cat([b[:e], b[2 * e :]]))

    def forward(self, proj_j: torch.Tensor, proj_i: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        e = self.hidden_channels
        return self._logits(proj_j[..., :e], proj_j[..., 2 * e :], proj_i, f)

    def neighbour_logits(self, nbr_proj: torch.Tensor, proj_i: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with the neighbours' :meth:`project_neighbours` (S, k, 2 hidden) for proj_j."""
        e = self.hidden_channels
        return self._logits(nbr_proj[..., :e], nbr_proj[..., e:], proj_i, f)

    def _logits(self, src_j, met_j, proj_i, f):
        e = self.hidden_channels
        dst_i, met_i = proj_i[:, None, e : 2 * e], proj_i[:, None, 2 * e :]
        z = src_j + dst_i + met_i * met_j + self.feat(f)
        # PReLU's per-channel weights act on dim 1: run the MLP on (S * k, hidden) rows.
        return self.mlp(z.reshape(-1, e)).view(z.shape[:-1])


def predicted_density(p: torch.Tensor, sim: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Parameter-free density :math:`\\hat d_i = \\mathrm{mean}_j s_{ij}(2 p_{ij} - 1)`, (N,)."""
    return mean_valid(sim * (2 * p - 1), valid)


def ground_truth_density(labels, nbr, sim) -> torch.Tensor:
    """d_i = mean_j s_ij * (+1 if y_j == y_i else -1), over valid neighbours; (N,)."""
    labels = torch.as_tensor(labels)
    nbr = torch.as_tensor(nbr)
    valid = nbr >= 0
    same = labels[nbr.clamp_min(0)] == labels[:, None]
    return mean_valid(torch.as_tensor(sim) * (2 * same.float() - 1), valid)


class Lander(nn.Module):
    """LANDER: conv -> per-node edge projections -> edge logits; density from the edge probabilities.

    Args:
        in_features: D, the embedding dimension (node inputs are 4D wide, see :func:`node_inputs`).
        k: neighbours per node (the relational profile is 2k wide).
        hidden_channels: size of h.
        edge_channels: width of the edge MLP.
        conv: 'lander' (similarity-weighted mean) or 'gat'.
        dropout: dropout on the raw-feature input of the conv.
        n_edge_features: how many of :data:`~agc_ray.core.graph.EDGE_FEATURES` the edge head reads, the
            first ones (a model saved before the last three were added reads ten).

    Shapes:
        embed: x_id, x_mean (N, D), nbr, sim (N, k), rows (M,) -> h (M, hidden).
        edge_logits: h (M, hidden), seeds (S,), nbr_local (S, k), f (S, k, F) -> (S, k).
    """

    def __init__(
        self,
        in_features: int,
        k: int,
        hidden_channels: int = DEFAULTS.hidden_channels,
        edge_channels: int = DEFAULTS.edge_channels,
        conv: str = DEFAULTS.conv,
        dropout: float = DEFAULTS.dropout,
        n_edge_features: int = N_EDGE_FEATURES,
    ):
        super().__init__()
        self.k = k
        self.n_edge_features = n_edge_features
        if conv not in ("lander", "gat"):
            raise ValueError(f"Lander: conv must be 'lander' or 'gat', got {conv!r}")
        self.in_features = in_features
        self.conv_type = conv
        # Built on the meta device, then initialised once by reset_parameters (PyG's convention): each
        # weight is drawn once, in construction order, as the layers' own constructors would draw it.
        with torch.device("meta"):
            if conv == "lander":
                self.conv = LanderConv(2 * in_features, hidden_channels, k, dropout=dropout)
            else:
                self.conv = GATLanderConv(2 * in_features, hidden_channels, k, dropout=dropout)
            self.edge_head = EdgeHead(hidden_channels, edge_channels, n_edge_features)
            # Input standardisation (fitted on the training graphs by `fit_normalization`): similarities
            # vary by a few hundredths, which an unscaled first layer learns from slowly.
            self.register_buffer("feat_mean", torch.empty(n_edge_features))
            self.register_buffer("feat_std", torch.empty(n_edge_features))
            self.register_buffer("rel_mean", torch.empty(2 * k))
            self.register_buffer("rel_std", torch.empty(2 * k))
        self.to_empty(device="cpu")
        self.reset_parameters()

    def reset_parameters(self):
        """Fresh weights and the identity standardisation."""
        self.conv.reset_parameters()
        self.edge_head.reset_parameters()
        for buffer, value in ((self.feat_mean, 0.0), (self.feat_std, 1.0), (self.rel_mean, 0.0), (self.rel_std, 1.0)):
            buffer.fill_(value)

    @torch.no_grad()
    def fit_normalization(self, feats: torch.Tensor, rel: torch.Tensor) -> None:
        """Set the edge-feature and relational-profile standardisation from training samples.

        Shapes:
            feats (E, F) valid edges' features; rel (M, 2k) relational profiles.
        """
        feats = feats[:, : self.n_edge_features]
        self.feat_mean.copy_(feats.mean(0))
        self.feat_std.copy_(feats.std(0).clamp_min(1e-3))
        self.rel_mean.copy_(rel.mean(0))
        self.rel_std.copy_(rel.std(0).clamp_min(1e-3))

    def embed(self, x_id: torch.Tensor, x_mean: torch.Tensor, nbr: torch.Tensor, sim: torch.Tensor, rows: torch.Tensor):
        """Node embeddings h of ``rows`` of a level graph.

        Shapes:
            x_id, x_mean (N, D); nbr, sim (N, k); rows (M,) -> (M, hidden).
        """
        if self.conv_type == "lander":
            raw, rel = node_inputs(x_id, x_mean, nbr, sim, rows)
            return self.conv(raw, (rel - self.rel_mean) / self.rel_std)
        nb, s = nbr[rows], sim[rows]
        valid = nb >= 0
        src_nodes, src_pos = torch.unique(nb[valid], return_inverse=True)
        dst_pos = torch.arange(rows.shape[0], device=rows.device).repeat_interleave(valid.sum(dim=1))
        u_src = torch.cat([x_id[src_nodes], x_mean[src_nodes]], dim=1)
        u_dst = torch.cat([x_id[rows], x_mean[rows]], dim=1)
        rel = (relational_profile(nbr, sim, rows) - self.rel_mean) / self.rel_std
        return self.conv(u_src, u_dst, torch.stack([src_pos, dst_pos]), s[valid], rel)

    def edge_logits(self, h: torch.Tensor, seeds: torch.Tensor, nbr_local: torch.Tensor, f: torch.Tensor):
        """Logits of the edges of ``seeds`` given node embeddings ``h`` of the batch's nodes.

        Shapes:
            h (M, hidden); seeds (S,) and nbr_local (S, k) positions into h (padding: any valid
            position, masked by the caller); f (S, k, F) -> (S, k).
        """
        proj = self.edge_head.project(h)
        return self.edge_head(proj[nbr_local], proj[seeds], self.normalize_features(f))

    def normalize_features(self, f: torch.Tensor) -> torch.Tensor:
        """Standardised edge features, the first :attr:`n_edge_features` of ``f`` (..., F)."""
        return (f[..., : self.n_edge_features] - self.feat_mean) / self.feat_std


def connectivity_loss(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, balance: bool = True, focal_gamma: float = 0.0
) -> torch.Tensor:
    """Binary linkage loss on the masked edges (edges to denser neighbours).

    ``balance`` weights the two classes equally (the reference subsamples the majority class; weighting
    keeps every edge's signal). ``focal_gamma`` > 0 gives the focal loss.
    """
    logits, target = logits[mask], target[mask].float()
    if logits.numel() == 0:
        return logits.sum()
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if focal_gamma > 0:
        p_t = torch.exp(-loss)
        loss = (1 - p_t) ** focal_gamma * loss
    if balance:
        n_pos = target.sum()
        n_neg = target.numel() - n_pos
        w = torch.where(target > 0, 0.5 / n_pos.clamp_min(1), 0.5 / n_neg.clamp_min(1))
        # classes absent from the batch: fall back to the plain mean
        if n_pos == 0 or n_neg == 0:
            return loss.mean()
        return (loss * w).sum()
    return loss.mean()
