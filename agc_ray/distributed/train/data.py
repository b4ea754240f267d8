"""The training job's data: footer checks in the driver, then Ray tasks on the table's blocks.

:func:`split_rows` validates the rows, sorts them by id (so that block order does not matter),
fingerprints them and holds out a validation split of whole classes; each split's level-0 kNN graph
is searched over the clustering job's sharded index; :func:`build_graphs` builds the ground-truth
level graphs with the core. The arrays stay in Ray's object store; every worker maps them read-only.
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np

from agc_ray.core.calibration import holdout_classes as split_by_class  # one implementation: the core's
from agc_ray.distributed.errors import InputError
from agc_ray.distributed.train.config import TrainJobConfig

log = logging.getLogger("agc_ray")


def inspect_table(cfg: TrainJobConfig):
    """``(filesystem, InputSchema)``: files, schemas, columns (label required), types and row count,
    from the Parquet footers only (:func:`agc_ray.distributed.input.check_schema`)."""
    from agc_ray.distributed.input import check_schema, resolve_input

    fs, files = resolve_input(cfg.input)
    return fs, check_schema(fs, files, cfg.id_column, cfg.embedding_column, cfg.label_column)


def read_table(fs, schema, cfg: TrainJobConfig):
    """Ray Data dataset of validated, L2-normalised rows: columns ``id``, ``x`` (tensor), ``label``.

    Every block goes through the clustering job's :func:`agc_ray.distributed.input.prepare_block`
    (null ids or labels, ragged, NaN/Inf or all-zero embeddings raise InputError).
    """
    import ray

    from agc_ray.distributed.input import prepare_block

    ds = ray.data.read_parquet(schema.files, filesystem=fs)
    ds = ds.select_columns([cfg.id_column, cfg.embedding_column, cfg.label_column])
    return ds.map_batches(
        prepare_block, batch_format="pyarrow", batch_size=None,
        fn_kwargs=dict(id_column=cfg.id_column, embedding_column=cfg.embedding_column,
                       label_column=cfg.label_column, dim=schema.dim),
    )


def _tensor_matrix(col) -> np.ndarray:
    arr = col.combine_chunks()
    if hasattr(arr, "to_numpy_ndarray"):
        return np.ascontiguousarray(arr.to_numpy_ndarray(), dtype=np.float32)
    return np.ascontiguousarray(np.stack(arr.to_numpy(zero_copy_only=False)), dtype=np.float32)


def sort_ids(column) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted ids, order)`` of an id column; InputError on duplicates (the rows are sorted by id)."""
    ids = column.to_numpy()
    if ids.dtype == object:
        ids = ids.astype(str)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    dup = ids[1:] == ids[:-1]
    if dup.any():
        raise InputError(f"id column has duplicate values (example id {ids[1:][dup][0]!r}, {int(dup.sum())} duplicates)")
    return ids, order


