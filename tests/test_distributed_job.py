"""The distributed job on a real local Ray: equality with HiLander, output contract, atomic commit."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from _job_fixtures import job_data, job_model, job_table, ray_session, read_levels, s3_endpoint, reference_levels  # noqa: F401

from agc_ray.distributed.job import JobConfig, run_job


@pytest.fixture(scope="module", autouse=True)
def ray_data_reads():
    """This module reads every table with Ray Data (the path of tables over a few thousand rows; the
    other modules' small tables are read by the driver, see agc_ray.distributed.input.DIRECT_READ_BYTES)."""
    import os

    old = os.environ.get("AGC_RAY_DIRECT_READ_BYTES")
    os.environ["AGC_RAY_DIRECT_READ_BYTES"] = "0"
    yield
    if old is None:
        os.environ.pop("AGC_RAY_DIRECT_READ_BYTES")
    else:
        os.environ["AGC_RAY_DIRECT_READ_BYTES"] = old


def test_direct_read_equals_ray_data_read(ray_session, job_table, monkeypatch):
    """Small tables are read by the driver: same shards, ids, labels and normalisation as Ray Data's."""
    from agc_ray.distributed.input import check_schema, read_shards, resolve_input

    fs, files = resolve_input(str(job_table))
    schema = check_schema(fs, files, "id", "embedding", None, default_label="label")
    ray_data = read_shards(fs, schema, 3)
    monkeypatch.setenv("AGC_RAY_DIRECT_READ_BYTES", str(10**9))
    direct = read_shards(fs, schema, 3)
    np.testing.assert_array_equal(direct.offsets, ray_data.offsets)
    assert direct.dim == ray_data.dim
    for a, b in zip(direct.x + direct.labels, ray_data.x + ray_data.labels):
        np.testing.assert_array_equal(ray_session.get(a), ray_session.get(b))
    for a, b in zip(direct.ids, ray_data.ids):
        assert ray_session.get(a).equals(ray_session.get(b))


def _run(input, output, model=None, **kw):
    return run_job(JobConfig(input=str(input), output=str(output), model=None if model is None else str(model), **kw))


def test_shards_stream_from_ray_data_blocks(ray_session):
    """The shards are cut from Ray Data's blocks as they stream (blocks straddling a shard boundary,
    empty shards, sliced bundles): the rows in order; a row count other than the footers' is an error."""
    import pyarrow as pa
    import ray

    from agc_ray.distributed.errors import InputError
    from agc_ray.distributed.input import _stream_shards

    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    blocks = [pa.table({"id": pa.array(range(lo, hi)), "x": pa.FixedShapeTensorArray.from_numpy_ndarray(x[lo:hi])})
              for lo, hi in ((0, 3), (3, 7), (7, 10))]
    ds = ray.data.from_arrow(blocks)
    for offsets in ([0, 10], [0, 2, 5, 10], [0, 0, 5, 5, 10], [0, 3, 7, 10]):
        built = _stream_shards(ds, np.array(offsets), False)
        assert len(built) == len(offsets) - 1
        for b, lo, hi in zip(built, offsets[:-1], offsets[1:]):
            if hi > lo:
                np.testing.assert_array_equal(ray.get(b[0]), x[lo:hi])
                assert ray.get(b[1]).to_pylist() == list(range(lo, hi))
    with pytest.raises(InputError, match="more rows than its files' footers say"):
        _stream_shards(ds, np.array([0, 4, 8]), False)
    with pytest.raises(InputError, match="has 10 rows where its files' footers say 12"):
        _stream_shards(ds, np.array([0, 6, 12]), False)


def test_bad_row_found_while_streaming_is_an_input_error(ray_session, tmp_path):
    """A bad row in a later file, found by a Ray Data task after shards were already being built,
    surfaces as the one-line InputError with its example id."""
    from agc_ray.distributed.demo import write_table
    from agc_ray.distributed.errors import InputError
    from agc_ray.distributed.input import check_schema, read_shards, resolve_input

    x = np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)
    x[377, 3] = np.nan
    write_table(tmp_path / "t", x, files=4)
    fs, files = resolve_input(str(tmp_path / "t"))
    schema = check_schema(fs, files, "id", "embedding", None)
    with pytest.raises(InputError, match=r"NaN or Inf in 1 row\(s\) of a block \(example id 377\)"):
        read_shards(fs, schema, 3)


