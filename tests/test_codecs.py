"""Tensor codecs: round trips with their stated error bounds, error feedback, config parsing."""

from __future__ import annotations

import math
import zlib
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmqtt.codecs import (
    DEFAULT_LIMITS,
    Codec,
    ErrorFeedback,
    Limits,
    _varint_gaps,
    _varint_indices,
    decode_params,
    decode_params_norm,
    decode_tensor,
    defers_int8_scales,
    encode_params,
    encode_tensor,
    topk_count,
    varint_bound,
)
from fedmqtt.errors import NONFINITE, SHAPE, ConfigError, DecodeError
from fedmqtt.params import F32, Layout

SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)
FINITE32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
FP16_RANGE = st.floats(-65504.0, 65504.0, width=32)
ALL_CODECS = ["raw", "fp16", "int8", "topk:0.01", "topk:0.3", "topk:1"]


def wire(msg: dict[str, Any]) -> Any:
    """What the aggregator sees: the map after a msgpack round trip."""
    return msgpack.unpackb(msgpack.packb(msg, use_bin_type=True), raw=False)


def reference_indices(g: bytes) -> np.ndarray[Any, Any]:
    """The indices of a "g" field, read byte by byte as the module docstring defines it."""
    out: list[int] = []
    value = shift = 0
    for byte in g:
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            out.append(value if not out else out[-1] + 1 + value)
            value = shift = 0
    assert shift == 0, "truncated varint"
    return np.array(out, dtype=np.int64)


def roundtrip(x: F32, text: str, seed: int = 0) -> tuple[F32, dict[str, Any]]:
    msg = encode_tensor(x, Codec.parse(text), rng=np.random.default_rng(seed))
    return decode_tensor(wire(msg)), msg


# ------------------------------------------------------------------------------ Codec.parse


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("raw", Codec("raw")),
        ("fp16", Codec("fp16")),
        ("int8", Codec("int8")),
        ("topk:0.01", Codec("topk", 0.01)),
        ("topk:1", Codec("topk", 1.0)),
        ("topk:.5", Codec("topk", 0.5)),
        ("topk:1e-3", Codec("topk", 0.001)),
        ("raw+zlib", Codec("raw", zlib=True)),
        ("int8+zlib", Codec("int8", zlib=True)),
        ("topk:0.01+zlib", Codec("topk", 0.01, zlib=True)),
        ("  INT8+ZLIB ", Codec("int8", zlib=True)),
        ("topk:0.01+int8", Codec("topk", 0.01, int8=True)),
        ("topk:0.01+int8+zlib", Codec("topk", 0.01, zlib=True, int8=True)),
        ("TOPK:.02+INT8+ZLIB", Codec("topk", 0.02, zlib=True, int8=True)),
    ],
)
def test_parse_good(text: str, expected: Codec) -> None:
    codec = Codec.parse(text)
    assert codec == expected
    assert Codec.parse(str(codec)) == codec


def test_str_is_canonical() -> None:
    assert str(Codec.parse("topk:1e-2+zlib")) == "topk:0.01+zlib"
    assert str(Codec.parse("fp16")) == "fp16"
    assert str(Codec("topk", 1)) == "topk:1.0"
    assert str(Codec.parse("topk:1e-2+int8+zlib")) == "topk:0.01+int8+zlib"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "zlib",
        "+zlib",
        "float32",
        "raw+gzip",
        "raw+zlib+zlib",
        "raw:0.5",
        "int8:1",
        "topk",
        "topk:",
        "topk:0",
        "topk:0.0",
        "topk:-0.1",
        "topk:1.5",
        "topk:nan",
        "topk:inf",
        "topk:1_0",
        "topk:0.1:0.2",
        "topk:abc",
        "int8+int8",
        "raw+int8",
        "int8+zlib+int8",
        "topk:0.1+int8+int8",
        "topk:0.1+zlib+int8",
        "topk:0.1+zlib+zlib",
        "topk:0.1+",
        "topk:0.1+fp16",
    ],
)
def test_parse_bad(text: str) -> None:
    with pytest.raises(ConfigError):
        Codec.parse(text)


