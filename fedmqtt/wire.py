"""Wire format: every MQTT payload fedmqtt sends, as msgpack, never pickle.

A message is a msgpack *stream of two objects*, a header and a body. Two forms exist, and
every receiver reads both:

* **compact** (header v2, what this release sends)::

    header = {"v": 2, "a": 1 | 2 | 3, "s": bin}      # ALG_CODES: chacha20-poly1305, hmac, ed25519
    body   = {"v": 1 | 2, "t": "update" | ..., "f": str, "s": str, ...}

  The body's keys are the short names of :data:`SHORT_KEYS` (every top-level field of every
  message type has one) and the hex ids of :data:`HEX_KEYS` travel as binary; a receiver
  expands both back before parsing, so each type's ``from_body`` sees the same map in either
  form. A compact body with a key that has no long name is refused (``schema``).
* **long** (header v1, what earlier releases send and read)::

    header = {"v": 1, "alg": "chacha20-poly1305" | "hmac-sha256" | "ed25519", "sig": bin}
    body   = {"v": 1 | 2, "type": ..., "federation": str, "sender": str, ...}

The short names and the long names are disjoint sets (apart from ``v``), and every type
requires ``type``, ``federation`` and ``sender``, so a body means one thing only: flipping a
header's form (it is not signed) makes the body unreadable, never a different message.
Receivers of earlier releases refuse header v2 (reason ``schema``): devices are upgraded before
the aggregator, and a device answers in the form of the aggregator's last verified message.

The body's ``v`` is the schema of its type: every type is at v1 except the model, at v2 (its
``spec`` is the fingerprint of a separately published :class:`SpecMessage` instead of the spec
itself; v1 model bodies, spec inline, are still read). A receiver refuses a ``v`` its type does
not know (reason ``schema``), so an older device refuses a v2 model cleanly.

The signature (or MAC) covers the body bytes exactly as sent. Putting the small header first
lets a receiver read it, verify the signature over a zero-copy view of the rest, and only then
parse the body: forged or corrupted messages are refused before any tensor is touched, and
nothing is ever re-encoded to be checked.

Decoding raises only :class:`fedmqtt.errors.DecodeError` (reason ``size``, ``schema`` or
``signature``), whatever the bytes. msgpack's own limits (``max_bin_len`` and friends) stop a
hostile length prefix before it allocates.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, cast

import msgpack
import numpy as np

from fedmqtt.cohort import EVERYONE, Selection
from fedmqtt.errors import SCHEMA, SIGNATURE, SIZE, UNKNOWN_SPEC, DecodeError
from fedmqtt.models.spec import ModelSpec
from fedmqtt.params import F32, Params
from fedmqtt.signing import CHACHA20_POLY1305, ED25519, HMAC_SHA256, Signer, Verifier

VERSION: Final = 1  # the long header's schema, and the body schema of every type but the model
COMPACT: Final = 2  # the compact header's schema (body keys from SHORT_KEYS)
_HEADER_VERSIONS: Final = (VERSION, COMPACT)
MODEL_VERSION: Final = 2  # the model body's schema (spec by fingerprint)
_BODY_VERSIONS: Final = (1, 2)  # every body schema some type speaks
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
_MAX_HEADER_BYTES: Final = 512
# msgpack's limits for a body (besides max_bytes for binary fields): a hostile length prefix is
# refused before anything is allocated. aggregator.updatebody declares them as type constraints.
MAX_STR_BYTES: Final = 1 << 20
MAX_ARRAY_LEN: Final = 1 << 16
MAX_MAP_LEN: Final = 1 << 12
MAX_KEYFRAMES: Final = 64  # the most keyframes an announcement may list
T = TypeVar("T")


ALG_CODES: Final[Mapping[str, int]] = {CHACHA20_POLY1305: 1, HMAC_SHA256: 2, ED25519: 3}
"""The compact header's ``a``: the signature algorithm by number."""
_ALG_NAMES: Final = {code: name for name, code in ALG_CODES.items()}

SHORT_KEYS: Final[Mapping[str, str]] = {
    "v": "v",
    "type": "t",
    "federation": "f",
    "sender": "s",
    "update_id": "u",
    "seq": "q",
    "base_version": "b",
    "num_samples": "n",
    "spec": "p",
    "metrics": "m",
    "created_at": "c",
    "delta": "d",
    "version": "r",
    "stats": "x",
    "params": "w",
    "keyframe": "k",
    "threshold": "h",
    "base": "o",
    "base_digest": "g",
    "digest": "G",
    "fingerprint": "F",
    "init": "I",
    "keyframes": "K",
    "revision": "R",
    "epochs": "e",
    "lr": "l",
    "batch_size": "B",
    "momentum": "M",
    "mu": "U",
    "codec": "C",
    "min_interval_s": "N",
    "extra": "X",
    "selection": "L",
    "state": "S",
    "at": "a",
    "onnx": "O",
    "loss": "E",
    "agent": "A",
    "spec_z": "Z",
}
"""Each top-level body field's key in a compact body: the one table, for every message type
(this module's and :mod:`fedmqtt.fedeval`'s). Nested maps keep their keys."""
_LONG_KEYS: Final = {short: long for long, short in SHORT_KEYS.items()}
HEX_KEYS: Final = frozenset({"update_id", "spec", "fingerprint"})
"""Fields whose value, a non-empty lowercase hex string, a compact body carries as binary."""
_HEX_DIGITS: Final = frozenset("0123456789abcdef")