@pytest.fixture(scope="module")
def reference(job_model, job_data):
    return reference_levels(job_model, job_data[0], knn="exact")


@pytest.fixture(scope="module")
def outputs(ray_session, tmp_path_factory, job_table, job_model):
    """The same job with 1 and 3 node shards, and with 3 shards whose node embeddings are streamed in blocks
    of 300 nodes (several per shard, the last one shorter; one block per shard is the default here)."""
    from agc_ray.distributed import level

    root = tmp_path_factory.mktemp("out")
    runs = {s: (root / f"s{s}", _run(job_table, root / f"s{s}", job_model, knn="exact", num_shards=s)) for s in (1, 3)}
    default, level.EMBEDDING_BLOCK = level.EMBEDDING_BLOCK, 300
    try:
        runs["3, blocks of 300"] = (root / "b300", _run(job_table, root / "b300", job_model, knn="exact", num_shards=3))
    finally:
        level.EMBEDDING_BLOCK = default
    return runs


def test_shards_equal_single_process(outputs, reference):
    assert len(reference) >= 2, "the test data should give several levels"
    for shards, (out, manifest) in outputs.items():
        got = read_levels(out)
        assert len(got) == len(reference), shards
        for level, (a, b) in enumerate(zip(got, reference)):
            # identical ids, not only identical partitions
            np.testing.assert_array_equal(a, b, err_msg=f"{shards} shards, level {level}")
        assert manifest["cluster_counts"] == [int(lv.max()) + 1 for lv in reference]


def test_output_files_identical_across_shards(outputs):
    (a, _), (b, _) = outputs[1], outputs[3]
    for level in range(len(read_levels(a))):
        ta = pq.read_table(a / "clusters" / f"level={level}")
        tb = pq.read_table(b / "clusters" / f"level={level}")
        assert ta.equals(tb)


def test_clusters_table_contract(outputs, job_data):
    out, manifest = outputs[3]
    levels = read_levels(out)
    x, _ = job_data
    for level, labels in enumerate(levels):
        table = pq.read_table(out / "clusters" / f"level={level}")
        assert table.column_names == ["cluster_id", "size", "peak_id", "parent_cluster_id"]
        np.testing.assert_array_equal(table.column("cluster_id").to_numpy(), np.arange(labels.max() + 1))
        np.testing.assert_array_equal(table.column("size").to_numpy(), np.bincount(labels))
        peaks = table.column("peak_id").to_numpy()
        np.testing.assert_array_equal(labels[peaks], np.arange(labels.max() + 1))  # ids are row numbers here
        parent = table.column("parent_cluster_id")
        if level + 1 < len(levels):
            # each level coarsens the one below: a cluster's rows all map to its parent
            np.testing.assert_array_equal(parent.to_numpy()[labels], levels[level + 1])
        else:
            assert parent.null_count == len(parent)
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["status"] == "succeeded"
    assert saved["input"]["rows"] == x.shape[0]
    assert set(saved["levels"][0]["metrics"]) >= {"fp", "fb", "nmi"}
    assert {"read_seconds", "knn_seconds", "score_seconds", "decode_seconds", "total_seconds"} <= set(saved["timings"])
    assert saved["versions"]["ray"]


def test_duckdb_reads_hive_partitions(outputs):
    duckdb = pytest.importorskip("duckdb")
    out, manifest = outputs[3]
    query = f"""
        SELECT a.level, count(DISTINCT a.cluster_id) AS clusters, count(*) AS rows_, max(c.size) AS largest
        FROM read_parquet('{out}/assignments/*/*.parquet', hive_partitioning = true) a
        JOIN read_parquet('{out}/clusters/*/*.parquet', hive_partitioning = true) c
          ON a.level = c.level AND a.cluster_id = c.cluster_id
        GROUP BY a.level ORDER BY a.level
    """
    rows = duckdb.sql(query).fetchall()
    assert [r[1] for r in rows] == manifest["cluster_counts"]
    assert all(r[2] == manifest["input"]["rows"] for r in rows)


