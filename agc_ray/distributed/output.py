"""Output of the clustering job: Parquet out, under a staging prefix, committed at the end.

Everything goes under a staging prefix next to the output; :meth:`Output.commit` replaces the output
at the very end (a directory rename locally; on S3, where there is no rename, the old manifest is
removed first, the files are copied and ``manifest.json`` is written last, so a reader that requires
the manifest never sees a half-written output; a commit cut short by a crash is finished by the next
run on that output, from the complete staging prefix that a ``_COMMITTING`` marker names).
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
import uuid

import pyarrow as pa
import pyarrow.fs as pafs

from agc_ray.distributed import commit as commit_
from agc_ray.distributed.errors import InputError, one_line
from agc_ray.distributed.input import display, filesystem_for

log = logging.getLogger("agc_ray")


class Output:
    """An output location with a staging prefix beside it, an atomic-as-possible commit and conflict detection.

    :meth:`check` (at the start) records the output's version; :meth:`commit` (at the end) replaces the
    output only if it still has that version (and each ``require`` location too), else raises
    :class:`~agc_ray.distributed.commit.OutputConflict`. See :mod:`agc_ray.distributed.commit`.
    """

    def __init__(self, uri: str, overwrite: bool):
        self.uri = uri.rstrip("/")
        self.fs, self.path = filesystem_for(self.uri)
        self.overwrite = overwrite
        self.run_id = uuid.uuid4().hex[:12]
        self.started = commit_.utc_now()
        parent, name = posixpath.split(self.path)
        self.staging = posixpath.join(parent, f".{name}.staging-{self.run_id}")
        self.committing = False
        self.seen: commit_.Version | None = None
        self._staging_lock = None
        self._marker = None
        self._created_parents: list[str] = []

    @property
    def local(self) -> bool:
        return self.fs.type_name == "local"

    def run_info(self) -> dict:
        """This run's identity, written into its manifest (what a losing run's conflict message names)."""
        return {"id": self.run_id, "started": self.started}

    def check(self) -> None:
        """Refuse an existing non-empty output unless ``overwrite`` (InputError); record its version."""
        if self.fs.type_name == "s3" and "/" not in self.path:
            raise InputError(f"output {self.uri} must be a prefix inside a bucket (s3://bucket/prefix)")
        if self.local:
            self._created_parents = commit_.make_parents(self.path)  # removed again if this run fails
            try:
                with commit_.local_lock(self.path):
                    commit_.clean_local(self.path, "output")
                    self._check_existing()
                    self._staging_lock = commit_.StagingLock(self.staging)  # claimed while this run lives
            except BaseException:
                commit_.remove_if_empty(self._created_parents)
                raise
        else:
            self.recover()
            self._check_existing()

    def inspect(self) -> None:
        """:meth:`check`'s refusals without its side effects (the dry run): creates, locks, removes nothing."""
        if self.fs.type_name == "s3" and "/" not in self.path:
            raise InputError(f"output {self.uri} must be a prefix inside a bucket (s3://bucket/prefix)")
        self._check_existing()

    def _check_existing(self) -> None:
        try:
            info = self.fs.get_file_info(self.path)
            if info.type == pafs.FileType.File:
                raise InputError(f"output {self.uri} exists and is a file")
            non_empty = info.type == pafs.FileType.Directory and bool(
                self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
            )
            if self.fs.type_name == "s3":
                bucket = self.path.split("/", 1)[0]
                if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise InputError(f"output bucket s3://{bucket} does not exist")
            self.seen = commit_.observe(self.fs, self.path)
        except (OSError, ValueError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(f"cannot access output {self.uri}: {one_line(e)}") from e
        if non_empty and not self.overwrite:
            raise InputError(f"output {self.uri} exists and is not empty (pass --overwrite to replace it)")

    def staged(self, *parts: str) -> str:
        return posixpath.join(self.staging, *parts)

    def commit(self, manifest: dict, require: tuple = ()) -> None:
        """Write the manifest into staging, then replace the output with the staging prefix.

        Args:
            manifest: the run's manifest (JSON-serialisable).
            require: ``(filesystem, path, version, what)`` of other locations that must still have the
                version this run read (``--previous``); checked with the output's own version.

        Raises:
            OutputConflict: the output (or a ``require`` location) changed since :meth:`check`.
        """
        if self.seen is None:
            raise RuntimeError("Output.check() must run before commit()")
        with self.fs.open_output_stream(self.staged("manifest.json")) as f:
            f.write(json.dumps(manifest, indent=2, default=str).encode())
        if self.local:
            with commit_.local_lock(self.path):
                self._require_unchanged(require)
                commit_.replace_local_dir(self.staging, self.path, self.run_id)
            self._release_staging()
        else:
            self._commit_copy(require)

    def _require_unchanged(self, require: tuple) -> None:
        commit_.require_unchanged(self.seen, commit_.observe(self.fs, self.path), f"output {self.uri}")
        for fs, path, seen, what in require:
            commit_.require_unchanged(seen, commit_.observe(fs, path), what)

    def _commit_copy(self, require: tuple) -> None:
        # Object stores have no rename. The commit point is manifest.json. A `_COMMITTING` marker naming
        # the (complete) staging prefix is created first with a conditional write that fails if another
        # run's marker is there, so one run commits at a time; it carries a lease that the copy renews.
        # Under it the versions are checked, then the old manifest is removed, the new files are copied
        # over the old ones (stale old files removed), the manifest is copied last and the marker and
        # staging are removed. A crash in between leaves no manifest, the old files until they are
        # replaced, and the marker; the next run on this output waits for the lease to expire and
        # finishes the commit first (:meth:`recover`), so the result of a finished run is never lost.
        fs = self.fs
        marker_path = posixpath.join(self.path, COMMIT_MARKER)
        self._require_unchanged(require)  # the common conflict, found before touching the output
        fs.create_dir(self.path, recursive=True)
        marker = commit_.S3Marker.create(marker_path, {"staging": self.staging, "run_id": self.run_id,
                                                       "started": self.started})
        if marker is None:
            raise commit_.OutputConflict(
                f"output {self.uri} is being committed by {self._marker_owner(marker_path)} (its {COMMIT_MARKER} "
                f"marker appeared after this run started); this run's result was not committed (rerun to work "
                f"from the new output)"
            )
        try:
            self._require_unchanged(require)
            # every run that staged before this commit saw an older output: it can only end in a conflict,
            # or it was killed. Listed under the marker: runs that start now wait for it (recover) and
            # stage after it is gone.
            superseded = self._other_staging()
        except BaseException:
            fs.delete_file(marker_path)
            raise
        self.committing, self._marker = True, marker  # from here on a recovery copies the staging prefix: keep it
        _copy_over(fs, self.staging, self.path, marker.renew)
        self.committing = False
        self.abort()
        for path in superseded:
            try:
                fs.delete_dir(path)
                log.info("removed the staging prefix of a superseded run: %s", display(fs, path))
            except OSError as e:  # best effort: the commit is done
                log.info("could not remove %s: %s", display(fs, path), one_line(e))

    def _other_staging(self) -> list[str]:
        parent, name = posixpath.split(self.path)
        return [i.path for i in self.fs.get_file_info(pafs.FileSelector(parent, recursive=False))
                if posixpath.basename(i.path).startswith(f".{name}.staging-") and i.path != self.staging]

    def _marker_owner(self, marker: str) -> str:
        try:
            with self.fs.open_input_stream(marker) as f:
                doc = json.loads(f.read())
            return f"run {doc.get('run_id')} (started {doc.get('started')})"
        except (OSError, ValueError, AttributeError):
            return "another run"

    def recover(self) -> None:
        """Wait for a commit in progress on this output (object stores); finish one whose run died.

        A marker whose lease runs is a live commit: wait for it (every run that starts meanwhile would
        otherwise start from a half-copied output). An expired one is taken over with a conditional
        write (one run wins) and finished from its staging prefix, or dropped when it has none.
        """
        marker_path = posixpath.join(self.path, COMMIT_MARKER)
        parent, name = posixpath.split(self.path)
        waited = False
        try:
            while True:
                got = commit_.s3_get(marker_path)
                if got is None:
                    return
                doc, etag = json.loads(got[0]), got[1]
                staging = doc["staging"]
                if not (isinstance(staging, str) and staging.startswith(posixpath.join(parent, f".{name}.staging-"))):
                    raise ValueError(f"it names {staging!r}, not a staging prefix of this output")
                remaining = float(doc.get("lease_until", 0)) - time.time()
                if remaining > 0:
                    if not waited:
                        log.info("output %s: run %s is committing it; waiting for it (its lease ends in %.0fs)",
                                 self.uri, doc.get("run_id"), remaining)
                        waited = True
                    time.sleep(min(remaining, 2.0))
                    continue
                marker = commit_.S3Marker.take_over(marker_path, doc, etag, run_id=self.run_id, started=self.started,
                                                    recovering=doc.get("run_id"))
                if marker is None:
                    continue  # another run took it over first: wait for that one
                if self.fs.get_file_info(posixpath.join(staging, "manifest.json")).type == pafs.FileType.File:
                    log.warning("output %s: finishing the commit that an earlier run started (%s)", self.uri,
                                display(self.fs, staging))
                    _copy_over(self.fs, staging, self.path, marker.renew)
                    self.fs.delete_dir(staging)
                else:
                    log.warning("output %s: an interrupted commit left no staging to finish it from; the output "
                                "has no manifest.json and is replaced by this run", self.uri)
                    self.fs.delete_file(marker_path)
                return
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"cannot recover the interrupted commit of {self.uri} ({COMMIT_MARKER}): {one_line(e)}") from e

    def _release_staging(self) -> None:
        if self._staging_lock is not None:
            self._staging_lock.release()
            self._staging_lock = None

    def abort(self) -> None:
        """Remove the staging prefix (best effort), unless an interrupted commit still needs it."""
        if self.committing:
            log.error("commit of %s interrupted: the next run on this output finishes it from %s",
                      self.uri, display(self.fs, self.staging))
            self._marker.expire()  # this process will not renew it: the next run need not wait for the lease
            return
        try:
            if self.fs.get_file_info(self.staging).type != pafs.FileType.NotFound:
                self.fs.delete_dir(self.staging)
        except OSError as e:  # pragma: no cover - best effort
            log.warning("could not remove staging %s: %s", display(self.fs, self.staging), e)
        finally:
            self._release_staging()
            commit_.remove_if_empty(self._created_parents)


