"""The output's commit recovery (no Ray): local renames undone, S3 markers checked."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest
from _job_fixtures import s3_endpoint  # noqa: F401

from agc_ray.distributed import io
from agc_ray.distributed.errors import InputError


def test_local_commit_killed_between_renames_is_undone(tmp_path):
    # the kill left the previous output moved aside and nothing at the output path
    aside = tmp_path / ".out.old-0123456789ab"
    (aside / "assignments").mkdir(parents=True)
    (aside / "manifest.json").write_text('{"status": "succeeded"}')
    with pytest.raises(InputError, match="exists and is not empty"):
        io.Output(str(tmp_path / "out"), overwrite=False).check()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "succeeded"
    assert not aside.exists()


def test_local_leftover_after_a_finished_commit_is_removed(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text("{}")
    (tmp_path / ".out.old-0123456789ab").mkdir()
    io.Output(str(tmp_path / "out"), overwrite=True).check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.fixture()
def bucket(s3_endpoint):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="commit")
    fs, _ = pafs.FileSystem.from_uri("s3://commit")
    return fs


def _put(fs, path, text):
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def test_s3_marker_naming_another_prefix_is_refused(bucket):
    _put(bucket, "commit/other/.x.staging-1/manifest.json", "{}")
    _put(bucket, "commit/run/" + io.COMMIT_MARKER, json.dumps({"staging": "commit/other/.x.staging-1"}))
    with pytest.raises(InputError, match="not a staging prefix of this output"):
        io.Output("s3://commit/run", overwrite=True).check()
    assert bucket.get_file_info("commit/other/.x.staging-1/manifest.json").type == pafs.FileType.File


def test_s3_marker_without_staging_is_dropped(bucket):
    _put(bucket, "commit/run2/assignments/level=0/part-00000.parquet", "x")
    _put(bucket, "commit/run2/" + io.COMMIT_MARKER, json.dumps({"staging": "commit/.run2.staging-gone"}))
    with pytest.raises(InputError, match="exists and is not empty"):
        io.Output("s3://commit/run2", overwrite=False).check()
    assert bucket.get_file_info("commit/run2/" + io.COMMIT_MARKER).type == pafs.FileType.NotFound