def test_unsupervised_equals_single_process(ray_session, tmp_path, job_table, job_data):
    from agc_ray import HiLander

    ref = HiLander(unsupervised=True, decode="sim", tau=0.5, knn="exact").predict_hierarchy(job_data[0])
    _run(job_table, tmp_path / "u", unsupervised=True, tau=0.5, knn="exact", num_shards=2)
    got = read_levels(tmp_path / "u")
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


def test_ivf_independent_of_shards(ray_session, tmp_path, job_table, job_model, job_data):
    m2 = _run(job_table, tmp_path / "a", job_model, knn="ivf", num_shards=2, max_levels=2)
    m3 = _run(job_table, tmp_path / "b", job_model, knn="ivf", num_shards=3, max_levels=2)
    assert 0.95 <= m2["levels"][0]["knn_recall"] <= 1.0  # the model's default target
    assert m2["levels"][0]["knn_method"] == "ivf"
    assert m2["parameters"]["knn_recall"] == 0.95
    assert [lv.get("knn_nprobe") for lv in m2["levels"]] == [lv.get("knn_nprobe") for lv in m3["levels"]]
    for a, b in zip(read_levels(tmp_path / "a"), read_levels(tmp_path / "b")):
        np.testing.assert_array_equal(a, b)
    # the shared quantizer is the core's, so the sharded IVF graph equals the single IVF index's
    ref = reference_levels(job_model, job_data[0], knn="ivf", levels=2)
    np.testing.assert_array_equal(read_levels(tmp_path / "a")[0], ref[0])


@pytest.fixture(scope="module")
def small_identities(tmp_path_factory):
    """3000 rows of identities of ~4: level 1 keeps over a thousand nodes, enough for an IVF index."""
    from agc_ray.core.synthetic import make_faces
    from agc_ray.distributed.demo import write_table

    x, y = make_faces(3000, mean_identity_size=4, seed=5)
    return x, write_table(tmp_path_factory.mktemp("small_identities"), x, y, files=3)


@pytest.mark.parametrize("recall", [0.8, 0.7])
def test_graph_from_the_level_below_equals_single_process(ray_session, tmp_path, small_identities, recall):
    """Above level 0 the job searches the graph from the level below as the core does (same candidates,
    rounds, recall and fallback), whatever the shards: 0.8 misses at level 1 (IVF, then exact) and holds
    at level 2; 0.7 refines level 1 once. (Without the boundary merge, whose larger merges at level 1 end
    this hierarchy at level 2.)"""
    from agc_ray import HiLander

    x, table = small_identities
    params = dict(unsupervised=True, decode="sim", knn="ivf", knn_recall=recall)
    est = HiLander(levels=3, boundary_closeness=None, **params)
    result = est.hierarchy(x)
    ref = result.levels
    manifest = _run(table, tmp_path / "out", num_shards=3, max_levels=3, boundary_closeness="off", **params)
    got = read_levels(tmp_path / "out")
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    keys = ("knn_method", "knn_rounds", "knn_recall", "knn_coarse_recall")
    assert [{key: lv.get(key) for key in keys} for lv in manifest["levels"]] == \
        [{key: st.get(key) for key in keys} for st in result.stats]
    methods = [lv["knn_method"] for lv in manifest["levels"]]
    assert methods == (["ivf", "exact", "coarse"] if recall == 0.8 else ["ivf", "coarse", "coarse"])
    if recall == 0.8:  # level 1's IVF missed its target: the margin it tried is reported as the IVF's
        assert "knn_probe_margin" not in manifest["levels"][1] and manifest["levels"][1]["knn_ivf_probe_margin"] > 0
    assert manifest["levels"][1].get("knn_rounds") == (None if recall == 0.8 else 1)


