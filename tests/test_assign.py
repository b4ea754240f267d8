"""Incremental assignment: the core (known answers, no Ray) and ``jobs/assign.py`` on real Ray, Parquet and S3."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from _job_fixtures import job_data, job_model, ray_session, read_levels, s3_endpoint  # noqa: F401

from agc_ray.core.incremental import assign_new_rows, hierarchy_state
from agc_ray.core.knn import MarginIVF, build_index, search, unit_rows
from agc_ray.distributed.demo import write_table
from agc_ray.distributed.errors import InputError


def _far_group(dim: int, rows: int, seed: int) -> np.ndarray:
    """A tight group of rows around a random direction (far from any face cluster)."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=dim)
    return unit_rows(centre / np.linalg.norm(centre) + 0.02 * rng.normal(size=(rows, dim)) / np.sqrt(dim))


# -- core ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_state(trained, faces_split):
    x = unit_rows(faces_split[2])
    labels, levels, taus = hierarchy_state(trained, x)
    return x, labels, levels, taus


def test_state_labels_are_predict_hierarchy(trained, faces_split, base_state):
    _, labels, _, _ = base_state
    reference = trained.predict_hierarchy(faces_split[2])
    assert len(labels) == len(reference) >= 2
    for ours, ref in zip(labels, reference):  # same partitions (numbering may differ)
        pairs = np.unique(np.stack([ours, ref]), axis=1)
        assert pairs.shape[1] == np.unique(ours).size == np.unique(ref).size


def test_identical_rows_join_their_twins_at_every_level(trained, base_state):
    x, labels, levels, taus = base_state
    twins = np.random.default_rng(0).choice(x.shape[0], 25, replace=False)
    out = assign_new_rows(trained.model_, levels, x[twins], taus, mode=trained.decode)
    for lvl in range(len(levels)):
        np.testing.assert_array_equal(out.cluster[lvl], labels[lvl][twins], err_msg=f"level {lvl}")
    assert out.new_clusters == [0] * len(levels)


def test_far_group_forms_one_new_cluster(trained, base_state):
    x, labels, levels, taus = base_state
    group = _far_group(x.shape[1], 12, seed=3)
    out = assign_new_rows(trained.model_, levels, group, taus, mode=trained.decode)
    top = out.cluster[-1]
    assert np.unique(top).size == 1
    assert top[0] >= out.base_clusters[-1]  # a new cluster, numbered after the base's
    assert out.joined_rows == [0] * len(levels)


def test_excluded_rows_are_never_linked(trained, base_state):
    x, labels, levels, taus = base_state
    twins = np.arange(10)
    out = assign_new_rows(trained.model_, levels, x[twins], taus, mode=trained.decode, exclude=twins)
    graph = out.nodes[0]
    assert not np.isin(graph["nbr"], twins).any()


def test_unsupervised_base(faces_split):
    from agc_ray import HiLander

    x = unit_rows(faces_split[2][:1500])
    est = HiLander(unsupervised=True, levels=3).fit(x)
    labels, levels, taus = hierarchy_state(est, x)
    assert len(taus) == len(levels) and all(0 < t < 1 for t in taus)  # the adaptive thresholds it used
    assert [lv.linkage is not None for lv in levels] == [False, False, True]  # level 2 decoded by linkage
    twins = np.arange(0, 1500, 100)
    out = assign_new_rows(None, levels, x[twins], taus)
    for lvl in range(len(levels)):
        np.testing.assert_array_equal(out.cluster[lvl], labels[lvl][twins])


def test_unsupervised_linkage_level_decodes_new_nodes_by_their_links(faces_split):
    """At the run's linkage level, new nodes (here copies of base nodes, kept from linking to their
    originals) link by the run's rule: average link above its threshold, peaks above the guard,
    the best-linked denser candidate."""
    from agc_ray import HiLander
    from agc_ray.core.hierarchy import average_links
    from agc_ray.core.incremental import decode_new_nodes

    x = unit_rows(faces_split[2][:1500])
    _, levels, taus = hierarchy_state(HiLander(unsupervised=True, levels=3).fit(x), x)
    base = levels[2]
    copies = np.arange(0, base.n, 3)
    parent, nbr, sim, _, _ = decode_new_nodes(None, base, base.x_id[copies], base.x_sum[copies], base.size[copies],
                                              tau=taus[2], mode="sim", exclude=copies)
    sums, sizes = np.concatenate([base.x_sum, base.x_sum[copies]]), np.concatenate([base.size, base.size[copies]])
    link = average_links(sums[base.n:], sizes[base.n:], nbr, lambda ids: sums[ids], lambda ids: sizes[ids])
    linked = np.flatnonzero(parent >= 0)
    assert linked.size > 0 and np.isin(parent[linked], copies, invert=True).all()
    col = (nbr[linked] == parent[linked, None]).argmax(axis=1)
    assert (link[linked, col] > base.linkage).all() and (sim[linked, col] > taus[2]).all()
    by_peaks = decode_new_nodes(None, replace(base, linkage=None), base.x_id[copies], base.x_sum[copies],
                                base.size[copies], tau=taus[2], mode="sim", exclude=copies)[0]
    assert (by_peaks != parent).any()  # the linkage rule decided, not the peaks' similarity


