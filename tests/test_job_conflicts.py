"""Overlapping runs on one output through the job's command line (real Ray; local and S3 outputs).

The second run starts after the first one checked its output and commits before the first one does
(the interleaving that a cron firing twice produces, made deterministic by running it from inside the
first run's commit): exactly one exits 0, the other exits 2 naming the winner, the output is the
winner's byte for byte, and no staging is left behind.
"""

from __future__ import annotations

import json
import posixpath

import pyarrow.fs as pafs
import pytest
from _job_fixtures import job_data, job_model, job_table, ray_session, s3_endpoint  # noqa: F401
from test_job_cli import _run_cli

from agc_ray.distributed.output import Output
from jobs import cluster as cli


@pytest.fixture(scope="module")
def race_bucket(ray_session, s3_endpoint):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="race")
    fs, _ = pafs.FileSystem.from_uri("s3://race")
    return fs


def _files(fs, path: str) -> dict:
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[posixpath.relpath(info.path, path)] = f.read()
    return out


def _overlapping_runs(argv, fs, path, monkeypatch, capsys):
    original = Output.commit
    other = {}

    def commit_after_the_other_run(self, manifest, require=()):
        if not other:
            other["started"] = True
            other["rc"] = cli.main(argv)  # the overlapping run: it saw the same output and commits first
            other["files"] = _files(fs, path)
        return original(self, manifest, require)

    monkeypatch.setattr(Output, "commit", commit_after_the_other_run)
    rc, errors = _run_cli(argv, capsys)
    return rc, errors, other


@pytest.mark.parametrize("where, existing", [("local", False), ("s3", True)])  # the others: test_output_commit
def test_overlapping_runs_one_wins(where, existing, tmp_path, job_table, job_model, race_bucket, monkeypatch, capsys):
    if where == "local":
        fs, path = pafs.LocalFileSystem(), str(tmp_path / "out")
        uri = path
    else:
        fs, path = race_bucket, f"race/{tmp_path.name}"
        uri = f"s3://{path}"
    argv = ["--input", str(job_table), "--output", uri, "--model", str(job_model), "--knn", "exact", "--max-levels", "1",
            "--num-shards", "2"]
    if existing:  # both runs replace an existing output in place, chained to it: --previous = --output
        assert _run_cli(argv, capsys)[0] == 0
        argv += ["--overwrite", "--previous", uri]
    rc, errors, other = _overlapping_runs(argv, fs, path, monkeypatch, capsys)
    winner = json.loads(other["files"]["manifest.json"])
    assert (other["rc"], rc) == (0, 2)
    assert len(errors) == 1 and "changed while this run was working" in errors[0], errors
    assert f"run {winner['run']['id']} (started {winner['run']['started']})" in errors[0]
    assert _files(fs, path) == other["files"]  # exactly the winner's output
    parent, name = posixpath.split(path)
    left = [i.path for i in fs.get_file_info(pafs.FileSelector(parent, recursive=True)) if f".{name}." in i.path]
    assert left == []  # the loser's staging is gone
