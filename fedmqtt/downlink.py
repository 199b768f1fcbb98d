"""The delta downlink: a model version sent as a compressed difference from a keyframe.

A *keyframe* is a version whose full model message the aggregator published and whose decoded
parameters ``K`` it keeps. For a later version ``V`` with float32 parameters ``theta``, the
aggregator encodes ``theta - K`` with a delta codec (top-k, int8, ...); a device holding ``K``
reconstructs::

    S = K + decode(delta)            (float32, element-wise, in layout order)

Both sides compute ``S`` with this module's :func:`apply_delta` on the same decoded values, so
the model a device trains on is bit-identical to the one the aggregator computes it sent; the
message carries :func:`digest` of ``K`` (a device holding another base refuses it) and of
``S`` (a device checks its reconstruction). Each delta is encoded afresh from ``theta``: what
one delta leaves out stays in ``theta`` and is sent by the next (server-side error feedback),
so the stream of reconstructed models does not drift from the aggregator's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from fedmqtt.codecs import Codec, decode_params, encode_params
from fedmqtt.params import F32, Layout

DIGEST_CHARS: Final = 32  # hex characters of a parameter digest (128 bits of SHA-256)


def digest(flat: F32) -> str:
    """SHA-256 (first 128 bits, hex) of a flat parameter vector as little-endian float32."""
    data = np.ascontiguousarray(flat, dtype="<f4").tobytes()
    return hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]


def apply_delta(base: F32, delta: F32) -> F32:
    """``base + delta`` in float32: the one reconstruction both ends compute."""
    if base.shape != delta.shape:
        raise ValueError(f"delta of {delta.size} values for a base of {base.size}")
    return np.add(base, delta, dtype=np.float32)


def encode_delta(
    layout: Layout,
    target: F32,
    base: F32,
    codec: Codec,
    *,
    seed: int,
    version: int,
    base_version: int,
) -> tuple[dict[str, Any], F32]:
    """Encode ``target - base`` with ``codec``; return the wire maps and exactly the model a
    receiver holding ``base`` reconstructs from them (:func:`reconstruct`).

    Deterministic: stochastic rounding (int8) draws from a generator seeded with the model
    seed and both versions, so a delta republished after a restart is the same bytes."""
    diff = np.subtract(target, base, dtype=np.float32)
    rng = np.random.default_rng([seed, version, base_version, 0xD])
    encoded = encode_params(layout.unflatten(diff, copy=False), codec, rng=rng)
    return encoded, reconstruct(base, encoded, layout)


def reconstruct(base: F32, encoded: Mapping[str, Any], layout: Layout) -> F32:
    """The model a receiver holding ``base`` gets from the delta wire maps ``encoded``
    (raises :class:`fedmqtt.errors.DecodeError` on malformed maps)."""
    return apply_delta(base, decode_params(encoded, layout))
