"""Commit-time conflict detection for outputs and model directories (optimistic concurrency).

A run records the *version* of its output when it starts (:func:`observe`: absent, or the digest of
the ``manifest.json`` it found, with the run id and start time written in it) and commits only if the
output still has that version; otherwise it raises :class:`OutputConflict` (exit code 2) naming the
run that committed meanwhile, and the winner stays untouched. ``--overwrite`` therefore means "replace
what I saw", never "replace whatever is there". Check and replace are one atomic step:

- **local filesystems**: an exclusive ``flock`` on the output's parent directory is held across the
  check and the renames (:func:`local_lock`). The kernel releases it when a process dies, so a kill
  never leaves a lock behind. It orders the processes of one machine; NFS and other shared
  filesystems across machines are not covered.
- **S3**: at most one run commits at a time because the commit marker is created with a conditional
  write (``If-None-Match: *``, :func:`create_if_absent`); the version check follows under it.

Runs also keep their own staging directory locked (locally) while they live, so that the next run can
tell a dead run's staging (removed) from a live one's (kept): :func:`remove_dead_staging`.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow.fs as pafs

from agc_ray.distributed.errors import InputError

log = logging.getLogger("agc_ray")


class OutputConflict(InputError):
    """The output changed between this run's start and its commit; nothing of this run was committed."""


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Version:
    """What a run saw at a location: ``digest`` of its manifest (None: no manifest) and whose it was."""

    digest: str | None
    run_id: str | None = None
    started: str | None = None

    def describe(self) -> str:
        if self.digest is None:
            return "no committed output"
        if self.run_id is None:
            return "an output without a run id (written before run ids were recorded)"
        return f"run {self.run_id} (started {self.started})"


def version_of(data: bytes | None) -> Version:
    """The :class:`Version` of a manifest's bytes (None: absent)."""
    if data is None:
        return Version(None)
    run = {}
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        doc = json.loads(data)
        run = doc.get("run") or (doc.get("training") or {}).get("run") or {}
    return Version(hashlib.sha256(data).hexdigest(), run.get("id"), run.get("started"))


def observe(fs: pafs.FileSystem, path: str, name: str = "manifest.json") -> Version:
    """The current :class:`Version` of the output at ``path`` (its ``name`` file's content)."""
    try:
        with fs.open_input_stream(f"{path}/{name}") as f:
            return version_of(f.read())
    except FileNotFoundError:
        return Version(None)


def require_unchanged(seen: Version, now: Version, what: str) -> None:
    """Raise :class:`OutputConflict` unless ``now`` is the version this run saw when it started."""
    if now.digest != seen.digest:
        raise OutputConflict(
            f"{what} changed while this run was working: {now.describe()} committed it after this run started "
            f"(this run saw {seen.describe()}); this run's result was not committed and the other run's is kept "
            f"(rerun to work from the new output)"
        )


# -- local ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def local_lock(path: str):
    """Hold an exclusive lock on ``path``'s parent directory (blocks until other holders finish)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class StagingLock:
    """A run's claim on its local staging directory: held from creation until the run ends."""

    def __init__(self, staging: str):
        os.makedirs(staging, exist_ok=True)
        self.fd = os.open(staging, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def remove_dead_staging(pattern: str) -> list[str]:
    """Remove the staging directories matching ``pattern`` whose run has died (no process holds them)."""
    removed = []
    for staging in glob.glob(pattern):
        try:
            fd = os.open(staging, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live run's
        else:
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
        finally:
            os.close(fd)
    return removed


def replace_local_dir(staging: str, path: str, run_id: str) -> None:
    """Replace ``path`` by ``staging`` with two renames; the caller holds :func:`local_lock`.

    A process killed between the renames leaves the previous output at ``.NAME.old-RUN``;
    :func:`restore_local` puts it back.
    """
    parent, name = os.path.split(path)
    old = None
    if os.path.lexists(path):
        old = os.path.join(parent, f".{name}.old-{run_id}")
        os.replace(path, old)
    try:
        os.replace(staging, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)  # put the previous output back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def restore_local(path: str, what: str) -> None:
    """Undo a kill between the two renames of :func:`replace_local_dir` (caller holds the lock)."""
    parent, name = os.path.split(path)
    olds = sorted(glob.glob(os.path.join(parent, f".{name}.old-*")))
    if not olds:
        return
    if not os.path.lexists(path) and len(olds) == 1:
        log.warning("%s %s: restoring the previous version that an interrupted commit moved aside", what, path)
        os.replace(olds[0], path)
    elif os.path.lexists(path):  # the commit finished; only the clean-up was cut short
        for old in olds:
            shutil.rmtree(old, ignore_errors=True)


# -- S3 -------------------------------------------------------------------------------------------
def _s3_client():
    import botocore.session

    # botocore reads the same AWS_* variables (endpoint, region, credentials) as pyarrow's S3 filesystem
    return botocore.session.get_session().create_client("s3")


def create_if_absent(path: str, data: bytes) -> bool:
    """Create the S3 object ``bucket/key`` unless it exists (one conditional PUT). False: it existed."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = path.split("/", 1)
    try:
        _s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as e:
        # 412: it exists; 409: another conditional write on the same key is in flight
        if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise OSError(f"cannot write s3://{path}: {e}") from e
    except BotoCoreError as e:
        raise OSError(f"cannot write s3://{path}: {e}") from e
    return True
