"""One hierarchy level over node shards: LANDER inference, decode, union-find, aggregation.

A level's nodes are cut into contiguous shards (``offsets``); each shard's arrays (identity features,
member-feature sums, sizes, peak rows) are objects in Ray's object store, and so are the level's
kNN graph arrays ``(nbr, sim)`` (n, k), which are small. Stages, each one Ray task per shard:

1. :func:`shard_embeddings`: reads the features of the shard's neighbours (its halo) from their
   owners' parts, computes LANDER's node embeddings h, stored in blocks (:func:`embedding_blocks`).
2. :func:`shard_probabilities`: edge features and probabilities (neighbours' embeddings read from their owners' parts
   chunk by chunk) and densities.
3. :func:`shard_decode`: each node keeps its best denser edge; a local union-find (connected
   components of the intra-shard edges) reduces the shard to its local roots. Label-free, stages 1-2
   are :func:`similarity_densities`, and at the linkage level :func:`shard_links` (average links from
   the halo's member sums).
4. :func:`global_components`: union-find over the cross-shard edges of the local roots gives the
   level's clusters, numbered by their first node (as :func:`agc_ray.core.hierarchy.forest_components`).
5. :func:`split_members` / :func:`assemble_next`: aggregation into the next level's node shards (peak
   identity feature, member sums added in node order, exactly like :func:`agc_ray.core.hierarchy.aggregate`).

All arithmetic is the core's, row for row, so the result equals the single-process hierarchy. Tasks
receive every shard part they read as a direct argument (:func:`shard_inputs`), so that Ray can
rebuild parts lost with a node before the tasks that need them hold a CPU.
"""

from __future__ import annotations

import numpy as np

from agc_ray.distributed.remote import lazy_remote
from agc_ray.distributed.shards import gather_rows, shard_of


def _torch_single_thread():
    """torch, with one thread (tasks share the CPUs) and no warning about read-only object-store arrays."""
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    return torch


@lazy_remote(num_cpus=1)
def halo_owners(offsets: np.ndarray, graph) -> list[list[int]]:
    """For each shard, the other shards that own rows of its halo (its neighbours outside itself)."""
    nbr, _ = graph
    shards = offsets.size - 1
    owners = []
    for s in range(shards):
        nb = nbr[offsets[s]:offsets[s + 1]]
        owner = shard_of(offsets, nb[nb >= 0])
        seen = np.bincount(owner, minlength=shards) > 0
        seen[s] = False
        owners.append([int(o) for o in np.flatnonzero(seen)])
    return owners


def shard_inputs(arrays: list[list], s: int, owners: list[int]) -> list:
    """Task arguments for shard ``s``: for each sharded array (a list of refs), shard s's part, then the
    parts of its halo owners.

    They are direct task arguments, never fetched with ``ray.get`` inside the task: Ray resolves them
    before the task takes its CPU, so that after a node loss the tasks that rebuild a lost part can
    run. A task blocked in ``ray.get`` can hold its CPU (seen with Ray 2.60: a 3-CPU cluster hung with
    every CPU held by tasks waiting for parts whose reconstruction needed a CPU).
    """
    return [refs[o] for refs in arrays for o in (s, *owners)]


def parts_by_shard(parts: tuple, i: int, s: int, owners: list[int]) -> dict:
    """Array ``i`` of :func:`shard_inputs`'s ``parts`` as ``{shard: part}`` (shard ``s`` and its halo owners)."""
    m = 1 + len(owners)
    return dict(zip((s, *owners), parts[i * m:(i + 1) * m]))


