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
  write (``If-None-Match: *``, :meth:`S3Marker.create`); the version check follows under it.

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
import posixpath
import shutil
import time
from collections.abc import Callable
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
            return "no committed output (no manifest.json)"
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


@dataclass(frozen=True)
class ManifestWording:
    """How :func:`read_manifest` words its refusals for one kind of caller.

    Each field is a ``str.format`` template over ``uri`` (the output as the user named it), ``flag``
    (the option that named it), ``shown`` (``uri``'s manifest.json), ``status`` (the manifest's),
    ``error`` (the first line of a read error) and ``hint`` (see :func:`read_manifest`).
    """

    missing: str
    unreadable: str
    not_object: str
    not_completed: str
    needs_levels: bool = False  # also refuse a manifest without a non-empty ``levels`` list


#: An output to report on (``jobs/report.py``, :func:`agc_ray.distributed.report.build_report`).
REPORT_WORDING = ManifestWording(
    missing="{uri} has no manifest.json: not a completed clustering output",
    unreadable="cannot read {shown}: {error}",
    not_object="{shown} is not a JSON object",
    not_completed="{uri} is not a completed output (manifest status {status!r}, expected 'succeeded')",
)

#: An earlier output that a run builds on (``--previous``, ``--base``): its levels are read too.
PREVIOUS_WORDING = ManifestWording(
    missing="{flag} {uri} is not a completed output (no manifest.json){hint}",
    unreadable="cannot read {flag} {uri}/manifest.json: {error}",
    not_object="{flag} {uri} is not a completed output (status None)",
    not_completed="{flag} {uri} is not a completed output (status {status!r})",
    needs_levels=True,
)


def read_manifest(
    fs: pafs.FileSystem,
    path: str,
    uri: str,
    wording: ManifestWording = REPORT_WORDING,
    *,
    flag: str = "",
    missing_hint: Callable[[], str] | None = None,
) -> tuple[dict, Version]:
    """The manifest of the completed output at ``path`` on ``fs``, and its :class:`Version`.

    Raises :class:`InputError`, worded by ``wording``, when the manifest is absent, unreadable (not
    UTF-8 or not JSON too), not a JSON object, or its status is not ``"succeeded"`` (or, with
    ``wording.needs_levels``, it has no levels).

    Args:
        fs, path: the output's filesystem and path on it.
        uri: the output as the user named it (what the messages show).
        wording: the caller's messages (:data:`REPORT_WORDING`, :data:`PREVIOUS_WORDING`).
        flag: the option that named the output (``--previous``), for the messages.
        missing_hint: called only when the manifest is absent; its text ends that message.
    """
    words = {"uri": uri, "flag": flag, "shown": uri.rstrip("/") + "/manifest.json", "hint": ""}
    try:
        with fs.open_input_stream(posixpath.join(path, "manifest.json")) as f:
            data = f.read()
        manifest = json.loads(data)
    except FileNotFoundError:
        words["hint"] = missing_hint() if missing_hint is not None else ""
        raise InputError(wording.missing.format(**words)) from None
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        lines = str(e).strip().splitlines()
        raise InputError(wording.unreadable.format(**words, error=lines[0] if lines else type(e).__name__)) from e
    if not isinstance(manifest, dict):
        raise InputError(wording.not_object.format(**words))
    levels = manifest.get("levels")
    if manifest.get("status") != "succeeded" or (wording.needs_levels and not (isinstance(levels, list) and levels)):
        raise InputError(wording.not_completed.format(**words, status=manifest.get("status")))
    return manifest, version_of(data)


def require_unchanged(seen: Version, now: Version, what: str) -> None:
    """Raise :class:`OutputConflict` unless ``now`` is the version this run saw when it started."""
    if now.digest == seen.digest:
        return
    if now.digest is None:
        raise OutputConflict(
            f"{what} changed while this run was working: its manifest.json is gone (another run is committing "
            f"it, or its commit was interrupted); this run's result was not committed (rerun to work from it)"
        )
    raise OutputConflict(
        f"{what} changed while this run was working: {now.describe()} committed it after this run started "
        f"(this run saw {seen.describe()}); this run's result was not committed and the other run's is kept "
        f"(rerun to work from the new output)"
    )


