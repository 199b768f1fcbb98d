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

*Version 0 built on the device* (:func:`genesis`): the initial model is deterministic from the
model seed (:func:`fedmqtt.models.init_params`), and so is its downlink encoding
(:func:`encode_model`). The signed spec message carries the seed, the downlink codec and the
digest of the version 0 devices decode (:class:`fedmqtt.wire.Genesis`); a device rebuilds it
from those, uses it only if its digest is the signed one, and otherwise fetches it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from fedmqtt.codecs import Codec, decode_params, encode_params
from fedmqtt.models.dense import init_params
from fedmqtt.models.spec import ModelSpec
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


def encode_model(
    layout: Layout, flat: F32, codec: Codec, *, seed: int, version: int
) -> tuple[dict[str, Any], F32]:
    """The full model ``flat`` of ``version`` as published (wire maps in ``codec``) and, flat,
    exactly what every receiver decodes from them.

    Deterministic: stochastic rounding (int8) draws from a generator seeded with the model seed
    and the version, so a version republished after a restart is the same bytes."""
    rng = np.random.default_rng([seed, version])
    encoded = encode_params(layout.unflatten(flat, copy=False), codec, rng=rng)
    return encoded, decode_params(encoded, layout)


def genesis(spec: ModelSpec, seed: int, codec: str) -> F32:
    """Version 0 as a device decodes it from the published model: the initial parameters of
    ``spec`` from the model seed, through the downlink ``codec`` (raises for a codec
    this build does not know: fedmqtt.errors.ConfigError)."""
    layout = spec.layout()
    flat = layout.flatten(init_params(spec, np.random.default_rng(seed)))
    return encode_model(layout, flat, Codec.parse(codec), seed=seed, version=0)[1]
