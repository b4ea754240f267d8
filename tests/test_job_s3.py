"""The job with input and output on s3:// (moto's server on 127.0.0.1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from _job_fixtures import job_data, job_model, job_table, ray_session, read_levels, s3_endpoint  # noqa: F401
from test_job_cli import _run_cli, cli

from agc_ray.distributed.errors import InputError
from agc_ray.distributed.job import JobConfig, run_job


@pytest.fixture(scope="module")
def bucket(ray_session, s3_endpoint, job_table):
    """Bucket 'agc' with the test table under table/ (3 files)."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="agc")
    fs, _ = pafs.FileSystem.from_uri("s3://agc")
    for f in sorted(Path(job_table).iterdir()):
        pafs.copy_files(str(f), f"agc/table/{f.name}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return fs


def _s3_levels(fs, prefix, tmp_path):
    local = tmp_path / "download"
    pafs.copy_files(prefix, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return read_levels(local), json.loads((local / "manifest.json").read_text())


def test_s3_in_and_out_equals_local(bucket, tmp_path, job_table, job_model):
    local = run_job(JobConfig(input=str(job_table), output=str(tmp_path / "local"), model=str(job_model),
                              knn="exact", num_shards=2, max_levels=2))
    manifest = run_job(JobConfig(input="s3://agc/table/*.parquet", output="s3://agc/out/run", model=str(job_model),
                                 knn="exact", num_shards=3, max_levels=2))
    assert manifest["cluster_counts"] == local["cluster_counts"]
    got, saved = _s3_levels(bucket, "agc/out/run", tmp_path)
    for a, b in zip(got, read_levels(tmp_path / "local")):
        np.testing.assert_array_equal(a, b)
    assert saved["status"] == "succeeded"
    # an existing output is refused without overwrite, replaced with it; no staging prefix is left
    with pytest.raises(InputError, match="exists and is not empty"):
        run_job(JobConfig(input="s3://agc/table/", output="s3://agc/out/run", unsupervised=True))
    run_job(JobConfig(input="s3://agc/table/", output="s3://agc/out/run", unsupervised=True, max_levels=1,
                      overwrite=True))
    keys = [i.path for i in bucket.get_file_info(pafs.FileSelector("agc/out", recursive=True))
            if i.type == pafs.FileType.File]
    assert all(k.startswith("agc/out/run/") for k in keys), keys
    assert not any("level=1" in k for k in keys)  # the old output's second level is gone
    _, saved = _s3_levels(bucket, "agc/out/run", tmp_path / "again")
    assert saved["parameters"]["unsupervised"] is True


@pytest.mark.parametrize(
    "uri, words",
    [("s3://no-such-bucket/table/", "not found"), ("s3://agc/missing/", "not found")],
)
def test_unreadable_s3_input(bucket, tmp_path, capsys, uri, words):
    out = tmp_path / "out"
    rc, lines = _run_cli(["--input", uri, "--output", out, "--unsupervised"], capsys)
    assert rc == 2 and len(lines) == 1 and words in lines[0], lines
    assert not out.exists()


def test_dry_run_on_s3_reads_and_writes_nothing(bucket, job_model, capsys):
    import json

    def keys():
        return sorted(i.path for i in bucket.get_file_info(pafs.FileSelector("agc", recursive=True))
                      if i.type == pafs.FileType.File)

    before = keys()
    rc = cli.main(["--input", "s3://agc/table/", "--output", "s3://agc/out/planned", "--model", str(job_model),
                   "--dry-run"])
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and plan["rows"] == 2500 and plan["files"] == 3 and plan["rows_checked"] == 2500
    assert keys() == before
    rc, lines = _run_cli(["--input", "s3://agc/table/", "--output", "s3://no-such-bucket/out", "--unsupervised",
                          "--dry-run"], capsys)
    assert rc == 2 and "does not exist" in lines[0], lines


def test_missing_output_bucket(bucket, capsys):
    rc, lines = _run_cli(["--input", "s3://agc/table/", "--output", "s3://no-such-bucket/out", "--unsupervised"], capsys)
    assert rc == 2 and "does not exist" in lines[0], lines


def test_interrupted_s3_commit_is_finished_by_the_next_run(bucket, tmp_path, monkeypatch):
    """A crash while the files are copied leaves no manifest; the next run completes that commit first."""
    from agc_ray.distributed import output

    out = "s3://agc/out/crash"
    run_job(JobConfig(input="s3://agc/table/", output=out, unsupervised=True, max_levels=2))
    real_copy = output._copy_over

    def crash_midway(fs, staging, path, renew=None):
        fs.delete_file(path + "/manifest.json")
        staged = [i.path for i in fs.get_file_info(pafs.FileSelector(staging, recursive=True)) if i.type == pafs.FileType.File]
        fs.copy_file(staged[0], path + "/" + staged[0][len(staging) + 1:])
        raise RuntimeError("simulated crash during the copy")

    monkeypatch.setattr(output, "_copy_over", crash_midway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_job(JobConfig(input="s3://agc/table/", output=out, unsupervised=True, max_levels=1, tau=0.5, overwrite=True))
    assert bucket.get_file_info("agc/out/crash/manifest.json").type == pafs.FileType.NotFound  # not a completed output
    assert bucket.get_file_info("agc/out/crash/" + output.COMMIT_MARKER).type == pafs.FileType.File
    monkeypatch.setattr(output, "_copy_over", real_copy)

    with pytest.raises(InputError, match="exists and is not empty"):  # the check recovers first
        run_job(JobConfig(input="s3://agc/table/", output=out, unsupervised=True))
    levels, manifest = _s3_levels(bucket, "agc/out/crash", tmp_path)
    assert manifest["status"] == "succeeded" and manifest["parameters"]["tau"] == [0.5]  # the interrupted run's result
    assert len(levels) == 1
    keys = [i.path for i in bucket.get_file_info(pafs.FileSelector("agc/out", recursive=True)) if i.type == pafs.FileType.File]
    assert not any("staging" in k or output.COMMIT_MARKER in k or "level=1" in k for k in keys if k.startswith("agc/out/")), keys
