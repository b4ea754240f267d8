"""Logging of the jobs: the project's lines at INFO, third-party loggers at WARNING unless verbose.

A run that succeeds prints the project's stage lines (counts, times) and Ray Data's progress, and
nothing at WARNING or above: library loaders (faiss's "Could not load library with AVX512 support"),
Ray's start-up notes and similar chatter stay at their INFO level, below the root's WARNING.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(message)s"


def configure(verbose: bool = False) -> None:
    """Root logger at WARNING (INFO with ``verbose``); the ``agc_ray`` logger at INFO (DEBUG with ``verbose``).

    In a process whose root logger already has handlers (a Ray worker's), only the levels are set.
    """
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format=FORMAT)
    logging.getLogger().setLevel(level)
    logging.getLogger("agc_ray").setLevel(logging.DEBUG if verbose else logging.INFO)
