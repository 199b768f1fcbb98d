"""Validation and chunking shared by the aggregation modules (private).

Every public aggregation function validates its inputs here so that all of them refuse the same
things in the same words: a batch must be a non-empty ``(K, d)`` float array, vectors must be
flat and match ``d``, per-row weights must be finite and non-negative, and no value may be NaN
or Inf. The finiteness check is the last line of defence before a number enters the global
model: one NaN there is permanent and spreads to every device, so it costs one extra read of the
batch on purpose. Inputs of another float dtype are converted to float32 (a copy), so a value
that does not fit float32 is refused as non-finite instead of overflowing later.

Reductions over a ``(K, d)`` batch work on column chunks of at most :data:`CHUNK_ELEMENTS`
values converted to float64: this keeps the float64 working set small (a float64 copy of a
K = 100, d = 1e6 batch would be 800 MB) while the loop runs over chunks, never over single
coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmqtt.params import F32

F64 = npt.NDArray[np.float64]

# Values (rows x columns) per float64 working chunk: 2**18 values = 2 MiB, cache-friendly.
# Read at call time, so tests can shrink it to exercise chunk boundaries.
CHUNK_ELEMENTS = 1 << 18

_F32_MAX = float(np.finfo(np.float32).max)
_DOT_CHECK_MIN = 1 << 13  # below this, isfinite().all() is cheaper than entering np.errstate


def as_f32(x: Any, name: str) -> F32:
    """``x`` as a float32 ndarray (no copy if it already is one); refuses non-float dtypes."""
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name} must be a float array, got dtype {a.dtype}")
    if a.dtype != np.float32:
        with np.errstate(over="ignore"):
            a = a.astype(np.float32)
    return a


def batch(deltas: Any, name: str = "deltas", *, allow_empty: bool = False) -> F32:
    """Validate a ``(K, d)`` batch of finite float32 rows (K >= 1 unless ``allow_empty``)."""
    a = as_f32(deltas, name)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a (K, d) array, got shape {a.shape}")
    if a.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} has no rows (K = 0): nothing to aggregate")
    # Row by row: np.isfinite on the whole batch would allocate K*d booleans at once.
    for i in range(a.shape[0]):
        if not np.isfinite(a[i]).all():
            raise ValueError(f"{name} row {i} contains NaN or Inf")
    return a


def vector(x: Any, name: str, d: int | None = None, *, finite: bool = True) -> F32:
    """Validate a flat float32 vector of finite values (of length ``d`` if given).

    ``finite=False`` skips the NaN/Inf check, for a caller that checks its result instead.
    """
    a = as_f32(x, name)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a flat (d,) vector, got shape {a.shape}")
    if d is not None and a.shape[0] != d:
        raise ValueError(f"{name} has length {a.shape[0]}, expected {d}")
    if finite and not all_finite(a):
        raise ValueError(f"{name} contains NaN or Inf")
    return a


def all_finite(a: F32) -> bool:
    """True iff the 1-D float32 array ``a`` holds no NaN or Inf.

    Large arrays are checked with one BLAS dot product ``a . a``: a sum of non-negative squares
    is finite iff every element is, except that huge finite values (|x| > ~1e19) overflow it,
    so a non-finite sum is confirmed element-wise. It reads ``a`` once, without the d-byte
    boolean temporary of ``isfinite(a).all()``; for small arrays entering ``np.errstate``
    costs more than that temporary.
    """
    if a.size > _DOT_CHECK_MIN:
        with np.errstate(over="ignore", invalid="ignore"):
            if math.isfinite(float(np.dot(a, a))):
                return True
    return bool(np.isfinite(a).all())


def row_weights(x: Any, k: int, name: str) -> F64:
    """Validate ``K`` per-row weights: finite and >= 0. Returned as a new float64 array."""
    try:
        a = np.array(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numbers: {exc}") from None
    if a.shape != (k,):
        raise ValueError(f"{name} must have shape ({k},) to match {k} rows, got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf")
    if (a < 0).any():
        raise ValueError(f"{name} must be >= 0, got minimum {a.min()}")
    return a


def positive_total(weights: F64, name: str) -> float:
    """The sum of ``weights``, which must be finite and > 0 to normalise by it."""
    total = float(weights.sum())
    if not (math.isfinite(total) and total > 0):
        raise ValueError(f"{name} must have a finite, positive sum, got {total}")
    return total


def unit_interval(x: float, name: str) -> float:
    """``x`` as a float in [0, 1]."""
    v = float(x)
    if not 0.0 <= v <= 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be in [0, 1], got {x!r}")
    return v


def to_f32(x: F64, what: str) -> F32:
    """Round a float64 result to float32 once; refuses a result that overflows float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = x.astype(np.float32)
    if not np.isfinite(out).all():
        raise ValueError(f"{what} is not finite in float32 (overflow)")
    return out


def saturate_f32(x: F64) -> F32:
    """Cast non-negative float64 values to float32, capping at the float32 maximum."""
    return np.minimum(x, _F32_MAX).astype(np.float32)


def column_chunks(k: int, d: int) -> Iterator[tuple[int, int]]:
    """Column ranges ``[a, b)`` covering ``0..d`` with at most CHUNK_ELEMENTS values each."""
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    for a in range(0, d, step):
        yield a, min(a + step, d)