def test_ivf_index_rebuilt_from_recorded_cells_searches_alike(faces_split):
    from agc_ray.distributed.state import ivf_from_lists, ivf_state

    x = unit_rows(faces_split[2])
    index = build_index(x, "ivf", seed=0, device="cpu")
    centroids, lists = ivf_state(index)
    rebuilt = ivf_from_lists(x, centroids, lists, index.nprobe)
    for a, b in zip(search(index, x, 10), search(rebuilt, x, 10)):
        np.testing.assert_array_equal(a, b)


# -- the job -------------------------------------------------------------------------------------------
NEW_SHARE = 0.05


def _job(input, output, model, **kw):
    from agc_ray.distributed.job import JobConfig, run_job

    return run_job(JobConfig(input=str(input), output=str(output), model=str(model), **kw))


def _assign(base, input, output, **kw):
    from agc_ray.distributed.assign import AssignConfig, run_assign

    return run_assign(AssignConfig(base=str(base), input=str(input), output=str(output), **kw))


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory, job_data, job_model):
    """Base B on 95 % of the rows (IVF kNN), A = B + the other 5 % plus copies of 5 base rows under new ids,
    and F, a full run on all rows of A."""
    x, y = job_data
    root = tmp_path_factory.mktemp("assign")
    ids = np.arange(len(x), dtype=np.int64) * 7 + 3
    new = np.random.default_rng(0).random(len(x)) < NEW_SHARE
    twins = np.flatnonzero(~new)[:5]
    x_new = np.concatenate([x[new], x[twins]])
    ids_new = np.concatenate([ids[new], 10**9 + ids[twins]])
    write_table(root / "base", x[~new], y[~new], ids=ids[~new], files=2)
    write_table(root / "new", x_new, ids=ids_new, files=1)
    write_table(root / "all", np.concatenate([x[~new], x_new]), ids=np.concatenate([ids[~new], ids_new]), files=2)
    out = {"B": _job(root / "base", root / "B", job_model, knn="ivf", num_shards=3)}
    out["B_digest"] = _digest(root / "B")
    out["A"] = _assign(root / "B", root / "new", root / "A")
    out["F"] = _job(root / "all", root / "F", job_model, knn="ivf", num_shards=3)
    return root, out, dict(ids=ids, new=new, twins=twins, ids_new=ids_new, x=x)


def _labels_of(output, ids) -> list[np.ndarray]:
    """Every level's cluster_id of the rows ``ids`` (any subset of the output's rows), in that order."""
    table = pds.dataset(str(output) + "/assignments", format="parquet", partitioning="hive").to_table()
    out = []
    for level in sorted(set(table.column("level").to_pylist())):
        part = table.filter(pds.field("level") == level)
        have = part.column("id").to_numpy()
        order = np.argsort(have)
        pos = order[np.searchsorted(have[order], ids)]
        assert np.array_equal(have[pos], ids), "ids missing from the output"
        out.append(part.column("cluster_id").to_numpy()[pos])
    return out


def _digest(directory) -> dict:
    import hashlib

    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _table(path, part, level):
    return pq.read_table(path / part / f"level={level}")


