"""The aggregator's zero-copy update parser agrees with the wire module's reference parser.

:func:`aggregator.updatebody.parse_update` must accept exactly the bodies
:func:`fedmqtt.wire.parse` accepts, return the same update (tensor bytes as views of the
payload), and refuse everything else with the reference's reason and detail. Checked on real
encoded updates, on hypothesis' mutations of them, and on the hostile shapes the reference's
msgpack limits exist for.
"""

from __future__ import annotations

from typing import Any

import msgpack
import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_wire import _update

from aggregator.updatebody import _Body, _CompactBody, parse_update
from fedmqtt import wire
from fedmqtt.codecs import Codec, decode_params, encode_params
from fedmqtt.errors import SCHEMA, DecodeError
from fedmqtt.params import Layout

MAX = wire.DEFAULT_MAX_MESSAGE_BYTES
CODECS = (
    "raw",
    "fp16",
    "int8",
    "int8+zlib",
    "int4",
    "int4+zlib",
    "topk:0.25",
    "topk:0.25+int8+zlib",
)


def _body(codec: str = "int8") -> dict[str, Any]:
    rng = np.random.default_rng(0)
    delta = {
        "W": rng.standard_normal((6, 5)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float32),
    }
    upd = _update(
        delta=encode_params(delta, Codec.parse(codec), rng=rng), metrics={"loss": 0.5, "n": 2}
    )
    return upd.to_body()


def _envelope(body_bytes: bytes, compact: bool = False) -> wire.Envelope:
    return wire.Envelope("hmac-sha256", b"", memoryview(body_bytes), compact=compact)


def _compact(body: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(wire.compact_body(body), use_bin_type=True)
    return packed


def _outcome(parse: Any, body_bytes: bytes, compact: bool) -> tuple[str, Any]:
    try:
        upd = parse(_envelope(body_bytes, compact))
    except DecodeError as e:
        return ("refused", (e.reason, e.detail))
    delta = {  # the reference leaves a tensor's own checks to the codecs: it may be anything
        name: {
            k: bytes(v) if isinstance(v, memoryview) else v for k, v in sorted(t.items(), key=repr)
        }
        if isinstance(t, dict)
        else t
        for name, t in upd.delta.items()
    }
    fields = {k: v for k, v in vars(upd).items() if k != "delta"}
    return ("accepted", (fields, delta))


def _same(body_bytes: bytes, compact: bool = False) -> tuple[str, Any]:
    ours = _outcome(lambda env: parse_update(env, max_bytes=MAX), body_bytes, compact)
    reference = _outcome(
        lambda env: wire.parse(env, wire.Update, max_bytes=MAX), body_bytes, compact
    )
    # Compared as msgpack bytes, where NaN equals NaN (the reference leaves tensor fields and
    # metric values to later checks, so a NaN can be in an accepted body).
    assert msgpack.packb(ours) == msgpack.packb(reference), (ours, reference)
    return ours


@pytest.mark.parametrize("compact", [False, True], ids=["long", "compact"])
@pytest.mark.parametrize("codec", CODECS)
def test_valid_updates_parse_the_same_with_tensor_bytes_as_views(codec: str, compact: bool) -> None:
    body = _body(codec)
    body["update_id"] = "5e" * 16  # as the agent makes them: hex, binary in the compact form
    packed = _compact(body) if compact else msgpack.packb(body, use_bin_type=True)
    kind, _ = _same(packed, compact)
    assert kind == "accepted"
    upd = parse_update(_envelope(packed, compact), max_bytes=MAX)
    assert upd.update_id == "5e" * 16
    views = [v for t in upd.delta.values() for v in t.values() if isinstance(v, memoryview)]
    assert views and all(v.obj is packed for v in views)  # no copy of the tensor bytes


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=70),
    st.binary(max_size=16),
    st.lists(st.one_of(st.integers(-3, 40), st.booleans(), st.text(max_size=2)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.one_of(st.integers(-2, 2), st.floats()), max_size=2),
)
_BODY_KEYS = (
    "v",
    "type",
    "federation",
    "sender",
    "update_id",
    "seq",
    "base_version",
    "num_samples",
    "spec",
    "metrics",
    "created_at",
    "delta",
)
_TENSOR_KEYS = ("c", "s", "d", "z", "q", "k", "i", "g", "x")


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    compact=st.booleans(),
    codec=st.sampled_from(CODECS),
    body_edits=st.dictionaries(
        st.sampled_from((*_BODY_KEYS, "extra")), st.one_of(st.just("drop"), _VALUES), max_size=3
    ),
    tensor_edits=st.dictionaries(
        st.sampled_from(_TENSOR_KEYS), st.one_of(st.just("drop"), _VALUES), max_size=2
    ),
)
def test_mutated_updates_get_the_reference_outcome(
    compact: bool, codec: str, body_edits: dict[str, Any], tensor_edits: dict[str, Any]
) -> None:
    body = _body(codec)
    if compact:  # edited under the short keys, as a compact sender's bytes would be
        body = wire.compact_body(body)
    for name, value in body_edits.items():
        key = wire.SHORT_KEYS.get(name, name) if compact else name
        if value == "drop":
            body.pop(key, None)
        else:
            body[key] = value
    delta = body.get(wire.SHORT_KEYS["delta"] if compact else "delta")
    tensor = delta.get("W") if isinstance(delta, dict) else None
    if isinstance(tensor, dict):
        for key, value in tensor_edits.items():
            if value == "drop":
                tensor.pop(key, None)
            else:
                tensor[key] = value
    _same(msgpack.packb(body, use_bin_type=True), compact)


