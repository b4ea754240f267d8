"""Shards: contiguous ranges of a table's rows (or a level's nodes) whose arrays are objects in Ray's object store.

Where the ranges are cut (:func:`shard_bounds`), the input rows as shards (:class:`RowShards`), which
shard owns a row (:func:`shard_of`), rows read across shards (:func:`gather_rows`) and a level's kNN
graph joined from its shards' parts (:func:`concat_graph`). NumPy only: the workers that read Parquet
import this module and not torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agc_ray.distributed.remote import lazy_remote


@dataclass
class RowShards:
    """The input rows as contiguous shards in the object store.

    Attributes:
        offsets: (S + 1,) first global row of each shard (row order = input order).
        x: refs to (n_s, D) unit float32 embeddings.
        ids: refs to pyarrow arrays of input ids.
        labels: refs to (n_s,) int64 labels, or None.
        dim: embedding dimension.
    """

    offsets: np.ndarray
    x: list
    ids: list
    labels: list | None
    dim: int

    @property
    def n(self) -> int:
        return int(self.offsets[-1])


def shard_bounds(n: int, num_shards: int) -> np.ndarray:
    """(S + 1,) offsets of ``min(num_shards, n)`` contiguous, near-equal shards of n rows."""
    s = max(1, min(num_shards, n))
    return np.linspace(0, n, s + 1).round().astype(np.int64)


def shard_of(offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Index of the shard (contiguous ranges cut at ``offsets``) that holds each of ``rows``."""
    return np.searchsorted(offsets, rows, side="right") - 1


def gather_rows(parts: dict, offsets: np.ndarray, rows: np.ndarray, fallback: int | None = None) -> np.ndarray:
    """Rows (global ids, any order) of an array sharded over ``offsets``, in ``rows`` order.

    ``parts`` maps shard index -> that shard's array; it must hold every shard that ``rows`` touch, unless
    ``fallback`` (a global row of a shard held) is given: rows of shards not held read that row instead
    (padded neighbours, whose values the caller masks).
    """
    rows = np.asarray(rows, dtype=np.int64)
    like = next(iter(parts.values()))
    out = np.empty((rows.size,) + like.shape[1:], dtype=like.dtype)
    owner = shard_of(offsets, rows)
    if fallback is not None:
        held = np.zeros(offsets.size - 1, dtype=bool)
        held[list(parts)] = True
        missing = ~held[owner]
        if missing.any():
            rows = np.where(missing, fallback, rows)
            owner = np.where(missing, shard_of(offsets, np.array([fallback]))[0], owner)
    # the shards present by a count, not np.unique (a sort or hash of every row: 0.5 s of a 10^6-row
    # shard's scoring, called per chunk)
    for o in np.flatnonzero(np.bincount(owner, minlength=offsets.size - 1)):
        sel = owner == o
        out[sel] = parts[int(o)][rows[sel] - offsets[o]]
    return out


@lazy_remote(num_cpus=1, num_returns=2)
def concat_graph(n_shards: int, *parts):
    """The level's (n, k) ``(nbr, sim)`` from the shards' search results (as one object) and its stats."""
    nbr = np.concatenate(parts[:n_shards])
    sim = np.concatenate(parts[n_shards:])
    return (nbr, sim), {"rows": int(nbr.shape[0])}