class ShardedRows:
    """Rows of a sharded (N, D) array by global id, gathered from the shard parts held (``{shard: part}``)
    when indexed, as ``rows[ids]`` -> tensor (``ids.shape + (D,)``): the core's arrays, read in place.

    Never an own + halo copy: at level 0 in random row order the halo is nearly every other shard's
    rows, so a copy doubled each scoring task's features (1 GB a task at 10^6 x 256 rows on two shards);
    and no local numbering (mapping a chunk's neighbours to local ids, and building it from the unique
    halo ids, cost 2.4 s of a 10^6-row shard's 15 s of edge scoring). Ids of shards not held (padded
    neighbours, -1 clamped to 0, whose values the caller masks) read the first held row.
    ``normalize``: unit rows (member means from member sums), normalised as gathered, row by row as
    :func:`~agc_ray.core.knn.l2_normalize` of the whole array would.
    """

    def __init__(self, by_shard: dict, offsets: np.ndarray, normalize: bool = False):
        self.by_shard, self.offsets, self.normalize = by_shard, offsets, normalize
        self.fallback = int(offsets[min(by_shard)])
        dim = next(iter(by_shard.values())).shape[1]
        self.shape = (int(offsets[-1]), dim)
        torch = _torch_single_thread()
        self.dtype, self.device = torch.float32, torch.device("cpu")  # what the core's gathers ask of x

    def __getitem__(self, ids):
        import torch

        from agc_ray.core.knn import l2_normalize

        ids = np.asarray(ids, dtype=np.int64)
        out = gather_rows(self.by_shard, self.offsets, ids.reshape(-1), fallback=self.fallback)
        if self.normalize:
            out = l2_normalize(out)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32).reshape(ids.shape + (self.shape[1],)))


def _aggregated(parts: tuple, owners: list[int]) -> bool:
    """Whether :func:`shard_inputs`'s ``parts`` carry member sums and sizes after their first array
    (a level above 0)."""
    return len(parts) > 1 + len(owners)


def _mean_rows(s: int, offsets, owners, parts, array: int = 1) -> ShardedRows:
    """Aggregated levels: the unit member means of the nodes held, from array ``array`` (member sums) of
    :func:`shard_inputs`'s ``parts``."""
    return ShardedRows(parts_by_shard(parts, array, s, owners), offsets, normalize=True)


def _sizes_and_cohesion(s: int, offsets, owners, parts) -> tuple[np.ndarray, np.ndarray]:
    """Aggregated levels: (N,) sizes and member cohesions (:func:`~agc_ray.core.graph.member_cohesion`) of
    the level's nodes, from arrays 0 (member sums) and 1 (sizes) of :func:`shard_inputs`'s ``parts``,
    filled for the shards held (1 elsewhere: padded neighbours only read them), the sums read in blocks."""
    from agc_ray.core.cells import scratch_rows
    from agc_ray.core.graph import member_cohesion

    sums, sizes = parts_by_shard(parts, 0, s, owners), parts_by_shard(parts, 1, s, owners)
    n = int(offsets[-1])
    size = np.ones(n, dtype=next(iter(sizes.values())).dtype)
    cohesion = np.ones(n, dtype=np.float32)
    step = scratch_rows(next(iter(sums.values())).shape[1])
    for o, part in sums.items():
        lo = int(offsets[o])
        size[lo:lo + part.shape[0]] = sizes[o]
        for a in range(0, part.shape[0], step):
            b = min(a + step, part.shape[0])
            cohesion[lo + a:lo + b] = member_cohesion(part[a:b], sizes[o][a:b])
    return size, cohesion


def _mean_similarities(nbr: np.ndarray, sim: np.ndarray):
    """(N,) :func:`~agc_ray.core.graph.mean_valid` of the level's similarities, in blocks of rows (no
    (N, k) temporaries)."""
    from agc_ray.core.cells import scratch_rows
    from agc_ray.core.graph import mean_valid

    torch = _torch_single_thread()
    nbr_t, sim_t = torch.as_tensor(nbr), torch.as_tensor(sim, dtype=torch.float32)
    out = torch.empty(nbr_t.shape[0], dtype=torch.float32)
    step = scratch_rows(nbr_t.shape[1])
    for a in range(0, nbr_t.shape[0], step):
        out[a:a + step] = mean_valid(sim_t[a:a + step], nbr_t[a:a + step] >= 0)
    return out


def shard_edge_features(nbr, sim, lo: int, x_mean=None, size=None, cohesion=None):
    """:func:`agc_ray.core.graph.edge_features` of a shard's rows (its first global row ``lo``), as
    ``feats(a, b)`` -> the (b - a, k, F) features of its rows a:b (computed per chunk, never held for
    the whole shard).

    ``nbr``/``sim`` are the level's arrays (neighbours' neighbour lists are needed); ``x_mean``,
    ``size`` and ``cohesion`` (above level 0) are read by global id (:class:`ShardedRows`,
    :func:`_sizes_and_cohesion`).
    """
    from agc_ray.core.graph import edge_features

    mean_sim = _mean_similarities(nbr, sim)

    def feats(a: int, b: int):
        return edge_features(nbr, sim, x_mean, size, start=lo + a, stop=lo + b, mean_sim=mean_sim, cohesion=cohesion)

    return feats


