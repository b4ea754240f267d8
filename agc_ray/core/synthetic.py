"""Synthetic face-like embeddings with the structure that makes face clustering hard.

- identities with long-tailed sizes (log-normal, mean 60 like MS-Celeb-1M part1_test's 68);
- look-alike groups: identities drawn around a shared group centre, so their samples interleave
  in the kNN graph (the failure mode of similarity thresholds);
- varied spread: each identity has its own noise scale and one to four "pose" modes, so a single
  threshold either chains look-alikes or splits loose identities;
- optional anisotropy: each identity scales its deviation differently along each nuisance direction
  (wide in some, tight in others), so no single radius fits an identity;
- distractor singletons: samples that belong to no identity.

Rows come out L2-normalised, float32, in random order; labels are int64 (every distractor has its own
label). Generation streams in fixed-size chunks from one seeded generator: O(chunk * D) temporary
memory, the same output for the same arguments.
"""

from __future__ import annotations

import numpy as np

_CHUNK = 16384


def _unit(a: np.ndarray) -> np.ndarray:
    a /= np.linalg.norm(a, axis=-1, keepdims=True)
    return a


def make_faces(n_samples: int, dim: int = 256, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Generate an (n_samples, dim) face-like embedding table and its identity labels.

    The arguments are :func:`iter_faces`'s; the rows are its chunks, concatenated.

    Returns:
        ``(x, y)``: x of shape (N, D), float32, unit rows; y of shape (N,), int64.
    """
    x = np.empty((n_samples, dim), dtype=np.float32) if n_samples >= 1 else None
    y = np.empty(n_samples, dtype=np.int64) if n_samples >= 1 else None
    for start, x_chunk, y_chunk in iter_faces(n_samples, dim, **kwargs):
        x[start:start + x_chunk.shape[0]] = x_chunk
        y[start:start + y_chunk.shape[0]] = y_chunk
    return x, y


def iter_faces(n_samples: int, dim: int = 256, *, mean_identity_size: float = 60.0, size_sigma: float = 1.0,
               group_size: int = 6, look_alike: float = 0.9, spread: tuple[float, float] = (0.4, 0.8),
               max_modes: int = 4, mode_spread: float = 1.0, distractor_fraction: float = 0.02, nuisance_dim: int = 32,
               isotropic: float = 0.3, anisotropy: float = 0.0, label_by: str = "identity", seed: int = 0,
               chunk_rows: int = _CHUNK):
    """Generate a face-like embedding table and its identity labels in chunks of rows.

    Memory is O(identities + N) for the per-row plan (8 bytes a row per array) and O(chunk D) for the
    rows: a 10^7 x 128 table never exists in memory at once. Rows come out identical to
    :func:`make_faces` with the same arguments, whatever ``chunk_rows``.

    Args:
        n_samples: number of rows N (>= 1).
        dim: embedding dimension D (>= 2).
        mean_identity_size: mean number of samples per identity (log-normal sizes, >= 2).
        size_sigma: log-normal sigma of identity sizes; larger gives a longer tail.
        group_size: identities per look-alike group.
        look_alike: cosine between an identity centre and its group centre (0: unrelated, 1: equal).
        spread: range of the per-identity noise scale (noise norm relative to the centre's).
        max_modes: maximum number of pose modes per identity.
        mode_spread: noise scale of mode centres around the identity centre.
        distractor_fraction: share of rows that are singletons of no identity.
        nuisance_dim: dimension of the shared nuisance subspace (pose, light, age) in which most of
            each sample's deviation from its mode lies; real embeddings vary in few directions,
            which is what makes approximate kNN search work on them.
        isotropic: share (as a norm ratio) of the deviation that is isotropic noise instead.
        anisotropy: log-normal sigma of each identity's own scale per nuisance direction (rescaled to
            a mean square of 1, so the typical spread stays that of ``spread``); 0 (default): the same
            scale in every direction. The scales come from a generator spawned off ``seed``, so every
            other draw (sizes, centres, modes, noise) is the same as with ``anisotropy=0``.
        label_by: 'identity' (default) or 'mode': each member row labelled by its identity's pose mode
            instead (a refinement of the identities; the rows are the same). The partition into modes
            is what a method reaches that finds every mode and joins none (see README, Quality).
        seed: random seed.
        chunk_rows: rows per chunk (a multiple of 16384 keeps the random draws aligned; other values
            are rounded up to one).

    Yields:
        ``(start, x, y)``: the chunk's first row, its rows (n_c, D) float32 unit, its labels (n_c,) int64.
    """
    if n_samples < 1:
        raise ValueError(f"make_faces: n_samples must be >= 1, got {n_samples}")
    if dim < 2:
        raise ValueError(f"make_faces: dim must be >= 2, got {dim}")
    if not 0.0 <= distractor_fraction <= 1.0:
        raise ValueError(f"make_faces: distractor_fraction must be in [0, 1], got {distractor_fraction}")
    if anisotropy < 0.0:
        raise ValueError(f"make_faces: anisotropy must be >= 0, got {anisotropy}")
    if label_by not in ("identity", "mode"):
        raise ValueError(f"make_faces: label_by must be 'identity' or 'mode', got {label_by!r}")
    rng = np.random.default_rng(seed)

    n_distractors = int(round(n_samples * distractor_fraction))
    n_members = n_samples - n_distractors
    # Long-tailed identity sizes that add up to exactly n_members.
    mu = np.log(max(mean_identity_size, 2.0)) - size_sigma**2 / 2
    sizes = np.maximum(2, np.round(rng.lognormal(mu, size_sigma, size=n_members // 2 + 1))).astype(np.int64)
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), n_members)) + 1]
    if sizes.size:
        sizes[-1] -= int(sizes.sum()) - n_members
        sizes = sizes[sizes > 0]
    n_ids = sizes.size

    # Identity centres around look-alike group centres; pose modes around identity centres.
    n_groups = max(1, -(-n_ids // group_size))
    group_centres = _unit(rng.standard_normal((n_groups, dim), dtype=np.float32))
    group_of_id = rng.integers(0, n_groups, size=n_ids)
    off = _unit(rng.standard_normal((n_ids, dim), dtype=np.float32))
    sin_la = np.sqrt(1.0 - look_alike**2)
    id_centres = _unit(look_alike * group_centres[group_of_id] + sin_la * off)
    n_modes = rng.integers(1, max_modes + 1, size=n_ids)
    mode_first = np.concatenate([[0], np.cumsum(n_modes)[:-1]])
    mode_id = np.repeat(np.arange(n_ids), n_modes)
    mode_noise = rng.standard_normal((mode_id.size, dim), dtype=np.float32) * (mode_spread / np.sqrt(dim))
    mode_centres = _unit(id_centres[mode_id] + mode_noise.astype(np.float32))
    id_spread = rng.uniform(spread[0], spread[1], size=n_ids).astype(np.float32)
    r = max(1, min(nuisance_dim, dim))
    nuisance = _unit(rng.standard_normal((r, dim), dtype=np.float32)) / np.float32(np.sqrt(r))
    w_struct = np.float32(np.sqrt(max(0.0, 1.0 - isotropic**2)))
    w_iso = np.float32(isotropic / np.sqrt(dim))
    id_axes = None  # (n_ids, r) per-identity scale of each nuisance direction
    if anisotropy > 0.0:
        # A spawned child stream: spawning draws nothing from rng, so the rest of the output is unchanged.
        axes_rng = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0])
        id_axes = np.exp(anisotropy * axes_rng.standard_normal((n_ids, r)))
        id_axes = (id_axes / np.sqrt(np.mean(id_axes**2, axis=1, keepdims=True))).astype(np.float32)

    # Per-row assignment, shuffled so that labels are not sorted.
    row_id = np.concatenate([np.repeat(np.arange(n_ids), sizes), -1 - np.arange(n_distractors)])
    row_id = row_id[rng.permutation(n_samples)]
    row_mode = np.full(n_samples, -1, dtype=np.int64)
    member = row_id >= 0
    row_mode[member] = mode_first[row_id[member]] + (
        rng.integers(0, 1 << 30, size=int(member.sum())) % n_modes[row_id[member]]
    )

    # Labels: identities (or modes) keep their index, distractors get fresh labels after them.
    if label_by == "mode":
        y = np.where(row_id >= 0, row_mode, mode_id.size + (-1 - row_id)).astype(np.int64)
    else:
        y = np.where(row_id >= 0, row_id, n_ids + (-1 - row_id)).astype(np.int64)
    chunk_rows = _CHUNK * max(1, -(-int(chunk_rows) // _CHUNK))
    out = []
    for start in range(0, n_samples, _CHUNK):
        stop = min(start + _CHUNK, n_samples)
        ids, modes = row_id[start:stop], row_mode[start:stop]
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
        coef = rng.standard_normal((stop - start, r), dtype=np.float32)
        is_member = ids >= 0
        block = noise  # distractors: uniform directions
        member_ids = ids[is_member]
        member_coef = coef[is_member] if id_axes is None else coef[is_member] * id_axes[member_ids]
        deviation = member_coef @ (w_struct * nuisance) + noise[is_member] * w_iso
        block[is_member] = mode_centres[modes[is_member]] + deviation * id_spread[member_ids][:, None]
        out.append(_unit(block))
        # the random draws go block by block of _CHUNK rows as always; a chunk is yielded once full
        if stop == n_samples or (stop % chunk_rows) == 0:
            first = stop - sum(b.shape[0] for b in out)
            yield first, out[0] if len(out) == 1 else np.concatenate(out), y[first:stop]
            out = []


def make_subspace_clusters(n_samples: int, dim: int = 128, *, mean_cluster_size: float = 20.0, subspace_dim: int = 8,
                           spread: tuple[float, float] = (0.25, 0.45), size_exponent: float = 0.5,
                           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Another generator than :func:`make_faces`: clusters stretched along their own low-dim subspace.

    Each cluster is a random unit centre plus a deviation confined to a ``subspace_dim``-dimensional
    subspace of its own (a random basis per cluster), so its members lie along an elongated sheet
    (pose, viewpoint or style manifolds) rather than in a ball around the centre; cluster sizes follow
    a Zipf law. Density-peak and centroid methods fragment such clusters; boundary links join them.

    Args:
        n_samples: number of rows N (>= 1).
        dim: embedding dimension D (>= 2).
        mean_cluster_size: N / number of clusters.
        subspace_dim: dimension of each cluster's own deviation subspace (1 <= it <= D).
        spread: range of the per-cluster deviation scale, per subspace direction, relative to the
            centre's norm.
        size_exponent: Zipf exponent of the cluster sizes (0: equal expected sizes).
        seed: random seed.

    Returns:
        ``(x, y)``: x of shape (N, D), float32, unit rows; y of shape (N,), int64.
    """
    if n_samples < 1:
        raise ValueError(f"make_subspace_clusters: n_samples must be >= 1, got {n_samples}")
    if not 1 <= subspace_dim <= dim:
        raise ValueError(f"make_subspace_clusters: subspace_dim must be in [1, dim={dim}], got {subspace_dim}")
    rng = np.random.default_rng(seed)
    n_clusters = max(1, int(round(n_samples / mean_cluster_size)))
    weight = 1.0 / np.arange(1, n_clusters + 1) ** size_exponent
    y = rng.choice(n_clusters, size=n_samples, p=weight / weight.sum()).astype(np.int64)
    centres = _unit(rng.standard_normal((n_clusters, dim), dtype=np.float32))
    basis = rng.standard_normal((n_clusters, subspace_dim, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
    scale = rng.uniform(spread[0], spread[1], size=n_clusters).astype(np.float32)
    x = np.empty((n_samples, dim), dtype=np.float32)
    for start in range(0, n_samples, _CHUNK):  # O(chunk * subspace_dim * D) temporaries
        ids = y[start:start + _CHUNK]
        coef = rng.standard_normal((ids.size, subspace_dim), dtype=np.float32)
        x[start:start + ids.size] = centres[ids] + np.einsum("ns,nsd->nd", coef, basis[ids]) * scale[ids, None]
    return _unit(x), y