def test_output_holds_base_and_new_rows_with_base_labels_kept(runs):
    root, out, d = runs
    base_ids = d["ids"][~d["new"]]
    all_ids = np.concatenate([base_ids, d["ids_new"]])
    levels = len(out["B"]["levels"])
    assert len(out["A"]["levels"]) == levels
    base, inc = _labels_of(root / "B", base_ids), _labels_of(root / "A", all_ids)
    for lvl in range(levels):
        a = _table(root / "A", "assignments", lvl)
        assert a.num_rows == all_ids.size and np.unique(a.column("id").to_numpy()).size == all_ids.size
        np.testing.assert_array_equal(inc[lvl][:base_ids.size], base[lvl])  # base rows keep their clusters
        clusters = _table(root / "A", "clusters", lvl)
        cid = clusters.column("cluster_id").to_numpy()
        assert np.unique(cid).size == cid.size
        sizes = dict(zip(cid, clusters.column("size").to_numpy()))
        got, counts = np.unique(inc[lvl], return_counts=True)
        assert sizes == dict(zip(got, counts))  # every cluster's size counts its rows, new ones included
        fresh = cid[~np.isin(cid, _table(root / "B", "clusters", lvl).column("cluster_id").to_numpy())]
        counter = out["B"]["next_cluster_ids"][lvl]
        assert np.all(fresh >= counter) and fresh.size == out["A"]["incremental"]["new_clusters"][lvl]
        assert out["A"]["next_cluster_ids"][lvl] == counter + fresh.size
        if lvl + 1 < levels:  # parents of the new clusters are clusters of the level above
            parents = clusters.filter(pa.compute.is_in(clusters.column("cluster_id"), pa.array(fresh)))
            above = _table(root / "A", "clusters", lvl + 1).column("cluster_id").to_numpy()
            assert np.isin(parents.column("parent_cluster_id").to_numpy(), above).all()
    inc_manifest = json.loads((root / "A" / "manifest.json").read_text())
    assert inc_manifest["incremental"]["base"]["path"] == str(root / "B")
    assert inc_manifest["incremental"]["new_rows"] == d["ids_new"].size
    assert inc_manifest["cluster_counts"] == [_table(root / "A", "clusters", lvl).num_rows for lvl in range(levels)]
    assert (root / "A" / "report.html").stat().st_size > 1000


def test_copies_of_base_rows_join_their_clusters(runs):
    root, _, d = runs
    twin_ids = d["ids"][d["twins"]]
    base, inc = _labels_of(root / "B", twin_ids), _labels_of(root / "A", 10**9 + twin_ids)
    for lvl, (b, a) in enumerate(zip(base, inc)):
        np.testing.assert_array_equal(a, b, err_msg=f"level {lvl}")


def test_new_rows_agree_with_a_full_recluster(runs):
    """Partition of the new rows against a full run on base + new: pairwise F over the new rows."""
    from agc_ray.metrics import evaluate

    root, out, d = runs
    all_ids = np.concatenate([d["ids"][~d["new"]], d["ids_new"]])
    inc, full = _labels_of(root / "A", all_ids), _labels_of(root / "F", all_ids)
    new = np.arange(all_ids.size) >= (~d["new"]).sum()
    top = min(len(inc), len(full)) - 1
    assert evaluate(full[top][new], inc[top][new])["fp"] > 0.85


