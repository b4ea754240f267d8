"""Ray remote functions created on first use, so that importing a module does not import Ray; each
gives the heap freed in its worker back to the operating system when it starts and ends
(:func:`release_heap`).

The job's tasks each take a whole CPU (``num_cpus=1``), light ones too: Ray keeps one idle worker per
CPU, so tasks of half a CPU, which ran two per CPU, made every stage start workers that the raylet
had killed a second after the stage before, each importing torch, faiss and agc_ray again (ten worker
starts in a 10^6-row run; its aggregation took 5.5 s, 2.0 s with whole CPUs).
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import sys

_MALLOC_TRIM = None


def release_heap() -> None:
    """Return the memory that this process freed to the operating system.

    A Ray worker runs one task after another: glibc keeps the chunks a task freed in its arenas, and
    pyarrow's allocator keeps its pages, so a worker that had read Parquet blocks still held 0.9 GB
    when it went on to run a kNN task, and a scoring worker 0.8 GB more than the other in the next stage
    (10^6 x 256 rows). ``malloc_trim`` and pyarrow's ``release_unused`` hand those pages back; a no-op
    where they do not exist.
    """
    global _MALLOC_TRIM
    pyarrow = sys.modules.get("pyarrow")
    if pyarrow is not None:
        pyarrow.default_memory_pool().release_unused()
    if _MALLOC_TRIM is None:  # glibc's, from the symbols already loaded in this process (False: none)
        _MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", False) if sys.platform.startswith("linux") else False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def _releasing(fn):
    """``fn`` calling :func:`release_heap` when it starts (the worker's earlier task, maybe not ours,
    may have left pages) and when it ends (after its last ``yield`` for a generator)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            release_heap()
            try:
                yield from fn(*args, **kwargs)
            finally:
                release_heap()

        return gen

    @functools.wraps(fn)
    def call(*args, **kwargs):
        release_heap()
        try:
            return fn(*args, **kwargs)
        finally:
            release_heap()

    return call


class LazyRemote:
    """``LazyRemote(fn, **options)``: behaves like ``ray.remote(**options)(fn)``, built on first call."""

    def __init__(self, fn, **options):
        self.fn = fn
        self.options_ = options
        self._remote = None

    def _get(self):
        if self._remote is None:
            import ray

            fn = _releasing(self.fn)
            self._remote = ray.remote(**self.options_)(fn) if self.options_ else ray.remote(fn)
        return self._remote

    def options(self, **kwargs):
        return self._get().options(**kwargs)

    def remote(self, *args, **kwargs):
        return self._get().remote(*args, **kwargs)


def ref_list(refs) -> list:
    """The refs of a call with ``num_returns`` set, as a list (Ray returns one ref, not a list, for 1)."""
    return list(refs) if isinstance(refs, list) else [refs]


def lazy_remote(fn=None, **options):
    """Decorator or function: a :class:`LazyRemote` of ``fn`` with Ray ``options``."""
    if fn is None:
        return lambda f: LazyRemote(f, **options)
    return LazyRemote(fn, **options)