def compact_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """``body`` with short keys and binary hex ids (ValueError for a field without a short
    name: a sender's bug, never sent in long form by accident)."""
    out: dict[str, Any] = {}
    for k, v in body.items():
        short = SHORT_KEYS.get(k)
        if short is None:
            raise ValueError(f"body field {k!r} has no short name in wire.SHORT_KEYS")
        out[short] = bytes.fromhex(v) if k in HEX_KEYS and _is_hex(v) else v
    return out


def expand_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """A compact body with its long keys and hex ids back; DecodeError(SCHEMA) for a key
    without a long name."""
    out: dict[str, Any] = {}
    for k, v in body.items():
        long = _LONG_KEYS.get(k)
        if long is None:
            raise DecodeError(SCHEMA, f"unknown field {k!r} in a compact body")
        out[long] = v.hex() if long in HEX_KEYS and type(v) is bytes else v
    return out


def _is_hex(v: Any) -> bool:
    return isinstance(v, str) and v != "" and len(v) % 2 == 0 and _HEX_DIGITS.issuperset(v)


@dataclass(frozen=True)
class BodyField:
    """One field of a message body, as the receiver checks it.

    ``kind`` is the msgpack type: ``int`` (never a bool), ``float`` (an int or a float, finite
    when ``finite``), ``str`` or ``dict`` (a map with text keys, at most :data:`MAX_MAP_LEN`
    entries; ``values=float``: each value a number, ``values=None``: values checked later, by
    their own owner). ``const``: the only value allowed. ``lo``: the smallest value of an int,
    or the fewest characters of a str; ``hi``: the most characters of a str. Every field is
    required, and a str is also bounded by :data:`MAX_STR_BYTES` in UTF-8.
    """

    name: str
    kind: type
    const: int | str | None = None
    lo: int | None = None
    hi: int | None = None
    values: type | None = None
    finite: bool = False


UPDATE_FIELDS: Final = (
    BodyField("v", int, const=VERSION),
    BodyField("type", str, const="update"),
    BodyField("federation", str),
    BodyField("sender", str),
    BodyField("update_id", str, lo=8, hi=64),
    BodyField("seq", int, lo=0),
    BodyField("base_version", int, lo=0),
    BodyField("num_samples", int, lo=1),
    BodyField("spec", str),
    BodyField("metrics", dict, values=float),
    BodyField("created_at", float, finite=True),
    BodyField("delta", dict),  # tensor maps, checked by fedmqtt.codecs when decoded
)
"""The update body: the one declaration of its fields, types and limits.

:meth:`Update.from_body` checks a body against it, in this order, and
``aggregator.updatebody``'s msgspec types declare the same (tests/test_updatebody.py compares
the two field by field)."""
UPDATE_FIELD: Final = {f.name: f for f in UPDATE_FIELDS}

SCORE_QUANTILE_PREFIX: Final = "score_q:"
"""An autoencoder's update reports quantiles of the anomaly scores of the device's data under
the update's base version in ``metrics``: key ``"score_q:<level>"`` (e.g. ``score_q:0.99``),
value the quantile at that level. At most :data:`MAX_SCORE_QUANTILES`; levels in (0, 1),
values finite, >= 0 and non-decreasing with the level. The aggregator refuses an update whose
report breaks these rules (reason ``schema``) and combines the reports into
:attr:`GlobalModel.threshold` (:mod:`fedmqtt.aggregation.threshold`)."""
MAX_SCORE_QUANTILES: Final = 16


def score_quantile_key(level: float) -> str:
    return f"{SCORE_QUANTILE_PREFIX}{level:.6g}"


def score_quantiles(metrics: Mapping[str, float]) -> tuple[tuple[float, float], ...] | None:
    """The update's (level, score quantile) report sorted by level, None if it has none;
    DecodeError if the report breaks the rules of :data:`SCORE_QUANTILE_PREFIX`."""
    from fedmqtt.aggregation.threshold import check_points

    n = len(SCORE_QUANTILE_PREFIX)
    found = [(k[n:], v) for k, v in metrics.items() if k.startswith(SCORE_QUANTILE_PREFIX)]
    if not found:
        return None
    if len(found) > MAX_SCORE_QUANTILES:
        raise DecodeError(SCHEMA, f"more than {MAX_SCORE_QUANTILES} score quantiles")
    try:
        return check_points([(float(level), v) for level, v in found])
    except ValueError as e:
        raise DecodeError(SCHEMA, f"bad score quantile report: {e}") from None