def test_levels_above_an_ivf_miss_search_exactly(ray_session, tmp_path):
    """Where level 0's IVF search misses the recall target (4000 isotropic rows among faces: searched
    exactly instead), level 1 searches exactly without building an IVF index, in the job as in the core."""
    from agc_ray import HiLander
    from agc_ray.core.synthetic import make_faces
    from agc_ray.distributed.demo import write_table

    x, y = make_faces(6000, dim=64, seed=3)
    noise = np.random.default_rng(0).standard_normal((4000, 64)).astype(np.float32)
    x, y = np.concatenate([x, noise]), np.concatenate([y, y.max() + 1 + np.arange(4000)])
    table = write_table(tmp_path / "table", x, y, files=2)
    params = dict(unsupervised=True, knn="ivf")
    result = HiLander(levels=2, **params).hierarchy(x)
    manifest = _run(table, tmp_path / "out", num_shards=2, max_levels=2, **params)
    assert "knn_ivf_recall" in result.stats[0] and result.stats[1]["knn_ivf_skipped"]
    assert [lv["knn_method"] for lv in manifest["levels"]] == [st["knn_method"] for st in result.stats] == \
        ["exact", "exact"]
    assert [lv.get("knn_ivf_skipped") for lv in manifest["levels"]] == [None, True]
    got = read_levels(tmp_path / "out")
    assert len(got) == len(result.levels) == 2
    for a, b in zip(got, result.levels):
        np.testing.assert_array_equal(a, b)


def test_levels_derived_from_deeper_lists_equal_single_process(ray_session, tmp_path, small_identities, monkeypatch):
    """Levels above 0 searched exactly keep lists 2k deep (the row limit lowered here), and the levels
    above derive their graphs from them, rescanning the rows left short in tasks: the core's graphs
    and labels, which are those of searching every level afresh."""
    from agc_ray import HiLander
    from agc_ray.core import subset

    x, table = small_identities
    params = dict(unsupervised=True, decode="sim", knn="exact")
    fresh = HiLander(levels=4, boundary_closeness=None, **params).hierarchy(x)
    monkeypatch.setattr(subset, "DEEP_MIN_ROWS", 0)
    monkeypatch.setattr(subset, "RESCAN_BLOCK", 1)  # a task per rescanned row
    result = HiLander(levels=4, boundary_closeness=None, **params).hierarchy(x)
    manifest = _run(table, tmp_path / "out", num_shards=3, max_levels=4, boundary_closeness="off", **params)
    methods = [lv["knn_method"] for lv in manifest["levels"]]
    assert methods == [st["knn_method"] for st in result.stats] and methods[:2] == ["exact", "exact"]
    assert len(methods) >= 3 and set(methods[2:]) == {"derived"}
    assert [lv.get("knn_rescanned") for lv in manifest["levels"]] == [st.get("knn_rescanned") for st in result.stats]
    assert max(lv.get("knn_rescanned") or 0 for lv in manifest["levels"]) >= 2
    got = read_levels(tmp_path / "out")
    assert len(got) == len(result.levels) == len(fresh.levels)
    for a, b, c in zip(got, result.levels, fresh.levels):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(b, c)


def test_boundary_merge_equals_single_process(ray_session, tmp_path):
    """The boundary merge above level 0 sums the level-0 edges per row shard: the same links, levels and
    peaks as the core over the whole table (a table where it joins clusters: stretched ones)."""
    from agc_ray import HiLander
    from agc_ray.core.synthetic import make_subspace_clusters
    from agc_ray.distributed.demo import write_table

    x, y = make_subspace_clusters(3000, spread=(0.35, 0.6), seed=5)
    table = write_table(tmp_path / "in", x, y, files=3)
    result = HiLander(unsupervised=True, knn="exact").hierarchy(x)
    manifest = _run(table, tmp_path / "out", unsupervised=True, knn="exact", num_shards=3)
    got = read_levels(tmp_path / "out")
    assert len(got) == len(result.levels)
    for a, b in zip(got, result.levels):
        np.testing.assert_array_equal(a, b)
    links = [st.get("boundary_links") for st in result.stats][: len(got)]
    assert [lv.get("boundary_links") for lv in manifest["levels"]] == links and links[1] > 0
    assert manifest["parameters"]["boundary_closeness"] == 0.7