def test_parse_errors_name_every_form() -> None:
    with pytest.raises(ConfigError, match=r"topk:F\+int8.*\+zlib"):
        Codec.parse("topk:0.1+int4")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "gzip"},
        {"name": "raw", "fraction": 0.5},
        {"name": "topk", "fraction": 0.0},
        {"name": "topk", "fraction": float("nan")},
        {"name": "topk", "fraction": True},
        {"name": "raw", "zlib": 1},
        {"name": "int8", "int8": True},
        {"name": "topk", "fraction": 0.1, "int8": 1},
    ],
)
def test_codec_constructor_validates(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Codec(**kwargs)


def test_parse_rejects_non_text() -> None:
    with pytest.raises(ConfigError):
        Codec.parse(3)  # type: ignore[arg-type]


@given(st.floats(min_value=0.0, max_value=1.0, exclude_min=True), st.booleans(), st.booleans())
def test_parse_str_roundtrip_any_fraction(fraction: float, zlib: bool, int8: bool) -> None:
    codec = Codec("topk", fraction, zlib=zlib, int8=int8)
    assert Codec.parse(str(codec)) == codec


def test_limits_validate() -> None:
    with pytest.raises(ConfigError):
        Limits(max_elements=-1)
    with pytest.raises(ConfigError):
        Limits(max_ndim=True)


# ------------------------------------------------------------------------------- round trips


@settings(max_examples=200)
@given(hnp.arrays(np.float32, SHAPES, elements=FINITE32), st.booleans())
def test_raw_is_bit_exact(x: F32, zlib: bool) -> None:
    y, _ = roundtrip(x, "raw+zlib" if zlib else "raw")
    assert y.dtype == np.float32
    assert y.shape == x.shape
    assert y.tobytes() == x.tobytes()


@settings(max_examples=200)
@given(hnp.arrays(np.float32, SHAPES, elements=FP16_RANGE))
def test_fp16_error_bound(x: F32) -> None:
    y, _ = roundtrip(x, "fp16")
    assert y.shape == x.shape and y.dtype == np.float32
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    ax = np.abs(x.astype(np.float64))
    normal = ax >= 2.0**-14
    # Round to nearest with an 11-bit significand: half an ulp, relative.
    assert np.all(err[normal] <= ax[normal] * 2.0**-11)
    assert np.all(err[~normal] <= 2.0**-25)


def test_fp16_clips_instead_of_overflowing() -> None:
    x = np.array([1e30, -1e30, 65519.0, 65520.0, -3.4e38, 1.0], dtype=np.float32)
    y, _ = roundtrip(x, "fp16")
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y, [65504, -65504, 65504, 65504, -65504, 1.0])


def test_fp16_decoder_matches_numpy_for_every_finite_bit_pattern() -> None:
    bits = np.arange(1 << 16, dtype=np.uint32).astype("<u2")
    halves = bits.view("<f2")
    finite = np.isfinite(halves)
    expected = halves[finite].astype(np.float32)
    data = bits[finite].tobytes()
    # All 63488 at once take the vectorised bit-manipulation path; small tensors take
    # numpy's cast. Both must be bit-exact, signed zeros and subnormals included.
    for start, stop in [(0, expected.size), (0, 1000), (31_000, 33_000)]:
        msg = {"c": "fp16", "s": [stop - start], "d": data[2 * start : 2 * stop]}
        assert decode_tensor(msg).tobytes() == expected[start:stop].tobytes()