@dataclass(frozen=True)
class Envelope:
    """A message split into its authenticated parts; ``body`` is a view into the payload."""

    alg: str
    sig: bytes
    body: memoryview
    compact: bool = False  # header v2: the body's keys are SHORT_KEYS

    def verify(self, verifier: Verifier) -> None:
        if self.alg != verifier.alg:
            raise DecodeError(SIGNATURE, f"signed with {self.alg}, expected {verifier.alg}")
        if not verifier.verify(self.body, self.sig):
            raise DecodeError(SIGNATURE, "signature does not match")


def seal(body: Mapping[str, Any], signer: Signer, *, compact: bool = True) -> bytes:
    """Encode ``body`` (long keys) and prepend a header carrying its signature.

    Args:
        body: the message body, with the long field names.
        signer: signs (or MACs) the body bytes.
        compact: write the compact form (header v2, short keys); False: the long form, which
            receivers of earlier releases read.
    """
    if not compact:
        body_bytes = _pack(body)
        return _pack({"v": VERSION, "alg": signer.alg, "sig": signer.sign(body_bytes)}) + body_bytes
    code = ALG_CODES.get(signer.alg)
    if code is None:
        raise ValueError(f"signature algorithm {signer.alg!r} has no compact header code")
    body_bytes = _pack(compact_body(body))
    header = {"v": COMPACT, "a": code, "s": signer.sign(body_bytes)}
    return _pack(header) + body_bytes


def is_compact(payload: bytes) -> bool:
    """Whether ``payload`` opens with a compact header (False for anything unreadable)."""
    try:
        return open_envelope(payload).compact
    except DecodeError:
        return False


