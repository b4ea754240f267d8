"""Progress of the job's long stages, counted from finished Ray tasks.

:func:`wait` blocks until a stage's task refs are done. On a terminal it draws a tqdm bar; otherwise
it logs a line every ``AGC_RAY_PROGRESS_S`` seconds (10 by default), as Ray Data does for
non-interactive output: tasks and rows done, rows per second and an ETA from that rate. Counts come
from the tasks that have finished (and the rows each one covers), never from guesses.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("agc_ray")


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


def wait(refs: list, stage: str, rows: list[int] | None = None) -> None:
    """Wait for every ref in ``refs`` (not fetching them), showing the stage's progress.

    Args:
        refs: one ref per task of the stage.
        stage: the stage's name in the progress line ("level 0 kNN").
        rows: rows each task covers (rates and ETA in rows); None: counted in tasks.
    """
    import ray

    if not refs:
        return
    weights = list(rows) if rows is not None else [1] * len(refs)
    unit = "rows" if rows is not None else "tasks"
    total = sum(weights)
    weight_of = {ref: w for ref, w in zip(refs, weights)}
    pending, done, t0 = list(refs), 0, time.perf_counter()
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=stage, unit=unit, unit_scale=True, leave=False)
    every = interval_seconds()
    next_line = t0 + every
    try:
        while pending:
            if bar is not None or every == 0:  # one task at a time: the bar moves as each finishes
                ready, pending = ray.wait(pending, num_returns=1, fetch_local=False)
            else:  # everything, or what has finished when the next line is due
                timeout = max(0.0, next_line - time.perf_counter())
                ready, pending = ray.wait(pending, num_returns=len(pending), timeout=timeout, fetch_local=False)
            step = sum(weight_of[r] for r in ready)
            done += step
            if bar is not None:
                bar.update(step)
            now = time.perf_counter()
            if bar is None and pending and now >= next_line:
                _log_line(stage, done, total, unit, now - t0, f"{len(refs) - len(pending)}/{len(refs)} tasks, ")
                next_line = now + every
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
        self.next_line = self.t0 + self.every

    def tick(self, done: int) -> None:
        now = time.perf_counter()
        if now < self.next_line or done >= self.total:
            return
        _log_line(self.stage, done, self.total, self.unit, now - self.t0, decimals=1)
        self.next_line = now + self.every