@pytest.mark.parametrize("pattern", [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF])
@pytest.mark.parametrize("n", [3, 20_000])  # both decoding paths
def test_fp16_decoder_rejects_inf_and_nan(pattern: int, n: int) -> None:
    bits = np.full(n, 0x3C00, dtype="<u2")
    bits[n // 2] = pattern
    with pytest.raises(DecodeError) as err:
        decode_tensor({"c": "fp16", "s": [n], "d": bits.tobytes()})
    assert err.value.reason == NONFINITE


@pytest.mark.parametrize(("text", "top", "limit"), [("int8", 127, 128), ("int4", 7, 8)])
@settings(max_examples=300)
@given(hnp.arrays(np.float32, SHAPES, elements=FINITE32), st.integers(0, 2**32))
def test_int8_and_int4_error_at_most_one_scale(
    text: str, top: int, limit: int, x: F32, seed: int
) -> None:
    y, msg = roundtrip(x, text, seed)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.all(np.isfinite(y))
    scale = msg["q"]
    if x.size:
        cap = float(np.finfo(np.float32).max) / limit  # no code decodes to inf
        assert scale == pytest.approx(min(float(np.max(np.abs(x))) / top, cap), rel=1e-6)
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    assert np.all(err <= scale * (1.0 + 2.0**-15))
    if scale:  # codes within -top..top
        assert np.all(np.abs(y.astype(np.float64) / np.float32(scale)) <= top * (1 + 2.0**-15))


@pytest.mark.parametrize(("text", "top"), [("int8", 127), ("int4", 7)])
def test_int8_and_int4_are_unbiased(text: str, top: int) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(100).astype(np.float32)
    x[0] = 4.0  # scale = 4/top; other entries land at assorted fractions of a step
    draws = 4000
    total = np.zeros(x.size)
    for _ in range(draws):
        total += decode_tensor(encode_tensor(x, Codec.parse(text), rng=rng))
    mean_err = total / draws - x.astype(np.float64)
    scale = 4.0 / top
    # Per-element error variance <= scale^2/4, so the mean of `draws` draws has standard
    # deviation <= scale / (2 sqrt(draws)); deterministic rounding would be off by up to
    # scale / 2 on most elements.
    sigma = scale / (2.0 * math.sqrt(draws))
    assert np.max(np.abs(mean_err)) < 5.0 * sigma
    assert abs(float(np.mean(mean_err))) < 5.0 * sigma / math.sqrt(x.size)


def test_int8_all_zero_tensor_has_zero_scale() -> None:
    x = np.zeros((3, 4), dtype=np.float32)
    y, msg = roundtrip(x, "int8")
    assert msg["q"] == 0.0
    assert np.all(y == 0.0)


def test_int8_extreme_magnitudes_stay_finite() -> None:
    big = np.float32(np.finfo(np.float32).max)
    tiny = np.finfo(np.float32).smallest_subnormal
    for x in (np.array([big, -big, 1.0], np.float32), np.array([tiny, -tiny, 0], np.float32)):
        y, msg = roundtrip(x, "int8")
        assert np.all(np.isfinite(y))
        assert np.all(np.abs(y.astype(np.float64) - x) <= msg["q"] * (1 + 2.0**-15))


@settings(max_examples=200)
@given(
    hnp.arrays(np.float32, SHAPES, elements=FINITE32),
    st.floats(min_value=0.001, max_value=1.0),
)
def test_topk_exact_on_kept_and_zero_elsewhere(x: F32, fraction: float) -> None:
    y, msg = roundtrip(x, str(Codec("topk", fraction)))
    assert y.shape == x.shape and y.dtype == np.float32
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    kept = reference_indices(msg["g"])
    k = topk_count(x.size, fraction)
    assert kept.size == msg["k"] == k
    assert np.all(np.diff(kept) > 0)
    np.testing.assert_array_equal(flat_y[kept], flat_x[kept])
    dropped = np.ones(x.size, bool)
    dropped[kept] = False
    assert np.all(flat_y[dropped] == 0.0)
    if kept.size and dropped.any():  # kept entries are the largest magnitudes
        assert np.min(np.abs(flat_x[kept])) >= np.max(np.abs(flat_x[dropped]))


# Gaps at every varint length boundary: 1 byte below 2**7, 2 below 2**14, ... 5 up to 2**32 - 1.
BOUNDARY_GAPS = [0, 1, 127, 128, 2**14 - 1, 2**14, 2**21 - 1, 2**21, 2**28 - 1, 2**28]
BOUNDARY_BYTES = [1, 1, 1, 2, 2, 3, 3, 4, 4, 5]


@pytest.mark.parametrize(("gap", "size"), list(zip(BOUNDARY_GAPS, BOUNDARY_BYTES, strict=True)))
def test_gap_coding_at_every_varint_length(gap: int, size: int) -> None:
    idx = np.array([gap, gap + 1, 2 * gap + 2], dtype=np.int64)  # gaps: gap, 0, gap
    g = _varint_gaps(idx)
    assert len(g) == 2 * size + 1
    np.testing.assert_array_equal(reference_indices(g), idx)
    np.testing.assert_array_equal(_varint_indices(g, 3, 2 * gap + 3), idx)


def test_gap_coding_of_the_largest_index() -> None:
    idx = np.array([2**32 - 1], dtype=np.int64)
    g = _varint_gaps(idx)
    assert g == b"\xff\xff\xff\xff\x0f"
    assert _varint_indices(g, 1, 2**32).tolist() == [2**32 - 1]


@settings(max_examples=80)
@given(st.integers(1, 300_000), st.data())
def test_gap_coding_roundtrips_any_index_set(n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, min(n, 400)))
    idx = np.sort(data.draw(st.sets(st.integers(0, n - 1), min_size=k, max_size=k).map(list)))
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    g = _varint_gaps(idx)
    assert k <= len(g) <= varint_bound(k, n)  # the bound the decoder checks first
    np.testing.assert_array_equal(reference_indices(g), idx)
    np.testing.assert_array_equal(_varint_indices(g, k, n), idx)


