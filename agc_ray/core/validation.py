"""Parameter and row checks shared by the estimator and the jobs (one message format everywhere).

numpy only: the jobs' Ray Data workers import this to check rows without importing torch.
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def check_param(name: str, value, kind=None, low=None, high=None, options=None, *, error=ValueError) -> None:
    """Raise ``error("{name} must be ..., got {value!r}")`` unless ``value`` fits.

    Args:
        name: how the parameter is named in the message (``"HiLander: k"``, ``"--max-levels"``).
        kind: ``int`` or ``float`` (any real number; bools are refused for both); unused with options.
        low, high: inclusive bounds (None: unbounded).
        options: the allowed values, instead of kind and bounds.
        error: the exception type (a ValueError subclass, e.g. the jobs' InputError).
    """
    if options is not None:
        if value not in options:
            raise error(f"{name} must be one of {', '.join(map(str, options))}, got {value!r}")
        return
    ok = isinstance(value, numbers.Integral) if kind is int else isinstance(value, numbers.Real)
    if not ok or isinstance(value, bool) or (kind is not int and not math.isfinite(value)):
        raise error(f"{name} must be {'an integer' if kind is int else 'a finite number'}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
        raise error(f"{name} must be {bounds}, got {value!r}")


def invalid_rows(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of an (N, D) matrix that cannot be embeddings: (rows with NaN/Inf, all-zero rows).

    Callers phrase the error their way (a row number in the estimator, an example id in the job's
    input checks).
    """
    nonfinite = np.flatnonzero(~np.isfinite(X).all(axis=1))
    zero = np.flatnonzero(~X.any(axis=1))
    return nonfinite, zero