def open_envelope(payload: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Envelope:
    """Split a payload into header and body without parsing the body."""
    if len(payload) > max_bytes:
        raise DecodeError(SIZE, f"message of {len(payload)} bytes exceeds {max_bytes}")
    unpacker = msgpack.Unpacker(
        raw=False,
        max_buffer_size=_MAX_HEADER_BYTES,
        max_bin_len=128,
        max_str_len=64,
        max_array_len=0,
        max_map_len=8,
        max_ext_len=0,
    )
    unpacker.feed(payload[:_MAX_HEADER_BYTES])
    try:
        header = unpacker.unpack()
    except msgpack.OutOfData:
        raise DecodeError(SCHEMA, "truncated header") from None
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise DecodeError(SCHEMA, f"header is not msgpack: {type(e).__name__}") from None
    offset = unpacker.tell()
    if not isinstance(header, dict):
        raise DecodeError(SCHEMA, "header must be a map")
    if _check_version(header, _HEADER_VERSIONS) == COMPACT:
        code, sig = header.get("a"), header.get("s")
        alg = _ALG_NAMES.get(code) if type(code) is int else None
        if alg is None or not isinstance(sig, bytes):
            raise DecodeError(SCHEMA, "compact header needs 'a' (an algorithm code) and 's' (bin)")
        return Envelope(alg, sig, memoryview(payload)[offset:], compact=True)
    alg, sig = header.get("alg"), header.get("sig")
    if not isinstance(alg, str) or not isinstance(sig, bytes):
        raise DecodeError(SCHEMA, "header needs 'alg' (str) and 'sig' (bin)")
    return Envelope(alg, sig, memoryview(payload)[offset:])


def unpack_body(env: Envelope, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Parse the body map of an envelope (call after verifying it); its ``v`` is one that some
    type speaks (each ``from_body`` checks its own)."""
    body = unpack_map(env.body, max_bytes=max_bytes)
    if env.compact:
        body = expand_body(body)
    _check_version(body, _BODY_VERSIONS)
    return body


def unpack_map(data: bytes | memoryview, *, max_bytes: int) -> dict[str, Any]:
    """A msgpack map with text keys, parsed under tight limits; DecodeError(SCHEMA) otherwise."""
    try:
        body = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=MAX_STR_BYTES,
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=MAX_MAP_LEN,
            max_ext_len=0,
        )
    except Exception as e:  # ValueError, ExtraData, FormatError, StackError, TypeError...
        raise DecodeError(SCHEMA, f"body is not valid msgpack: {type(e).__name__}") from None
    if not isinstance(body, dict):
        raise DecodeError(SCHEMA, "body must be a map")
    return cast(dict[str, Any], body)


def _check_version(m: Mapping[Any, Any], versions: tuple[int, ...] = (VERSION,)) -> int:
    v = m.get("v")
    if type(v) is not int or v not in versions:  # neither a bool nor a float such as 1.0
        speaks = " or ".join(map(str, versions))
        raise DecodeError(SCHEMA, f"unsupported schema version {v!r} (this build speaks {speaks})")
    return v


def _pack(obj: Mapping[str, Any]) -> bytes:
    return cast(bytes, msgpack.packb(obj, use_bin_type=True))


def field_of(m: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...]) -> T:
    """``m[key]`` checked to be of ``kind`` (bool never passes as int)."""
    if key not in m:
        raise DecodeError(SCHEMA, f"missing field {key!r}")
    v = m[key]
    if type(v) is kind:  # the usual case, decided at once (an update has eleven fields)
        return v
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(v, bool) and bool not in kinds:
        raise DecodeError(SCHEMA, f"field {key!r} must be {_names(kinds)}, got bool")
    if not isinstance(v, kinds):
        raise DecodeError(SCHEMA, f"field {key!r} must be {_names(kinds)}, got {type(v).__name__}")
    return cast(T, v)


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)


def _number(m: Mapping[str, Any], key: str) -> float:
    v = float(field_of(m, key, (int, float)))
    if not math.isfinite(v):  # not np.isfinite: a numpy call per number costs ~1 µs
        raise DecodeError(SCHEMA, f"field {key!r} must be finite")
    return v


def _nonneg_int(m: Mapping[str, Any], key: str) -> int:
    v = field_of(m, key, int)
    if v < 0:
        raise DecodeError(SCHEMA, f"field {key!r} must be >= 0")
    return v


def _float_map(m: Mapping[str, Any], key: str) -> dict[str, float]:
    raw = field_of(m, key, dict)
    out: dict[str, float] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DecodeError(SCHEMA, f"field {key!r} must map names to numbers")
        out[k] = float(v)
    return out


def _read(m: Mapping[str, Any], fields: tuple[BodyField, ...]) -> dict[str, Any]:
    """The values of ``fields`` in ``m``, each checked against its declaration, in order."""
    out: dict[str, Any] = {}
    for f in fields:
        if f.kind is float:
            v: Any = _number(m, f.name) if f.finite else float(field_of(m, f.name, (int, float)))
        elif f.kind is dict and f.values is float:
            v = _float_map(m, f.name)
        else:
            v = field_of(m, f.name, f.kind)
        if f.const is not None and v != f.const:
            if f.name == "v":
                raise DecodeError(SCHEMA, f"unsupported schema version {v!r} for this message")
            raise DecodeError(SCHEMA, f"field {f.name!r} must be {f.const!r}, got {v!r}")
        if f.kind is int and f.lo is not None and v < f.lo:
            raise DecodeError(SCHEMA, f"field {f.name!r} must be >= {f.lo}")
        if f.kind is str and not (f.lo or 0) <= len(v) <= (f.hi or len(v)):
            raise DecodeError(SCHEMA, f"{f.name} must be {f.lo or 0}-{f.hi or 'any'} characters")
        out[f.name] = v
    return out


def _common(
    m: Mapping[str, Any], type_: str, versions: tuple[int, ...] = (VERSION,)
) -> tuple[str, str]:
    t = field_of(m, "type", str)
    if t != type_:
        raise DecodeError(SCHEMA, f"expected a {type_!r} message, got {t!r}")
    _check_version(m, versions)
    return field_of(m, "federation", str), field_of(m, "sender", str)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Update:
    """A device's contribution: the encoded delta (client weights - base weights).

    ``delta`` stays in its wire form (a map of encoded tensors); the aggregator decodes it
    straight into its flat buffer with :func:`fedmqtt.codecs.decode_params` once the cheap checks
    (staleness, replay, spec) have passed.
    """

    federation: str
    sender: str
    update_id: str
    seq: int
    base_version: int
    num_samples: int
    spec_fingerprint: str
    delta: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)

    def to_body(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "type": "update",
            "federation": self.federation,
            "sender": self.sender,
            "update_id": self.update_id,
            "seq": self.seq,
            "base_version": self.base_version,
            "num_samples": self.num_samples,
            "spec": self.spec_fingerprint,
            "metrics": self.metrics,
            "created_at": self.created_at,
            "delta": self.delta,
        }

    @classmethod
    def from_body(cls, m: Mapping[str, Any]) -> Update:
        f = _read(m, UPDATE_FIELDS)
        return cls(
            federation=f["federation"],
            sender=f["sender"],
            update_id=f["update_id"],
            seq=f["seq"],
            base_version=f["base_version"],
            num_samples=f["num_samples"],
            spec_fingerprint=f["spec"],
            delta=f["delta"],
            metrics=f["metrics"],
            created_at=f["created_at"],
        )


SpecStore = Mapping[str, ModelSpec]  # verified specs a receiver holds, by fingerprint


@dataclass(frozen=True)
class GlobalModel:
    r"""A version of the global model with its full parameters, signed by the aggregator.

    On the wire (v2) the spec is its fingerprint: the receiver resolves it against the specs
    it holds (``specs``, from verified :class:`SpecMessage`\ s); an unknown fingerprint is
    refused with reason ``unknown_spec`` before any tensor is decoded.

    The parameters travel in any full-tensor codec of :mod:`fedmqtt.codecs` (raw, fp16,
    int8); the receiver decodes whichever it finds. A sender that compressed them passes the
    wire maps as ``encoded`` (sent as they are) and their decoding as ``params``.

    ``threshold`` (autoencoders only, optional field ``threshold`` of the body, finite and
    >= 0): the decision threshold on the anomaly score that belongs to this version; absent
    until the first device has reported a score quantile. Receivers that do not know the field
    ignore it.
    """

    federation: str
    sender: str
    version: int
    spec: ModelSpec
    params: Params
    stats: dict[str, float] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    encoded: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    keyframe: bool = False  # the aggregator keeps it as a base of deltas (ModelDelta)
    threshold: float | None = None

    def to_body(self) -> dict[str, Any]:
        from fedmqtt.codecs import Codec, encode_params

        body: dict[str, Any] = {
            "v": MODEL_VERSION,
            "type": "model",
            "federation": self.federation,
            "sender": self.sender,
            "version": self.version,
            "spec": self.spec.fingerprint(),
            "stats": self.stats,
            "created_at": self.created_at,
            "params": self.encoded
            if self.encoded is not None
            else encode_params(self.params, Codec("raw"), rng=np.random.default_rng(0)),
        }
        if self.keyframe:  # absent otherwise: a model that is no keyframe is unchanged
            body["keyframe"] = True
        if self.threshold is not None:
            body["threshold"] = self.threshold
        return body

    @classmethod
    def from_body(cls, m: Mapping[str, Any], specs: SpecStore | None = None) -> GlobalModel:
        from fedmqtt.codecs import decode_params

        fed, sender = _common(m, "model", (1, MODEL_VERSION))
        if m["v"] == 1:
            spec = ModelSpec.from_wire(field_of(m, "spec", dict))
        else:
            spec = _resolve_spec(m, specs)
        threshold = _number(m, "threshold") if "threshold" in m else None
        if threshold is not None and threshold < 0:
            raise DecodeError(SCHEMA, "field 'threshold' must be >= 0")
        layout = spec.layout()
        flat = decode_params(field_of(m, "params", dict), layout)
        return cls(
            federation=fed,
            sender=sender,
            version=_nonneg_int(m, "version"),
            spec=spec,
            params=layout.unflatten(flat, copy=False),
            stats=_float_map(m, "stats"),
            created_at=_number(m, "created_at"),
            keyframe=m.get("keyframe") is True,
            threshold=threshold,
        )


def _resolve_spec(m: Mapping[str, Any], specs: SpecStore | None) -> ModelSpec:
    fp = field_of(m, "spec", str)
    found = specs.get(fp) if specs is not None else None
    if found is None:
        raise DecodeError(UNKNOWN_SPEC, f"spec {fp} is not one this receiver holds")
    return found


@dataclass(frozen=True)
class ModelDelta:
    """Version ``version`` as a compressed difference from keyframe ``base`` (a version
    published in full with ``keyframe`` set), signed by the aggregator; retained on
    ``fl/<fed>/delta/<base>`` (fedmqtt.downlink).

    ``delta`` is the decoded difference (flat, layout order); a receiver holding the keyframe's
    parameters ``K`` with ``digest(K) == base_digest`` gets the model
    ``downlink.apply_delta(K, delta)``, whose digest must equal ``digest``. The wire maps of
    ``delta`` are passed as ``encoded`` by the sender (any codec of fedmqtt.codecs).
    """

    federation: str
    sender: str
    version: int
    base: int
    spec: ModelSpec
    base_digest: str  # hex; 16 bytes on the wire
    digest: str
    delta: F32
    created_at: float = field(default_factory=time.time)
    encoded: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    threshold: float | None = None  # an autoencoder's decision threshold, as in GlobalModel

    def to_body(self) -> dict[str, Any]:
        from fedmqtt.codecs import Codec, encode_params

        params = self.encoded
        if params is None:
            layout = self.spec.layout()
            params = encode_params(
                layout.unflatten(self.delta, copy=False), Codec("raw"), rng=np.random.default_rng(0)
            )
        body: dict[str, Any] = {
            "v": VERSION,
            "type": "delta",
            "federation": self.federation,
            "sender": self.sender,
            "version": self.version,
            "base": self.base,
            "spec": self.spec.fingerprint(),
            "base_digest": bytes.fromhex(self.base_digest),
            "digest": bytes.fromhex(self.digest),
            "created_at": self.created_at,
            "params": params,
        }
        if self.threshold is not None:  # absent otherwise, as in the model message
            body["threshold"] = self.threshold
        return body

    @classmethod
    def from_body(cls, m: Mapping[str, Any], specs: SpecStore | None = None) -> ModelDelta:
        from fedmqtt.codecs import decode_params

        fed, sender = _common(m, "delta")
        version, base = _nonneg_int(m, "version"), _nonneg_int(m, "base")
        if base >= version:
            raise DecodeError(SCHEMA, f"delta from v{base} to v{version} does not go forward")
        digests = [field_of(m, k, bytes).hex() for k in ("base_digest", "digest")]
        if any(len(d) != 32 for d in digests):
            raise DecodeError(SCHEMA, "digests must be 16 bytes")
        spec = _resolve_spec(m, specs)
        threshold = _number(m, "threshold") if "threshold" in m else None
        if threshold is not None and threshold < 0:
            raise DecodeError(SCHEMA, "field 'threshold' must be >= 0")
        return cls(
            federation=fed,
            sender=sender,
            version=version,
            base=base,
            spec=spec,
            base_digest=digests[0],
            digest=digests[1],
            delta=decode_params(field_of(m, "params", dict), spec.layout()),
            created_at=_number(m, "created_at"),
            threshold=threshold,
        )


@dataclass(frozen=True)
class Genesis:
    """What a device needs to build version 0 itself (fedmqtt.downlink.genesis): the model
    seed, the downlink codec of the published version 0, and the digest of what devices decode
    from it (hex; 16 bytes on the wire)."""

    seed: int
    codec: str
    digest: str

    def to_wire(self) -> dict[str, Any]:
        return {"seed": self.seed, "codec": self.codec, "digest": bytes.fromhex(self.digest)}

    @classmethod
    def from_wire(cls, m: Any) -> Genesis:
        if not isinstance(m, dict):
            raise DecodeError(SCHEMA, "init must be a map")
        seed, codec = _nonneg_int(m, "seed"), field_of(m, "codec", str)
        digest = field_of(m, "digest", bytes)
        if len(digest) != 16 or not 0 < len(codec) <= 64:
            raise DecodeError(SCHEMA, "init needs a 16-byte digest and a codec of 1-64 characters")
        return cls(seed, codec, digest.hex())


@dataclass(frozen=True)
class SpecMessage:
    """The model spec (architecture, preprocessing, classes) that models refer to by
    fingerprint; published, retained, when it changes. The receiver recomputes the
    fingerprint from the spec and refuses a message whose declared fingerprint differs.

    The spec travels as a map (``spec``) or, in the compact form, as the zlib stream of that
    map packed (``spec_z``) when that is smaller: preprocessing constants are float64 lists
    that repeat (digits: 64 zeros and 64 equal scales, 1.2 KB as a map). A body carries
    exactly one of the two; the fingerprint is the spec's, whichever way it travelled.

    ``genesis`` (field ``init``, absent when None, so older receivers ignore it): how to build
    version 0 without downloading it, given only while the aggregator holds that version 0."""

    federation: str
    sender: str
    spec: ModelSpec
    created_at: float = field(default_factory=time.time)
    genesis: Genesis | None = None

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint()

    def to_body(self, *, deflate: bool = False) -> dict[str, Any]:
        """The body; ``deflate``: the spec as ``spec_z`` if that is smaller (compact form only:
        receivers of earlier releases read ``spec`` alone)."""
        spec: dict[str, Any] = {"spec": self.spec.to_wire()}
        if deflate:
            packed = _pack(spec["spec"])
            z = zlib.compress(packed, 9)
            if len(z) < len(packed):
                spec = {"spec_z": z}
        body: dict[str, Any] = {
            "v": VERSION,
            "type": "spec",
            "federation": self.federation,
            "sender": self.sender,
            "fingerprint": self.fingerprint,
            **spec,
            "created_at": self.created_at,
        }
        if self.genesis is not None:
            body["init"] = self.genesis.to_wire()
        return body

    @classmethod
    def from_body(
        cls, m: Mapping[str, Any], *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> SpecMessage:
        """Parse a body; ``max_bytes`` also bounds what ``spec_z`` inflates to."""
        fed, sender = _common(m, "spec")
        if ("spec" in m) == ("spec_z" in m):
            raise DecodeError(SCHEMA, "a spec message carries exactly one of spec and spec_z")
        if "spec" in m:
            raw = field_of(m, "spec", dict)
        else:
            packed = _inflate_bounded(field_of(m, "spec_z", bytes), max_bytes, "spec_z")
            raw = unpack_map(packed, max_bytes=max_bytes)
        spec = ModelSpec.from_wire(raw)
        declared = field_of(m, "fingerprint", str)
        if declared != spec.fingerprint():
            raise DecodeError(SCHEMA, f"declared fingerprint {declared} is not the spec's")
        genesis = Genesis.from_wire(m["init"]) if "init" in m else None
        return cls(fed, sender, spec, _number(m, "created_at"), genesis)


def _inflate_bounded(data: bytes, limit: int, key: str) -> bytes:
    """The single zlib stream ``data`` inflated, at most ``limit`` bytes (zlib allocates only
    what it produces, so a bomb stops at ``limit + 1``); DecodeError(SCHEMA) for anything
    else: a longer, truncated, corrupt or trailed stream."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as e:
        raise DecodeError(SCHEMA, f"field {key!r} is not a zlib stream: {e}") from None
    if len(out) > limit:
        raise DecodeError(SCHEMA, f"field {key!r} inflates to more than {limit} bytes")
    if not inflater.eof or inflater.unused_data:
        raise DecodeError(SCHEMA, f"field {key!r} is a truncated or trailed zlib stream")
    return out


UNSTATED_SPEC: Final = ""
"""The ``spec`` of an announcement as the aggregator sends it: not stated. A device needs the
spec of the model it fetches, which that model message names (and the spec message is
retained on its own topic), not the spec of each version announced. The field stays, empty,
because receivers of earlier releases require a string there; receivers of this release also
accept a body without it."""


@dataclass(frozen=True)
class Announce:
    """A new global version exists: a few dozen bytes that devices stay subscribed to, so that
    each fetches the (retained) model only when it is ready to train on it. ``spec_fingerprint``
    is informative only (:data:`UNSTATED_SPEC` from the aggregator): nothing depends on it."""

    federation: str
    sender: str
    version: int
    spec_fingerprint: str
    created_at: float = field(default_factory=time.time)
    # Keyframes with a delta to ``version`` on fl/<fed>/delta/<keyframe> (ModelDelta); the
    # field is absent when there are none, so an announcement without deltas is unchanged.
    keyframes: tuple[int, ...] = ()

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "v": VERSION,
            "type": "announce",
            "federation": self.federation,
            "sender": self.sender,
            "version": self.version,
            "spec": self.spec_fingerprint,
            "created_at": self.created_at,
        }
        if self.keyframes:
            body["keyframes"] = list(self.keyframes)
        return body

    @classmethod
    def from_body(cls, m: Mapping[str, Any]) -> Announce:
        fed, sender = _common(m, "announce")
        version = _nonneg_int(m, "version")
        kf = m.get("keyframes", [])
        if (
            not isinstance(kf, list)
            or len(kf) > MAX_KEYFRAMES
            or not all(type(k) is int and 0 <= k <= version for k in kf)
        ):
            raise DecodeError(SCHEMA, f"keyframes must be at most {MAX_KEYFRAMES} versions <= v")
        return cls(
            fed,
            sender,
            version,
            field_of(m, "spec", str) if "spec" in m else UNSTATED_SPEC,
            _number(m, "created_at"),
            tuple(kf),
        )


@dataclass(frozen=True)
class PlanSettings:
    """A plan's training settings with their defaults: the aggregator's ``[plan]`` table and
    what a device uses before it has received a plan. The ranges a plan's ``epochs`` and
    ``batch_size`` must be in are :data:`PLAN_EPOCHS` and :data:`PLAN_BATCH_SIZE`."""

    epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    momentum: float = 0.9
    mu: float = 0.0
    codec: str = "int8"
    min_interval_s: float = 0.0
    selection: Selection = EVERYONE  # who trains (fedmqtt.cohort); [plan.selection]


PLAN_DEFAULTS: Final = PlanSettings()
PLAN_EPOCHS: Final = (1, 1000)  # the fewest and most local epochs a plan may ask for
PLAN_BATCH_SIZE: Final = (1, 1 << 20)  # the smallest and largest batch size


@dataclass(frozen=True)
class Plan:
    """What devices should do next: local training hyperparameters and upload codec (each
    defaulting to :data:`PLAN_DEFAULTS`), and which devices train (``selection``, an optional
    field of the body: a plan without it selects every device, :mod:`fedmqtt.cohort`)."""

    federation: str
    sender: str
    revision: int
    epochs: int = PLAN_DEFAULTS.epochs
    lr: float = PLAN_DEFAULTS.lr
    batch_size: int = PLAN_DEFAULTS.batch_size
    momentum: float = PLAN_DEFAULTS.momentum
    mu: float = PLAN_DEFAULTS.mu
    codec: str = PLAN_DEFAULTS.codec
    min_interval_s: float = PLAN_DEFAULTS.min_interval_s
    extra: dict[str, float] = field(default_factory=dict)
    selection: Selection = PLAN_DEFAULTS.selection

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "v": VERSION,
            "type": "plan",
            "federation": self.federation,
            "sender": self.sender,
            "revision": self.revision,
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "momentum": self.momentum,
            "mu": self.mu,
            "codec": self.codec,
            "min_interval_s": self.min_interval_s,
            "extra": self.extra,
        }
        if not self.selection.everyone:  # optional: absent means every device trains
            body["selection"] = self.selection.to_wire()
        return body

    @classmethod
    def from_body(cls, m: Mapping[str, Any]) -> Plan:
        fed, sender = _common(m, "plan")
        epochs, batch = _nonneg_int(m, "epochs"), _nonneg_int(m, "batch_size")
        if not PLAN_EPOCHS[0] <= epochs <= PLAN_EPOCHS[1] or not (
            PLAN_BATCH_SIZE[0] <= batch <= PLAN_BATCH_SIZE[1]
        ):
            raise DecodeError(SCHEMA, "plan epochs/batch_size out of range")
        return cls(
            federation=fed,
            sender=sender,
            revision=_nonneg_int(m, "revision"),
            epochs=epochs,
            lr=_number(m, "lr"),
            batch_size=batch,
            momentum=_number(m, "momentum"),
            mu=_number(m, "mu"),
            codec=field_of(m, "codec", str),
            min_interval_s=_number(m, "min_interval_s"),
            extra=_float_map(m, "extra"),
            selection=Selection.from_wire(m["selection"]) if "selection" in m else EVERYONE,
        )