@settings(max_examples=200)
@given(
    hnp.arrays(np.float32, SHAPES, elements=FINITE32),
    st.floats(min_value=0.001, max_value=1.0),
    st.integers(0, 2**32),
)
def test_topk_int8_keeps_the_same_entries_within_one_scale(
    x: F32, fraction: float, seed: int
) -> None:
    y, msg = roundtrip(x, str(Codec("topk", fraction, int8=True)), seed)
    _, exact = roundtrip(x, str(Codec("topk", fraction)), seed)
    assert y.shape == x.shape and y.dtype == np.float32 and np.all(np.isfinite(y))
    assert msg["g"] == exact["g"] and msg["k"] == exact["k"]  # the same entries as topk:F
    assert len(msg["d"]) == msg["k"]  # one byte per kept value
    kept = reference_indices(msg["g"])
    flat_x, flat_y = x.reshape(-1).astype(np.float64), y.reshape(-1).astype(np.float64)
    scale = msg["q"]
    if kept.size:
        cap = float(np.finfo(np.float32).max) / 128.0
        biggest = float(np.max(np.abs(flat_x[kept])))
        assert scale == pytest.approx(min(biggest / 127.0, cap), rel=1e-6)
    assert np.all(np.abs(flat_y[kept] - flat_x[kept]) <= scale * (1.0 + 2.0**-15))
    dropped = np.ones(x.size, bool)
    dropped[kept] = False
    assert np.all(flat_y[dropped] == 0.0)


def test_topk_int8_is_unbiased_on_the_kept_entries() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(200).astype(np.float32)
    x[0] = 4.0  # kept, and sets the scale: 4/127
    codec = Codec.parse("topk:0.5+int8")
    kept = reference_indices(encode_tensor(x, codec, rng=rng)["g"])
    draws = 4000
    total = np.zeros(x.size)
    for _ in range(draws):
        msg = encode_tensor(x, codec, rng=rng)
        assert reference_indices(msg["g"]).tolist() == kept.tolist()
        total += decode_tensor(msg)
    mean_err = total[kept] / draws - x[kept].astype(np.float64)
    sigma = (4.0 / 127.0) / (2.0 * math.sqrt(draws))  # as in test_int8_is_unbiased
    assert np.max(np.abs(mean_err)) < 5.0 * sigma
    assert abs(float(np.mean(mean_err))) < 5.0 * sigma / math.sqrt(kept.size)


@pytest.mark.parametrize("text", ["topk:0.2", "topk:0.2+zlib", "topk:0.2+int8+zlib"])
def test_the_u4_index_form_still_decodes(text: str) -> None:
    """Devices of earlier releases send "<u4" indices in "i": the decoder still takes them."""
    x = np.random.default_rng(5).standard_normal((30, 7)).astype(np.float32)
    msg = encode_tensor(x, Codec.parse(text), rng=np.random.default_rng(0))
    idx = reference_indices(zlib.decompress(msg["g"]) if "z" in msg else msg["g"])
    old = {key: value for key, value in msg.items() if key != "g"}
    old["i"] = idx.astype("<u4").tobytes()
    if "z" in msg:
        old["i"] = zlib.compress(old["i"])
    assert decode_tensor(wire(old)).tobytes() == decode_tensor(wire(msg)).tobytes()


def test_compact_topk_of_an_mlp_sized_tensor() -> None:
    """1 % of 99,985 values: about 1.3 bytes per index instead of 4, 1 per value instead of 4."""
    x = np.random.default_rng(0).standard_normal(99_985).astype(np.float32)
    msg = encode_tensor(x, Codec.parse("topk:0.01+int8"), rng=np.random.default_rng(0))
    assert msg["k"] == 1000 and len(msg["d"]) == 1000
    assert len(msg["g"]) < 1400  # gaps average ~100: one or two bytes each
    y = decode_tensor(wire(msg))
    assert np.count_nonzero(y) <= 1000


@pytest.mark.parametrize(
    ("n", "fraction", "k"),
    [(100, 0.01, 1), (300, 0.01, 3), (1000, 0.01, 10), (1001, 0.01, 11), (50, 0.01, 1),
     (7, 1.0, 7), (0, 0.5, 0), (10, 0.25, 3), (3, 0.999, 3),
     (100, 0.07, 7), (10_000, 0.07, 700)],  # 0.07 * 100 == 7.000000000000001 in binary
)  # fmt: skip
def test_topk_count(n: int, fraction: float, k: int) -> None:
    assert topk_count(n, fraction) == k


