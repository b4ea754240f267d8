"""Progress of the job's long stages, counted from finished Ray tasks and rows done inside them.

:func:`wait` blocks until a stage's task refs are done. On a terminal it draws a tqdm bar; otherwise
it logs a line every ``AGC_RAY_PROGRESS_S`` seconds (10 by default), as Ray Data does for
non-interactive output: tasks and rows done, rows per second and an ETA from that rate. Counts come
from the tasks that have finished (and the rows each one covers), never from guesses. Stages whose
tasks are long (scoring: one task per shard) also count rows inside the tasks: each task reports the
rows of every chunk it finishes to a :class:`RowCounter` actor (the progress-actor pattern of Ray's
own examples), which :func:`wait` reads when a line is due.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("agc_ray")


class _LastLine(logging.Filter):
    """Notes when the job last logged a line, so that progress lines keep the silence under one interval
    across stage boundaries too (a stage that ends 9 s after the last line is followed by one 1 s in)."""

    at = time.perf_counter()

    def filter(self, record) -> bool:
        _LastLine.at = time.perf_counter()
        return True


log.addFilter(_LastLine())


def interval_seconds() -> float:
    """Seconds between progress lines (``AGC_RAY_PROGRESS_S``; 0: a line each time a task finishes)."""
    try:
        return max(0.0, float(os.environ.get("AGC_RAY_PROGRESS_S", "10")))
    except ValueError:
        return 10.0


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _log_line(stage: str, done: int, total: int, unit: str, elapsed: float, tasks: str = "", decimals: int = 0) -> None:
    """``stage: [tasks, ]done/total unit (pct), rate, elapsed[, ETA]`` (ETA once something is done)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = f", ETA {duration((total - done) / rate)}" if rate > 0 else ""
    log.info("%s: %s%d/%d %s (%.0f%%), %.*f %s/s, %s elapsed%s", stage, tasks, done, total, unit,
             100.0 * done / total, decimals, rate, unit, duration(elapsed), eta)


#: Stages over fewer nodes than this count finished tasks only (their tasks take seconds; a counter
#: actor costs a worker process).
COUNT_INSIDE_ROWS = 65_536


class RowCounter:
    """Rows done per stage, reported by tasks while they run (a Ray actor; see :func:`row_counter`)."""

    def __init__(self):
        self.rows: dict[str, int] = {}

    def add(self, stage: str, rows: int) -> None:
        self.rows[stage] = self.rows.get(stage, 0) + rows

    def done(self, stage: str) -> int:
        return self.rows.get(stage, 0)


def row_counter():
    """A :class:`RowCounter` actor on the driver's node (no CPU: it only adds numbers)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(RowCounter).options(num_cpus=0, scheduling_strategy=here).remote()


def reporter(counter, stage: str):
    """``report(rows)`` for a task's inner loop: tells ``counter`` (if any) about rows done, without waiting
    (a call on a dead counter does not raise: the counter lives on the driver's node, and dies with it)."""
    if counter is None:
        return None

    def report(rows: int) -> None:
        counter.add.remote(stage, int(rows))

    return report


def _counted(counter, stage: str, done: int) -> int:
    """Rows done: the finished tasks' rows, or the counter's rows when it has counted more."""
    if counter is None:
        return done
    import ray

    try:
        return max(done, ray.get(counter.done.remote(stage), timeout=5))
    except Exception:  # noqa: BLE001 - a lost counter: count the finished tasks only
        return done


def wait(refs: list, stage: str, rows: list[int] | None = None, counter=None, unit: str = "rows") -> None:
    """Wait for every ref in ``refs`` (not fetching them), showing the stage's progress.

    Args:
        refs: one ref per task of the stage.
        stage: the stage's name in the progress line ("level 0 kNN").
        rows: rows each task covers (rates and ETA in rows); None: counted in tasks.
        counter: a :func:`row_counter` that the tasks report their rows to under ``stage`` (needs ``rows``).
        unit: what ``rows`` counts.
    """
    import ray

    if not refs:
        return
    weights = list(rows) if rows is not None else [1] * len(refs)
    unit = unit if rows is not None else "tasks"
    total = sum(weights)
    weight_of = {ref: w for ref, w in zip(refs, weights)}
    pending, done, t0 = list(refs), 0, time.perf_counter()
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=stage, unit=unit, unit_scale=True, leave=False)
    every = interval_seconds()
    last_line = t0 - every  # this wait's own last line: the clock advances even where INFO is not emitted
    try:
        while pending:
            if bar is not None or every == 0:  # one task at a time: the bar moves as each finishes
                timeout = 1.0 if bar is not None and counter is not None else None  # the bar moves within tasks
                ready, pending = ray.wait(pending, num_returns=1, timeout=timeout, fetch_local=False)
            else:  # everything, or what has finished when the next line is due
                timeout = max(0.0, max(_LastLine.at, last_line) + every - time.perf_counter())
                ready, pending = ray.wait(pending, num_returns=len(pending), timeout=timeout, fetch_local=False)
            done += sum(weight_of[r] for r in ready)
            now = time.perf_counter()
            if bar is not None:
                bar.update(min(total, _counted(counter, stage, done)) - bar.n)
            elif pending and now >= max(_LastLine.at, last_line) + every:
                counted = min(total, _counted(counter, stage, done))
                _log_line(stage, counted, total, unit, now - t0, f"{len(refs) - len(pending)}/{len(refs)} tasks, ",
                          decimals=0 if unit in ("rows", "tasks") else 2)
                last_line = now
    finally:
        if bar is not None:
            bar.close()


class Ticker:
    """Progress of a loop in one process (a training epoch's batches): a line every interval.

    ``tick(done)`` logs ``stage: done/total unit (pct), rate, elapsed, ETA`` when the interval has
    passed since the last line (AGC_RAY_PROGRESS_S; 0: every call).
    """

    def __init__(self, stage: str, total: int, unit: str):
        self.stage, self.total, self.unit = stage, max(1, int(total)), unit
        self.t0 = time.perf_counter()
        self.every = interval_seconds()
        self.last_line = self.t0

    def tick(self, done: int) -> None:
        now = time.perf_counter()
        if now < max(self.last_line, _LastLine.at) + self.every or done >= self.total:
            return
        _log_line(self.stage, done, self.total, self.unit, now - self.t0, decimals=1)
        self.last_line = now