def table_arrays(tables: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, x, y)`` of prepared blocks (see :func:`read_table`), sorted by id, ids checked unique.

    Sorting makes everything downstream independent of the order in which Ray Data delivers blocks.
    """
    import pyarrow as pa

    tables = [t for t in tables if t.num_rows]
    if not tables:
        raise InputError("input has zero rows")
    table = pa.concat_tables(tables)
    ids, order = sort_ids(table.column("id"))
    x = _tensor_matrix(table.column("x"))[order]
    y = table.column("label").to_numpy().astype(np.int64)[order]
    return ids, x, y


def data_fingerprint(ids: np.ndarray, x: np.ndarray, y: np.ndarray) -> str:
    """sha256 of the id-sorted ids, embeddings and labels (the rows the model was trained on)."""
    h = hashlib.sha256()
    if ids.dtype == object:
        h.update("\x00".join(map(str, ids)).encode())
    else:
        h.update(np.ascontiguousarray(ids.astype(np.int64)).data)
    h.update(np.ascontiguousarray(x, dtype=np.float32).data)
    h.update(np.ascontiguousarray(y, dtype=np.int64).data)
    h.update(str(x.shape).encode())
    return h.hexdigest()


def graph_arrays(g) -> dict:
    """A :class:`~agc_ray.core.train.TrainGraph` as numpy arrays (zero-copy in the object store)."""
    out = {f: getattr(g, f).numpy() for f in ("x_id", "nbr", "sim", "feats", "same", "denser", "density")}
    out["x_mean"] = None if g.x_mean is g.x_id else g.x_mean.numpy()
    out["k"], out["level"] = g.k, g.level
    return out


def graph_from_arrays(d: dict, device="cpu"):
    """Inverse of :func:`graph_arrays` (tensors share the read-only buffers on CPU)."""
    import warnings

    import torch

    from agc_ray.core.train import TrainGraph

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffers: never written
        t = {f: torch.from_numpy(d[f]) for f in ("x_id", "nbr", "sim", "feats", "same", "denser", "density")}
    t["x_mean"] = t["x_id"] if d["x_mean"] is None else torch.from_numpy(d["x_mean"])
    g = TrainGraph(**t, k=d["k"], level=d["level"])
    return g.to(device) if str(device) != "cpu" else g


def check_split(cfg: TrainJobConfig, y: np.ndarray) -> np.ndarray:
    """The validation mask of the id-sorted labels ``y`` (whole classes held out); InputError when a
    split is too small to train or validate on."""
    if np.unique(y).size < 2:
        raise InputError(f"label column {cfg.label_column!r} has a single class ({y[0]}); training needs at least 2")
    val = split_by_class(y, cfg.val_fraction, cfg.seed)
    n_train, n_val = int((~val).sum()), int(val.sum())
    if n_train < cfg.batch_size:
        raise InputError(
            f"{n_train} training rows ({y.size} rows, {n_val} held out for validation) is fewer than "
            f"--batch-size {cfg.batch_size}"
        )
    if n_train <= cfg.k:
        raise InputError(f"{n_train} training rows; more than --k {cfg.k} are needed")
    if np.unique(y[~val]).size < 2:
        raise InputError("the training split has a single class; lower --val-fraction or add classes")
    if n_val and (n_val <= cfg.k or np.unique(y[val]).size < 2):
        raise InputError(
            f"the validation split ({n_val} rows, {np.unique(y[val]).size} classes) needs more than "
            f"--k {cfg.k} rows and 2 classes; raise --val-fraction or set it to 0"
        )
    return val


def split_rows(cfg: TrainJobConfig, *tables) -> dict:
    """Validate the rows, sort them by id, fingerprint them and hold out whole classes (a Ray task).

    Returns a dict of numpy arrays and small metadata: ``x_train``, ``y_train``, ``x_val``, ``y_val``
    (None without validation), ``fingerprint``, counts, ``prepare_seconds``.
    """
    t0 = time.perf_counter()
    ids, x, y = table_arrays(list(tables))
    fingerprint = data_fingerprint(ids, x, y)
    val = check_split(cfg, y)
    n_train, n_val = int((~val).sum()), int(val.sum())
    out = {
        "fingerprint": fingerprint, "n_rows": int(x.shape[0]), "n_train": n_train, "n_val": n_val,
        "dim": int(x.shape[1]), "n_classes": int(np.unique(y).size),
        "x_train": np.ascontiguousarray(x[~val]), "y_train": y[~val], "x_val": None, "y_val": None,
    }
    if n_val:
        out.update(x_val=np.ascontiguousarray(x[val]), y_val=y[val])
    out["prepare_seconds"] = time.perf_counter() - t0
    return out


def row_shards(data: dict, split: str, bounds: np.ndarray) -> list[np.ndarray]:
    """``data[split]`` cut into the contiguous row shards of ``bounds`` (a Ray task with len(bounds) - 1 returns)."""
    x = data[split]
    parts = [x[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
    return parts if len(parts) > 1 else parts[0]


def build_graphs(cfg: TrainJobConfig, data: dict, train_graph, val_graph) -> dict:
    """``data`` plus the ground-truth level graphs of both splits (a Ray task).

    ``train_graph`` / ``val_graph``: the splits' level-0 kNN graphs (nbr, sim) from the sharded search
    (None: the core searches itself); higher levels are built by the core.
    """
    from agc_ray.core.train import ground_truth_graphs, training_tables

    t0 = time.perf_counter()
    settings = ((cfg.k, cfg.train_levels),)
    out = dict(data)
    # As HiLander.fit: the split's graphs, then its identity-subsampled copy's (whose kNN graph the core
    # searches here: a third of the split's rows).
    tables = training_tables(data["x_train"], data["y_train"], subsample=cfg.subsample_identities, seed=cfg.seed)
    out["train_graphs"] = [graph_arrays(g) for i, (x_t, y_t) in enumerate(tables) for g in ground_truth_graphs(
        x_t, y_t, settings, knn_method=cfg.knn, seed=cfg.seed, first_graph=train_graph if i == 0 else None)]
    out["val_graphs"] = [] if not data["n_val"] else [graph_arrays(g) for g in ground_truth_graphs(
        data["x_val"], data["y_val"], settings, knn_method=cfg.knn, seed=cfg.seed, first_graph=val_graph)]
    out["prepare_seconds"] = data["prepare_seconds"] + time.perf_counter() - t0
    return out


def prepare_data(cfg: TrainJobConfig, table_refs: list, num_shards: int):
    """Ref to the training data dict (:func:`split_rows` + :func:`build_graphs`), with the level-0 kNN
    graphs of both splits searched over the clustering job's sharded index (never in the driver)."""
    import ray

    from agc_ray.core.knn import KNN_RECALL, RECALL_SAMPLE
    from agc_ray.distributed.shards import shard_bounds
    from agc_ray.distributed.knn import sharded_knn_graph

    cpus = min(1.0, cfg.cpus_per_worker)
    data = ray.remote(split_rows).options(num_cpus=cpus, max_retries=0).remote(cfg, *table_refs)
    summary = ray.get(ray.remote(_data_summary).options(num_cpus=0).remote(data))
    graphs, actors = {}, []
    for split, n in (("x_train", summary["n_train"]), ("x_val", summary["n_val"])):
        if not n:
            graphs[split] = None
            continue
        bounds = shard_bounds(n, num_shards)
        shards = ray.remote(row_shards).options(num_cpus=cpus, num_returns=bounds.size - 1).remote(data, split, bounds)
        graphs[split], info, new_actors = sharded_knn_graph(
            shards if isinstance(shards, list) else [shards], bounds, cfg.k, cfg.knn, cfg.seed,
            recall_sample=RECALL_SAMPLE, recall_target=KNN_RECALL)  # the IVF search of the core's training graphs
        actors += new_actors
        log.info("%s: %d rows, level-0 kNN over %d index shards (%s)", split, n, bounds.size - 1, info["knn_method"])
    task = ray.remote(build_graphs).options(num_cpus=cpus, max_retries=0)
    out = task.remote(cfg, data, graphs["x_train"], graphs["x_val"])
    ray.wait([out], fetch_local=False)
    for a in actors:
        ray.kill(a)
    return out, summary


def _data_summary(data: dict) -> dict:
    """The small fields of the training data dict (the driver never fetches the arrays)."""
    return {k: v for k, v in data.items() if not isinstance(v, (np.ndarray, list)) and v is not None}