@pytest.mark.parametrize("text", ["raw", "fp16", "int8", "topk:0.05", "topk:0.05+int8"])
def test_zlib_variant_decodes_to_the_same_tensor(text: str) -> None:
    x = (np.random.default_rng(3).standard_normal((40, 25)) * 0.1).astype(np.float32)
    x[::3] = 0.0  # something zlib can actually shrink
    plain, plain_msg = roundtrip(x, text, seed=7)
    packed, packed_msg = roundtrip(x, text + "+zlib", seed=7)
    assert packed.tobytes() == plain.tobytes()
    assert packed_msg["z"] is True and "z" not in plain_msg
    if not text.startswith("topk"):  # 50 gap-coded indices and values leave zlib nothing
        assert len(msgpack.packb(packed_msg)) < len(msgpack.packb(plain_msg))


@pytest.mark.parametrize(
    "text", ["raw", "fp16", "int8", "topk:0.1", "int8+zlib", "topk:0.1+int8", "topk:0.1+int8+zlib"]
)
def test_wire_map_has_only_documented_keys(text: str) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    msg = encode_tensor(x, Codec.parse(text), rng=np.random.default_rng(0))
    keys = {"c", "s", "d"} | {"int8": {"q"}, "topk": {"k", "g"}}.get(msg["c"], set())
    keys |= {"q"} if "+int8" in text else set()
    assert set(msg) == keys | ({"z"} if "zlib" in text else set())
    assert msg["s"] == [3, 4] and all(type(d) is int for d in msg["s"])


def test_scalar_and_empty_tensors() -> None:
    for text in ALL_CODECS:
        for x in (np.array(2.5, np.float32), np.zeros((0, 3), np.float32)):
            y, _ = roundtrip(x, text)
            assert y.shape == x.shape
            if x.size:
                assert float(y) == pytest.approx(2.5, abs=2.5 / 127)


def test_encode_rejects_bad_input() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError):
        encode_tensor(np.zeros(3), Codec("raw"), rng=rng)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        encode_tensor(np.array([1, np.nan], np.float32), Codec("int8"), rng=rng)
    feedback = ErrorFeedback({"w": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        encode_tensor(np.zeros(3, np.float32), Codec("topk", 0.5), rng=rng, name="w",
                      feedback=feedback)  # fmt: skip


def test_encode_accepts_non_contiguous_input() -> None:
    x = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    y, _ = roundtrip(x, "raw")
    np.testing.assert_array_equal(y, x)


# --------------------------------------------------------------------------- decode into out


def test_decode_writes_into_out_without_copy() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    flat = np.full(10, -1.0, dtype=np.float32)
    for text in ALL_CODECS:
        msg = wire(encode_tensor(x, Codec.parse(text), rng=np.random.default_rng(0)))
        y = decode_tensor(msg, out=flat[2:8], expected_shape=(2, 3))
        assert y.shape == (2, 3) and np.shares_memory(y, flat)
        assert flat[0] == flat[1] == flat[8] == flat[9] == -1.0


def test_decode_out_size_must_match_declared_shape() -> None:
    msg = encode_tensor(np.ones(5, np.float32), Codec("raw"), rng=np.random.default_rng(0))
    with pytest.raises(DecodeError) as err:
        decode_tensor(msg, out=np.empty(4, np.float32))
    assert err.value.reason == SHAPE
    with pytest.raises(DecodeError) as err:
        decode_tensor(msg, expected_shape=(5, 1))
    assert err.value.reason == SHAPE


@pytest.mark.parametrize(
    "out",
    [np.empty(5, np.float64), np.empty((5, 1), np.float32), np.empty(10, np.float32)[::2]],
)
def test_decode_out_of_wrong_kind_is_a_caller_error(out: Any) -> None:
    msg = encode_tensor(np.ones(5, np.float32), Codec("raw"), rng=np.random.default_rng(0))
    with pytest.raises(ValueError):
        decode_tensor(msg, out=out)


@pytest.mark.parametrize("n", [3, 100_000])
def test_huge_finite_values_are_accepted(n: int) -> None:
    # The fast finiteness check of large tensors squares values; 1e30**2 overflows, which
    # must not reject.
    x = np.full(n, 0.5, dtype=np.float32)
    x[:2] = [1e30, -3e38]
    for text in ("raw", "topk:1"):
        y, _ = roundtrip(x, text)
        np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 777, 299_999])