@dataclass(frozen=True)
class Status:
    """Device presence. ``offline`` is also the device's retained last-will message."""

    federation: str
    sender: str
    state: str
    at: float = field(default_factory=time.time)

    def to_body(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "type": "status",
            "federation": self.federation,
            "sender": self.sender,
            "state": self.state,
            "at": self.at,
        }

    @classmethod
    def from_body(cls, m: Mapping[str, Any]) -> Status:
        fed, sender = _common(m, "status")
        state = field_of(m, "state", str)
        if state not in ("online", "offline"):
            raise DecodeError(SCHEMA, f"status must be online or offline, not {state!r}")
        return cls(fed, sender, state, _number(m, "at"))


@dataclass(frozen=True)
class OnnxModel:
    """The ONNX export of a global-model version, for on-device inference."""

    federation: str
    sender: str
    version: int
    onnx: bytes
    created_at: float = field(default_factory=time.time)

    def to_body(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "type": "onnx",
            "federation": self.federation,
            "sender": self.sender,
            "version": self.version,
            "onnx": self.onnx,
            "created_at": self.created_at,
        }

    @classmethod
    def from_body(cls, m: Mapping[str, Any]) -> OnnxModel:
        fed, sender = _common(m, "onnx")
        return cls(
            fed,
            sender,
            _nonneg_int(m, "version"),
            field_of(m, "onnx", bytes),
            _number(m, "created_at"),
        )