@pytest.mark.parametrize("embedding_type", ["list", "tensor"])
def test_string_ids_and_embedding_types(ray_session, tmp_path, job_model, job_data, embedding_type):
    from agc_ray.distributed.demo import write_table

    x, y = job_data[0][:600], job_data[1][:600]
    ids = np.array([f"face-{i:05d}" for i in range(600)], dtype=object)
    write_table(tmp_path / "in", x, y, files=2, ids=ids, embedding_type=embedding_type)
    _run(tmp_path / "in", tmp_path / "out", job_model, num_shards=2)
    got = read_levels(tmp_path / "out")  # sorted string ids = row order here
    ref = reference_levels(job_model, x, knn="exact")
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", ["one_row", "fewer_than_k", "identical"])
def test_degenerate_inputs(ray_session, tmp_path, job_model, job_data, case):
    from agc_ray.distributed.demo import write_table

    x = job_data[0]
    if case == "one_row":
        x = x[:1]
    elif case == "fewer_than_k":
        x = x[:6]
    else:
        x = np.repeat(x[:1], 40, axis=0)
    write_table(tmp_path / "in", x, files=1)
    manifest = _run(tmp_path / "in", tmp_path / "out", job_model, num_shards=2)
    got = read_levels(tmp_path / "out")
    assert all(lv.shape == (x.shape[0],) for lv in got)
    if case == "one_row":
        assert manifest["cluster_counts"] == [1]
    for fine, coarse in zip(got, got[1:]):  # each level coarsens the one below
        pairs = np.unique(np.stack([fine, coarse]), axis=1)
        assert np.unique(pairs[0]).size == pairs.shape[1]
    if case != "identical":
        # exact ties (identical vectors) make densities equal up to float rounding, which depends on
        # batch sizes: only the tie-free cases are compared with the single process
        ref = reference_levels(job_model, x, knn="exact")
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)