# -- local ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def local_lock(path: str):
    """Hold an exclusive lock on ``path``'s parent directory (blocks until other holders finish).

    ``flock`` on the directory itself, so nothing is left behind; where the filesystem refuses it
    (NFS emulates flock with POSIX locks, which need a writable descriptor), a POSIX lock on a
    ``.NAME.lock`` file beside the output instead. The parent must exist.
    """
    parent, name = os.path.split(os.path.abspath(path))
    fd = os.open(parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            fd = os.open(os.path.join(parent, f".{name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def make_parents(path: str) -> list[str]:
    """Create ``path``'s missing parent directories; returns those created (deepest first)."""
    created, parent = [], os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return created


def remove_if_empty(directories: list[str]) -> None:
    """Remove the directories that :func:`make_parents` created, if nothing was put in them."""
    for d in directories:
        try:
            os.rmdir(d)
        except OSError:
            return


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


def clean_local(path: str, what: str) -> None:
    """What killed runs left beside ``path``: an interrupted commit undone, dead staging removed.

    The caller holds :func:`local_lock`.
    """
    restore_local(path, what)
    parent, name = os.path.split(path)
    for dead in remove_dead_staging(os.path.join(parent, f".{name}.staging-*")):
        log.info("removed the staging directory of a run that died: %s", dead)


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


def s3_put(path: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str | None:
    """PUT the S3 object ``bucket/key``, conditionally; its new ETag, or None when the condition failed.

    ``if_none_match``: only if absent (``If-None-Match: *``); ``if_match``: only if its ETag is still that.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = path.split("/", 1)
    cond = {"IfNoneMatch": "*"} if if_none_match else {"IfMatch": if_match} if if_match else {}
    try:
        return _s3_client().put_object(Bucket=bucket, Key=key, Body=data, **cond)["ETag"]
    except ClientError as e:
        # 412: the condition failed; 409: another conditional write on the key is in flight; 404: If-Match on a gone key
        if cond and e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict",
                                                                 "NoSuchKey", "404"):
            return None
        raise OSError(f"cannot write s3://{path}: {e}") from e
    except BotoCoreError as e:
        raise OSError(f"cannot write s3://{path}: {e}") from e


def s3_get(path: str) -> tuple[bytes, str] | None:
    """``(content, ETag)`` of the S3 object ``bucket/key``, or None when it does not exist."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = path.split("/", 1)
    try:
        got = _s3_client().get_object(Bucket=bucket, Key=key)
        return got["Body"].read(), got["ETag"]
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise OSError(f"cannot read s3://{path}: {e}") from e
    except BotoCoreError as e:
        raise OSError(f"cannot read s3://{path}: {e}") from e


def commit_lease_seconds() -> float:
    """How long an S3 commit marker stays valid without renewal (``AGC_RAY_COMMIT_LEASE_S``, default 600)."""
    try:
        lease = float(os.environ.get("AGC_RAY_COMMIT_LEASE_S", "600"))
    except ValueError:
        raise InputError(f"AGC_RAY_COMMIT_LEASE_S must be a number of seconds, not {os.environ['AGC_RAY_COMMIT_LEASE_S']!r}") from None
    if not lease > 0:
        raise InputError(f"AGC_RAY_COMMIT_LEASE_S must be positive, not {lease}")
    return lease


class S3Marker:
    """A held S3 commit marker: its content and ETag, renewed (conditionally) while a commit copies."""

    def __init__(self, path: str, doc: dict, etag: str, lease: float):
        self.path, self.doc, self.etag, self.lease = path, doc, etag, lease
        self.renewed = time.time()

    @classmethod
    def create(cls, path: str, doc: dict) -> S3Marker | None:
        """Take a free marker (None: another run holds one)."""
        lease = commit_lease_seconds()
        doc = {**doc, "lease_until": time.time() + lease}
        etag = s3_put(path, json.dumps(doc).encode(), if_none_match=True)
        return None if etag is None else cls(path, doc, etag, lease)

    @classmethod
    def take_over(cls, path: str, doc: dict, etag: str, **update) -> S3Marker | None:
        """Take an expired marker over from a dead run (None: another run took it first)."""
        lease = commit_lease_seconds()
        doc = {**doc, **update, "lease_until": time.time() + lease}
        new = s3_put(path, json.dumps(doc).encode(), if_match=etag)
        return None if new is None else cls(path, doc, new, lease)

    def renew(self) -> None:
        """Extend the lease when a third of it has passed; OutputConflict if another run took the marker."""
        if time.time() - self.renewed < self.lease / 3:
            return
        self.doc["lease_until"] = time.time() + self.lease
        etag = s3_put(self.path, json.dumps(self.doc).encode(), if_match=self.etag)
        if etag is None:
            raise OutputConflict(f"the commit marker s3://{self.path} was taken over by another run after this run's "
                                 f"lease expired; that run finishes this commit")
        self.etag, self.renewed = etag, time.time()

    def expire(self) -> None:
        """End the lease now (a commit that failed in this process): the next run recovers at once."""
        self.doc["lease_until"] = 0
        try:
            s3_put(self.path, json.dumps(self.doc).encode(), if_match=self.etag)
        except OSError as e:  # best effort: the lease then ends on its own
            log.warning("could not release the commit marker s3://%s: %s", self.path, e)