COMMIT_MARKER = "_COMMITTING"


def _copy_over(fs, staging: str, path: str, renew=lambda: None) -> None:
    """Replace the files under ``path`` with those under ``staging``; manifest.json last, then the marker goes.

    ``renew`` is called between files (the commit marker's lease).
    """
    manifest = posixpath.join(path, "manifest.json")
    if fs.get_file_info(manifest).type == pafs.FileType.File:
        fs.delete_file(manifest)
    staged = sorted(posixpath.relpath(i.path, staging) for i in fs.get_file_info(pafs.FileSelector(staging, recursive=True))
                    if i.type == pafs.FileType.File)
    old = [posixpath.relpath(i.path, path) for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
           if i.type == pafs.FileType.File]
    for rel in sorted(set(old) - set(staged) - {COMMIT_MARKER}):
        renew()
        fs.delete_file(posixpath.join(path, rel))
    for rel in sorted(staged, key=lambda r: r == "manifest.json"):
        renew()
        fs.copy_file(posixpath.join(staging, rel), posixpath.join(path, rel))
    fs.delete_file(posixpath.join(path, COMMIT_MARKER))


def write_table(fs, path: str, table: pa.Table) -> str:
    """Write one Parquet file (parent directories created). Returns the path."""
    import pyarrow.parquet as pq

    fs.create_dir(posixpath.dirname(path), recursive=True)
    pq.write_table(table, path, filesystem=fs)
    return path