#: Rows per object of a shard's node embeddings (a multiple of the core's chunk of rows, a power of two up to
#: :data:`~agc_ray.core.inference.MAX_CHUNK`, so that each chunk is the same product as in one piece): a
#: task streams them to the object store one at a time (a generator), instead of holding its whole (n_s,
#: hidden) result and then its copy there, and objects of ~32 MB fit where earlier objects were freed. At
#: 10^6 x 256 rows on two shards, one result per shard (then 768 MB of projections each) took the job's
#: peak to 6.0 GB.
EMBEDDING_BLOCK = 16 * 4096


def embedding_blocks(offsets: np.ndarray, block: int | None = None) -> tuple[np.ndarray, list[list[int]]]:
    """The level's embedding objects: ``(bounds, per shard its block indices)``, ``bounds`` (B + 1,)
    global node ranges of at most ``block`` (default :data:`EMBEDDING_BLOCK`) nodes, each inside one
    shard, a shard's first starting where the shard does."""
    block = block or EMBEDDING_BLOCK
    cuts, of_shard = [], []
    for s in range(offsets.size - 1):
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        starts = list(range(lo, hi, block)) or [lo]
        of_shard.append(list(range(len(cuts), len(cuts) + len(starts))))
        cuts += starts
    return np.array(cuts + [int(offsets[-1])], dtype=np.int64), of_shard


@lazy_remote(num_cpus=1)
def shard_embeddings(model, s: int, offsets, graph, owners: list[int], blocks, *parts, progress=None):
    """Stage 1: the node embeddings of shard ``s``, yielded as one (b, hidden) array per embedding block
    of the shard: ``blocks`` are their bounds, global ids from the shard's first node to its end (of
    :func:`embedding_blocks`; call with ``num_returns`` = ``len(blocks) - 1``).

    ``parts``: :func:`shard_inputs` of ``[x_id]`` (level 0) or ``[x_id, x_sum, size]``.
    ``progress``: ``(counter, stage)`` that the rows done are reported to (see
    :func:`agc_ray.distributed.progress.reporter`), or None.
    """
    from agc_ray.core.inference import node_embeddings
    from agc_ray.distributed.progress import reporter

    torch = _torch_single_thread()
    nbr, sim = graph
    x_id = ShardedRows(parts_by_shard(parts, 0, s, owners), offsets)
    x_mean = _mean_rows(s, offsets, owners, parts) if _aggregated(parts, owners) else x_id
    nbr_t, sim_t = torch.as_tensor(nbr), torch.as_tensor(sim)
    model.eval()
    report = reporter(*progress) if progress else None
    for a, b in zip(blocks[:-1], blocks[1:]):
        yield node_embeddings(model, x_id, x_mean, nbr_t, sim_t, torch.arange(int(a), int(b)), report=report).numpy()


class BlockRows:
    """Rows of an array stored as embedding blocks (``{block index: (b, C) array}`` over ``bounds``),
    as tensors: by global id (``rows(ids)``), or a range of a shard's rows ``first:stop`` by local
    position (``rows[a:b]``, cut at ``stop``)."""

    def __init__(self, by_block: dict, bounds: np.ndarray, first: int, stop: int):
        self.by_block, self.bounds, self.first, self.stop = by_block, bounds, first, stop

    def __call__(self, ids):
        """Rows of global ``ids`` (a tensor of any shape); ids outside the blocks held read row ``first``
        (padded edges arrive as row 0 and get p = 0 anyway)."""
        import torch

        rows = gather_rows(self.by_block, self.bounds, ids.reshape(-1).numpy(), fallback=self.first)
        return torch.from_numpy(rows).reshape(*ids.shape, -1)

    def __getitem__(self, rows: slice):
        import torch

        ids = np.arange(self.first + rows.start, min(self.first + rows.stop, self.stop), dtype=np.int64)
        return torch.from_numpy(gather_rows(self.by_block, self.bounds, ids))


