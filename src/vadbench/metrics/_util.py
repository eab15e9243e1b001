"""Small helpers shared by the metric modules: rounding for byte-stable JSON and input checks."""

from __future__ import annotations

from typing import Any

import numpy as np

#: decimals kept in every returned metric, so metrics JSON files are byte-identical across runs
DECIMALS = 6


def rnd(value: float | np.floating | None) -> float | None:
    """Plain Python float rounded to `DECIMALS` (None stays None); -0.0 becomes 0.0."""
    if value is None:
        return None
    out = float(value)
    if not np.isfinite(out):
        # a metric that reaches here as NaN/inf is a bug: callers must return None + a reason instead
        raise ValueError(f"metric value {out!r} is not finite")
    return round(out, DECIMALS) + 0.0


def as_scores(values: Any, name: str, ndim: int) -> np.ndarray:
    """`values` as a real-valued finite array with `ndim` dims (no copy when already one)."""
    arr = np.asarray(values)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {arr.shape}")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    return arr


def check_finite(arr: np.ndarray, name: str) -> None:
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def as_binary(values: Any, name: str, ndim: int) -> np.ndarray:
    """`values` as an array of 0/1 (bool or integer) with `ndim` dims; anything else is an error."""
    arr = np.asarray(values)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {arr.shape}")
    if arr.dtype != bool:
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise ValueError(f"{name} must be 0/1 labels, got dtype {arr.dtype}")
        check_binary_values(arr, name)
    return arr


def check_binary_values(arr: np.ndarray, name: str) -> None:
    if arr.dtype == bool or arr.size == 0:
        return
    if np.issubdtype(arr.dtype, np.integer):
        bad = arr.min() < 0 or arr.max() > 1  # two reductions, no big temporaries
    else:
        bad = bool(((arr != 0) & (arr != 1)).any())
    if bad:
        raise ValueError(f"{name} must contain only 0 and 1, found {np.unique(arr)[:5].tolist()}...")
