"""The tensor decoder against hostile input: only DecodeError, and no large allocations.

``decode_tensor`` runs on the aggregator for every update from any device, so whatever a
device sends must end in a decoded, finite tensor of the declared shape or in a DecodeError
with a precise reason; never another exception, and never memory beyond the declared size.
Warnings are errors here: hostile input must not spam the aggregator's log either.
"""

from __future__ import annotations

import contextlib
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmqtt.codecs import (
    DEFAULT_LIMITS,
    Codec,
    Limits,
    _decode_checked,
    decode_tensor,
    encode_tensor,
)
from fedmqtt.errors import CODEC, NONFINITE, SCHEMA, SHAPE, SIZE, DecodeError

pytestmark = pytest.mark.filterwarnings("error")

REASONS = {SCHEMA, CODEC, SIZE, NONFINITE, SHAPE}
MB = 1 << 20


def check(obj: Any, **kwargs: Any) -> DecodeError | None:
    """Decode ``obj``: either a valid tensor or a precise DecodeError (returned)."""
    try:
        y = decode_tensor(obj, **kwargs)
    except DecodeError as err:
        assert err.reason in REASONS
        # The decoder's last-resort net labels what its explicit checks missed; none may.
        assert not err.detail.startswith("unexpected"), err.detail
        return err
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    assert isinstance(obj, dict)
    assert list(y.shape) == list(obj["s"])
    assert bool(np.all(np.isfinite(y)))
    return None