@lazy_remote(num_cpus=1, num_returns=2)
def shard_probabilities(model, s: int, offsets, graph, owners: list[int], blocks, block_ids: list[int], *parts,
                        progress=None):
    """Stage 2: ``(p (n_s, k), density (n_s,))`` of shard ``s``.

    ``parts``: the embedding blocks ``block_ids`` (of :func:`embedding_blocks`' ``blocks``: shard s's
    and its halo owners'), then at levels above 0 :func:`shard_inputs` of ``[x_sum, size]``.
    ``progress`` as in :func:`shard_embeddings`.

    The embeddings of the shard's rows and of their neighbours are read from the blocks chunk by
    chunk (no own + halo copy: at level 0 in random row order the halo is nearly every other row, 0.5
    GB of embeddings at 10^6 rows), and the edge features are computed chunk by chunk here (stage 1
    returning them put (n, k, F) floats, 0.4 GB at 10^6 rows, in the object store beside the
    embeddings).
    """
    from agc_ray.core.inference import edge_probabilities
    from agc_ray.core.lander import predicted_density
    from agc_ray.distributed.progress import reporter

    torch = _torch_single_thread()
    nbr, sim = graph
    lo, hi = int(offsets[s]), int(offsets[s + 1])
    h = BlockRows(dict(zip(block_ids, parts[:len(block_ids)])), blocks, lo, hi)
    parts = parts[len(block_ids):]
    means = (None, None, None)
    if parts:  # member means, sizes and cohesions (from arrays 0 and 1 of shard_inputs)
        means = (_mean_rows(s, offsets, owners, parts, array=0), *_sizes_and_cohesion(s, offsets, owners, parts))
    nbr_rows = torch.from_numpy(np.ascontiguousarray(nbr[lo:hi]))
    model.eval()
    p = edge_probabilities(model, h, h, nbr_rows, shard_edge_features(nbr, sim, lo, *means),
                           report=reporter(*progress) if progress else None)
    sim_rows = torch.from_numpy(np.ascontiguousarray(sim[lo:hi]))
    density = predicted_density(p, sim_rows, nbr_rows >= 0)
    return p.numpy(), density.numpy()


@lazy_remote(num_cpus=1)
def similarity_densities(s: int, offsets, graph):
    """Unsupervised density of shard ``s`` (mean similarity to valid neighbours), (n_s,)."""
    from agc_ray.core.hierarchy import similarity_density

    nbr, sim = graph
    lo, hi = int(offsets[s]), int(offsets[s + 1])
    return similarity_density(nbr[lo:hi], sim[lo:hi]).numpy()