def test_unsupervised_base_job_assigns_as_the_core_does(ray_session, tmp_path, job_data):
    """An unsupervised base (adaptive thresholds, its selected level decoded by average linkage): the
    job's state carries the linkage threshold, and jobs/assign.py places new rows as the core's
    assign_new_rows does on the single process's state (same partitions at every level)."""
    from agc_ray import HiLander
    from agc_ray.distributed.job import JobConfig, run_job

    x, y = job_data
    ids = np.arange(len(x), dtype=np.int64) + 100
    # whole identities new: their nodes form new clusters up to the linkage level, where they decode
    new = np.isin(y, np.random.default_rng(1).choice(np.unique(y), np.unique(y).size // 8, replace=False))
    write_table(tmp_path / "base", x[~new], y[~new], ids=ids[~new], files=2)
    write_table(tmp_path / "new", x[new], ids=ids[new], files=1)
    base = run_job(JobConfig(input=str(tmp_path / "base"), output=str(tmp_path / "B"), unsupervised=True,
                             knn="exact", max_levels=4, num_shards=2))
    meta = json.loads((tmp_path / "B" / "state" / "state.json").read_text())
    assert meta["linkage"][base["selected_level"]] is not None
    _assign(tmp_path / "B", tmp_path / "new", tmp_path / "A")

    est = HiLander(unsupervised=True, knn="exact", levels=4).fit(x[~new])
    labels, levels, taus = hierarchy_state(est, unit_rows(x[~new]))
    assert [lv.linkage for lv in levels] == pytest.approx(meta["linkage"])
    core = assign_new_rows(None, levels, unit_rows(x[new]), taus)
    got = _labels_of(tmp_path / "A", np.concatenate([ids[~new], ids[new]]))
    assert len(got) == len(levels)
    for lvl, job_labels in enumerate(got):  # the same partition of base + new rows
        ours = np.concatenate([labels[lvl], core.cluster[lvl]])
        pairs = np.unique(np.stack([ours, job_labels]), axis=1)
        assert pairs.shape[1] == np.unique(ours).size == np.unique(job_labels).size, f"level {lvl}"


def test_state_ivf_index_reproduces_the_base_graph(runs):
    """The state's IVF cells and centroids rebuild the run's index: searching the base rows gives the
    run's level-0 graph (the run scans the cells as matrix products, the rebuilt faiss index query by
    query: the same rows are found, near-equal similarities may come in another order)."""
    from agc_ray.distributed import state

    root, out, _ = runs
    fs = pafs.LocalFileSystem()
    meta = state.read_meta(fs, str(root / "B"))
    level0 = state.read_level(fs, str(root / "B"), meta, 0)
    assert meta["level0_knn"] == "ivf" and len(meta["offsets"][0]) == 4  # 3 shards
    index = state.ivf_from_lists(level0["x_id"], level0["centroids"], level0["lists"], meta["nprobe"])
    assert meta["probe_margin"] > 0  # the run's rows probed the cells within a margin: so does the search
    nbr, sim = search(MarginIVF(index, meta["probe_margin"]), np.ascontiguousarray(level0["x_id"]), meta["k"])
    assert (nbr == level0["nbr"]).all(axis=1).mean() >= 0.999
    np.testing.assert_allclose(sim, level0["sim"], rtol=0, atol=2e-6)
    # the incremental output's state is the base's plus one shard of new rows per level that had any
    meta_a = state.read_meta(fs, str(root / "A"))
    assert meta_a["rows"] == meta["rows"] + out["A"]["incremental"]["new_rows"]
    assert len(meta_a["offsets"][0]) == len(meta["offsets"][0]) + 1


def test_incremental_output_is_a_base_and_a_previous(runs, job_model, tmp_path):
    root, out, d = runs
    more = _far_group(d["x"].shape[1], 6, seed=7)
    write_table(tmp_path / "more", more, ids=np.arange(6) + 5 * 10**9, files=1)
    chained = _assign(root / "A", tmp_path / "more", tmp_path / "A2")
    assert chained["incremental"]["base"]["path"] == str(root / "A")
    assert chained["incremental"]["rows_in_base_clusters"][0] == 0  # far from everything
    assert len(set(_labels_of(tmp_path / "A2", np.arange(6) + 5 * 10**9)[-1])) == 1
    assert chained["input"]["rows"] == out["A"]["input"]["rows"] + 6
    # the next full run keeps the incremental output's ids
    rerun = _job(root / "all", tmp_path / "R", job_model, knn="ivf", num_shards=3, previous=str(root / "A"))
    assert rerun["previous"]["path"] == str(root / "A")
    for lvl, item in enumerate(rerun["levels"]):
        assert item["churn"]["kept"] >= 0.9 * item["churn"]["clusters"], (lvl, item["churn"])


def test_replace_reassigns_rows_and_refuses_without_it(runs, tmp_path):
    root, _, d = runs
    base_ids = d["ids"][~d["new"]][:8]
    moved = _far_group(d["x"].shape[1], 8, seed=11)
    write_table(tmp_path / "moved", moved, ids=base_ids, files=1)
    with pytest.raises(InputError, match=r"8 id\(s\) are already in the base .*example id 3.*--replace"):
        _assign(root / "B", tmp_path / "moved", tmp_path / "no")
    assert not (tmp_path / "no").exists()
    m = _assign(root / "B", tmp_path / "moved", tmp_path / "yes", replace=True)
    assert m["incremental"]["replaced_rows"] == 8
    rows = _table(tmp_path / "yes", "assignments", 0)
    assert rows.num_rows == m["input"]["rows"] == (~d["new"]).sum()  # replaced, not added
    moved_labels = _labels_of(tmp_path / "yes", base_ids)
    assert len(set(moved_labels[-1])) == 1  # the moved rows are together, in a new cluster
    assert moved_labels[-1][0] >= json.loads((root / "B" / "manifest.json").read_text())["next_cluster_ids"][-1]


@pytest.mark.parametrize("case", ["dimension", "no manifest", "no state", "damaged state", "newer state format",
                                  "bad base path"])
def test_bad_input_writes_nothing(runs, tmp_path, case, job_data):
    root, _, d = runs
    base = root / "B"
    new = tmp_path / "new"
    x = d["x"][:5]
    if case == "dimension":
        write_table(new, x[:, :128], ids=np.arange(5) + 7 * 10**9, files=1)
        match = "128-dimensional embeddings, the base .* 256-dimensional"
    else:
        write_table(new, x, ids=np.arange(5) + 7 * 10**9, files=1)
    if case == "no manifest":
        base = tmp_path / "half"
        (base / "assignments").mkdir(parents=True)
        match = "--base .* is not a completed output \\(no manifest.json\\)"
    elif case == "no state":
        base = tmp_path / "stateless"
        _copy_without_state(root / "B", base)
        match = "has no assignment state"
    elif case == "damaged state":
        base = tmp_path / "damaged"
        import shutil

        shutil.copytree(root / "B", base)
        (base / "state" / "level=0" / "shard=00001" / "sim.npy").unlink()
        match = "cannot read its assignment state .*sim.npy"
    elif case == "newer state format":  # written by a later version: not read as if it were this one's
        base = tmp_path / "newer"
        _copy_with_state_format(root / "B", base, 99)
        match = "assignment state format 99 is not one this version reads \\(1, 2\\)"
    elif case == "bad base path":
        base = tmp_path / "nowhere"
        match = "--base .* is not a completed output"
    with pytest.raises(InputError, match=match):
        _assign(base, new, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left


def _copy_with_state_format(src, dst, fmt):
    import shutil

    shutil.copytree(src, dst)
    meta_path = dst / "state" / "state.json"
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text()) | {"format": fmt}))


