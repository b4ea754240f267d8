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


def check_rows(X: np.ndarray, *, name: str = "X") -> np.ndarray:
    """``X`` unchanged; ValueError naming the count and the first row with NaN/Inf or all zeros (an
    all-zero embedding has no cosine similarity)."""
    nonfinite, zero = invalid_rows(X)
    if nonfinite.size:
        raise ValueError(f"{name} contains NaN or Inf in {nonfinite.size} rows (first at row {nonfinite[0]})")
    if zero.size:
        raise ValueError(f"{name} has {zero.size} all-zero rows (first at row {zero[0]}): cosine similarity is undefined")
    return X


def check_labels(y, n_rows: int) -> np.ndarray:
    """Class labels (N,) as int64: integers as they are, other discrete labels (strings, integral
    floats) as their index in the sorted unique values. ValueError for continuous targets, a length
    that differs from X's, or a single class."""
    from sklearn.utils.multiclass import type_of_target

    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D of shape (n_samples,), got shape {y.shape}")
    if y.shape[0] != n_rows:
        raise ValueError(f"X and y have different numbers of rows: {n_rows} vs {y.shape[0]}")
    kind = type_of_target(y, input_name="y", raise_unknown=True)
    if kind not in ("binary", "multiclass"):
        raise ValueError(f"y must hold class labels (integers or strings), got {kind} values of dtype {y.dtype}")
    if np.unique(y).size < 2:
        raise ValueError(f"y has a single class ({y[0]}); supervised training needs at least 2")
    if np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    return np.unique(y, return_inverse=True)[1].astype(np.int64)
