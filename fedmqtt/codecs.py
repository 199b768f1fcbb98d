"""Tensor codecs: how one float32 tensor travels inside an update or a global model.

Devices on slow links send model deltas, so the payload is compressed by a *codec*: ``raw``
(float32), ``fp16``, ``int8`` (per-tensor scale, stochastic rounding), ``int4`` (the same with
15 levels, two codes per byte), ``topk:F`` (the ``ceil(F*n)`` largest-magnitude entries, exact)
or ``topk:F+int8`` (the same entries with their values quantized like ``int8``), each
optionally followed by ``+zlib``. The decoder runs on the aggregator against untrusted input,
so it validates everything against hard :class:`Limits` *before* allocating, and raises only
:class:`~fedmqtt.errors.DecodeError`.

Wire form of one tensor (a msgpack map with short keys; all multi-byte numbers little-endian)::

    key  type        codecs     meaning
    "c"  str         all        codec name: "raw" | "fp16" | "int8" | "int4" | "topk"
    "s"  [int, ...]  all        shape, 0..max_ndim non-negative ints ([] is a scalar)
    "d"  bin         all        values: raw "<f4" n items, fp16 "<f2" n items,
                                int8 "i1" n items, int4 ceil(n/2) bytes (below),
                                topk "<f4" k items, or "i1" k items if "q" is present
                                (topk+int8)
    "q"  float       int8 int4  scale >= 0; value = q_i * scale (0 for an all-zero tensor)
                     topk+int8
    "k"  int         topk       number of kept entries, 0 <= k <= n
    "g"  bin         topk       the kept indices, gap-coded: k unsigned LEB128 varints
                                g_0 = idx_0, g_j = idx_j - idx_(j-1) - 1 (what the encoder sends)
    "i"  bin         topk       "<u4" k indices, strictly increasing (accepted, no longer sent)
    "z"  true        any        present (and true) iff "d" (and "g" or "i") are zlib streams

``n`` is the product of the shape. Fields not listed for a codec are refused, so one map has
exactly one meaning; a topk map carries exactly one of "g" and "i". ``z`` is omitted rather
than sent as false by the encoder; the decoder accepts either. The indices of "g" are
``idx_j = sum(g_0..g_j) + j``, strictly increasing by construction, and each must be below
``n``. Every varint is canonical: 1 to 5 bytes, 7 bits each, least significant group first,
the high bit set on every byte but the last, no redundant final zero byte (an overlong
form), value at most 2**32 - 1; since the gaps sum to at most ``n - k``, a valid "g" has
between ``k`` and ``min(5k, k + (n - k) // 128)`` bytes (a varint of g >= 128 bytes takes
at most ``1 + g/128`` bytes), which bounds it before anything is decoded. With ``z`` the
declared (decompressed) sizes are still ``n * itemsize`` (int4: ``ceil(n / 2)``; topk values:
``k * itemsize``), ``4 * k`` for "i" and at most that bound for "g"; decompression stops one
byte past them (``zlib.decompressobj`` with ``max_length``), so a zlib bomb costs at most the
declared size.

int4 packing: each code ``q_i`` in -7..7 is a 4-bit two's-complement nibble; element ``2j``
is the low nibble (bits 0-3) of byte ``j`` and element ``2j + 1`` its high nibble (bits 4-7),
so ``d`` has exactly ``ceil(n / 2)`` bytes. For odd ``n`` the high nibble of the last byte is
padding and must be 0. The nibble 0x8 (code -8) is never produced and is refused, so the
codes are symmetric and no decoded value exceeds ``7 * scale`` in magnitude. Anything else
(wrong length, code -8, non-zero padding) is a DecodeError.

Encoding contract (trusted, local input: errors are ``TypeError``/``ValueError``):

- raw is exact. fp16 clips to +-65504 (the largest finite float16) instead of overflowing
  to inf, then rounds to nearest: relative error <= 2**-11 in the normal fp16 range
  (|x| >= 2**-14), absolute error <= 2**-25 below it.
- int8: ``scale = max|x| / 127`` (float32, capped at float32_max / 128 so that no code,
  -128 included, decodes to inf), ``q = clip(floor(x / scale + u), -127, 127)`` with
  ``u ~ U[0, 1)`` from the caller's ``rng``: E[q * scale] = x (unbiased) and
  ``|x - q * scale| < scale`` (up to float32 rounding, <= scale * (1 + 2**-15)).
- int4: as int8 with ``scale = max|x| / 7`` (capped at float32_max / 8) and codes clipped to
  -7..7: unbiased, ``|x - q * scale| < scale = max|x| / 7``. Half of int8's bytes per
  value, with a step 18x coarser (127 / 7).
- topk:F: ``k = max(1, ceil(F * n))`` (computed with a 1e-12 relative tolerance so that
  0.01 * 300 gives 3, not 4), clamped to ``n``; kept values are exact float32.
- topk:F+int8: the same ``k`` entries; their values are quantized as int8 above, with the
  scale from the kept values alone (unbiased, error below one scale per kept value).
- With an :class:`ErrorFeedback`, the tensor actually encoded is ``x + residual`` and the new
  residual is ``(x + residual) - decoded``. For topk this is the error feedback of Stich et
  al. 2018 / Karimireddy et al. 2019; the same rule is applied to every codec, so switching
  codec between rounds never drops the pending residual (for raw it becomes zero).
"""

from __future__ import annotations

import math
import re
import zlib as _zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NoReturn, cast, get_args

import msgpack
import numpy as np
import numpy.typing as npt

from fedmqtt.errors import CODEC, NONFINITE, SCHEMA, SHAPE, SIZE, ConfigError, DecodeError
from fedmqtt.params import F32, Layout
from fedmqtt.rand import RandomSource

CodecName = Literal["raw", "fp16", "int8", "int4", "topk"]
CODEC_NAMES: Final[tuple[CodecName, ...]] = get_args(CodecName)