def test_format_1_state_still_assigns(runs, tmp_path):
    """A base written before format 2 (no linkage level) is read as it was written: the same labels."""
    root, _, d = runs
    base = tmp_path / "format1"
    _copy_with_state_format(root / "B", base, 1)
    meta = json.loads((root / "B" / "state" / "state.json").read_text())
    assert meta["format"] == 2 and not any(meta.get("linkage") or [])  # supervised: nothing decoded by linkage
    _assign(base, root / "new", tmp_path / "out")
    ids = np.concatenate([d["ids"][~d["new"]], d["ids_new"]])
    got, want = _labels_of(tmp_path / "out", ids), _labels_of(root / "A", ids)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def _copy_without_state(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("state"))


def test_cli_exit_codes(runs, tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import assign as cli

    root, _, d = runs
    assert cli.main(["--base", str(root / "B"), "--input", str(root / "new"), "--output", str(root / "B")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "exists" in err[0]
    assert cli.main(["--base", str(root / "B"), "--input", str(root / "new"), "--output", str(tmp_path / "o")]) == 0
    assert "assigned" in capsys.readouterr().out
    assert read_levels(tmp_path / "o")[0].size == read_levels(root / "A")[0].size


def test_s3_base_input_and_output(runs, s3_endpoint, tmp_path):
    import boto3

    root, out, d = runs
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="agc-assign")
    fs, _ = pafs.FileSystem.from_uri("s3://agc-assign")
    local = pafs.LocalFileSystem()
    pafs.copy_files(str(root / "B"), "agc-assign/B", source_filesystem=local, destination_filesystem=fs)
    pafs.copy_files(str(root / "new"), "agc-assign/new", source_filesystem=local, destination_filesystem=fs)
    m = _assign("s3://agc-assign/B", "s3://agc-assign/new/", "s3://agc-assign/A")
    assert m["incremental"] == out["A"]["incremental"] | {"base": m["incremental"]["base"]}
    pafs.copy_files("agc-assign/A", str(tmp_path / "A"), source_filesystem=fs, destination_filesystem=local)
    for a, b in zip(read_levels(tmp_path / "A"), read_levels(root / "A")):
        np.testing.assert_array_equal(a, b)
    keys = [i.path for i in fs.get_file_info(pafs.FileSelector("agc-assign", recursive=True)) if i.type == pafs.FileType.File]
    assert any(k.startswith("agc-assign/A/state/level=0/shard=") for k in keys)
    assert not any(".staging" in k for k in keys)
    ds = pds.dataset(str(tmp_path / "A" / "assignments"), format="parquet", partitioning="hive")
    assert ds.count_rows() == sum(out["A"]["cluster_counts"][:0]) + len(out["A"]["levels"]) * m["input"]["rows"]


def test_base_output_is_untouched(runs):
    """Every assignment above read B (staging hard-links its files): B is byte for byte what its run wrote."""
    root, out, _ = runs
    assert _digest(root / "B") == out["B_digest"]