def local_roots(parent: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Local union-find: each node's local root (global id), following intra-shard edges only.

    The forest restricted to a shard is a forest too; every local tree has exactly one node whose
    parent is outside the shard (or none): its root.
    """
    from agc_ray.core.hierarchy import weak_components

    local = (parent >= lo) & (parent < hi)
    child = np.flatnonzero(local)
    comp = weak_components(child, parent[child] - lo, hi - lo)
    tops = np.flatnonzero(~local)
    root_of_comp = np.empty(tops.size, dtype=np.int64)
    root_of_comp[comp[tops]] = tops + lo
    return root_of_comp[comp]


@lazy_remote(num_cpus=1)
def adaptive_tau(graph, x_sample, seed: int) -> tuple[float, float]:
    """The core's label-free ``(tau_0, chance)`` of a table from its level-0 graph and seeded row sample."""
    from agc_ray.core.hierarchy import adaptive_similarity_threshold

    return adaptive_similarity_threshold(graph[1], x_sample, seed=seed)


@lazy_remote(num_cpus=1, num_returns=3)
def shard_links(s: int, offsets, graph, owners: list[int], *parts):
    """The label-free linkage level's scores of shard ``s``: its edges' average links (the core's
    :func:`~agc_ray.core.hierarchy.average_links`, (n_s, k)), each node's best link (n_s,) and its
    multi-member nodes' best links (:func:`~agc_ray.core.hierarchy.best_links`, the threshold's input).
    ``parts``: :func:`shard_inputs` of the level's member sums and sizes (the halo's read in blocks,
    never copied whole)."""
    from agc_ray.core.hierarchy import average_links, best_links, node_best_links

    nbr, _ = graph
    lo, hi = int(offsets[s]), int(offsets[s + 1])
    sums, sizes = parts_by_shard(parts, 0, s, owners), parts_by_shard(parts, 1, s, owners)
    link = average_links(sums[s], sizes[s], nbr[lo:hi], lambda ids: gather_rows(sums, offsets, ids),
                         lambda ids: gather_rows(sizes, offsets, ids))
    return link, node_best_links(link), best_links(link, sizes[s])


@lazy_remote(num_cpus=1, num_returns=2)
def shard_decode(s: int, offsets, graph, p, tau: float, mode: str, *densities, guard: float | None = None,
                 best=None):
    """Stage 3: ``(parent (n_s,), local root (n_s,))`` of shard ``s``; densities are all shards'.
    The linkage level (``p`` the average links): candidates also need the core's
    :func:`~agc_ray.core.hierarchy.linkage_allowed` with ``guard`` and ``best``, every node's best link."""
    nbr, sim = graph
    lo, hi = int(offsets[s]), int(offsets[s + 1])
    density = np.concatenate(densities)
    score = sim[lo:hi] if mode == "sim" or p is None else p
    from agc_ray.core.hierarchy import linkage_allowed, select_parents

    _torch_single_thread()
    allowed = None if guard is None else linkage_allowed(p, sim[lo:hi], nbr[lo:hi], best, guard)
    parent = select_parents(score, nbr[lo:hi], density, tau, allowed, start=lo)
    return parent, local_roots(parent, lo, hi)


@lazy_remote(num_cpus=1, num_returns=2)
def global_components(n_shards: int, *parts):
    """Stage 4: union-find over the cross-shard edges of the local roots.

    ``parts`` are n_shards parents, n_shards local roots, n_shards sizes and n_shards peak rows (sizes
    and peak rows may be None at level 0).

    Returns:
        ``({comp, peaks, size, peak_row}, {edges, clusters})``: comp (n,) cluster of each node numbered
        by first node; peaks (C,) root node of each cluster; size (C,) original rows per cluster;
        peak_row (C,) original row of each cluster's peak; and the counts.
    """
    from agc_ray.core.hierarchy import canonical_labels, forest_peaks, weak_components

    parent = np.concatenate(parts[:n_shards])
    root = np.concatenate(parts[n_shards:2 * n_shards])
    sizes, peak_rows = parts[2 * n_shards:3 * n_shards], parts[3 * n_shards:]
    n = parent.size
    tops = np.flatnonzero(root == np.arange(n))
    cross = tops[parent[tops] >= 0]
    top_comp = weak_components(np.searchsorted(tops, cross), np.searchsorted(tops, root[parent[cross]]), tops.size)
    comp = canonical_labels(top_comp[np.searchsorted(tops, root)])
    peaks = forest_peaks(comp, parent)
    size = np.ones(n, dtype=np.int64) if sizes[0] is None else np.concatenate(sizes)
    peak_row = np.arange(n, dtype=np.int64) if peak_rows[0] is None else np.concatenate(peak_rows)
    cluster_size = np.bincount(comp, weights=size, minlength=peaks.size).astype(np.int64)
    level = {"comp": comp, "peaks": peaks, "size": cluster_size, "peak_row": peak_row[peaks]}
    return level, {"edges": int((parent >= 0).sum()), "clusters": int(peaks.size)}


@lazy_remote(num_cpus=1)
def split_members(s: int, offsets, level: dict, x_sum, x_id, bounds):
    """Aggregation, step 1: shard ``s``'s contribution to each next-level shard t.

    Yields one ``(cluster index within t, the cluster's members' sum here, peak cluster index within t,
    peak x_id rows)`` per next shard t (clusters with a member in shard s; peaks: the clusters whose peak
    node is in shard s), as separate objects (call with ``num_returns`` = number of next shards) so that
    each next shard fetches only its own part. The sums are :func:`~agc_ray.core.hierarchy.fixed_point_sums`
    (int64), exact whatever the split: a part holds a row per cluster, not a copy of every member row
    (level 0 of 1M rows in 72K clusters: ~150K rows instead of 1M).
    """
    from agc_ray.core.hierarchy import fixed_point_sums

    _torch_single_thread()
    lo, hi = int(offsets[s]), int(offsets[s + 1])
    comp = level["comp"][lo:hi]
    t = shard_of(bounds, comp)
    is_peak = level["peaks"][comp] == np.arange(lo, hi)
    for j in range(len(bounds) - 1):
        member, peak = np.flatnonzero(t == j), np.flatnonzero(is_peak & (t == j))
        clusters, inverse = np.unique(comp[member] - bounds[j], return_inverse=True)
        sums = fixed_point_sums(x_sum, inverse, clusters.size, rows=None if member.size == hi - lo else member)
        yield clusters, sums.numpy(), comp[peak] - bounds[j], np.take(x_id, peak, axis=0)


@lazy_remote(num_cpus=1, num_returns=4)
def assemble_next(t: int, bounds, level: dict, *parts):
    """Aggregation, step 2: next-level shard ``t``: ``(x_id, x_sum, size, peak_row)``.

    ``parts``: every old shard's part for ``t`` from :func:`split_members`. Their integer sums add up
    exactly, in any order, to those of :func:`agc_ray.core.hierarchy.aggregate` over every member.
    """
    from agc_ray.core.hierarchy import from_fixed_point

    torch = _torch_single_thread()
    c0, c1 = int(bounds[t]), int(bounds[t + 1])
    x_sum = torch.zeros((c1 - c0, parts[0][1].shape[1]), dtype=torch.int64)
    for p in parts:
        x_sum.index_add_(0, torch.from_numpy(p[0]), torch.from_numpy(p[1]))
    x_id = np.empty((c1 - c0, parts[0][3].shape[1]), dtype=parts[0][3].dtype)
    for p in parts:  # every cluster has exactly one peak, in exactly one old shard
        x_id[p[2]] = p[3]
    return x_id, from_fixed_point(x_sum), level["size"][c0:c1].copy(), level["peak_row"][c0:c1].copy()


@lazy_remote(num_cpus=1)
def background_chance(x_sample, seed: int) -> float:
    """The core's chance similarity of a table from its seeded row sample (the boundary merge's)."""
    from agc_ray.core.hierarchy import background_similarity

    return background_similarity(x_sample, seed=seed)


@lazy_remote(num_cpus=1, num_returns=2)
def split_deep(graph, k: int):
    """A level's ``(nbr, sim)`` (n, k) and its exact lists, from a graph searched deeper
    (:func:`~agc_ray.core.subset.split_deep`)."""
    from agc_ray.core.subset import split_deep as split

    nbr, sim, deep = split(*graph, k)
    return (nbr, sim), deep


@lazy_remote(num_cpus=1)
def nearest_similarities(graph) -> np.ndarray:
    """(N,) every row's nearest-neighbour similarity in the level-0 graph."""
    from agc_ray.core.boundary import nearest_similarity

    return nearest_similarity(*graph)


@lazy_remote(num_cpus=1)
def boundary_part(s: int, offsets, graph, nearest, *clusters):
    """Row shard ``s``'s :func:`~agc_ray.core.boundary.boundary_tables` (``clusters``: every row
    shard's clusters at this level, in shard order)."""
    from agc_ray.core.boundary import boundary_tables

    nbr, sim = graph
    lo, hi = int(offsets[s]), int(offsets[s + 1])
    return boundary_tables(nbr[lo:hi], sim[lo:hi], np.concatenate(clusters), nearest, rows=np.arange(lo, hi))


@lazy_remote(num_cpus=1, num_returns=2)
def boundary_merge(level: dict, chance: float, closeness: float, *tables):
    """The level's clusters (as :func:`global_components` returns them) after the boundary merge of the
    row shards' ``tables`` (their sums are exact: the same merge as over the whole table)."""
    from agc_ray.core.boundary import add_tables, largest_parts, merged_clusters

    merged, links = merged_clusters(add_tables(list(tables)), chance, closeness)
    keep = largest_parts(merged, level["size"])
    comp = merged[level["comp"]]
    out = {"comp": comp, "peaks": level["peaks"][keep], "peak_row": level["peak_row"][keep],
           "size": np.bincount(merged, weights=level["size"], minlength=keep.size).astype(np.int64)}
    return out, {"edges": int(comp.size - keep.size), "clusters": int(keep.size), "boundary_links": links}


@lazy_remote(num_cpus=1)
def relabel(node_of_row, level: dict):
    """Rows' clusters at this level: ``comp[node_of_row]``."""
    return level["comp"][node_of_row]
