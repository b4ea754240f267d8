"""The output's commit (no Ray): recovery (local renames undone, S3 markers checked) and conflict detection.

Two runs on one output are two :class:`output.Output` objects that both ``check()`` before either commits:
the interleaving that overlapping scheduled runs produce, made deterministic.
"""

from __future__ import annotations

import json
import os

import pyarrow.fs as pafs
import pytest
from _job_fixtures import s3_endpoint  # noqa: F401

from agc_ray.distributed import commit
from agc_ray.distributed.errors import InputError
from agc_ray.distributed.output import COMMIT_MARKER, Output


def test_local_commit_killed_between_renames_is_undone(tmp_path):
    # the kill left the previous output moved aside and nothing at the output path
    aside = tmp_path / ".out.old-0123456789ab"
    (aside / "assignments").mkdir(parents=True)
    (aside / "manifest.json").write_text('{"status": "succeeded"}')
    with pytest.raises(InputError, match="exists and is not empty"):
        Output(str(tmp_path / "out"), overwrite=False).check()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "succeeded"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing aside, no staging of the refused run


def test_local_leftover_after_a_finished_commit_is_removed(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text("{}")
    (tmp_path / ".out.old-0123456789ab").mkdir()
    run = Output(str(tmp_path / "out"), overwrite=True)
    run.check()
    run.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.fixture()
def bucket(s3_endpoint):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="commit")
    fs, _ = pafs.FileSystem.from_uri("s3://commit")
    return fs


def _put(fs, path, text):
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def test_s3_marker_naming_another_prefix_is_refused(bucket):
    _put(bucket, "commit/other/.x.staging-1/manifest.json", "{}")
    _put(bucket, "commit/run/" + COMMIT_MARKER, json.dumps({"staging": "commit/other/.x.staging-1"}))
    with pytest.raises(InputError, match="not a staging prefix of this output"):
        Output("s3://commit/run", overwrite=True).check()
    assert bucket.get_file_info("commit/other/.x.staging-1/manifest.json").type == pafs.FileType.File


def test_s3_marker_without_staging_is_dropped(bucket):
    _put(bucket, "commit/run2/assignments/level=0/part-00000.parquet", "x")
    _put(bucket, "commit/run2/" + COMMIT_MARKER, json.dumps({"staging": "commit/.run2.staging-gone"}))
    with pytest.raises(InputError, match="exists and is not empty"):
        Output("s3://commit/run2", overwrite=False).check()
    assert bucket.get_file_info("commit/run2/" + COMMIT_MARKER).type == pafs.FileType.NotFound


# -- conflicts ------------------------------------------------------------------------------------
def _stage(run: Output, text: str) -> None:
    _put(run.fs, run.staged("assignments", "level=0", "part-00000.parquet"), text)


def _commit(run: Output, text: str, require=()) -> None:
    _stage(run, text)
    run.commit({"status": "succeeded", "run": run.run_info(), "text": text}, require)


def _files(fs, path) -> dict:
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    out = {}
    for i in infos:
        if i.type == pafs.FileType.File:
            with fs.open_input_stream(i.path) as f:
                out[i.path[len(path):]] = f.read()
    return out


def _overlap(uri: str, overwrite: bool):
    """Two runs that both saw the output as it was; the first commits. Returns (winner, loser, error)."""
    first, second = Output(uri, overwrite), Output(uri, overwrite)
    first.check()
    second.check()
    _commit(first, "first")
    with pytest.raises(commit.OutputConflict) as err:
        try:
            _commit(second, "second")
        except BaseException:
            second.abort()
            raise
    return first, second, str(err.value)


def _conflict_cases(root: str, fs, path_of):
    """Fresh output, then both runs with --overwrite over an existing output: exactly the winner's stays."""
    for case, overwrite in (("fresh", False), ("existing", True)):
        uri = f"{root}/{case}"
        if overwrite:
            old = Output(uri, False)
            old.check()
            _commit(old, "old")
        winner, loser, message = _overlap(uri, overwrite)
        assert winner.run_id in message and winner.started in message and "not committed" in message
        files = _files(fs, path_of(uri))
        assert sorted(files) == ["/assignments/level=0/part-00000.parquet", "/manifest.json"]
        assert files["/assignments/level=0/part-00000.parquet"] == b"first"
        manifest = json.loads(files["/manifest.json"])
        assert manifest["run"]["id"] == winner.run_id and manifest["text"] == "first"
        assert fs.get_file_info(loser.staging).type == pafs.FileType.NotFound


def test_local_overlapping_runs_exactly_one_commits(tmp_path):
    _conflict_cases(str(tmp_path), pafs.LocalFileSystem(), lambda uri: uri)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "fresh"]  # no staging, no old copies


def test_s3_overlapping_runs_exactly_one_commits(bucket):
    _conflict_cases("s3://commit/conflict", bucket, lambda uri: uri[len("s3://"):])
    left = [i.path for i in bucket.get_file_info(pafs.FileSelector("commit/conflict", recursive=True))]
    assert not [p for p in left if ".staging-" in p or COMMIT_MARKER in p]