def test_existing_output_refused_then_replaced(ray_session, tmp_path, job_table, job_model):
    from agc_ray.distributed.errors import InputError

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    with pytest.raises(InputError, match="exists and is not empty"):
        _run(job_table, out, job_model, max_levels=1)
    assert (out / "keep.txt").read_text() == "previous"
    _run(job_table, out, job_model, max_levels=1, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left behind


def test_failure_before_commit_keeps_previous_output(ray_session, tmp_path, job_table, job_model, monkeypatch):
    from agc_ray.distributed import commit

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"status": "previous"}')

    def crash(*args):
        raise RuntimeError("simulated crash during the commit")

    monkeypatch.setattr(commit, "replace_local_dir", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(job_table, out, job_model, max_levels=1, overwrite=True)
    assert json.loads((out / "manifest.json").read_text()) == {"status": "previous"}
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # staging removed


@pytest.mark.parametrize("case", ["exact", "ivf", "ivf-small-calls", "ivf-target", "ivf-target-small-calls",
                                  "ivf-out-of-reach", "ivf-out-of-reach-kept"])
def test_sharded_knn_graph_equals_single_index(ray_session, job_data, case, monkeypatch, caplog):
    """The graph of the sharded index (3 shards, top-k merge) equals the core's single-index graph; with a
    recall target both probe the cells within the same margin, with the same recall measured, or both
    fall back to exact search when the target is out of IVF's reach. Small calls: each task searches its
    rows in calls of 100 rows (the bound on query x probe pairs that keeps a high nprobe's memory in
    check; with a target, calls of 50 probes).
    Kept: a table over the exact-search bound (5000 rows here) keeps its IVF graph below the target,
    says so in its info and warns."""
    from agc_ray.core import knn as core_knn
    from agc_ray.core import recall as core_recall
    from agc_ray.core.knn import knn_graph, l2_normalize
    from agc_ray.core.recall import RECALL_SAMPLE, probe_cap
    from agc_ray.core.synthetic import make_faces
    from agc_ray.distributed.shards import shard_bounds
    from agc_ray.distributed import knn as sharded

    if case.endswith("small-calls"):
        monkeypatch.setattr(sharded, "IVF_PROBE_PAIRS", 100 * 16 if case == "ivf-small-calls" else 50)
    kept = case == "ivf-out-of-reach-kept"
    if kept:
        monkeypatch.setattr(core_recall, "EXACT_FALLBACK_MAX_ROWS", 5000)
    method = case.split("-")[0]
    # out of reach: small identities in isotropic spread (an eighth of the cells a row, where a miss is
    # searched exactly: recall 0.91 of 0.95; a quarter, where a miss keeps IVF: 0.96 of 0.98)
    target = 0.98 if kept else 0.95 if "out-of-reach" in case else 0.99 if "target" in case else None
    x = l2_normalize(make_faces(10000, dim=64, isotropic=1.0, mean_identity_size=5, seed=8)[0]
                     if "out-of-reach" in case else job_data[0])
    info = {}
    with caplog.at_level("WARNING", logger="agc_ray.core.knn"):
        nbr, sim = knn_graph(x, 10, method=method, seed=0, normalize=False, recall=target, info=info)
    assert ("too many to search exactly" in caplog.text) == kept
    offsets = shard_bounds(x.shape[0], 3)
    refs = [ray_session.put(x[offsets[s]:offsets[s + 1]]) for s in range(3)]
    graph, stats, actors = sharded.sharded_knn_graph(refs, offsets, 10, method, 0, recall_sample=RECALL_SAMPLE,
                                                     recall_target=target)
    try:
        got_nbr, got_sim = ray_session.get(graph)
    finally:
        for a in actors:
            ray_session.kill(a)
    assert stats["knn_method"] == info["knn_method"] == ("exact" if case == "ivf-out-of-reach" else method)
    np.testing.assert_array_equal(got_nbr, nbr)
    # exact search goes through BLAS, whose blocking differs with the index size: similarities may
    # differ in the last bit (the neighbours do not)
    np.testing.assert_allclose(got_sim, sim, rtol=0, atol=2e-6)
    if method == "ivf":
        assert 0.9 <= stats["knn_recall"] <= 1.0
        assert stats.get("knn_nprobe") == info.get("knn_nprobe")
        assert stats.get("knn_probe_margin") == info.get("knn_probe_margin")
        assert stats.get("knn_probes_mean") == info.get("knn_probes_mean")
    if case in ("ivf", "ivf-small-calls"):
        assert stats["knn_nprobe"] == 16
    if target is not None and not kept:
        assert stats["knn_recall"] == pytest.approx(info["knn_recall"]) and stats["knn_recall"] >= target
    if "target" in case:  # rows probe the cells within a margin of their best: one to a few on average
        assert stats["knn_probe_margin"] > 0 and 1 < stats["knn_probes_mean"] < stats["knn_nprobe"]
    if case == "ivf-out-of-reach":
        assert stats["knn_recall"] == 1.0 and stats["knn_ivf_recall"] < 0.95
        assert stats["knn_ivf_recall"] == pytest.approx(info["knn_ivf_recall"])
    if kept:
        assert stats["knn_recall_target_met"] is info["knn_recall_target_met"] is False
        assert stats["knn_recall"] == pytest.approx(info["knn_recall"]) and 0.5 < stats["knn_recall"] < 0.98
        assert stats["knn_nprobe"] == info["knn_nprobe"] == probe_cap(core_knn.ivf_nlist(10000), 10000, max_share=1 / 4)


def test_index_actors_serve_every_level(ray_session, job_data):
    """The next level reuses the index actors (one fewer shard: the extra actor is not used), and a late
    search for the earlier level (a lost graph being reconstructed) still searches that level's rows."""
    from agc_ray.core.knn import knn_graph, l2_normalize
    from agc_ray.distributed.index import MergedIndex, index_actors
    from agc_ray.distributed.knn import sharded_knn_graph
    from agc_ray.distributed.shards import shard_bounds

    x = l2_normalize(job_data[0])
    upper = x[::5]  # another "level": other rows, other offsets
    off0, off1 = shard_bounds(x.shape[0], 3), shard_bounds(upper.shape[0], 2)
    refs0 = [ray_session.put(x[off0[s]:off0[s + 1]]) for s in range(3)]
    refs1 = [ray_session.put(upper[off1[s]:off1[s + 1]]) for s in range(2)]
    _, _, actors = sharded_knn_graph(refs0, off0, 10, "exact", 0)
    try:
        graph, _, reused = sharded_knn_graph(refs1, off1, 10, "exact", 0, actors=actors)
        assert reused == actors[:2]
        np.testing.assert_array_equal(ray_session.get(graph)[0], knn_graph(upper, 10, method="exact", normalize=False)[0])
        pairs0 = index_actors(refs0, off0, "exact", None, 0, actors=actors)  # level 0 again, as a reconstruction
        sim, ids = MergedIndex(pairs0, exact=True).search(x[:50], 11)
        np.testing.assert_array_equal(ids[:, 0], np.arange(50))
        ray_session.get([a.release.remote() for a in actors])  # as the job does once a level's graph is done
        again = MergedIndex(pairs0, exact=True).search(x[:50], 11)  # rebuilt from the call's source
        np.testing.assert_array_equal(again[1], ids)
        np.testing.assert_array_equal(again[0], sim)
    finally:
        for a in actors:
            ray_session.kill(a)


def test_unsupervised_adaptive_tau_equals_single_process(ray_session, tmp_path, job_table, job_data):
    """No tau: the job derives the core's threshold from the same seeded row sample, for any sharding."""
    from agc_ray import HiLander

    result = HiLander(unsupervised=True, decode="sim", knn="exact").hierarchy(job_data[0])
    ref = result.levels
    taus = [st["tau"] for st in result.stats][: len(ref)]
    manifest = _run(job_table, tmp_path / "a", unsupervised=True, knn="exact", num_shards=3)
    got = read_levels(tmp_path / "a")
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    assert manifest["parameters"]["tau_source"] == "adaptive"
    assert manifest["parameters"]["tau"] == pytest.approx(taus)
    assert manifest["selected_level"] == result.selected_level
    # the selected level decoded by average linkage (member sums over the shards' halos), same threshold
    linkage = {i: st["linkage"] for i, st in enumerate(result.stats[: len(ref)]) if "linkage" in st}
    assert list(linkage) == [result.selected_level]
    assert {i: lv["linkage"] for i, lv in enumerate(manifest["levels"]) if "linkage" in lv} == pytest.approx(linkage)


def test_long_stages_log_progress_and_nothing_louder(ray_session, tmp_path, job_table, job_model, monkeypatch, caplog):
    """Progress lines come from finished tasks: with AGC_RAY_PROGRESS_S=0, one line per task but the last."""
    import logging

    from agc_ray.distributed import progress

    monkeypatch.setenv("AGC_RAY_PROGRESS_S", "0")
    monkeypatch.setattr(progress, "COUNT_INSIDE_ROWS", 0)  # the tasks report their rows even on this small table
    with caplog.at_level(logging.INFO, logger="agc_ray"):
        _run(job_table, tmp_path / "out", job_model, max_levels=1, knn="ivf", num_shards=2)
    ours = [r for r in caplog.records if r.name == "agc_ray"]
    lines = [r.getMessage() for r in ours]
    knn = [line for line in lines if line.startswith("level 0 kNN: ") and " tasks, " in line]
    assert knn and knn[0].startswith("level 0 kNN: 1/2 tasks, 1250/2500 rows (50%)") and "ETA" in knn[0], knn
    assert any(line.startswith("level 0 kNN: ivf index of 2500 rows built in 2 shard(s)") for line in lines)
    assert any(line.startswith("level 0 kNN index build: 1/2 tasks, ") for line in lines)
    for stage in ("level 0 scoring 1/2 (node embeddings): ", "level 0 scoring 2/2 (edges): "):
        scoring = [line for line in lines if line.startswith(stage)]
        # rows done come from the tasks' own reports too: at least the finished task's 1250 rows
        assert scoring and scoring[0].startswith(stage + "1/2 tasks, "), (stage, lines)
        assert int(scoring[0].split("tasks, ")[1].split("/")[0]) >= 1250
    assert not [r.getMessage() for r in ours if r.levelno >= logging.WARNING]


def test_row_counter_counts_rows_reported_inside_tasks(ray_session):
    """Tasks report rows per chunk to the counter; wait() reads it (the scoring stages' progress)."""
    import time

    import ray

    from agc_ray.distributed import progress

    counter = progress.row_counter()

    @ray.remote
    def work(counter, chunks):
        report = progress.reporter(counter, "stage")
        for _ in range(chunks):
            report(100)
        return chunks

    refs = [work.remote(counter, 3), work.remote(counter, 2)]
    progress.wait(refs, "stage", rows=[300, 200], counter=counter)
    assert ray.get(refs) == [3, 2]
    deadline = time.monotonic() + 30  # fire-and-forget reports: delivered, not necessarily before the return
    while ray.get(counter.done.remote("stage")) < 500 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.get(counter.done.remote("stage")) == 500
    assert ray.get(counter.done.remote("other")) == 0
    assert progress._counted(counter, "stage", 0) == 500 and progress._counted(None, "stage", 300) == 300
    ray.kill(counter)
    assert progress.reporter(None, "stage") is None
    progress.reporter(counter, "stage")(5)  # a dead counter does not fail the task


@pytest.mark.parametrize("normalize", [False, True])
def test_sharded_rows_read_like_the_whole_array(normalize):
    """The scoring tasks' rows by global id, gathered from the shard parts a task holds, equal the whole
    array's (normalised rows: bit for bit as l2_normalize of the whole array); ids of shards not held
    (padded neighbours) read the first held row."""
    from agc_ray.core.knn import l2_normalize
    from agc_ray.distributed.level import ShardedRows
    from agc_ray.distributed.shards import shard_bounds

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32) * 3
    offsets = shard_bounds(300, 3)  # 0, 100, 200, 300
    want = l2_normalize(x) if normalize else x
    held = {s: x[offsets[s]:offsets[s + 1]] for s in (1, 2)}  # shard 1 and one halo owner
    rows = ShardedRows(held, offsets, normalize=normalize)
    assert rows.shape == x.shape
    ids = rng.integers(100, 300, size=(40, 5))
    np.testing.assert_array_equal(rows[ids].numpy(), want[ids])
    np.testing.assert_array_equal(rows[np.arange(100, 200)].numpy(), want[100:200])
    padded = np.array([[0, 150], [99, 250]])  # shard 0 is not held: its ids read row 100
    np.testing.assert_array_equal(rows[padded].numpy(), want[np.where(padded < 100, 100, padded)])