FP16_MAX: Final = 65504.0
ZLIB_LEVEL: Final = 6
_MAX_SCALE: Final = float(np.finfo(np.float32).max) / 128.0  # int8 codes reach -128
_F32_TINY: Final = np.float32(np.finfo(np.float32).tiny)  # the smallest normal float32
_MAX_SCALE4: Final = float(np.finfo(np.float32).max) / 8.0  # int4 codes stay within -7..7
_SAFE_SUM: Final = float(np.finfo(np.float32).max) / 2  # a float32 sum below it cannot overflow
# Element-wise checks walk large tensors in blocks so that their temporaries stay small (and
# in cache) instead of costing one or two bytes per element of a possibly 50M-element tensor.
_BLOCK: Final = 1 << 18
_INFLATE_IN: Final = 1 << 16  # zlib input slice
_INFLATE_OUT: Final = 1 << 16  # zlib output chunk
# Below this many elements the per-call cost of numpy dominates: plain isfinite() and numpy's
# float16 cast then beat the vectorised tricks used for large tensors.
_SMALL: Final = 1 << 13
_FRACTION_RE: Final = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?")

# Wire dtypes, built once: np.frombuffer parses a dtype string on every call otherwise.
_F4: Final = np.dtype("<f4")
_F32: Final = np.dtype(np.float32)  # native order, for the caller's arrays
_F2: Final = np.dtype("<f2")
_U2: Final = np.dtype("<u2")
_U4: Final = np.dtype("<u4")
_I1: Final = np.dtype("i1")
_ZERO: Final = np.float32(0.0)

_COMMON_KEYS: Final = frozenset({"c", "s", "d", "z"})
_KEYS: Final[dict[str, frozenset[str]]] = {
    "raw": _COMMON_KEYS,
    "fp16": _COMMON_KEYS,
    "int8": _COMMON_KEYS | {"q"},
    "int4": _COMMON_KEYS | {"q"},
    "topk": _COMMON_KEYS | {"k", "i", "g", "q"},
}
# Optional besides "z": topk's "q" (int8 values) and its index field, "g" or "i" (one of them).
_OPTIONAL: Final = {"topk": frozenset({"z", "q", "g", "i"})}
_REQUIRED: Final = {c: keys - _OPTIONAL.get(c, {"z"}) for c, keys in _KEYS.items()}
_ALL_KEYS: Final = frozenset().union(*_KEYS.values())
_ITEMSIZE: Final = {"raw": 4, "fp16": 2, "int8": 1, "topk": 4}  # int4: ceil(n / 2) bytes


@dataclass(frozen=True)
class Codec:
    """A codec choice, written in configs and CLIs as ``raw``, ``int8+zlib``, ``topk:0.01``,
    ``topk:0.01+int8+zlib``."""

    name: CodecName
    fraction: float = 1.0  # topk only, 0 < fraction <= 1
    zlib: bool = False
    int8: bool = False  # topk only: kept values quantized to int8

    def __post_init__(self) -> None:
        if self.name not in CODEC_NAMES:
            raise ConfigError(f"unknown codec {self.name!r}; expected one of {CODEC_NAMES}")
        if type(self.zlib) is not bool:
            raise ConfigError(f"codec zlib flag must be a bool, got {self.zlib!r}")
        if type(self.int8) is not bool:
            raise ConfigError(f"codec int8 flag must be a bool, got {self.int8!r}")
        if self.int8 and self.name != "topk":
            raise ConfigError(f"codec {self.name} takes no int8 values; only topk does")
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, int | float):
            raise ConfigError(f"topk fraction must be a number, got {f!r}")
        if not (math.isfinite(f) and 0.0 < f <= 1.0):
            raise ConfigError(f"topk fraction must satisfy 0 < fraction <= 1, got {f!r}")
        if self.name != "topk" and f != 1.0:
            raise ConfigError(f"codec {self.name} takes no fraction (got {f!r}); only topk does")
        object.__setattr__(self, "fraction", float(f))

    @classmethod
    def parse(cls, text: str) -> Codec:
        """Parse ``raw | fp16 | int8 | int4 | topk:F | topk:F+int8``, each optionally followed
        by ``+zlib``."""
        usage = (
            "expected raw, fp16, int8, int4, topk:F or topk:F+int8 (0 < F <= 1), "
            "optionally followed by +zlib"
        )
        if not isinstance(text, str):
            raise ConfigError(f"codec must be text, got {type(text).__name__}; {usage}")
        base, *suffixes = text.strip().lower().split("+")
        for i, suffix in enumerate(suffixes):
            if suffix not in ("int8", "zlib") or suffix in suffixes[:i]:
                raise ConfigError(f"codec {text!r}: unknown suffix {'+' + suffix!r}; {usage}")
        int8 = "int8" in suffixes
        if int8 and suffixes[0] != "int8":
            raise ConfigError(f"codec {text!r}: +int8 comes before +zlib; {usage}")
        name, colon, arg = base.partition(":")
        if name not in CODEC_NAMES:
            raise ConfigError(f"unknown codec {text!r}; {usage}")
        fraction = 1.0
        if name == "topk":
            if not colon or not _FRACTION_RE.fullmatch(arg):
                raise ConfigError(f"codec {text!r}: topk needs a fraction, e.g. topk:0.01")
            fraction = float(arg)
            if not 0.0 < fraction <= 1.0:
                raise ConfigError(f"codec {text!r}: topk fraction must satisfy 0 < F <= 1")
        elif colon:
            raise ConfigError(f"codec {text!r}: {name} takes no argument; {usage}")
        if int8 and name != "topk":
            raise ConfigError(f"codec {text!r}: only topk takes +int8; {usage}")
        return cls(name, fraction, zlib="zlib" in suffixes, int8=int8)

    def __str__(self) -> str:
        base = f"topk:{self.fraction!r}" if self.name == "topk" else self.name
        if self.int8:
            base += "+int8"
        return base + "+zlib" if self.zlib else base


@dataclass(frozen=True)
class Limits:
    """Hard limits on one decoded tensor, checked before any allocation."""

    max_elements: int = 50_000_000  # per tensor, product of the declared shape
    max_ndim: int = 4
    max_data_bytes: int = 256 * 1024 * 1024  # "d" plus "i" bytes after decompression

    def __post_init__(self) -> None:
        for key in ("max_elements", "max_ndim", "max_data_bytes"):
            value = getattr(self, key)
            if type(value) is not int or value < 0:
                raise ConfigError(f"Limits.{key} must be a non-negative int, got {value!r}")


