"""Helpers over fixed-degree kNN graphs, stored as (N, k) neighbour and similarity arrays.

A row ``i`` lists the k neighbours ``nbr[i]`` of node i (-1 where padded) with similarities
``sim[i]``; the edge (i, nbr[i, j]) is "edge j of node i". Everything is a dense gather: no sparse
matrices or sampler library are needed, and every function runs in chunks of rows to bound memory.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: Names of the per-edge features of :func:`edge_features`, in column order.
EDGE_FEATURES = (
    "sim",  # s_ij
    "rank",  # position of j in i's list, / k
    "sim_minus_mean_i",  # s_ij - mean_j s_ij: how j compares with i's other neighbours
    "sim_minus_mean_j",  # s_ij - mean of j's own neighbour similarities
    "mutual",  # 1 if i is also among j's neighbours
    "shared",  # |N(i) & N(j)| / k: shared-neighbour overlap
    "mean_j_minus_mean_i",  # local-density difference (mean neighbour similarity)
    "sim_of_means",  # cosine of the two nodes' member means (= sim at level 0; less noisy above)
    "log_size_i",  # log of the number of original rows in node i (0 at level 0)
    "log_size_j",
    # Added after the first ten (a model saved with ten reads only those, see Lander.n_edge_features). With
    # c the norm of a node's member mean (member_cohesion; 1 for a single row):
    "avg_link",  # c_i c_j sim_of_means: the mean similarity of the two nodes' member pairs (= sim at level 0)
    "cohesion_i",  # c_i: c_i^2 is the mean similarity of node i's member pairs
    "cohesion_j",  # c_j
)
N_EDGE_FEATURES = len(EDGE_FEATURES)
#: The features of model directories saved before ``avg_link`` and the cohesions (and the level-0 edge
#: classifier baseline's, where the added ones repeat ``sim`` and a constant).
N_EDGE_FEATURES_V1 = 10
_CHUNK = 8192


def best_per_row(rows: np.ndarray, ids: np.ndarray, sims: np.ndarray, k: int):
    """The k best of candidate edges ``(rows[m], ids[m], sims[m])`` per row, by similarity descending
    then id ascending (one total order, so the choice does not depend on the candidates' order).

    Returns:
        ``(rows, rank, ids, sims)`` of the kept edges (rank: 0 for a row's best); write them with
        ``out[rows, rank] = ids``.
    """
    order = np.lexsort((ids, -sims, rows))
    rows, ids, sims = rows[order], ids[order], sims[order]
    rank = np.arange(rows.size) - np.searchsorted(rows, rows)
    keep = rank < k
    return rows[keep], rank[keep], ids[keep], sims[keep]


def valid_mask(nbr: np.ndarray | torch.Tensor):
    """(N, k) boolean mask of real (non-padded) edges."""
    return nbr >= 0


def mean_valid(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Row mean of ``values`` (N, k) over the valid entries; 0 for rows without any."""
    total = (values * valid).sum(dim=1)
    return total / valid.sum(dim=1).clamp_min(1)


def aggregation_weights(sim: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Row-normalised similarity weights a_ij = s_ij / sum_j s_ij, (N, k).

    Negative similarities are clipped to 0 (the reference divides by a sum that can be ~0 or negative
    on tiny or spread-out graphs); a row with no positive weight gets all-zero weights.
    """
    w = sim.clamp_min(0) * valid
    return w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)


def weighted_neighbor_mean(x, nbr: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j a_ij x_j for every row of ``nbr``.

    One fused gather-and-sum (``embedding_bag``), never the (M, k, F) gather of the neighbours' rows:
    that gather was 85 % of the time (11K rows x 10 neighbours x 256 dims: 64 ms against 2.3 ms). ``x``
    is a tensor, or any row-indexable object whose ``[ids]`` returns rows as a tensor (its rows that
    ``nbr`` names are then gathered once; each sum is the same, to the last bit).

    Shapes:
        x (N, F); nbr (M, k) indices into x (-1 padded, weight 0); weights (M, k) -> (M, F).
    """
    if nbr.shape[1] == 0:  # no neighbours: embedding_bag cannot cut bags of size 0
        return torch.zeros((nbr.shape[0], x.shape[1]), dtype=x.dtype, device=nbr.device)
    idx = nbr.clamp_min(0)
    if not isinstance(x, torch.Tensor):
        ids, idx = torch.unique(idx, return_inverse=True)
        x = x[ids]
    return F.embedding_bag(idx, x, per_sample_weights=weights.to(x.dtype), mode="sum")


def edge_features(
    nbr: np.ndarray, sim: np.ndarray, x_mean=None, size=None, *, start: int = 0, stop: int | None = None,
    mean_sim: torch.Tensor | None = None, rows=None, cohesion=None,
) -> torch.Tensor:
    """Per-edge structural features (see :data:`EDGE_FEATURES`) of rows ``start:stop`` (or of the given
    ``rows``), (M, k, F) float32.

    ``x_mean`` (N, D) unit member means (an array, a tensor, or any object whose ``[ids]`` returns
    those rows as a tensor) and ``size`` (N,) member counts describe super-nodes; leave
    them None at level 0 (every node its own only member), with ``cohesion`` (N,), the norms of the member
    means (:func:`member_cohesion`: what tells the identities of look-alike super-nodes apart, whose
    member means point almost the same way). A caller that asks for many row ranges
    passes ``mean_sim`` (:func:`mean_valid` of the whole graph's similarities) to compute it once.

    Cost: O(k^2) for mutual-ness, O(k^3) elementwise for shared neighbours (k = 10: 1000 comparisons)
    and O(k D) for the mean similarities, per row, in chunks of rows.
    """
    if (size is None) != (cohesion is None):  # without cohesion a super-node would read a single row's 1
        raise ValueError("edge_features: size and cohesion describe super-nodes together: pass both or neither")
    nbr_t = torch.as_tensor(nbr)
    sim_t = torch.as_tensor(sim, dtype=torch.float32)
    n, k = nbr_t.shape
    stop = n if stop is None else min(stop, n)
    row_ids = torch.arange(start, stop) if rows is None else torch.as_tensor(rows, dtype=torch.int64)
    # Only the asked rows' entries: whole-graph arrays here cost O(N k) a call, and scoring asks for
    # ~1000 rows a call (1M nodes: 10 s more in chunks of 1024 than of 4096).
    valid_rows = nbr_t[row_ids] >= 0  # (M, k)
    if mean_sim is None:
        mean_sim = mean_valid(sim_t, nbr_t >= 0)  # (N,)
    out = torch.zeros((row_ids.shape[0], k, N_EDGE_FEATURES), dtype=torch.float32)
    rank = torch.arange(k, dtype=torch.float32) / max(k, 1)
    xm = torch.as_tensor(x_mean) if isinstance(x_mean, np.ndarray) else x_mean  # or any row-indexable (N, D)
    size_t = None if size is None else torch.as_tensor(size)
    cohesion_t = None if cohesion is None else torch.as_tensor(cohesion, dtype=torch.float32)
    for lo in range(0, row_ids.shape[0], _CHUNK):
        hi = min(lo + _CHUNK, row_ids.shape[0])
        rows_c = row_ids[lo:hi]
        nb = nbr_t[rows_c].clamp_min(0)  # (c, k); padded neighbours point at node 0, zeroed at the end
        nb_nb = nbr_t[nb]  # (c, k, k): neighbours of each neighbour (-1 padded)
        mutual = (nb_nb == rows_c[:, None, None]).any(dim=2)
        mine = torch.where(valid_rows[lo:hi], nbr_t[rows_c], -2)  # -2 never equals -1 padding
        shared = (nb_nb[:, :, :, None] == mine[:, None, None, :]).any(dim=3).sum(dim=2)
        s = sim_t[rows_c]
        block = out[lo:hi]
        block[..., 0] = s
        block[..., 1] = rank
        block[..., 2] = s - mean_sim[rows_c, None]
        block[..., 3] = s - mean_sim[nb]
        block[..., 4] = mutual.float()
        block[..., 5] = shared.float() / k
        block[..., 6] = mean_sim[nb] - mean_sim[rows_c, None]
        block[..., 7] = s if xm is None else torch.einsum("cd,ckd->ck", xm[rows_c], xm[nb])
        if size_t is not None:
            block[..., 8] = torch.log(size_t[rows_c].to(torch.float32))[:, None]
            block[..., 9] = torch.log(size_t[nb].to(torch.float32))
        if cohesion_t is None:  # single rows
            block[..., 10] = s
            block[..., 11:13] = 1.0
        else:
            block[..., 11] = cohesion_t[rows_c, None]
            block[..., 12] = cohesion_t[nb]
            block[..., 10] = block[..., 7] * block[..., 11] * block[..., 12]
    out[~valid_rows] = 0.0
    return out


def member_cohesion(x_sum: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Norm of each node's member mean, ``|x_sum| / size`` (n,) float32: with unit members its square is
    the mean similarity of the node's member pairs (self-pairs included), 1 for a single row.

    Shapes:
        x_sum (n, D); size (n,) -> (n,).
    """
    return (np.linalg.norm(x_sum, axis=1) / np.maximum(size, 1)).astype(np.float32)
