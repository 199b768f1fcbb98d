"""The int4 codec: 15 levels per tensor, two codes per byte.

Unbiased stochastic rounding, an error below one step (max|x| / 7), the documented nibble
order and padding, round trips through msgpack, zlib, parameter maps and the aggregator's
norm path, error feedback, and a decoder that refuses every malformed packing (wrong length,
code -8, non-zero padding, bad scales, zlib bombs) with a DecodeError only and no large
allocation.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_codecs import roundtrip, wire
from test_codecs_hostile import MB, check, peak_bytes, rejects

from fedmqtt.codecs import (
    DEFAULT_LIMITS,
    Codec,
    ErrorFeedback,
    _decode_checked,
    decode_params,
    decode_params_norm,
    decode_tensor,
    encode_params,
    encode_tensor,
)
from fedmqtt.errors import CODEC, NONFINITE, SCHEMA, SIZE, ConfigError, DecodeError
from fedmqtt.params import Layout

F32_MAX = float(np.finfo(np.float32).max)
INT4 = Codec("int4")


def packed(codes: list[int]) -> bytes:
    """Codes -7..7 packed as documented: element 2j low nibble of byte j, 2j+1 high."""
    nib = [c & 0x0F for c in codes] + [0] * (len(codes) % 2)
    return bytes(lo | hi << 4 for lo, hi in zip(nib[0::2], nib[1::2], strict=True))


# ------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [("int4", Codec("int4")), ("int4+zlib", Codec("int4", zlib=True)), (" INT4 ", INT4)],
)
def test_parse(text: str, expected: Codec) -> None:
    assert Codec.parse(text) == expected
    assert Codec.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["int4:1", "int4+gzip", "int3"])
def test_parse_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        Codec.parse(text)


# ------------------------------------------------- the math (error bound, bias: test_codecs)


def test_wire_layout_is_the_documented_one() -> None:
    # max|x| = 7 gives scale 1 and integer x / scale: the codes are exactly x.
    x = np.array([1, -1, 7, -7, 0], np.float32)
    msg = encode_tensor(x, INT4, rng=np.random.default_rng(0))
    assert msg["q"] == 1.0 and set(msg) == {"c", "s", "d", "q"}
    assert msg["d"] == bytes([0xF1, 0x97, 0x00]) == packed([1, -1, 7, -7, 0])
    handmade = {"c": "int4", "s": [5], "q": 0.5, "d": bytes([0xF1, 0x97, 0x00])}
    np.testing.assert_array_equal(decode_tensor(handmade), x * 0.5)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 650, 20_001])
def test_round_trips_plain_and_zlib(n: int) -> None:
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    y, msg = roundtrip(x, "int4", seed=3)
    z, zmsg = roundtrip(x, "int4+zlib", seed=3)  # same rng draws: same codes
    np.testing.assert_array_equal(y, z)
    assert zmsg["z"] is True and zlib.decompress(zmsg["d"]) == msg["d"]
    again = encode_tensor(y, INT4, rng=np.random.default_rng(9))
    # a decoded tensor re-encodes to itself: its values are exact multiples of its scale
    np.testing.assert_array_equal(decode_tensor(again), y)


def test_all_zero_scalar_and_extreme_tensors() -> None:
    y, msg = roundtrip(np.zeros((3, 4), np.float32), "int4")
    assert msg["q"] == 0.0 and np.all(y == 0.0)
    y, msg = roundtrip(np.array(2.5, np.float32), "int4")
    assert y.shape == () and abs(float(y) - 2.5) < msg["q"]
    tiny = np.finfo(np.float32).smallest_subnormal
    for x in (np.array([F32_MAX, -F32_MAX, 1.0], np.float32), np.array([tiny, -tiny, 0])):
        y, msg = roundtrip(x.astype(np.float32), "int4")
        assert np.all(np.isfinite(y))
        assert np.all(np.abs(y.astype(np.float64) - x) <= msg["q"] * (1 + 2.0**-15))


LAYOUTS = {
    "small": Layout.from_shapes({"W": (64, 10), "b": (10,), "odd": (3, 3)}),
    "large": Layout.from_shapes({"W": (3000, 4), "b": (5,), "odd": (3, 3)}),
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("text", ["int4", "int4+zlib"])
def test_params_and_norm_path(layout: Layout, text: str) -> None:
    rng = np.random.default_rng(2)
    shapes = zip(layout.names, layout.shapes, strict=True)
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes}
    enc = wire(encode_params(params, Codec.parse(text), rng=rng))
    flat = decode_params(enc, layout)
    for name, (lo, hi) in layout.offsets().items():
        scale = enc[name]["q"]
        assert np.all(np.abs(flat[lo:hi] - params[name].reshape(-1)) <= scale * (1 + 2**-15))
    # The aggregator's path: same vector, its norm, and int4 tensors are never left unscaled.
    scales = np.full(len(layout.names), -1.0, np.float32)
    same, norm = decode_params_norm(enc, layout, scales=scales)
    np.testing.assert_array_equal(same, flat)
    np.testing.assert_array_equal(scales, 1.0)
    assert norm == pytest.approx(float(np.linalg.norm(flat.astype(np.float64))), rel=1e-5)


def test_error_feedback_keeps_what_was_not_sent() -> None:
    rng = np.random.default_rng(4)
    feedback = ErrorFeedback()
    true_sum = np.zeros(300)
    sent_sum = np.zeros(300)
    for _ in range(40):
        x = rng.standard_normal(300).astype(np.float32)
        y = decode_tensor(encode_tensor(x, INT4, rng=rng, name="w", feedback=feedback))
        true_sum += x
        sent_sum += y
        np.testing.assert_allclose(true_sum - sent_sum, feedback.residual["w"], atol=1e-4)
    # the residual stays below one step of the last tensor, it does not accumulate
    assert float(np.max(np.abs(feedback.residual["w"]))) < 1.0


# --------------------------------------------------------------------- malformed packings


def _t(n: int, d: bytes, q: Any = 1.0, **extra: Any) -> dict[str, Any]:
    return {"c": "int4", "s": [n], "d": d, "q": q, **extra}


MINUS8_DEEP = bytearray(packed([1] * 600_000))
MINUS8_DEEP[299_999] = 0x81  # beyond the first 2**18-byte block the decoder checks

BAD: list[tuple[str, Any, str]] = [
    ("short", _t(3, b"\x11"), CODEC),
    ("long", _t(3, b"\x11\x01\x00"), CODEC),
    ("even n, one byte more", _t(2, b"\x11\x00"), CODEC),
    ("empty with a byte", _t(0, b"\x00"), CODEC),
    ("code -8 low nibble", _t(2, b"\x18"), CODEC),
    ("code -8 high nibble", _t(2, b"\x81"), CODEC),
    ("code -8 in the last byte", _t(5, packed([1, 2, 3, 4]) + b"\x08"), CODEC),
    ("code -8 deep in a large tensor", _t(600_000, bytes(MINUS8_DEEP)), CODEC),
    ("padding nibble set", _t(3, b"\x11\x11"), CODEC),
    ("padding nibble 0x8", _t(1, b"\x81"), CODEC),
    ("padding set on a scalar", {"c": "int4", "s": [], "d": b"\x71", "q": 1.0}, CODEC),
    ("missing scale", {"c": "int4", "s": [2], "d": b"\x11"}, SCHEMA),
    ("topk field", _t(2, b"\x11", k=1), CODEC),
    ("scale nan", _t(2, b"\x11", float("nan")), NONFINITE),
    ("scale inf", _t(2, b"\x11", float("inf")), NONFINITE),
    ("scale overflows", _t(2, b"\x77", F32_MAX / 4), NONFINITE),
    ("scale bigint", _t(2, b"\x11", 2**200), NONFINITE),
    ("scale negative", _t(2, b"\x11", -1.0), CODEC),
    ("scale text", _t(2, b"\x11", "1"), SCHEMA),
    ("scale bool", _t(2, b"\x11", True), SCHEMA),
    ("data text", _t(2, "\x11"), SCHEMA),  # type: ignore[arg-type]
    ("zlib short", _t(4, zlib.compress(b"\x11"), z=True), CODEC),
    ("zlib long", _t(4, zlib.compress(b"\x11" * 3), z=True), SIZE),
    ("zlib bomb", _t(1000, zlib.compress(bytes(5_000_000)), z=True), SIZE),
    ("zlib code -8", _t(2, zlib.compress(b"\x80"), z=True), CODEC),
    ("huge declared", _t(10**9, b""), SIZE),
]  # fmt: skip


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(("label", "obj", "reason"), BAD, ids=[b[0] for b in BAD])
def test_malformed_is_refused(label: str, obj: Any, reason: str) -> None:
    rejects(obj, reason)
    if obj["s"] != [600_000]:  # the large valid-sized one allocates its declared output
        assert peak_bytes(lambda: decode_tensor(obj)) < MB
    with pytest.raises(DecodeError) as err:  # the aggregator's path refuses the same way
        _decode_checked(obj, DEFAULT_LIMITS, None, None, want_sq=True)
    assert err.value.reason == reason


def test_largest_legal_scale_and_code_decode_finite() -> None:
    y = decode_tensor(_t(2, packed([7, -7]), F32_MAX / 8))
    assert np.all(np.isfinite(y)) and float(y[0]) == pytest.approx(7 * F32_MAX / 8)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(["int4", "int4+zlib"]),
    st.integers(0, 9),
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 255)), min_size=1, max_size=3),
    st.integers(-2, 2),
)
@pytest.mark.filterwarnings("error")
def test_mutated_int4_maps(text: str, n: int, flips: list[tuple[int, int]], cut: int) -> None:
    """A real encoding with bytes changed, cut or added: a valid tensor or a DecodeError."""
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    obj = encode_tensor(x, Codec.parse(text), rng=np.random.default_rng(0))
    data = bytearray(obj["d"])
    for at, value in flips:
        if data:
            data[at % len(data)] = value
    obj["d"] = bytes(data[: len(data) + cut] if cut < 0 else data + bytes(cut))
    err = check(obj)
    if err is None:  # accepted: every code is legal and, if n is odd, the padding is zero
        raw = zlib.decompress(obj["d"]) if obj.get("z") else obj["d"]
        assert len(raw) == (n + 1) // 2
        assert all(b & 0x0F != 8 and b >> 4 != 8 for b in raw)
        assert n % 2 == 0 or raw[-1] >> 4 == 0