def rejects(obj: Any, reason: str, **kwargs: Any) -> None:
    err = check(obj, **kwargs)
    assert err is not None, "accepted"
    assert err.reason == reason, err


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak traced allocation (Python and numpy) while ``fn`` runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        with contextlib.suppress(DecodeError):
            fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def valid(text: str, shape: tuple[int, ...] = (4, 5), seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    return encode_tensor(x, Codec.parse(text), rng=rng)


F32_NAN = np.float32(np.nan).tobytes()
SIGNALLING_NAN = np.array([0x7F800001], "<u4").tobytes()
U4 = "<u4"


def topk(indices: list[int], n: int, k: int | None = None, values: bytes | None = None) -> Any:
    return {
        "c": "topk",
        "s": [n],
        "k": len(indices) if k is None else k,
        "i": np.array(indices, U4).tobytes(),
        "d": values if values is not None else np.ones(len(indices), "<f4").tobytes(),
    }


def varints(*values: int) -> bytes:
    """Canonical unsigned LEB128 of each value, written out byte by byte."""
    out = bytearray()
    for value in values:
        rest = value
        while rest >= 0x80:
            out.append(rest & 0x7F | 0x80)
            rest >>= 7
        out.append(rest)
    return bytes(out)


def gtopk(gaps: bytes, n: int, k: int, values: bytes | None = None) -> Any:
    """A topk map with gap-coded indices "g" (given as bytes) and k float32 ones."""
    return {
        "c": "topk",
        "s": [n],
        "k": k,
        "g": gaps,
        "d": values if values is not None else np.ones(k, "<f4").tobytes(),
    }


BIG = 100_000  # a tensor whose index bound allows 5-byte varints (k + (n - k) // 128 >= 5)


# Each case: (label, input, expected reason). All are tiny; the point is the reason.
CASES: list[tuple[str, Any, str]] = [
    ("none", None, SCHEMA),
    ("list", [1, 2], SCHEMA),
    ("bytes", b"\x93\x01", SCHEMA),
    ("empty map", {}, SCHEMA),
    ("codec not text", {"c": 5, "s": [1], "d": b""}, SCHEMA),
    ("codec bytes", {"c": b"raw", "s": [1], "d": b"\0" * 4}, SCHEMA),
    ("unknown codec", {"c": "float64", "s": [1], "d": b"\0" * 8}, CODEC),
    ("unknown field", {"c": "raw", "s": [1], "d": b"\0" * 4, "x": 1}, SCHEMA),
    ("non-str field", {"c": "raw", "s": [1], "d": b"\0" * 4, 7: 1}, SCHEMA),
    ("foreign field", {"c": "raw", "s": [1], "d": b"\0" * 4, "q": 1.0}, CODEC),
    ("missing data", {"c": "raw", "s": [1]}, SCHEMA),
    ("missing shape", {"c": "raw", "d": b"\0" * 4}, SCHEMA),
    ("missing scale", {"c": "int8", "s": [1], "d": b"\0"}, SCHEMA),
    ("missing k", {"c": "topk", "s": [1], "d": b"", "i": b""}, SCHEMA),
    ("z not bool", {"c": "raw", "s": [1], "d": b"\0" * 4, "z": 1}, SCHEMA),
    ("z text", {"c": "raw", "s": [1], "d": b"\0" * 4, "z": "yes"}, SCHEMA),
    ("shape text", {"c": "raw", "s": "4", "d": b"\0" * 16}, SCHEMA),
    ("shape map", {"c": "raw", "s": {"0": 4}, "d": b"\0" * 16}, SCHEMA),
    ("shape of bool", {"c": "raw", "s": [True, 1], "d": b"\0" * 4}, SCHEMA),
    ("shape of float", {"c": "raw", "s": [4.0], "d": b"\0" * 16}, SCHEMA),
    ("negative dim", {"c": "raw", "s": [-1], "d": b""}, SCHEMA),
    ("negative pair", {"c": "raw", "s": [-2, -2], "d": b"\0" * 16}, SCHEMA),
    ("huge dim", {"c": "raw", "s": [10**12], "d": b""}, SIZE),
    ("u64 dim", {"c": "raw", "s": [2**64 - 1], "d": b""}, SIZE),
    ("bigint dim", {"c": "raw", "s": [10**100], "d": b""}, SIZE),
    ("huge dim times zero", {"c": "raw", "s": [0, 10**12], "d": b""}, SIZE),
    ("huge product", {"c": "int8", "s": [10**4] * 4, "d": b"", "q": 1.0}, SIZE),
    ("too many dims", {"c": "raw", "s": [1] * 5, "d": b"\0" * 4}, SIZE),
    ("1M dims", {"c": "raw", "s": [1] * 1_000_000, "d": b"\0" * 4}, SIZE),
    ("data text", {"c": "raw", "s": [1], "d": "abcd"}, SCHEMA),
    ("data list", {"c": "raw", "s": [1], "d": [0, 0, 0, 0]}, SCHEMA),
    ("data short", {"c": "raw", "s": [4], "d": b"\0" * 15}, CODEC),
    ("data long", {"c": "raw", "s": [4], "d": b"\0" * 17}, CODEC),
    ("fp16 odd", {"c": "fp16", "s": [2], "d": b"\0" * 3}, CODEC),
    ("int8 short", {"c": "int8", "s": [3], "d": b"\0\0", "q": 1.0}, CODEC),
    ("raw nan", {"c": "raw", "s": [1], "d": F32_NAN}, NONFINITE),
    ("raw signalling nan", {"c": "raw", "s": [1], "d": SIGNALLING_NAN}, NONFINITE),
    ("raw inf", {"c": "raw", "s": [2], "d": np.array([1, -np.inf], "<f4").tobytes()}, NONFINITE),
    ("fp16 inf", {"c": "fp16", "s": [1], "d": np.array([0x7C00], "<u2").tobytes()}, NONFINITE),
    ("fp16 signalling nan", {"c": "fp16", "s": [1], "d": b"\x00\x7d"}, NONFINITE),
    ("fp16 big signalling nan", {"c": "fp16", "s": [10**4],
                                 "d": b"\x00\x7d" * 10**4}, NONFINITE),
    ("raw big signalling nan", {"c": "raw", "s": [10**4], "d": SIGNALLING_NAN * 10**4},
     NONFINITE),
    ("scale nan", {"c": "int8", "s": [1], "d": b"\x01", "q": float("nan")}, NONFINITE),
    ("scale inf", {"c": "int8", "s": [1], "d": b"\x01", "q": float("inf")}, NONFINITE),
    ("scale overflows", {"c": "int8", "s": [1], "d": b"\x80", "q": 3e36}, NONFINITE),
    ("scale bigint", {"c": "int8", "s": [1], "d": b"\x01", "q": 2**200}, NONFINITE),
    ("scale -bigint", {"c": "int8", "s": [1], "d": b"\x01", "q": -(2**200)}, NONFINITE),
    ("scale negative", {"c": "int8", "s": [1], "d": b"\x01", "q": -0.5}, CODEC),
    ("scale text", {"c": "int8", "s": [1], "d": b"\x01", "q": "1"}, SCHEMA),
    ("scale bool", {"c": "int8", "s": [1], "d": b"\x01", "q": True}, SCHEMA),
    ("scale none", {"c": "int8", "s": [1], "d": b"\x01", "q": None}, SCHEMA),
    ("k bool", {**topk([0], 4), "k": True}, SCHEMA),
    ("k float", {**topk([0], 4), "k": 1.0}, SCHEMA),
    ("k negative", topk([], 4, k=-1), CODEC),
    ("k above n", topk([0, 1, 2, 3, 4], 4), CODEC),
    ("k huge", topk([0], 4, k=10**12), CODEC),
    ("k vs indices", topk([0, 1], 4, k=3), CODEC),
    ("k vs values", topk([0, 1], 4, values=np.ones(3, "<f4").tobytes()), CODEC),
    ("index out of range", topk([1, 4], 4), CODEC),
    ("index u32 max", topk([0, 2**32 - 1], 4), CODEC),
    ("index duplicate", topk([1, 1], 4), CODEC),
    ("index decreasing", topk([2, 1], 4), CODEC),
    ("indices odd bytes", {**topk([1], 4), "i": b"\0\0\0"}, CODEC),
    ("topk nan value", topk([1], 4, values=F32_NAN), NONFINITE),
    ("topk on 0 elements", topk([0], 0), CODEC),
    ("g and i", {**topk([1], 4), "g": varints(1)}, SCHEMA),
    ("neither g nor i", {"c": "topk", "s": [4], "k": 1, "d": b"\0" * 4}, SCHEMA),
    ("g text", gtopk("a", 4, 1), SCHEMA),  # type: ignore[arg-type]
    ("g fewer bytes than k", gtopk(varints(0), 4, 2), CODEC),
    ("g above its bound", gtopk(b"\x80\x01", 4, 1), CODEC),  # 2 bytes, bound 1 + 3 // 128
    ("g fewer varints", gtopk(b"\x81\x01", BIG, 2), CODEC),
    ("g more varints", gtopk(varints(1, 2, 3), BIG, 2), CODEC),
    ("g truncated varint", gtopk(b"\x01\x02\x81", BIG, 2), CODEC),
    ("g overlong varint", gtopk(b"\x81\x00", BIG, 1), CODEC),
    ("g overlong zero", gtopk(b"\x80\x80\x00", BIG, 1), CODEC),
    ("g six-byte varint", gtopk(b"\x81\x80\x80\x80\x80\x01\x01", BIG, 2), CODEC),
    ("g above u32", gtopk(b"\xff\xff\xff\xff\x1f", BIG, 1), CODEC),
    ("g u32 max", gtopk(varints(2**32 - 1), BIG, 1), CODEC),
    ("g index n", gtopk(varints(4), 4, 1), CODEC),
    ("g sum reaches n", gtopk(varints(2, 1), 4, 2), CODEC),  # indices 2 and 4
    ("g sum wraps u32", gtopk(varints(1, 2**32 - 1), BIG, 2), CODEC),  # 1, 2**32 + 1
    ("g k vs values", gtopk(varints(0, 0), 4, 2, values=b"\0" * 4), CODEC),
    ("g nan value", gtopk(varints(1), 4, 1, values=F32_NAN), NONFINITE),
    ("g zlib short", {**gtopk(zlib.compress(varints(1)), 4, 2), "z": True,
                      "d": zlib.compress(b"\0" * 8)}, CODEC),
    ("g zlib above bound", {**gtopk(zlib.compress(b"\x80\x01"), 4, 1), "z": True,
                            "d": zlib.compress(b"\0" * 4)}, SIZE),
    ("g zlib truncated varint", {**gtopk(zlib.compress(b"\x01\x81"), BIG, 2), "z": True,
                                 "d": zlib.compress(b"\0" * 8)}, CODEC),
    ("topk int8 values of f32 size", {**gtopk(varints(1), 4, 1), "q": 1.0}, CODEC),
    ("topk int8 scale nan", {**gtopk(varints(1), 4, 1, b"\x01"), "q": float("nan")}, NONFINITE),
    ("topk int8 scale overflows", {**gtopk(varints(1), 4, 1, b"\x80"), "q": 3e36}, NONFINITE),
    ("topk int8 scale negative", {**gtopk(varints(1), 4, 1, b"\x01"), "q": -1.0}, CODEC),
    ("topk int8 scale text", {**gtopk(varints(1), 4, 1, b"\x01"), "q": "1"}, SCHEMA),
    ("zlib garbage", {"c": "raw", "s": [1], "d": b"\x78\x9c garbage", "z": True}, CODEC),
    ("zlib empty", {"c": "raw", "s": [1], "d": b"", "z": True}, CODEC),
    ("zlib truncated", {"c": "raw", "s": [64], "d": zlib.compress(b"\0" * 256)[:-5],
                        "z": True}, CODEC),
    ("zlib trailing", {"c": "raw", "s": [1], "d": zlib.compress(b"\0" * 4) + b"x", "z": True},
     CODEC),
    ("zlib short", {"c": "raw", "s": [2], "d": zlib.compress(b"\0" * 4), "z": True}, CODEC),
    ("zlib long", {"c": "raw", "s": [1], "d": zlib.compress(b"\0" * 8), "z": True}, SIZE),
    ("zlib empty tensor", {"c": "raw", "s": [0], "d": zlib.compress(b"\0"), "z": True}, SIZE),
    ("zlib index long", {**topk([1], 4), "i": zlib.compress(b"\0" * 8),
                         "d": zlib.compress(b"\0" * 4), "z": True}, SIZE),
    ("zlib nan", {"c": "raw", "s": [1], "d": zlib.compress(F32_NAN), "z": True}, NONFINITE),
]  # fmt: skip


# Which check refuses each gap-coded case: the detail names it.
GAP_DETAILS = {
    "g and i": "exactly one of",
    "neither g nor i": "exactly one of",
    "g text": "must be binary",
    "g fewer bytes than k": "needs 2 to",
    "g above its bound": "needs 1 to 1",
    "g fewer varints": "holds 1 varints, not 2",
    "g more varints": "holds 3 varints, not 2",
    "g truncated varint": "truncated",
    "g overlong varint": "overlong",
    "g overlong zero": "overlong",
    "g six-byte varint": "longer than 5 bytes",
    "g above u32": "above 2**32 - 1",
    "g u32 max": "index 4294967295 out of range",
    "g index n": "index 4 out of range for 4",
    "g sum reaches n": "index 4 out of range for 4",
    "g sum wraps u32": "index 4294967297 out of range",
    "g k vs values": "field 'd' has 4 bytes, needs 8",
    "g zlib short": "inflates to 1 bytes, not 2",
    "g zlib above bound": "inflates beyond 1 bytes",
    "g zlib truncated varint": "truncated",
}


@pytest.mark.parametrize(("label", "detail"), GAP_DETAILS.items())
def test_gap_coded_refusals_name_their_fault(label: str, detail: str) -> None:
    (obj,) = [case[1] for case in CASES if case[0] == label]
    err = check(obj)
    assert err is not None and detail in err.detail, err


@pytest.mark.parametrize(("label", "obj", "reason"), CASES, ids=[c[0] for c in CASES])
def test_hostile_case(label: str, obj: Any, reason: str) -> None:
    rejects(obj, reason)
    assert peak_bytes(lambda: decode_tensor(obj)) < MB


@pytest.mark.parametrize(("label", "obj", "reason"), CASES, ids=[c[0] for c in CASES])
def test_hostile_case_with_norm(label: str, obj: Any, reason: str) -> None:
    """The aggregator's path (values, finiteness and norm in one pass) refuses the same way."""
    with pytest.raises(DecodeError) as err:
        _decode_checked(obj, DEFAULT_LIMITS, None, None, want_sq=True)
    assert err.value.reason == reason


def test_shape_expectation_and_limits() -> None:
    msg = valid("raw", (4, 5))
    rejects(msg, SHAPE, expected_shape=(5, 4))
    rejects(msg, SHAPE, expected_shape=(20,))
    rejects(msg, SIZE, limits=Limits(max_elements=19))
    rejects(msg, SIZE, limits=Limits(max_ndim=1))
    rejects(msg, SIZE, limits=Limits(max_data_bytes=79))
    assert check(msg, limits=Limits(max_elements=20, max_ndim=2, max_data_bytes=80)) is None
    # 10 float32 values + at most min(5 * 10, 10 + 10 // 128) = 10 bytes of gap-coded indices.
    top = valid("topk:0.5", (4, 5))
    rejects(top, SIZE, limits=Limits(max_data_bytes=49))
    assert check(top, limits=Limits(max_data_bytes=50)) is None
    old = {**top, "i": np.arange(10, dtype=U4).tobytes()}  # "<u4" indices: 4 bytes each
    del old["g"]
    rejects(old, SIZE, limits=Limits(max_data_bytes=79))
    assert check(old, limits=Limits(max_data_bytes=80)) is None
    # int8 values: 1 byte each; the bound on "g" is what the declared k and n allow.
    small = valid("topk:0.01+int8", (1000, 100))  # k = 1000, bound 1000 + 99000 // 128
    assert check(small, limits=Limits(max_data_bytes=1000 + 1773)) is None
    rejects(small, SIZE, limits=Limits(max_data_bytes=1000 + 1772))


def test_valid_maps_pass_the_checker() -> None:
    # The checker itself must accept good input, or the property tests below prove nothing.
    for text in ("raw", "fp16", "int8", "topk:0.2", "int8+zlib", "topk:0.2+zlib",
                 "topk:0.2+int8", "topk:0.2+int8+zlib"):  # fmt: skip
        assert check(valid(text)) is None
        assert check(msgpack.unpackb(msgpack.packb(valid(text)), use_list=False)) is None


# ---------------------------------------------------------------------------- zlib bombs


@pytest.fixture(scope="module")
def gigabyte_of_zeros() -> bytes:
    """1 GiB of zero bytes as one zlib stream (about 1 MB)."""
    packer = zlib.compressobj(9)
    chunk = bytes(MB)
    parts = [packer.compress(chunk) for _ in range(1024)]
    parts.append(packer.flush())
    return b"".join(parts)


def bombs(bomb: bytes) -> Iterator[tuple[str, dict[str, Any], str]]:
    yield "raw declared small", {"c": "raw", "s": [1000], "d": bomb, "z": True}, SIZE
    yield "fp16 declared small", {"c": "fp16", "s": [10, 10], "d": bomb, "z": True}, SIZE
    yield "int8 declared small", {"c": "int8", "s": [1000], "d": bomb, "q": 1.0, "z": True}, SIZE
    small = zlib.compress(b"\0" * 4)
    yield "topk values", {**topk([0], 10), "d": bomb, "i": small, "z": True}, SIZE
    yield "topk indices", {**topk([0], 10), "d": small, "i": bomb, "z": True}, SIZE
    yield "topk gaps", {**gtopk(bomb, 10**6, 1), "d": small, "z": True}, SIZE
    yield "topk int8 values", {**gtopk(bomb, 10, 1), "d": bomb, "q": 1.0, "z": True}, SIZE
    yield "declared 1 GiB", {"c": "raw", "s": [2**28], "d": bomb, "z": True}, SIZE
    yield "declared 1 GiB int8", {"c": "int8", "s": [2**30], "d": bomb, "q": 0.0, "z": True}, SIZE
    yield "declared 1e12", {"c": "raw", "s": [10**12], "d": bomb, "z": True}, SIZE


def test_zlib_bombs_are_refused_cheaply(gigabyte_of_zeros: bytes) -> None:
    for label, obj, reason in bombs(gigabyte_of_zeros):
        rejects(obj, reason)
        peak = peak_bytes(lambda obj=obj: decode_tensor(obj))  # type: ignore[misc]
        assert peak < MB, (label, peak)


def test_zlib_bomb_costs_at_most_the_declared_size(gigabyte_of_zeros: bytes) -> None:
    declared = 4 * MB  # 1 Mi float32: within the default limits, so inflation starts
    obj = {"c": "raw", "s": [declared // 4], "d": gigabyte_of_zeros, "z": True}
    rejects(obj, SIZE)
    peak = peak_bytes(lambda: decode_tensor(obj))
    assert peak < declared + MB // 2, peak


def test_valid_decode_allocates_about_its_declared_size() -> None:
    # 100k int8 codes: output 400 kB, inflated codes 100 kB, plus zlib's state and chunks.
    obj = valid("int8+zlib", (1000, 100))
    overhead = 256 * 1024
    assert peak_bytes(lambda: decode_tensor(obj)) < 400_000 + 100_000 + overhead
    out = np.empty(100_000, np.float32)
    assert peak_bytes(lambda: decode_tensor(obj, out=out)) < 100_000 + overhead


# ----------------------------------------------------------------------- property-based

JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.binary(max_size=64)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=6),
    max_leaves=20,
)  # fmt: skip

INTERESTING = (
    JUNK
    | st.sampled_from(["raw", "fp16", "int8", "topk", True, False, 0, -1, 2**32, 2**64 - 1])
    | st.sampled_from([10**12, float("nan"), float("inf"), -0.0, 1e300, b"", [], [10**12]])
    | st.lists(st.integers(-3, 2**40), max_size=6)
    | st.binary(max_size=200)
)
FIELDS = ["c", "s", "d", "q", "k", "i", "g", "z"]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    try:
        obj: Any = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        obj = data
    check(obj)


@settings(max_examples=400)
@given(JUNK)
def test_random_objects(obj: Any) -> None:
    check(obj)


@settings(max_examples=600)
@given(st.dictionaries(st.sampled_from(FIELDS), INTERESTING, max_size=7))
def test_random_fields(obj: dict[str, Any]) -> None:
    check(obj)


@settings(max_examples=800)
@given(
    st.sampled_from(
        [
            "raw",
            "fp16",
            "int8",
            "topk:0.3",
            "raw+zlib",
            "int8+zlib",
            "topk:0.3+zlib",
            "topk:0.3+int8",
            "topk:0.3+int8+zlib",
        ]
    ),
    st.lists(
        st.tuples(
            st.sampled_from(["replace", "delete", "truncate", "extend", "flip"]),
            st.sampled_from(FIELDS),
            INTERESTING,
            st.integers(0, 10_000),
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_mutated_valid_maps(text: str, edits: list[tuple[str, str, Any, int]]) -> None:
    """Start from a real encoded tensor and break it a little: the hardest inputs to refuse."""
    obj = valid(text, (3, 7))
    for action, key, value, pos in edits:
        current = obj.get(key)
        if action == "replace":
            obj[key] = value
        elif action == "delete":
            obj.pop(key, None)
        elif isinstance(current, bytes) and current:
            at = pos % len(current)
            if action == "truncate":
                obj[key] = current[:at]
            elif action == "extend":
                obj[key] = current + current[: at + 1]
            else:
                obj[key] = current[:at] + bytes([current[at] ^ (1 + pos % 255)]) + current[at + 1 :]
    check(obj)
    try:
        packed = msgpack.packb(obj)
    except (OverflowError, TypeError, ValueError):  # e.g. integers beyond 64 bits
        return
    check(msgpack.unpackb(packed, raw=False, strict_map_key=False))
