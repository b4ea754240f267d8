"""``--previous``: stable cluster ids across runs of the job (real Ray, real Parquet)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from _job_fixtures import job_data, job_model, ray_session, read_levels, s3_endpoint  # noqa: F401

from agc_ray.distributed.demo import write_table
from agc_ray.distributed.errors import InputError
from agc_ray.distributed.job import JobConfig, run_job

HELD_OUT = 0.05


def _run(input, output, model, **kw):
    return run_job(JobConfig(input=str(input), output=str(output), model=str(model), knn="exact", **kw))


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory, job_data, job_model):
    """Run A on 95 % of the rows; B on the same rows with --previous A; C on all rows with --previous A."""
    x, y = job_data
    root = tmp_path_factory.mktemp("prev")
    ids = np.arange(len(x), dtype=np.int64) * 7 + 3  # ids are not row numbers
    old_rows = np.random.default_rng(0).random(len(x)) >= HELD_OUT
    write_table(root / "t95", x[old_rows], y[old_rows], ids=ids[old_rows], files=2)
    write_table(root / "t100", x, y, ids=ids, files=3)
    out = {"A": _run(root / "t95", root / "A", job_model)}
    out["B"] = _run(root / "t95", root / "B", job_model, previous=str(root / "A"), num_shards=2)
    out["C"] = _run(root / "t100", root / "C", job_model, previous=str(root / "A"))
    return root, out, ids, old_rows


def _clusters(path, level):
    return pq.read_table(path / "clusters" / f"level={level}")


def test_rerun_on_same_input_has_zero_churn(runs):
    root, out, _, _ = runs
    a, b = read_levels(root / "A"), read_levels(root / "B")
    assert len(a) == len(b) >= 2
    for level, (la, lb) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(la, lb, err_msg=f"level {level}")
        churn = out["B"]["levels"][level]["churn"]
        assert churn["kept"] == churn["clusters"] == churn["previous_clusters"], churn
        assert churn["changed_row_share"] == 0.0
        assert _clusters(root / "A", level).equals(_clusters(root / "B", level))
    assert out["B"]["previous"]["path"] == str(root / "A")
    assert json.loads((root / "B" / "manifest.json").read_text())["levels"][0]["churn"]["kept"] > 0


def test_five_percent_new_rows_keep_almost_every_id(runs):
    root, out, ids, old_rows = runs
    a = read_levels(root / "A", ids[old_rows])
    c = read_levels(root / "C", ids)
    for level in range(min(len(a), len(c))):
        churn = out["C"]["levels"][level]["churn"]
        assert churn["previous_clusters"] == out["A"]["cluster_counts"][level]
        assert churn["kept"] >= 0.9 * churn["previous_clusters"], (level, churn)
        assert churn["changed_row_share"] < 0.1, (level, churn)
        same = np.mean(c[level][old_rows] == a[level])
        assert same == pytest.approx(1 - churn["changed_row_share"])
        # fresh ids start past every id issued by run A; no id is used twice at a level
        table = _clusters(root / "C", level)
        cid = table.column("cluster_id").to_numpy()
        assert np.unique(cid).size == cid.size
        previous_ids = set(_clusters(root / "A", level).column("cluster_id").to_pylist())
        fresh = [i for i in cid if i not in previous_ids]
        assert len(fresh) == churn["clusters"] - churn["kept"]
        assert min(fresh, default=10**9) >= out["A"]["levels"][level]["next_cluster_id"]
        assert out["C"]["levels"][level]["next_cluster_id"] == out["A"]["levels"][level]["next_cluster_id"] + len(fresh)
        assert out["C"]["next_cluster_ids"][level] == out["C"]["levels"][level]["next_cluster_id"]
        assert set(np.unique(c[level])) == set(cid)


def test_parents_use_the_next_levels_stable_ids(runs):
    root, out, ids, _ = runs
    levels = read_levels(root / "C", ids)
    for level in range(len(levels) - 1):
        table = _clusters(root / "C", level)
        parent = dict(zip(table.column("cluster_id").to_pylist(), table.column("parent_cluster_id").to_pylist()))
        np.testing.assert_array_equal([parent[c] for c in levels[level]], levels[level + 1])


def test_previous_in_place_with_overwrite(ray_session, runs, job_model):
    root, out, _, _ = runs
    before = read_levels(root / "B")
    manifest = _run(root / "t95", root / "B", job_model, previous=str(root / "B"), overwrite=True)
    assert all(lv["churn"]["changed_row_share"] == 0.0 for lv in manifest["levels"])
    for x, y in zip(before, read_levels(root / "B")):
        np.testing.assert_array_equal(x, y)


def test_bad_previous(ray_session, runs, job_model, job_data, tmp_path):
    root, _, _, _ = runs
    with pytest.raises(InputError, match="no manifest.json"):
        _run(root / "t95", tmp_path / "o1", job_model, previous=str(tmp_path / "missing"))
    x, y = job_data
    write_table(tmp_path / "str", x[:300], ids=np.array([f"face-{i}" for i in range(300)]), files=1)
    with pytest.raises(InputError, match="int64 ids, this input has string ids"):
        _run(tmp_path / "str", tmp_path / "o2", job_model, previous=str(root / "A"))
    import shutil

    shutil.copytree(root / "A", tmp_path / "broken")
    shutil.rmtree(tmp_path / "broken" / "clusters" / "level=1")
    with pytest.raises(InputError, match="lacks clusters/level=1"):
        _run(root / "t95", tmp_path / "o3", job_model, previous=str(tmp_path / "broken"))
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_counters_survive_a_run_with_fewer_levels(ray_session, runs, job_model, tmp_path):
    """A level missing from one run keeps its counter: the next run's fresh ids there are not reused."""
    root, out, _, _ = runs
    a_counters = out["A"]["next_cluster_ids"]
    assert len(a_counters) >= 2
    one = _run(root / "t95", tmp_path / "one", job_model, previous=str(root / "A"), max_levels=1)
    assert len(one["levels"]) == 1
    assert one["next_cluster_ids"][1:] == a_counters[1:]  # carried for the levels this run did not reach
    again = _run(root / "t95", tmp_path / "again", job_model, previous=str(tmp_path / "one"))
    churn = again["levels"][1]["churn"]
    assert churn["previous_clusters"] == 0 and churn["new"] == churn["clusters"] > 0  # every cluster is new
    cid = _clusters(tmp_path / "again", 1).column("cluster_id").to_numpy()
    assert cid.min() >= a_counters[1]  # not reusing run A's level-1 ids for other clusters
    assert again["next_cluster_ids"][1] == a_counters[1] + cid.size


def test_previous_on_s3(ray_session, s3_endpoint, runs, job_model, tmp_path):
    import boto3
    import pyarrow.fs as pafs

    root, out, _, _ = runs
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="prev")
    fs, _ = pafs.FileSystem.from_uri("s3://prev")
    pafs.copy_files(str(root / "A"), "prev/A", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    manifest = _run(root / "t95", "s3://prev/B", job_model, previous="s3://prev/A")
    assert [lv["churn"]["changed_row_share"] for lv in manifest["levels"]] == [0.0] * len(manifest["levels"])
    assert [lv["churn"]["kept"] for lv in manifest["levels"]] == out["A"]["cluster_counts"]