def test_nonfinite_rejected_anywhere(bad: float, where: int) -> None:
    x = np.ones(300_000, np.float32)  # larger than one finiteness-check block
    x[where] = bad
    for msg in (
        {"c": "raw", "s": [x.size], "d": x.tobytes()},
        {"c": "topk", "s": [x.size], "k": 1, "i": np.array([where], "<u4").tobytes(),
         "d": x[where : where + 1].tobytes()},
    ):  # fmt: skip
        with pytest.raises(DecodeError) as err:
            decode_tensor(msg)
        assert err.value.reason == NONFINITE


# ---------------------------------------------------------------------------- decode_params

LAYOUT = Layout.from_shapes({"W0": (4, 3), "b0": (3,), "W1": (3, 2), "b1": (2,)})


def make_params(seed: int = 0) -> dict[str, F32]:
    rng = np.random.default_rng(seed)
    shapes = zip(LAYOUT.names, LAYOUT.shapes, strict=True)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes}


@pytest.mark.parametrize("text", ALL_CODECS)
def test_params_roundtrip_in_layout_order(text: str) -> None:
    params = make_params()
    enc = encode_params(params, Codec.parse(text), rng=np.random.default_rng(0))
    shuffled = {name: enc[name] for name in reversed(LAYOUT.names)}  # order must not matter
    flat = decode_params(wire(shuffled), LAYOUT)
    assert flat.shape == (LAYOUT.size,) and flat.dtype == np.float32
    one_by_one = [decode_tensor(enc[name]).reshape(-1) for name in LAYOUT.names]
    np.testing.assert_array_equal(flat, np.concatenate(one_by_one))
    if text == "raw":
        np.testing.assert_array_equal(flat, LAYOUT.flatten(params))


def test_params_into_out() -> None:
    enc = encode_params(make_params(), Codec("raw"), rng=np.random.default_rng(0))
    out = np.empty(LAYOUT.size, np.float32)
    assert decode_params(enc, LAYOUT, out=out) is out
    np.testing.assert_array_equal(out, LAYOUT.flatten(make_params()))
    with pytest.raises(ValueError):
        decode_params(enc, LAYOUT, out=np.empty(LAYOUT.size + 1, np.float32))


def _mutations() -> list[tuple[str, Any]]:
    enc = encode_params(make_params(), Codec("int8"), rng=np.random.default_rng(0))
    other = encode_params(
        {"W0": np.zeros((3, 4), np.float32), "b0": np.zeros(3, np.float32)},
        Codec("int8"),
        rng=np.random.default_rng(0),
    )
    missing = dict(enc)
    del missing["b1"]
    extra = {**enc, "W2": enc["b1"]}
    renamed = {("w0" if k == "W0" else k): v for k, v in enc.items()}
    transposed = {**enc, "W0": other["W0"]}
    non_str: dict[Any, Any] = {**missing, 5: enc["b1"]}
    return [("missing", missing), ("extra", extra), ("renamed", renamed),
            ("transposed", transposed), ("non-str key", non_str), ("empty", {})]  # fmt: skip


@pytest.mark.parametrize(("label", "obj"), _mutations())
def test_params_wrong_names_or_shapes_are_shape_errors(label: str, obj: Any) -> None:
    with pytest.raises(DecodeError) as err:
        decode_params(obj, LAYOUT)
    assert err.value.reason == SHAPE, label


def test_params_not_a_map() -> None:
    with pytest.raises(DecodeError):
        decode_params([1, 2], LAYOUT)


# ----------------------------------------------------------------------- decode_params_norm

# W0 is above the decoder's small-tensor threshold (8192 elements), the others below it.
BIG_LAYOUT = Layout.from_shapes({"W0": (3000, 4), "b0": (4,), "W1": (4, 3), "b1": (3,)})
NORM_CODECS = [*ALL_CODECS, "raw+zlib", "fp16+zlib", "int8+zlib", "topk:0.3+zlib", "topk:0.3+int8"]


def _params(layout: Layout, seed: int = 0) -> dict[str, F32]:
    rng = np.random.default_rng(seed)
    shapes = zip(layout.names, layout.shapes, strict=True)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes}


