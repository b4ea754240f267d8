"""A faiss index sharded across Ray actors, searched with a top-k merge.

Every shard actor holds the rows of one contiguous range of nodes. A query block is searched against
every shard for its k + 1 best, the candidates are merged by decreasing similarity (stable, so ties go
to the lower shard) and :func:`agc_ray.core.knn.search` removes the self match exactly as on a single
index. With ``exact`` search the graph therefore equals a single ``IndexFlatIP``'s.

``ivf``: the coarse quantizer is trained once, on the same seeded sample of rows that
:func:`agc_ray.core.knn.build_index` uses (:func:`~agc_ray.core.knn.ivf_train_rows`,
:func:`~agc_ray.core.knn.ivf_centroids`), and shared by all shards; each shard probes the same
cells, so the merged result equals a single IVF index with that quantizer, whatever the shard count.
"""

from __future__ import annotations

import numpy as np

from agc_ray.core.knn import ivf_index, resolve_method, search, to_gpu

JOB_METHODS = ("auto", "exact", "ivf")


class ShardIndex:
    """Ray actor: a faiss index over one shard's unit rows (global ids ``offset + local row``).

    Everything is built in the constructor from its arguments, so that Ray can restart the actor
    (on a node loss) and rebuild the same index from the (reconstructed) shard object.

    Args:
        x: (n_s, D) unit rows of the shard.
        offset: global id of the shard's first row.
        method: 'exact' or 'ivf'.
        centroids: (nlist, D) shared IVF centroids (ivf only).
        nprobe: IVF cells probed per query.
    """

    def __init__(self, x: np.ndarray, offset: int, method: str, centroids: np.ndarray | None = None, nprobe: int = 0):
        import faiss

        d = x.shape[1]
        index = faiss.IndexFlatIP(d) if method == "exact" else ivf_index(centroids, nprobe)
        if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:  # a GPU actor with faiss-gpu
            index = to_gpu(index)
        index.add(np.ascontiguousarray(x, dtype=np.float32))
        self.index, self.offset, self.x = index, int(offset), x

    def ready(self) -> int:
        """Rows indexed (a call to wait for the constructor)."""
        return self.index.ntotal

    def search(self, queries: np.ndarray, kk: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(sim, global ids)`` of the kk best rows of this shard for each query (-1 padded)."""
        import faiss

        if exact and not isinstance(self.index, (faiss.IndexFlatIP, getattr(faiss, "GpuIndexFlatIP", ()))):
            flat = faiss.IndexFlatIP(self.x.shape[1])
            flat.add(np.ascontiguousarray(self.x, dtype=np.float32))
            sim, idx = flat.search(queries, kk)
        else:
            sim, idx = self.index.search(queries, kk)
        return sim, np.where(idx >= 0, idx + self.offset, -1)


class MergedIndex:
    """Looks like a faiss index to :func:`agc_ray.core.knn.search`; searches every shard actor."""

    def __init__(self, actors, exact: bool = False):
        self.actors = actors
        self.exact = exact

    def search(self, queries: np.ndarray, kk: int):
        import ray

        qref = ray.put(np.ascontiguousarray(queries, dtype=np.float32))
        parts = ray.get([a.search.remote(qref, kk, self.exact) for a in self.actors])
        return merge_topk([p[0] for p in parts], [p[1] for p in parts], kk)


def merge_topk(sims: list[np.ndarray], ids: list[np.ndarray], kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard results (each (Q, kk), sorted) into the global kk best, stable in shard order.

    Shapes:
        sims, ids: S arrays of (Q, kk) -> (Q, kk) float32 similarities, (Q, kk) int64 ids.
    """
    sim = np.concatenate(sims, axis=1)
    idx = np.concatenate(ids, axis=1)
    sim = np.where(idx >= 0, sim, -np.inf).astype(np.float32)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :kk]
    out_sim = np.take_along_axis(sim, order, axis=1)
    out_idx = np.take_along_axis(idx, order, axis=1)
    out_sim[out_idx < 0] = -np.finfo(np.float32).max
    return out_sim, out_idx


def search_shard(x_q: np.ndarray, offset: int, actors, k: int, exact: bool = False):
    """kNN graph rows of one query shard (self excluded): ``(nbr, sim)`` of shape (n_s, k)."""
    return search(MergedIndex(actors, exact), x_q, k, query_offset=offset)


def job_method(method: str, n: int) -> str:
    """The search method for a level of n nodes (the core's 'auto' rule)."""
    return resolve_method(method, n)