def test_embedding_blocks_read_like_one_array():
    """A level's node embeddings as blocks (each inside one shard, a shard's first at its start, the last
    shorter) read back by global id and by a shard's row range as the whole array would be."""
    import torch

    from agc_ray.distributed.level import BlockRows, embedding_blocks
    from agc_ray.distributed.shards import shard_bounds

    offsets = shard_bounds(1000, 3)  # 0, 333, 667, 1000
    bounds, of_shard = embedding_blocks(offsets, block=128)
    np.testing.assert_array_equal(bounds, [0, 128, 256, 333, 461, 589, 667, 795, 923, 1000])
    assert of_shard == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    proj = np.random.default_rng(0).standard_normal((1000, 6)).astype(np.float32)
    held = of_shard[1] + of_shard[2]  # shard 1 and one halo owner
    rows = BlockRows({b: proj[bounds[b]:bounds[b + 1]] for b in held}, bounds, int(offsets[1]), int(offsets[2]))
    ids = torch.tensor([[333, 999, 700], [666, 10, 334]])  # 10 lies in a block not held: read as row 333
    want = proj[np.where(ids.numpy() == 10, 333, ids.numpy())]
    np.testing.assert_array_equal(rows(ids).numpy(), want)
    np.testing.assert_array_equal(rows[0:200].numpy(), proj[333:533])
    np.testing.assert_array_equal(rows[256:512].numpy(), proj[589:667])  # cut at the shard's end


def test_tasks_release_the_heap_when_they_start_and_end(monkeypatch):
    """Every lazy remote function gives freed heap back before and after it runs, a generator after its
    last value, a failing one too; names (Ray's task titles) and generator-ness are kept."""
    import inspect

    from agc_ray.distributed import remote

    calls = []
    monkeypatch.setattr(remote, "release_heap", lambda: calls.append(len(calls)))

    def plus_one(a):
        return a + 1

    def count(n):
        yield from range(n)

    def fails():
        raise ValueError("bad row")

    f, g, h = remote._releasing(plus_one), remote._releasing(count), remote._releasing(fails)
    assert f(1) == 2 and f.__name__ == "plus_one" and len(calls) == 2
    assert inspect.isgeneratorfunction(g) and g.__name__ == "count"
    values = g(3)
    assert next(values) == 0 and len(calls) == 3  # released when it started, not yet at its end
    assert list(values) == [1, 2] and len(calls) == 4
    with pytest.raises(ValueError, match="bad row"):
        h()
    assert len(calls) == 6
    monkeypatch.undo()
    assert remote.release_heap() is None  # the real one runs here (glibc and pyarrow, or nothing)
