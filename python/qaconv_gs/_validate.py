"""Input validation shared by every public function.

Arrays are converted once to C-contiguous float32 / int64 (never modified in place), and every
error names the argument, what was expected and what was received.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence

import numpy as np

from . import _native

__all__ = [
    "as_float32",
    "as_index",
    "as_labels",
    "check_int",
    "check_real",
    "resolve_threads",
    "shape_str",
]


def shape_str(shape: Sequence[int]) -> str:
    return str(tuple(int(s) for s in shape))


def _to_array(x: object, name: str) -> np.ndarray:
    if x is None:
        raise TypeError(f"{name}: expected an array, got None")
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name}: expected a numeric array, got {type(x).__name__}")
    if not isinstance(x, np.ndarray) and hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()  # torch tensors (CPU or not), without a torch import
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as exc:  # ragged lists and the like
        raise TypeError(f"{name}: could not be converted to a numeric array ({exc})") from None


def as_float32(
    x: object,
    name: str,
    ndim: int | tuple[int, ...] | None = None,
    *,
    allow_empty: bool = False,
    check_finite: bool = True,
) -> np.ndarray:
    """Return `x` as a C-contiguous float32 array, validating dtype, ndim, size and finiteness.

    Integer and floating inputs of any byte order or stride are accepted; bool, complex, object
    and string arrays raise TypeError. The result may share memory with `x` only when `x` is
    already C-contiguous native float32; callers must never write into it.
    """
    a = _to_array(x, name)
    kind = a.dtype.kind
    if kind not in "fiu":
        raise TypeError(f"{name}: expected a real floating-point (or integer) array, got dtype {a.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if a.ndim not in allowed:
            want = " or ".join(f"{d}-d" for d in allowed)
            raise ValueError(f"{name}: expected a {want} array, got shape {shape_str(a.shape)}")
    if a.size == 0 and not allow_empty:
        raise ValueError(f"{name}: expected a non-empty array, got shape {shape_str(a.shape)}")
    with np.errstate(over="ignore"):  # overflow to inf is reported below, by name
        out = np.ascontiguousarray(a, dtype=np.float32)
    if check_finite and out.size:
        finite = np.isfinite(out)
        if not finite.all():
            bad = ~finite
            if np.isfinite(a[bad]).all():
                raise ValueError(
                    f"{name}: values exceed the float32 range (|x| > {np.finfo(np.float32).max:.4g})"
                )
            raise ValueError(
                f"{name}: contains {int(np.count_nonzero(bad))} NaN or Inf value(s); inputs must be finite"
            )
    return out


def as_labels(
    labels: object,
    name: str,
    n: int | None = None,
    num_classes: int | None = None,
) -> np.ndarray:
    """Return `labels` as a C-contiguous int64 vector of length `n`, values in [0, num_classes)."""
    a = _to_array(labels, name)
    if a.dtype.kind == "b" or a.dtype.kind not in "iuf":
        raise TypeError(f"{name}: expected an integer array, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array, got shape {shape_str(a.shape)}")
    if a.dtype.kind == "f":
        if a.size and (not np.isfinite(a).all() or (a != np.round(a)).any()):
            raise TypeError(f"{name}: expected integer values, got non-integral floats")
    # Values outside int64 would be cast to INT64_MIN / wrapped: distinct labels could become equal.
    if a.size and a.dtype.kind in "fu" and a.dtype.itemsize >= 8:
        big = int(a.max()) if a.dtype.kind == "u" else float(np.abs(a).max())
        if big >= 2**63:
            raise ValueError(f"{name}: values must fit in int64 (|x| < 2**63), got {big}")
    out = np.ascontiguousarray(a, dtype=np.int64)
    if n is not None and out.shape[0] != n:
        raise ValueError(f"{name}: expected length {n}, got {out.shape[0]}")
    if num_classes is not None and out.size:
        lo, hi = int(out.min()), int(out.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name}: values must be in [0, {num_classes}), got {bad}")
    return out


def as_index(x: object, name: str, ndim: int, upper: int) -> np.ndarray:
    """Return an int64 C-contiguous index array with values in [0, upper)."""
    a = _to_array(x, name)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array, got shape {shape_str(a.shape)}")
    if a.dtype.kind == "u" and a.size and int(a.max()) >= upper:  # before int64 could wrap it negative
        raise ValueError(f"{name}: values must be in [0, {upper}), got {int(a.max())}")
    out = np.ascontiguousarray(a, dtype=np.int64)
    if out.size and (out.min() < 0 or out.max() >= upper):
        bad = int(out.min()) if out.min() < 0 else int(out.max())
        raise ValueError(f"{name}: values must be in [0, {upper}), got {bad}")
    return out


def check_int(value: object, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (not bool) in [lo, hi] inclusive."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        try:
            if isinstance(value, (bool, np.bool_)):
                raise TypeError
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name}: expected an integer, got {type(value).__name__}") from None
    v = int(value)
    if lo is not None and v < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name}: expected an integer <= {hi}, got {v}")
    return v


def check_real(value: object, name: str, lo: float | None = None, hi: float | None = None) -> float:
    """A finite real number in [lo, hi]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v}")
    if lo is not None and v < lo:
        raise ValueError(f"{name}: expected a number >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name}: expected a number <= {hi}, got {v}")
    return v


def resolve_threads(n_threads: object) -> int:
    """None -> OpenMP's default (respects OMP_NUM_THREADS); otherwise an integer >= 1."""
    if n_threads is None:
        return max(1, int(_native.default_threads()))
    return check_int(n_threads, "n_threads", lo=1, hi=4096)