@pytest.mark.parametrize("layout", [LAYOUT, BIG_LAYOUT], ids=["small", "large"])
@pytest.mark.parametrize("text", NORM_CODECS)
def test_norm_is_that_of_the_decoded_vector(layout: Layout, text: str) -> None:
    enc = wire(encode_params(_params(layout), Codec.parse(text), rng=np.random.default_rng(1)))
    out = np.empty(layout.size, np.float32)
    flat, norm = decode_params_norm(enc, layout, out=out)
    assert flat is out
    np.testing.assert_array_equal(flat, decode_params(enc, layout))
    assert norm == pytest.approx(float(np.linalg.norm(flat.astype(np.float64))), rel=1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # small models: float32 dot first
@pytest.mark.parametrize("layout", [LAYOUT, BIG_LAYOUT], ids=["small", "large"])
@pytest.mark.parametrize("text", ["raw", "int8", "int4", "topk:1", "raw+zlib"])
def test_norm_of_huge_finite_values_is_finite(layout: Layout, text: str) -> None:
    # Squares of these overflow float32; the norm must still be the float64 one, not inf.
    params = _params(layout)
    params["W0"].reshape(-1)[:3] = [1e30, -3e38, 2e19]
    enc = wire(encode_params(params, Codec.parse(text), rng=np.random.default_rng(1)))
    flat, norm = decode_params_norm(enc, layout)
    assert math.isfinite(norm)
    assert norm == pytest.approx(float(np.linalg.norm(flat.astype(np.float64))), rel=1e-6)


@pytest.mark.parametrize("layout", [LAYOUT, BIG_LAYOUT], ids=["small", "large"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_norm_path_rejects_nonfinite(layout: Layout, bad: float) -> None:
    params = _params(layout)
    params["W0"].reshape(-1)[-1] = bad
    enc = {
        name: {"c": "raw", "s": list(p.shape), "d": p.astype("<f4").tobytes()}
        for name, p in params.items()
    }
    with pytest.raises(DecodeError) as err:
        decode_params_norm(enc, layout)
    assert err.value.reason == NONFINITE and "'W0'" in err.value.detail


@pytest.mark.parametrize("layout", [LAYOUT, BIG_LAYOUT], ids=["small", "large"])
@pytest.mark.parametrize(
    "text", ["int8", "int8+zlib", "raw", "fp16", "topk:0.3", "topk:0.3+int8+zlib"]
)
def test_deferred_scales_give_the_same_vector_and_norm(layout: Layout, text: str) -> None:
    enc = wire(encode_params(_params(layout), Codec.parse(text), rng=np.random.default_rng(1)))
    full, full_norm = decode_params_norm(enc, layout)
    out = np.empty(layout.size, np.float32)
    scales = np.full(len(layout.names), -1.0, np.float32)  # every entry must be written
    flat, norm = decode_params_norm(enc, layout, out=out, scales=scales)
    sizes = [b - a for a, b in layout.offsets().values()]
    deferred = defers_int8_scales(layout) and text.startswith("int8")
    assert deferred == (layout is BIG_LAYOUT and text.startswith("int8"))
    if deferred:
        assert (scales > 0).all() and (scales != 1.0).all()
        # codes are left in the row: small integers, exactly
        np.testing.assert_array_equal(flat, np.round(flat))
        assert np.abs(flat).max() <= 128
    else:
        np.testing.assert_array_equal(scales, 1.0)
    np.testing.assert_allclose(flat * np.repeat(scales, sizes), full, rtol=1e-6, atol=0)
    assert norm == pytest.approx(full_norm, rel=1e-5)


def test_deferred_scales_need_one_entry_per_tensor() -> None:
    enc = wire(
        encode_params(_params(BIG_LAYOUT), Codec.parse("int8"), rng=np.random.default_rng(1))
    )
    with pytest.raises(ValueError, match="scales has 3 entries"):
        decode_params_norm(enc, BIG_LAYOUT, scales=np.ones(3, np.float32))


# --------------------------------------------------------------------------- error feedback


def _run_rounds(
    codec: str, rounds: int, drift: float, feedback: ErrorFeedback | None, d: int = 1000
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], list[float], float]:
    """Send ``rounds`` random deltas; return (sum true, sum decoded, |r| per round, max|x|)."""
    rng = np.random.default_rng(11)
    mean = rng.standard_normal(d).astype(np.float32) * np.float32(drift)
    sum_true, sum_decoded = np.zeros(d), np.zeros(d)
    norms: list[float] = []
    max_norm = 0.0
    for _ in range(rounds):
        x = mean + rng.standard_normal(d).astype(np.float32)
        max_norm = max(max_norm, float(np.linalg.norm(x)))
        msg = encode_tensor(x, Codec.parse(codec), rng=rng, name="w", feedback=feedback)
        sum_true += x
        sum_decoded += decode_tensor(wire(msg))
        if feedback is not None:
            r = feedback.residual.get("w", np.zeros(d, np.float32))
            norms.append(float(np.linalg.norm(r)))
            # Nothing is lost, only delayed: the gap is exactly the pending residual.
            np.testing.assert_allclose(sum_true - sum_decoded, r, atol=1e-3)
    return sum_true, sum_decoded, norms, max_norm


def test_topk_error_feedback_zero_mean_deltas() -> None:
    feedback = ErrorFeedback()
    true, decoded, norms, max_x = _run_rounds("topk:0.01", 200, 0.0, feedback)
    gap_ef = float(np.linalg.norm(true - decoded))
    assert gap_ef == pytest.approx(norms[-1], rel=1e-4)
    # Bounded residual: with k/d = 1 % it stays below sqrt(d/k) max|x| (it sits near 4 max|x|),
    # while the no-feedback gap grows like sqrt(rounds) |x| (~14 |x| here).
    assert max(norms) <= math.sqrt(100) * max_x
    true2, decoded2, _, _ = _run_rounds("topk:0.01", 200, 0.0, None)
    gap_plain = float(np.linalg.norm(true2 - decoded2))
    assert gap_plain > 2.5 * gap_ef


def test_topk_error_feedback_drifting_deltas() -> None:
    # Deltas with a persistent direction, like real gradients: without feedback the dropped
    # 99 % accumulate linearly; with it the residual plateaus once every coordinate has had
    # its turn (about d/k = 100 rounds).
    feedback = ErrorFeedback()
    true, decoded, norms, _ = _run_rounds("topk:0.01", 1000, 1.0, feedback)
    gap_ef = float(np.linalg.norm(true - decoded))
    assert max(norms[500:]) <= 1.1 * max(norms[:500])
    true2, decoded2, _, _ = _run_rounds("topk:0.01", 1000, 1.0, None)
    gap_plain = float(np.linalg.norm(true2 - decoded2))
    assert gap_plain > 10 * gap_ef


@pytest.mark.parametrize(
    "codec", ["fp16", "int8", "int8+zlib", "topk:0.2", "topk:0.2+int8", "topk:0.2+int8+zlib"]
)
def test_feedback_identity_holds_for_every_lossy_codec(codec: str) -> None:
    feedback = ErrorFeedback()
    _run_rounds(codec, 30, 0.5, feedback, d=200)  # asserts sum gap == residual every round
    assert "w" in feedback.residual


def test_feedback_is_flushed_by_raw() -> None:
    rng = np.random.default_rng(0)
    feedback = ErrorFeedback()
    x = rng.standard_normal(50).astype(np.float32)
    first = decode_tensor(encode_tensor(x, Codec("topk", 0.1), rng=rng, name="w",
                                        feedback=feedback))  # fmt: skip
    second = decode_tensor(encode_tensor(np.zeros(50, np.float32), Codec("raw"), rng=rng,
                                         name="w", feedback=feedback))  # fmt: skip
    np.testing.assert_allclose(first + second, x, atol=1e-6)
    assert "w" not in feedback.residual


def test_feedback_persists_through_bytes() -> None:
    rng = np.random.default_rng(0)
    feedback = ErrorFeedback()
    encode_params(make_params(), Codec("topk", 0.2), rng=rng, feedback=feedback)
    assert set(feedback.residual) == set(LAYOUT.names)
    restored = ErrorFeedback.from_bytes(feedback.to_bytes())
    assert set(restored.residual) == set(feedback.residual)
    for name, r in feedback.residual.items():
        assert restored.residual[name].tobytes() == r.tobytes()
        assert restored.residual[name].shape == r.shape
    assert ErrorFeedback.from_bytes(ErrorFeedback().to_bytes()).residual == {}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"not msgpack at all",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 2, "r": {}}),
        msgpack.packb({"v": 1, "r": []}),
        msgpack.packb({"v": 1, "r": {"w": {"c": "int8", "s": [1], "d": b"\x01", "q": 1.0}}}),
        msgpack.packb({"v": 1, "r": {"w": {"c": "raw", "s": [2], "d": b"\x00" * 4}}}),
        msgpack.packb({"v": 1, "r": {"w": {"c": "raw", "s": [10**12], "d": b""}}}),
        msgpack.packb({"v": 1, "r": {"w": {"c": "raw", "s": [1],
                                           "d": np.float32(np.nan).tobytes()}}}),
        "text",
    ],
)  # fmt: skip
def test_feedback_from_garbage_is_a_decode_error(data: Any) -> None:
    with pytest.raises(DecodeError):
        ErrorFeedback.from_bytes(data)


def test_default_limits() -> None:
    assert Limits(50_000_000, 4, 256 * 1024 * 1024) == DEFAULT_LIMITS