Message = Update | GlobalModel | ModelDelta | SpecMessage | Announce | Plan | Status | OnnxModel
M = TypeVar("M", Update, GlobalModel, ModelDelta, SpecMessage, Announce, Plan, Status, OnnxModel)


def encode(msg: Message, signer: Signer, *, compact: bool = True) -> bytes:
    """``msg`` sealed by ``signer``, compact unless ``compact`` is False (:func:`seal`); the
    compact form also deflates a spec message's spec (:class:`SpecMessage`)."""
    if isinstance(msg, SpecMessage):
        return seal(msg.to_body(deflate=compact), signer, compact=compact)
    return seal(msg.to_body(), signer, compact=compact)


def decode(
    payload: bytes,
    cls: type[M],
    verifier: Verifier,
    *,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    specs: SpecStore | None = None,
) -> M:
    """Open, verify and parse a message of type ``cls``; raises only DecodeError. ``specs``
    resolves a model's spec fingerprint (models only)."""
    env = open_envelope(payload, max_bytes=max_bytes)
    env.verify(verifier)
    return parse(env, cls, max_bytes=max_bytes, specs=specs)


def parse(
    env: Envelope,
    cls: type[M],
    *,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    specs: SpecStore | None = None,
) -> M:
    """Parse an already verified envelope into ``cls``; raises only DecodeError."""
    body = unpack_body(env, max_bytes=max_bytes)
    try:
        if cls is GlobalModel:
            model: Any = GlobalModel.from_body(body, specs)
            return cast(M, model)
        if cls is ModelDelta:
            delta: Any = ModelDelta.from_body(body, specs)
            return cast(M, delta)
        if cls is SpecMessage:
            spec_msg: Any = SpecMessage.from_body(body, max_bytes=max_bytes)
            return cast(M, spec_msg)
        return cls.from_body(body)
    except DecodeError:
        raise
    except Exception as e:  # defensive: a from_body bug must not crash a receiver
        raise DecodeError(SCHEMA, f"bad {cls.__name__}: {type(e).__name__}: {e}") from None