def test_s3_commit_in_flight_is_a_conflict(bucket):
    run = Output("s3://commit/inflight", overwrite=True)
    run.check()
    # another run holds the commit marker (it is copying its files now)
    _put(bucket, "commit/inflight/" + COMMIT_MARKER,
         json.dumps({"staging": "commit/.inflight.staging-other", "run_id": "other", "started": "2026-01-01T00:00:00Z"}))
    with pytest.raises(commit.OutputConflict, match="being committed by run other"):
        _commit(run, "mine")
    run.abort()
    assert bucket.get_file_info("commit/inflight/manifest.json").type == pafs.FileType.NotFound


def test_previous_changed_meanwhile_is_a_conflict(tmp_path):
    prev = Output(str(tmp_path / "prev"), False)
    prev.check()
    _commit(prev, "v1")
    seen = commit.observe(pafs.LocalFileSystem(), str(tmp_path / "prev"))
    assert seen.run_id == prev.run_id
    run = Output(str(tmp_path / "out"), False)
    run.check()
    newer = Output(str(tmp_path / "prev"), True)  # the previous output is replaced meanwhile
    newer.check()
    _commit(newer, "v2")
    require = ((pafs.LocalFileSystem(), str(tmp_path / "prev"), seen, "--previous prev"),)
    with pytest.raises(commit.OutputConflict, match=f"--previous prev changed.*run {newer.run_id}"):
        _commit(run, "mine", require)
    run.abort()
    assert not (tmp_path / "out").exists()


def test_unchanged_output_commits_with_overwrite(tmp_path):
    first = Output(str(tmp_path / "out"), False)
    first.check()
    _commit(first, "first")
    second = Output(str(tmp_path / "out"), True)
    second.check()
    _commit(second, "second")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["run"]["id"] == second.run_id


def test_dead_runs_staging_is_removed_and_live_runs_kept(tmp_path):
    dead = tmp_path / ".out.staging-deadbeef0000"
    (dead / "assignments").mkdir(parents=True)  # a killed run's: nobody holds it
    live = Output(str(tmp_path / "out"), False)
    live.check()  # holds its staging while it runs
    other = Output(str(tmp_path / "out"), False)
    other.check()
    assert not dead.exists()
    assert os.path.isdir(live.staging) and os.path.isdir(other.staging)
    live.abort()
    other.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_s3_commit_removes_superseded_staging(bucket):
    killed = Output("s3://commit/sched/out", overwrite=True)
    killed.check()
    _stage(killed, "killed")  # a run killed before its commit: nothing can tell it is dead
    run = Output("s3://commit/sched/out", overwrite=True)
    run.check()
    _commit(run, "next")
    left = [i.path for i in bucket.get_file_info(pafs.FileSelector("commit/sched", recursive=True))]
    assert not [p for p in left if ".staging-" in p]
    assert json.loads(_files(bucket, "commit/sched/out")["/manifest.json"])["run"]["id"] == run.run_id


def test_s3_live_commit_is_waited_for_and_a_dead_one_finished(bucket, monkeypatch):
    """A marker whose lease runs is a live commit: the next run waits; once it has expired, it finishes it."""
    import time

    _put(bucket, "commit/lease/.out.staging-dead00000000/manifest.json", '{"run": {"id": "dead"}}')
    _put(bucket, "commit/lease/.out.staging-dead00000000/assignments/level=0/part-00000.parquet", "dead's")
    _put(bucket, "commit/lease/out/" + COMMIT_MARKER, json.dumps(
        {"staging": "commit/lease/.out.staging-dead00000000", "run_id": "dead", "lease_until": time.time() + 1.0}))
    run = Output("s3://commit/lease/out", overwrite=True)
    run.check()  # waits out the lease, takes the marker over, copies the dead run's staging
    assert run.seen.run_id == "dead"
    assert _files(bucket, "commit/lease/out") == {"/manifest.json": b'{"run": {"id": "dead"}}',
                                                  "/assignments/level=0/part-00000.parquet": b"dead's"}
    assert bucket.get_file_info("commit/lease/.out.staging-dead00000000").type == pafs.FileType.NotFound


def test_s3_marker_taken_over_stops_the_renewing_commit(bucket, monkeypatch):
    import time

    monkeypatch.setenv("AGC_RAY_COMMIT_LEASE_S", "0.3")
    marker = commit.S3Marker.create("commit/renew/" + COMMIT_MARKER, {"run_id": "slow"})
    assert commit.S3Marker.create("commit/renew/" + COMMIT_MARKER, {"run_id": "other"}) is None  # held
    before = json.loads(commit.s3_get(marker.path)[0])["lease_until"]
    time.sleep(0.15)
    marker.renew()  # still its own: the lease is extended
    assert json.loads(commit.s3_get(marker.path)[0])["lease_until"] > before
    got = commit.s3_get(marker.path)
    assert commit.S3Marker.take_over(marker.path, json.loads(got[0]), got[1], run_id="other") is not None
    time.sleep(0.15)
    with pytest.raises(commit.OutputConflict, match="taken over by another run"):
        marker.renew()
