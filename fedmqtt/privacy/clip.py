"""Clipping and noising a device's delta (all tensors as one vector), with plain numpy only so
the agent stays light. The norm is the L2 norm over every tensor of the model together."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedmqtt.params import Params

# A clipped delta's norm is bound * (1 - 1e-6) so float32 rounding never lands above ``bound``.
_SHRINK = 1.0 - 1e-6


def params_norm(delta: Params) -> float:
    """L2 norm of all tensors together (float64)."""
    total = 0.0
    for v in delta.values():
        a = np.asarray(v, dtype=np.float64).ravel()
        total += float(np.dot(a, a))
    return math.sqrt(total)


def clip_params(delta: Params, bound: float) -> tuple[Params, float]:
    """``delta`` scaled down to L2 norm <= ``bound`` (new arrays when it is scaled; the same
    dict's arrays otherwise) and its norm before clipping."""
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"clip bound must be finite and > 0, got {bound!r}")
    norm = params_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("delta is not finite")
    if norm <= bound:
        return delta, norm
    f = np.float64(bound / norm * _SHRINK)
    return {k: np.multiply(v, f).astype(np.float32) for k, v in delta.items()}, norm


def gaussian_params(delta: Params, std: float, rng: Any) -> Params:
    """``delta`` plus independent N(0, std^2) noise in every coordinate (new float32 arrays).

    ``rng`` is a ``numpy.random.Generator`` (``standard_normal``) or the agent's light random
    source (uniforms, turned into normals by the Box-Muller transform).
    """
    out: Params = {}
    for k, v in delta.items():
        n = int(np.size(v))
        if hasattr(rng, "standard_normal"):
            z = np.asarray(rng.standard_normal(n), dtype=np.float64)
        else:
            z = box_muller(rng, n)
        noisy = np.asarray(v, dtype=np.float64).ravel() + z * std
        out[k] = noisy.astype(np.float32).reshape(np.shape(v))
    return out


def box_muller(rng: Any, n: int) -> Any:
    """``n`` standard normal values from ``rng.random`` uniforms (Box-Muller, float64)."""
    m = (n + 1) // 2
    u1 = 1.0 - np.asarray(rng.random(m), dtype=np.float64)  # (0, 1]: the log is finite
    u2 = np.asarray(rng.random(m), dtype=np.float64)
    r = np.sqrt(-2.0 * np.log(u1))
    return np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