def _with(**change: Any) -> bytes:
    body = _body()
    body.update(change)
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


NOT_MSGPACK = "body is not valid msgpack"
_REFUSED = "refused"
_ACCEPTED = "accepted"


@pytest.mark.parametrize(
    ("body_bytes", "outcome", "detail"),
    [
        # longer than msgpack's string limit
        (_with(sender="d" * (wire.MAX_STR_BYTES + 1)), _REFUSED, NOT_MSGPACK),
        # over the character bound, within the byte limit: a string msgpack may read
        (_with(sender="é" * (wire.MAX_STR_BYTES // 4 + 1)), _ACCEPTED, ""),
        # few enough characters, too many bytes
        (_with(sender="é" * (wire.MAX_STR_BYTES // 2 + 1)), _REFUSED, NOT_MSGPACK),
        (
            _with(metrics={f"m{i}": 1.0 for i in range(wire.MAX_MAP_LEN + 1)}),
            _REFUSED,
            NOT_MSGPACK,
        ),
        (_with(extra=list(range(wire.MAX_ARRAY_LEN + 1))), _REFUSED, NOT_MSGPACK),
        (_with(v=True), _REFUSED, "unsupported schema version True"),
        (_with(v=1.0), _REFUSED, "unsupported schema version 1.0"),  # the version is an int
        (_with(created_at=float("inf")), _REFUSED, "field 'created_at' must be finite"),
        (_with(extra=msgpack.ExtType(1, b"x")), _REFUSED, NOT_MSGPACK),
        (_with(update_id="x" * 65), _REFUSED, "update_id must be 8-64 characters"),
        (_with(update_id="é" * 8), _ACCEPTED, ""),  # 8 characters: the bound counts characters
        (_with(seq=2**64 - 1), _ACCEPTED, ""),  # the largest msgpack unsigned integer
        (
            msgpack.packb(_body(), use_bin_type=True) + b"\x00",
            _REFUSED,
            f"{NOT_MSGPACK}: ExtraData",
        ),
        (msgpack.packb(_body(), use_bin_type=True)[:-7], _REFUSED, NOT_MSGPACK),  # truncated
        # nested past the recursion limit
        (b"\x81\xa3seq" + b"\x91" * 100_000 + b"\x01", _REFUSED, f"{NOT_MSGPACK}: StackError"),
        (b"\x82\xa1v\x01\xa4type\xa2\xff\xfe", _REFUSED, f"{NOT_MSGPACK}: UnicodeDecodeError"),
        (b"\x81\xc4\x01v\x01", _REFUSED, "unsupported schema version None"),  # a binary key
        (b"\xdf\x7f\xff\xff\xff", _REFUSED, NOT_MSGPACK),  # a map header claiming 2**31 entries
    ],
    ids=[
        "long-string",
        "long-multibyte-string",
        "multibyte-string-over-the-byte-limit",
        "big-map",
        "big-array",
        "bool-version",
        "float-version",
        "infinite-time",
        "ext-type",
        "long-update-id",
        "multibyte-update-id",
        "uint64-seq",
        "trailing-bytes",
        "truncated",
        "deep-nesting",
        "bad-utf8",
        "binary-key",
        "huge-map-header",
    ],
)
def test_hostile_bodies_get_the_reference_outcome(
    body_bytes: bytes, outcome: str, detail: str
) -> None:
    """Both parsers agree, and on the expected outcome: a body refused by both for the wrong
    reason, or accepted by both, fails here."""
    kind, value = _same(body_bytes)
    assert kind == outcome, value
    if outcome == _REFUSED:
        reason, text = value
        assert reason == SCHEMA
        assert text.startswith(detail), text


def _compact_with(**change: Any) -> bytes:
    body = wire.compact_body(_body())
    body.update(change)
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


@pytest.mark.parametrize(
    ("body_bytes", "outcome", "detail"),
    [
        (_compact_with(u=b"\x01" * 32), _ACCEPTED, ""),  # 64 hex characters
        (_compact_with(u=b"\x01" * 33), _REFUSED, "update_id must be 8-64 characters"),
        (_compact_with(u=b"\x01" * 3), _REFUSED, "update_id must be 8-64 characters"),
        (_compact_with(u="not-hex-but-text"), _ACCEPTED, ""),  # the sender's id kept as text
        (_compact_with(p=b""), _ACCEPTED, ""),  # an empty fingerprint, as in the long form
        (_compact_with(u=7), _REFUSED, "field 'update_id' must be str, got int"),
        (_compact_with(zz=1), _REFUSED, "unknown field 'zz' in a compact body"),
        (_compact_with(update_id="ab" * 8), _REFUSED, "unknown field 'update_id'"),
        (msgpack.packb(_body(), use_bin_type=True), _REFUSED, "unknown field 'type'"),
    ],
    ids=[
        "id-32-bytes",
        "id-33-bytes",
        "id-3-bytes",
        "id-as-text",
        "empty-fingerprint",
        "id-int",
        "unknown-key",
        "long-key-in-compact",
        "long-body",
    ],
)
def test_hostile_compact_bodies_get_the_reference_outcome(
    body_bytes: bytes, outcome: str, detail: str
) -> None:
    kind, value = _same(body_bytes, compact=True)
    assert kind == outcome, value
    if outcome == _REFUSED:
        reason, text = value
        assert reason == SCHEMA
        assert text.startswith(detail), text


def test_the_compact_body_declares_the_same_fields_under_the_short_keys() -> None:
    long_info = msgspec.inspect.type_info(_Body)
    info = msgspec.inspect.type_info(_CompactBody)
    assert isinstance(info, msgspec.inspect.StructType) and info.forbid_unknown_fields
    assert isinstance(long_info, msgspec.inspect.StructType)
    assert [f.name for f in info.fields] == [f.name for f in wire.UPDATE_FIELDS]
    assert [f.encode_name for f in info.fields] == [
        wire.SHORT_KEYS[f.name] for f in wire.UPDATE_FIELDS
    ]
    for ours, long in zip(info.fields, long_info.fields, strict=True):
        assert ours.required, ours.name
        if ours.name in wire.HEX_KEYS:  # bytes, half the characters of the long form's bounds
            assert isinstance(ours.type, msgspec.inspect.BytesType), ours
            continue
        assert ours.type == long.type, ours.name


def test_a_shape_too_long_for_msgpack_is_refused_as_the_reference_does() -> None:
    body = _body("raw")
    body["delta"]["W"]["s"] = [1] * (wire.MAX_ARRAY_LEN + 1)
    kind, _ = _same(msgpack.packb(body, use_bin_type=True))
    assert kind == "refused"


@pytest.mark.parametrize("codec", CODECS)
def test_views_decode_to_the_same_values_as_bytes(codec: str) -> None:
    packed = msgpack.packb(_body(codec), use_bin_type=True)
    ours = parse_update(_envelope(packed), max_bytes=MAX)
    reference = wire.parse(_envelope(packed), wire.Update, max_bytes=MAX)
    layout = Layout.from_shapes({"W": (6, 5), "b": (5,)})
    assert decode_params(ours.delta, layout).tobytes() == (
        decode_params(reference.delta, layout).tobytes()
    )


def test_a_view_of_anything_but_bytes_is_refused_as_not_binary() -> None:
    body = _body("raw")
    tensor = dict(body["delta"]["b"])
    tensor["d"] = memoryview(np.zeros(5, dtype=np.float32).data)  # 4-byte items: 5 long, 20 bytes
    with pytest.raises(DecodeError) as e:
        decode_params({"b": tensor}, Layout.from_shapes({"b": (5,)}))
    assert e.value.reason == SCHEMA
    assert "must be binary" in e.value.detail


_TEXT = msgspec.inspect.StrType(max_length=wire.MAX_STR_BYTES // 4)  # characters, UTF-8 bound


def _declared(f: wire.BodyField) -> msgspec.inspect.Type | type:
    """What ``aggregator.updatebody`` must declare for the field ``f`` of the one declaration
    (for a map of values checked later: the type of its values' declaration)."""
    ins = msgspec.inspect
    if f.const is not None:
        return ins.LiteralType(values=(f.const,))
    if f.kind is int:
        return ins.IntType(ge=f.lo)
    if f.kind is float:
        return ins.FloatType()
    if f.kind is str:
        if f.lo is None and f.hi is None:
            return _TEXT
        return ins.StrType(min_length=f.lo, max_length=f.hi)
    assert f.kind is dict, f
    if f.values is float:
        return ins.DictType(_TEXT, ins.FloatType(), max_length=wire.MAX_MAP_LEN)
    return ins.StructType  # a tensor map, whose fields fedmqtt.codecs owns


def test_the_msgspec_body_declares_exactly_the_wire_fields() -> None:
    """aggregator.updatebody's types are the one declaration, wire.UPDATE_FIELDS: same fields
    in the same order, all required, the same types and limits."""
    info = msgspec.inspect.type_info(_Body)
    assert isinstance(info, msgspec.inspect.StructType) and info.forbid_unknown_fields
    assert [f.name for f in info.fields] == [f.name for f in wire.UPDATE_FIELDS]
    for ours, decl in zip(info.fields, wire.UPDATE_FIELDS, strict=True):
        assert ours.required, ours.name
        want = _declared(decl)
        if want is msgspec.inspect.StructType:
            assert isinstance(ours.type, msgspec.inspect.DictType), ours
            assert ours.type.key_type == _TEXT and ours.type.max_length == wire.MAX_MAP_LEN
            assert isinstance(ours.type.value_type, msgspec.inspect.StructType), ours
        else:
            assert ours.type == want, (decl, ours.type)


@pytest.mark.parametrize("field", [f for f in wire.UPDATE_FIELDS if f.finite], ids=str)
def test_a_non_finite_value_is_refused_where_the_declaration_says_finite(
    field: wire.BodyField,
) -> None:
    kind, value = _same(_with(**{field.name: float("nan")}))
    assert (kind, value[1]) == (_REFUSED, f"field {field.name!r} must be finite")


@pytest.mark.parametrize("field", [f for f in wire.UPDATE_FIELDS if f.lo is not None], ids=str)
def test_the_declared_lower_bounds_are_where_both_parsers_refuse(field: wire.BodyField) -> None:
    assert field.lo is not None
    at = "x" * field.lo if field.kind is str else field.lo
    below = "x" * (field.lo - 1) if field.kind is str else field.lo - 1
    assert _same(_with(**{field.name: at}))[0] == _ACCEPTED
    assert _same(_with(**{field.name: below}))[0] == _REFUSED


@pytest.mark.parametrize("field", [f for f in wire.UPDATE_FIELDS if f.hi is not None], ids=str)
def test_the_declared_upper_bounds_are_where_both_parsers_refuse(field: wire.BodyField) -> None:
    assert field.hi is not None
    assert _same(_with(**{field.name: "x" * field.hi}))[0] == _ACCEPTED
    assert _same(_with(**{field.name: "x" * (field.hi + 1)}))[0] == _REFUSED