DEFAULT_LIMITS: Final = Limits()


@dataclass(eq=False)
class ErrorFeedback:
    """Client-side residual for top-k (error feedback, Stich et al. 2018 / Karimireddy 2019).

    What a lossy codec did not send this round is kept here, by tensor name, and added to the
    next round's tensor, so nothing is lost, only delayed. Devices persist it across restarts
    with :meth:`to_bytes` (msgpack of raw float32 tensor maps; no pickle, so a corrupted or
    planted file cannot execute code).
    """

    residual: dict[str, F32] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        body = {
            "v": 1,
            "r": {
                name: {"c": "raw", "s": list(r.shape), "d": r.astype("<f4").tobytes()}
                for name, r in self.residual.items()
            },
        }
        return cast(bytes, msgpack.packb(body, use_bin_type=True))

    @classmethod
    def from_bytes(cls, data: bytes) -> ErrorFeedback:
        """Inverse of :meth:`to_bytes`; raises only DecodeError on anything else."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError(SCHEMA, f"error feedback must be bytes, got {type(data).__name__}")
        try:
            body = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:
            raise DecodeError(SCHEMA, f"error feedback is not msgpack: {exc}") from exc
        if not isinstance(body, dict) or body.get("v") != 1 or set(body) != {"v", "r"}:
            raise DecodeError(SCHEMA, "error feedback must be a map {'v': 1, 'r': {...}}")
        tensors = body["r"]
        if not isinstance(tensors, dict) or not all(isinstance(k, str) for k in tensors):
            raise DecodeError(SCHEMA, "error feedback 'r' must map tensor names to tensors")
        out = cls()
        for name, obj in tensors.items():
            if not isinstance(obj, dict) or obj.get("c") != "raw":
                raise DecodeError(CODEC, f"error feedback tensor {name!r} is not a raw tensor")
            out.residual[name] = decode_tensor(obj)
        return out


def topk_count(n: int, fraction: float) -> int:
    """Number of entries topk:``fraction`` keeps of ``n``: max(1, ceil(fraction * n)), <= n."""
    if n <= 0:
        return 0
    # The tolerance absorbs the binary representation error of decimal fractions:
    # 0.01 is stored slightly above 1/100, and ceil(0.01 * 300) would otherwise be 4.
    k = math.ceil(fraction * n * (1.0 - 1e-12))
    return min(n, max(1, k))


# --------------------------------------------------------------------------------- encoding


def encode_tensor(
    x: F32,
    codec: Codec,
    *,
    rng: RandomSource,
    name: str = "",
    feedback: ErrorFeedback | None = None,
) -> dict[str, Any]:
    """Encode one float32 tensor into its wire map (see the module docstring)."""
    a = np.asarray(x)
    if a.dtype != np.float32:
        raise TypeError(f"tensor {name!r} must be float32, got {a.dtype}")
    shape = a.shape
    flat = a.reshape(-1)
    residual = feedback.residual.get(name) if feedback is not None else None
    if residual is not None:
        if residual.shape != shape:
            raise ValueError(
                f"error-feedback residual for {name!r} has shape {residual.shape}, tensor has "
                f"{shape}; clear the feedback when the model changes"
            )
        flat = flat + residual.reshape(-1)
    if not _all_finite(flat):
        raise ValueError(f"tensor {name!r} (plus any error-feedback residual) has NaN or Inf")

    msg: dict[str, Any] = {"c": codec.name, "s": [int(d) for d in shape]}
    index_bytes: bytes | None = None
    sent: F32 | None = None  # what the receiver will decode, when it differs from ``flat``
    if codec.name == "raw":
        data = flat.astype("<f4", copy=False).tobytes()
    elif codec.name == "fp16":
        half = np.clip(flat, -FP16_MAX, FP16_MAX).astype("<f2")
        data = half.tobytes()
        if feedback is not None:
            sent = half.astype(np.float32)
    elif codec.name == "int8":
        q, scale = _quantize_int8(flat, rng)
        data = q.tobytes()
        msg["q"] = float(scale)
        if feedback is not None:
            sent = _dequantized(q, scale)
    elif codec.name == "int4":
        q, scale = _quantize(flat, rng, 7.0, _MAX_SCALE4)
        data = _pack_int4(q)
        msg["q"] = float(scale)
        if feedback is not None:
            sent = _dequantized(q, scale)
    else:
        idx = _topk_indices(flat, topk_count(flat.size, codec.fraction))
        kept = flat[idx]
        index_bytes = _varint_gaps(idx)
        msg["k"] = int(idx.size)
        if codec.int8:
            q, scale = _quantize_int8(kept, rng)
            data = q.tobytes()
            msg["q"] = float(scale)
            kept = _dequantized(q, scale)
        else:
            data = kept.astype("<f4", copy=False).tobytes()
        if feedback is not None:
            sent = np.zeros_like(flat)
            sent[idx] = kept

    if codec.zlib:
        msg["d"] = _zlib.compress(data, ZLIB_LEVEL)
        if index_bytes is not None:
            msg["g"] = _zlib.compress(index_bytes, ZLIB_LEVEL)
        msg["z"] = True
    else:
        msg["d"] = data
        if index_bytes is not None:
            msg["g"] = index_bytes

    if feedback is not None:
        if sent is None:
            feedback.residual.pop(name, None)  # raw: everything was sent
        else:
            feedback.residual[name] = (flat - sent).reshape(shape)
    return msg


def encode_params(
    params: Mapping[str, F32],
    codec: Codec,
    *,
    rng: RandomSource,
    feedback: ErrorFeedback | None = None,
) -> dict[str, dict[str, Any]]:
    """Encode every tensor of ``params`` (name -> wire map), sharing ``rng`` and ``feedback``."""
    return {
        name: encode_tensor(t, codec, rng=rng, name=name, feedback=feedback)
        for name, t in params.items()
    }


def _quantize_int8(v: F32, rng: RandomSource) -> tuple[npt.NDArray[np.int8], np.float32]:
    """Per-tensor scale and stochastically rounded int8 codes of ``v`` (finite, flat)."""
    return _quantize(v, rng, 127.0, _MAX_SCALE)


def _quantize(
    v: F32, rng: RandomSource, top: float, max_scale: float
) -> tuple[npt.NDArray[np.int8], np.float32]:
    """Scale ``max|v| / top`` (at most ``max_scale``) and codes in ``-top..top`` of ``v``
    (finite, flat), stochastically rounded: int8 (top 127) and int4 (top 7)."""
    maxabs = float(np.max(np.abs(v))) if v.size else 0.0
    if maxabs == 0.0:
        return np.zeros(v.size, dtype=np.int8), np.float32(0.0)
    scale = np.float32(maxabs / top)
    if scale < _F32_TINY and float(scale) * top < maxabs:
        # A subnormal scale rounded down is coarse (max|v| = 5.9e-43 gives 4.2e-45, not
        # 4.6e-45): the largest values would clip far beyond one step. One float32 step up is
        # at least max|v| / top (the rounding was below half a step). Normal scales round by
        # at most 2**-24 relative, which the stated bound covers, and are kept as they are so
        # that a decoded tensor re-encodes to itself.
        scale = np.nextafter(scale, np.float32(np.inf))
    # The decoder refuses scales whose largest code magnitude (int8: 128, int4: 8) times the
    # scale overflows: near float32 max, cap the scale so that legitimate tensors are always
    # accepted. Codes then clip at ``top`` with an error still below one step.
    scale = min(scale, np.float32(max_scale))
    t = v / scale
    t += rng.random(v.size, dtype=np.float32)
    np.floor(t, out=t)
    np.clip(t, -top, top, out=t)  # float32 rounding of v/scale can reach top + 1e-5
    return t.astype(np.int8), scale


def _dequantized(q: npt.NDArray[np.int8], scale: np.float32) -> F32:
    """The float32 values the receiver decodes from codes ``q`` and ``scale``."""
    out = q.astype(np.float32)
    out *= scale
    return out


def _pack_int4(q: npt.NDArray[np.int8]) -> bytes:
    """Codes in -7..7, two per byte: element 2j in the low nibble of byte j, 2j+1 in the high
    one; for odd n the last high nibble is 0."""
    nib = q.view(np.uint8) & np.uint8(0x0F)  # 4-bit two's complement
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] | (nib[1::2] << np.uint8(4))).tobytes()


def _topk_indices(v: F32, k: int) -> npt.NDArray[np.intp]:
    """Ascending indices of the ``k`` largest |v| (ties broken arbitrarily)."""
    n = v.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    idx = np.argpartition(np.abs(v), n - k)[n - k :]
    idx.sort()
    return idx


_VARINT_MAX: Final = 5  # bytes of a varint up to 2**32 - 1 (7 bits each)
_U32_MAX: Final = 2**32 - 1


def varint_bound(k: int, n: int) -> int:
    """Most bytes the "g" field of ``k`` valid indices below ``n`` can take (0 <= k <= n)."""
    return min(_VARINT_MAX * k, k + (n - k) // 128)


def _varint_gaps(idx: npt.NDArray[np.intp]) -> bytes:
    """The "g" field of the strictly increasing indices ``idx`` (all below 2**32)."""
    if idx.size == 0:
        return b""
    gaps = np.empty(idx.size, dtype=np.uint64)
    gaps[0] = idx[0]
    np.subtract(idx[1:], idx[:-1], out=gaps[1:], casting="unsafe")
    gaps[1:] -= np.uint64(1)
    # Bytes per varint: one, plus one for each 7-bit group above the first.
    nbytes = np.ones(gaps.size, dtype=np.int64)
    for j in range(1, _VARINT_MAX):
        nbytes += gaps >= np.uint64(1 << (7 * j))
    ends = np.cumsum(nbytes)
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    starts = ends - nbytes
    out[starts] = (gaps & np.uint64(0x7F)).astype(np.uint8)
    # Every byte but a varint's last carries the continuation bit.
    for j in range(1, _VARINT_MAX):
        more = np.flatnonzero(nbytes > j)
        if more.size == 0:
            break
        out[starts[more] + j - 1] |= np.uint8(0x80)
        out[starts[more] + j] = ((gaps[more] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(
            np.uint8
        )
    return out.tobytes()


def _varint_indices(data: bytes | bytearray | memoryview, k: int, n: int) -> npt.NDArray[np.int64]:
    """Decode and check the "g" field (length already within [k, varint_bound(k, n)])."""
    b = np.frombuffer(data, dtype=np.uint8)
    last = b < 0x80  # the final byte of each varint
    if k == 0:  # and then b is empty: its length is in [k, varint_bound(k, n)]
        return np.empty(0, dtype=np.int64)
    if not last[-1]:
        raise DecodeError(CODEC, "topk field 'g' ends inside a varint (truncated)")
    ends = np.flatnonzero(last)
    if ends.size != k:
        raise DecodeError(CODEC, f"topk field 'g' holds {ends.size} varints, not {k}")
    starts = np.empty(k, dtype=np.int64)
    starts[0] = 0
    np.add(ends[:-1], 1, out=starts[1:])
    lengths = ends - starts + 1
    if int(lengths.max()) > _VARINT_MAX:
        raise DecodeError(CODEC, "topk field 'g' has a varint longer than 5 bytes")
    long = lengths > 1
    if bool(np.any(b[ends[long]] == 0)):
        raise DecodeError(CODEC, "topk field 'g' has an overlong varint")
    gaps = (b[starts] & 0x7F).astype(np.int64)
    for j in range(1, _VARINT_MAX):
        more = np.flatnonzero(lengths > j)
        if more.size == 0:
            break
        gaps[more] |= (b[starts[more] + j] & 0x7F).astype(np.int64) << (7 * j)
    if int(gaps.max()) > _U32_MAX:
        raise DecodeError(CODEC, "topk field 'g' has a varint above 2**32 - 1")
    # Each gap is below 2**32 and k < 2**31 (5 bytes each fit in memory): no int64 overflow.
    gaps += 1
    idx = np.cumsum(gaps, out=gaps)
    idx -= 1
    if int(idx[-1]) >= n:
        raise DecodeError(CODEC, f"topk index {int(idx[-1])} out of range for {n}")
    return idx


# --------------------------------------------------------------------------------- decoding


def decode_tensor(
    obj: object,
    *,
    limits: Limits = DEFAULT_LIMITS,
    expected_shape: tuple[int, ...] | None = None,
    out: F32 | None = None,
) -> F32:
    """Validate and decode one wire map into a float32 tensor of its declared shape.

    Raises only DecodeError for anything wrong with ``obj`` (reason SCHEMA/CODEC for malformed
    maps, SIZE for limits, NONFINITE, SHAPE if ``expected_shape`` or ``out``'s size differ).
    ``out``, if given, must be a writeable C-contiguous 1-D float32 array (a caller bug
    otherwise: ValueError); it receives the values and the result is ``out`` reshaped. After a
    DecodeError its contents are unspecified.
    """
    if out is not None:
        _check_out(out)
    return _decode_checked(obj, limits, expected_shape, out, want_sq=False)[0]


def _decode_checked(
    obj: object,
    limits: Limits,
    expected_shape: tuple[int, ...] | None,
    out: F32 | None,
    *,
    want_sq: bool,
    defer_scale: bool = False,
) -> tuple[F32, float, float]:
    """:func:`_decode` with every failure turned into a DecodeError."""
    try:
        return _decode(obj, limits, expected_shape, out, want_sq, defer_scale=defer_scale)
    except DecodeError:
        raise
    except MemoryError as exc:
        raise DecodeError(SIZE, "not enough memory for the declared tensor") from exc
    except Exception as exc:
        # Defence in depth: every input problem should already have a precise DecodeError; if
        # one slips through, the aggregator still sees a rejection and not a crash.
        raise DecodeError(SCHEMA, f"unexpected {type(exc).__name__} decoding tensor") from exc


def decode_params(
    obj: object,
    layout: Layout,
    *,
    limits: Limits = DEFAULT_LIMITS,
    out: F32 | None = None,
) -> F32:
    """Decode a name -> wire-map mapping into one flat float32 vector in ``layout`` order.

    The names must be exactly ``layout.names`` (any order) and every shape must match, else
    DecodeError(SHAPE). ``out`` (size ``layout.size``) receives the vector if given.
    """
    return _decode_params(obj, layout, limits, out, want_sq=False)[0]


def defers_int8_scales(layout: Layout) -> bool:
    """Whether :func:`decode_params_norm` leaves int8 tensors of ``layout`` unscaled when given
    ``scales`` (models of more than 8192 values); for smaller ones passing ``scales`` only
    costs time."""
    return layout.size > _SMALL


def decode_params_norm(
    obj: object,
    layout: Layout,
    *,
    limits: Limits = DEFAULT_LIMITS,
    out: F32 | None = None,
    scales: F32 | None = None,
) -> tuple[F32, float]:
    """:func:`decode_params`, also returning the L2 norm of the decoded vector.

    The aggregator needs both, and the norm comes almost for free: the finiteness check of a
    large raw (or topk) tensor is itself the float32 dot product ``v . v`` (see
    :func:`_finite_sq`), here taken on the decoded values while they are still in cache, so a
    large delta is not read once more just for its norm. Large tensors' sums of squares are
    added in float64; a small model (at most 8192 values) gets one float32 dot product over
    the whole vector after decoding. A float32 sum that overflows (finite values above ~1e19)
    is redone in float64, so the norm is always finite and within float32 rounding of
    ``np.linalg.norm`` of the result. Same errors as :func:`decode_params`.

    ``scales`` (float32, one entry per tensor of ``layout``, in layout order) lets the caller
    apply int8 scales later, where they cost nothing: in a model of more than 8192 values each
    int8 tensor is then left as its codes (``q`` as float32) and its scale goes to ``scales``;
    every other tensor is decoded in full and gets 1.0. The decoded vector is ``flat`` with
    each tensor's segment multiplied by its entry. The norm is always that of the decoded
    vector. It saves the aggregator one pass over every int8 update, whose sum with the
    others is a matrix-vector product that takes the scales for free
    (:func:`fedmqtt.aggregation.mean_of_rows`). A small model is decoded in full (all 1.0):
    its norm is taken over the whole vector after decoding.
    """
    flat, sq = _decode_params(obj, layout, limits, out, want_sq=True, scales=scales)
    return flat, math.sqrt(sq)


def _decode_params(
    obj: object,
    layout: Layout,
    limits: Limits,
    out: F32 | None,
    *,
    want_sq: bool,
    scales: F32 | None = None,
) -> tuple[F32, float]:
    if out is not None:
        _check_out(out)
        if out.size != layout.size:
            raise ValueError(f"out has {out.size} elements, layout needs {layout.size}")
    if scales is not None:
        _check_out(scales)
        if scales.size != len(layout.names):
            raise ValueError(f"scales has {scales.size} entries, layout has {len(layout.names)}")
    if not isinstance(obj, dict):
        raise DecodeError(SCHEMA, f"tensors must be a map, got {type(obj).__name__}")
    offsets = layout.offsets()
    if obj.keys() != offsets.keys():  # one set comparison in C
        wanted = set(layout.names)
        missing = sorted(wanted.difference(obj))
        extra = sorted(_short(key) for key in obj if key not in wanted)
        raise DecodeError(
            SHAPE, f"tensor names differ from the model: missing {missing}, unexpected {extra[:10]}"
        )
    dst = np.empty(layout.size, dtype=np.float32) if out is None else out
    # A small model is summed once, after decoding, as one float32 dot product over the whole
    # (cached) vector: cheaper than a float64 sum per tensor when per-call costs dominate.
    per_tensor = want_sq and layout.size > _SMALL
    defer = scales is not None and per_tensor
    total = 0.0
    for t, ((name, (start, stop)), shape) in enumerate(
        zip(offsets.items(), layout.shapes, strict=True)
    ):
        try:
            _, sq, scale = _decode_checked(
                obj[name], limits, shape, dst[start:stop], want_sq=per_tensor, defer_scale=defer
            )
        except DecodeError as exc:
            raise DecodeError(exc.reason, f"tensor {name!r}: {exc.detail}") from exc
        total += sq
        if scales is not None:
            scales[t] = scale
    if want_sq and not per_tensor:
        total = float(np.dot(dst, dst))
        if not math.isfinite(total):  # finite values above ~1e19: redo it in float64
            total = _sq64(dst)
    return dst, total


def _check_out(out: object) -> None:
    if isinstance(out, np.ndarray) and out.dtype == _F32 and out.ndim == 1:
        flags = out.flags
        if flags.c_contiguous and flags.writeable:
            return
    raise ValueError("out must be a writeable, C-contiguous, 1-D float32 numpy array")


def _decode(
    obj: object,
    limits: Limits,
    expected_shape: tuple[int, ...] | None,
    out: F32 | None,
    want_sq: bool,
    *,
    defer_scale: bool = False,
) -> tuple[F32, float, float]:
    """The decoded tensor, if ``want_sq`` the float64 sum of its squares (else 0.0), and the
    scale still to apply to it: 1.0, except for an int8 tensor with ``defer_scale``, which is
    left as its codes (the sum of squares is still that of the scaled values)."""
    if not isinstance(obj, dict):
        raise DecodeError(SCHEMA, f"tensor must be a map, got {type(obj).__name__}")
    codec = obj.get("c")
    if not isinstance(codec, str):
        raise DecodeError(SCHEMA, "tensor field 'c' (codec name) missing or not text")
    allowed = _KEYS.get(codec)
    if allowed is None:
        raise DecodeError(CODEC, f"unknown codec {_short(codec)}")
    if not allowed.issuperset(obj) or not obj.keys() >= _REQUIRED[codec]:
        _explain_fields(obj, codec, allowed)
    compressed = obj.get("z", False)
    if type(compressed) is not bool:
        raise DecodeError(SCHEMA, "tensor field 'z' must be a bool")

    shape, n = _check_shape(obj["s"], limits)
    if expected_shape is not None and shape != tuple(expected_shape):
        raise DecodeError(SHAPE, f"tensor shape {list(shape)} differs from {list(expected_shape)}")
    if out is not None and out.size != n:
        raise DecodeError(SHAPE, f"tensor shape {list(shape)} does not fit out ({out.size})")

    quantized = codec == "int8" or "q" in obj  # int8 codes in "d", scaled by "q"
    index_key = ""
    if codec == "topk":
        k = obj["k"]
        if type(k) is not int:
            raise DecodeError(SCHEMA, "topk field 'k' must be an integer")
        if not 0 <= k <= n:
            raise DecodeError(CODEC, f"topk keeps {k} entries of a {n}-element tensor")
        if ("g" in obj) == ("i" in obj):
            raise DecodeError(SCHEMA, "topk needs exactly one of the index fields 'g' and 'i'")
        index_key = "g" if "g" in obj else "i"
        data_len = k if quantized else 4 * k
        index_len = varint_bound(k, n) if index_key == "g" else 4 * k
    elif codec == "int4":
        k, data_len, index_len = 0, (n + 1) // 2, 0
    else:
        k, data_len, index_len = 0, n * _ITEMSIZE[codec], 0
    if data_len + index_len > limits.max_data_bytes:
        raise DecodeError(SIZE, f"tensor data of {data_len + index_len} bytes exceeds the limit")

    if codec == "int4":
        scale = _check_scale(obj["q"], "int4", _MAX_SCALE4)
    elif quantized:
        scale = _check_scale(obj["q"])
    else:
        scale = _ZERO
    data = _payload(obj["d"], "d", data_len, compressed)
    index: bytes | bytearray | memoryview = b""
    if index_key == "g":  # any length from k to index_len bytes
        index = _payload(obj["g"], "g", index_len, compressed, least=k)
    elif index_key == "i":
        index = _payload(obj["i"], "i", index_len, compressed)
    dst = np.empty(n, dtype=np.float32) if out is None else out
    sq, left = 0.0, 1.0

    if codec == "raw":
        # Copy first, then check the copy: the check (a dot product, see _finite_sq) reads
        # ``dst`` while it is still in cache. A refused tensor leaves garbage
        # in ``dst``, which the contract allows (contents unspecified after a DecodeError).
        np.copyto(dst, np.frombuffer(data, _F4))
        sq = _finite_sq(dst, want_sq)
        if sq < 0:
            raise DecodeError(NONFINITE, "raw tensor contains NaN or Inf")
    elif codec == "int8":
        # Codes are bounded (|q| <= 128) and 128 * scale was checked finite: no scan needed.
        # (A single np.multiply(q, scale, out=dst, casting="unsafe") is slower than these two
        # passes: numpy runs mixed-type ufuncs through a buffered cast.)
        np.copyto(dst, np.frombuffer(data, _I1))
        if defer_scale:
            # sum q^2 <= n * 128^2 is exact enough in float32 (no overflow below ~1e34 codes);
            # the product with scale^2 (< 7.1e72) is taken in float64, where it cannot overflow.
            left = float(scale)
            if want_sq:
                sq = float(np.dot(dst, dst)) * left * left
            return (dst if len(shape) == 1 else dst.reshape(shape)), sq, left
        np.multiply(dst, scale, out=dst)
        if want_sq:
            sq = _bounded_sq(dst, 128.0 * float(scale))
    elif codec == "int4":
        _unpack_int4(data, n, dst)
        np.multiply(dst, scale, out=dst)
        if want_sq:
            sq = _bounded_sq(dst, 7.0 * float(scale))
    elif codec == "fp16":
        if n <= _SMALL:  # numpy's cast has less per-call overhead than the bit trick
            np.copyto(dst, np.frombuffer(data, _F2))
            if not _scan_finite(dst):
                raise DecodeError(NONFINITE, "fp16 tensor contains NaN or Inf")
            if want_sq:
                sq = _sq64(dst)
        else:
            half = np.frombuffer(data, _U2)
            if not _half_all_finite(half):
                raise DecodeError(NONFINITE, "fp16 tensor contains NaN or Inf")
            _half_to_float(half, dst)
            if want_sq:
                # |x| <= 65504: a float32 sum of squares cannot overflow below ~7.9e28 terms.
                sq = float(np.dot(dst, dst))
    else:
        idx: npt.NDArray[Any]
        if index_key == "g":
            idx = _varint_indices(index, k, n)
        else:
            idx = np.frombuffer(index, _U4)
            if k:
                if int(idx[-1]) >= n:
                    raise DecodeError(CODEC, f"topk index {int(idx[-1])} out of range for {n}")
                if k > 1 and not bool(np.all(idx[1:] > idx[:-1])):
                    raise DecodeError(CODEC, "topk indices are not strictly increasing")
        if quantized:
            # |q| <= 128 and 128 * scale was checked finite: the values are finite.
            values = np.frombuffer(data, _I1).astype(np.float32)
            values *= scale
        else:
            values = np.frombuffer(data, _F4)
        # Indices are distinct, so the squares of the kept values are those of the tensor.
        sq = _finite_sq(values, want_sq)
        if sq < 0:
            raise DecodeError(NONFINITE, "topk values contain NaN or Inf")
        dst.fill(0.0)
        dst[idx] = values
    return (dst if len(shape) == 1 else dst.reshape(shape)), sq, left


def _explain_fields(obj: dict[Any, Any], codec: str, allowed: frozenset[str]) -> NoReturn:
    """Raise the precise error for a map whose field names do not fit its codec."""
    for key in obj:
        if key not in allowed:
            if key in _ALL_KEYS:
                raise DecodeError(CODEC, f"field {key!r} is not used by codec {codec}")
            raise DecodeError(SCHEMA, f"unknown tensor field {_short(key)}")
    missing = sorted(_REQUIRED[codec].difference(obj))
    raise DecodeError(SCHEMA, f"codec {codec} needs fields {missing}")


def _check_shape(s: object, limits: Limits) -> tuple[tuple[int, ...], int]:
    if not isinstance(s, list | tuple):
        raise DecodeError(SCHEMA, "tensor field 's' (shape) must be a list")
    if len(s) > limits.max_ndim:
        raise DecodeError(SIZE, f"tensor has {len(s)} dimensions, limit {limits.max_ndim}")
    n = 1
    for dim in s:
        if type(dim) is not int:  # excludes bool, which is an int subclass
            raise DecodeError(SCHEMA, "tensor shape entries must be integers")
        if dim < 0:
            raise DecodeError(SCHEMA, f"negative tensor dimension {dim}")
        if dim > limits.max_elements:
            raise DecodeError(SIZE, f"tensor dimension {dim} exceeds {limits.max_elements}")
        n *= dim
    if n > limits.max_elements:
        raise DecodeError(SIZE, f"tensor has {n} elements, limit {limits.max_elements}")
    return tuple(s), n


def _check_scale(q: object, codec: str = "int8", bound: float = _MAX_SCALE) -> np.float32:
    if type(q) is int:
        value = float(q) if abs(q) < 2**128 else math.copysign(math.inf, q)
    elif type(q) is float:
        value = q
    else:
        raise DecodeError(SCHEMA, f"{codec} field 'q' (scale) must be a number")
    if not math.isfinite(value):
        raise DecodeError(NONFINITE, f"{codec} scale is NaN or Inf")
    if value < 0:
        raise DecodeError(CODEC, f"{codec} scale is negative")
    # An int8 code can be -128 (int4: |code| <= 7, below 8): beyond ``bound`` some decoded
    # value would overflow to inf. Both bounds are power-of-two fractions of float32 max, so
    # rounding to float32 keeps them.
    if value > bound:
        raise DecodeError(NONFINITE, f"{codec} scale so large that decoded values overflow float32")
    return np.float32(value)


def _unpack_int4(data: bytes | bytearray | memoryview, n: int, dst: F32) -> None:
    """Write the ``n`` int4 codes packed in ``data`` (exactly ceil(n/2) bytes) into ``dst``
    as float32; DecodeError for a code -8 or a non-zero padding nibble.

    Works on the bytes as int8, in blocks (temporaries stay small): an arithmetic right
    shift by 4 sign-extends the high nibble, a left shift by 4 first does the same for the
    low one. Code -8 is the only nibble whose sign-extended value is -8."""
    s = np.frombuffer(data, np.int8)
    if n % 2 and int(s[-1]) >> 4:  # the padding nibble of an odd-length tensor
        raise DecodeError(CODEC, "int4 padding nibble of an odd-length tensor is not 0")
    pairs = dst[: n - n % 2].reshape(-1, 2)
    four = np.int8(4)
    for i in range(0, s.size, _BLOCK):
        block = s[i : i + _BLOCK]
        hi = np.right_shift(block, four)
        lo = np.right_shift(np.left_shift(block, four), four)
        if int(hi.min(initial=0)) == -8 or int(lo.min(initial=0)) == -8:
            raise DecodeError(CODEC, "int4 code -8 (nibble 0x8) is not a valid code")
        rows = pairs[i : i + _BLOCK]
        np.copyto(rows[:, 0], lo[: rows.shape[0]])
        np.copyto(rows[:, 1], hi[: rows.shape[0]])
    if n % 2:
        dst[-1] = lo[-1]


def _payload(
    value: object, key: str, size: int, compressed: bool, *, least: int | None = None
) -> bytes | bytearray | memoryview:
    """The bytes of field ``key``, exactly ``size`` long after optional bounded inflation
    (with ``least``: from ``least`` to ``size`` bytes long).

    A ``memoryview`` of bytes (what the aggregator's zero-copy body parser yields,
    :mod:`aggregator.updatebody`) is used in place, like ``bytes``.
    """
    if isinstance(value, memoryview):
        if not (value.ndim == 1 and value.itemsize == 1 and value.c_contiguous):
            raise DecodeError(SCHEMA, f"tensor field {key!r} must be binary")
    elif not isinstance(value, bytes | bytearray):
        raise DecodeError(SCHEMA, f"tensor field {key!r} must be binary")
    lo = size if least is None else least
    if not compressed:
        if not lo <= len(value) <= size:
            needs = f"{size}" if least is None else f"{lo} to {size}"
            raise DecodeError(CODEC, f"tensor field {key!r} has {len(value)} bytes, needs {needs}")
        return value
    return _inflate(value, key, size, lo)


def _inflate(
    value: bytes | bytearray | memoryview, key: str, size: int, least: int
) -> bytearray | memoryview:
    """Inflate the zlib stream ``value`` that must yield ``least`` to ``size`` bytes.

    Memory stays at ``size`` plus small chunks whatever the stream claims: input is fed in
    slices (zlib copies the unconsumed rest of its input on every call), each call may
    produce at most one chunk and never more than one byte past ``size``, which is enough to
    know that a stream is too long without ever inflating a bomb.
    """
    inflater = _zlib.decompressobj()
    buf = bytearray(size)
    view = memoryview(value)
    got = pos = 0
    pending: bytes = b""
    filled = False  # the last call stopped at its output limit: zlib may hold more
    try:
        while True:
            if pending:
                chunk: bytes | memoryview = pending
            elif pos < len(view):
                chunk = view[pos : pos + _INFLATE_IN]
                pos += _INFLATE_IN
            elif filled:
                chunk = b""
            else:
                break
            limit = min(_INFLATE_OUT, size + 1 - got)
            piece = inflater.decompress(chunk, limit)
            filled = len(piece) == limit
            pending = inflater.unconsumed_tail
            if got + len(piece) > size:
                raise DecodeError(SIZE, f"tensor field {key!r} inflates beyond {size} bytes")
            buf[got : got + len(piece)] = piece
            got += len(piece)
            if inflater.eof:
                break
    except _zlib.error as exc:
        raise DecodeError(CODEC, f"tensor field {key!r} is not a valid zlib stream") from exc
    if not inflater.eof:
        raise DecodeError(CODEC, f"tensor field {key!r}: zlib stream truncated")
    if inflater.unused_data or pending or pos < len(view):
        raise DecodeError(CODEC, f"tensor field {key!r}: bytes after the zlib stream")
    if got < least:
        needs = f"{size}" if least == size else f"{least} to {size}"
        raise DecodeError(CODEC, f"tensor field {key!r} inflates to {got} bytes, not {needs}")
    return buf if got == size else memoryview(buf)[:got]


def _all_finite(a: F32) -> bool:
    """True iff the float32 array ``a`` (1-D) holds no NaN or Inf (see :func:`_finite_sq`)."""
    return _finite_sq(a, False) >= 0


def _finite_sq(a: F32, want_sq: bool) -> float:
    """-1.0 if the float32 array ``a`` (1-D) holds a NaN or Inf, else the float64 value of its
    sum of squares if ``want_sq`` (else 0.0).

    Large arrays take a fast path: ``a . a`` is a sum of non-negative squares, so it is finite
    whenever every element is finite, and NaN or Inf as soon as one element is (IEEE rules:
    NaN propagates, Inf cannot be cancelled by non-negative terms). That is one BLAS call
    with no temporary, faster than ``isfinite(a).all()``, and it is also the squared norm the
    aggregator needs, so one pass answers both. It overflows for huge finite values
    (|x| > ~1e19), so a non-finite result is confirmed element-wise, in blocks to keep the
    boolean temporaries small, and the sum is then redone in float64. Small arrays skip it:
    entering ``np.errstate`` (needed to keep overflow and signalling-NaN warnings out of the
    logs) costs more than a scan plus a float64 dot, which cannot overflow.
    """
    if a.size <= _SMALL:
        if not _scan_finite(a):
            return -1.0
        return _sq64(a) if want_sq else 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        sq = float(np.dot(a, a))
    if math.isfinite(sq):
        return sq if want_sq else 0.0
    if not all(_scan_finite(a[i : i + _BLOCK]) for i in range(0, a.size, _BLOCK)):
        return -1.0
    return sum(_sq64(a[i : i + _BLOCK]) for i in range(0, a.size, _BLOCK)) if want_sq else 0.0


def _bounded_sq(a: F32, bound: float) -> float:
    """Sum of squares of ``a``, whose values are finite and at most ``bound`` in magnitude
    (decoded int8/int4 codes): only the float32 sum may overflow, and below
    :data:`_SAFE_SUM` it cannot, so no check is needed then."""
    if a.size * bound**2 < _SAFE_SUM:
        return float(np.dot(a, a))
    return _sq64(a) if a.size <= _SMALL else _finite_sq(a, True)


def _sq64(a: F32) -> float:
    """Sum of squares of finite float32 values in float64 (cannot overflow: < 1.2e77 each)."""
    b = a.astype(np.float64)
    return float(np.dot(b, b))


def _scan_finite(a: F32) -> bool:
    # count_nonzero is a plain C loop; ndarray.all() goes through the slower reduction machinery.
    return int(np.count_nonzero(np.isfinite(a))) == a.size


def _half_all_finite(h: np.ndarray[Any, Any]) -> bool:
    """No Inf/NaN among float16 bit patterns ``h`` (uint16): exponent field not all ones."""
    for i in range(0, h.size, _BLOCK):
        if int(np.max(h[i : i + _BLOCK] & np.uint16(0x7C00))) == 0x7C00:
            return False
    return True


_HALF_EXP_SHIFT: Final = np.float32(2.0**112)  # float32 exponent bias 127 - float16 bias 15


def _half_to_float(h: np.ndarray[Any, Any], dst: F32) -> None:
    """Write finite float16 bit patterns ``h`` into float32 ``dst`` exactly.

    numpy's own float16 -> float32 cast is scalar on many builds (~5x slower than this). Here
    the 16 bits are placed in the top of a 32-bit word and shifted right arithmetically by 3,
    which puts the fp16 exponent and mantissa where float32 has them, with the exponent
    re-biased later; the three copies of the sign that the shift smears are masked off. The
    word, read as float32, is the value times 2**-112 (normal and subnormal alike), so one
    multiply finishes the job. Inf/NaN (exponent all ones) must have been rejected before.
    """
    bits = dst.view(np.uint32)
    np.copyto(bits, h)
    np.left_shift(bits, np.uint32(16), out=bits)
    signed = dst.view(np.int32)
    np.right_shift(signed, np.int32(3), out=signed)
    np.bitwise_and(bits, np.uint32(0x8FFFFFFF), out=bits)
    np.multiply(dst, _HALF_EXP_SHIFT, out=dst)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
