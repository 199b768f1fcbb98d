"""The compact wire form: every message reads back the same in both forms, the key tables
cannot make one body mean two things, and malformed compact input is refused as ``schema``."""

from __future__ import annotations

import zlib
from typing import Any

import msgpack
import numpy as np
import pytest
from test_wire import AGG_KEY, DEV_KEY, SPEC, _update

from fedmqtt import wire
from fedmqtt.cohort import Selection
from fedmqtt.errors import SCHEMA, DecodeError
from fedmqtt.fedeval import EvalReport, decode_report
from fedmqtt.models.spec import ModelSpec
from fedmqtt.signing import ChaChaPolyKey


def _messages() -> list[tuple[Any, Any]]:
    """(message, key) of every type, with every optional field set."""
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SPEC.param_shapes().items()}
    flat = SPEC.layout().flatten(params)
    digest = "0f" * 16
    agg = AGG_KEY
    return [
        (_update(update_id="9a" * 16, spec_fingerprint=SPEC.fingerprint()), DEV_KEY),
        (
            wire.GlobalModel(
                "fed", "agg", 5, SPEC, params, {"acc": 0.9}, 2.0, keyframe=True, threshold=0.25
            ),
            agg,
        ),
        (wire.ModelDelta("fed", "agg", 6, 5, SPEC, digest, digest, flat, 3.0, threshold=0.5), agg),
        (wire.SpecMessage("fed", "agg", SPEC, 1.0, wire.Genesis(7, "int8", digest)), agg),
        (wire.Announce("fed", "agg", 6, wire.UNSTATED_SPEC, 4.0, (0, 5)), agg),
        (
            wire.Plan(
                "fed",
                "agg",
                3,
                epochs=2,
                extra={"dp_clip": 1.0},
                selection=Selection(participation=0.5, window=4),
            ),
            agg,
        ),
        (wire.Status("fed", "dev1", "online", at=5.0), DEV_KEY),
        (wire.OnnxModel("fed", "agg", 5, b"onnx bytes", 6.0), agg),
    ]


def _decode(payload: bytes, msg: Any, key: Any) -> Any:
    verifier = key.verifier() if hasattr(key, "verifier") else key
    return wire.decode(payload, type(msg), verifier, specs={SPEC.fingerprint(): SPEC})


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, wire.ModelDelta):  # its float32 delta is an array
        return a.version == b.version and a.digest == b.digest and a.threshold == b.threshold
    if isinstance(a, wire.GlobalModel):
        return (a.version, a.stats, a.keyframe, a.threshold) == (
            b.version,
            b.stats,
            b.keyframe,
            b.threshold,
        ) and all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    return bool(a == b)


@pytest.mark.parametrize("index", range(8))
def test_every_message_reads_back_the_same_in_both_forms_and_compact_is_smaller(
    index: int,
) -> None:
    msg, key = _messages()[index]
    compact, long = wire.encode(msg, key), wire.encode(msg, key, compact=False)
    assert wire.is_compact(compact) and not wire.is_compact(long)
    assert _same(_decode(compact, msg, key), msg) and _same(_decode(long, msg, key), msg)
    c_body = wire.unpack_body(wire.open_envelope(compact))
    if "spec_z" in c_body:  # a spec message's spec, deflated (the long form carries the map)
        c_body["spec"] = msgpack.unpackb(zlib.decompress(c_body.pop("spec_z")))
    assert c_body == wire.unpack_body(wire.open_envelope(long))
    assert len(compact) < len(long)


def test_an_eval_report_reads_back_the_same_in_both_forms() -> None:
    r = EvalReport("fed", "dev1", 4, SPEC.fingerprint(), 30, 0.7, {"accuracy": 0.8}, "a", 1.0)
    for compact in (True, False):
        env = wire.open_envelope(wire.seal(r.to_body(), DEV_KEY, compact=compact))
        env.verify(DEV_KEY)
        assert decode_report(env) == r


def test_the_key_tables_are_one_to_one_and_disjoint_from_the_long_names() -> None:
    shorts = list(wire.SHORT_KEYS.values())
    assert len(set(shorts)) == len(shorts)
    assert set(shorts) & set(wire.SHORT_KEYS) == {"v"}  # only the schema version is shared
    keys = {k for m, _ in _messages() for k in m.to_body()}
    keys |= set(wire.SpecMessage("fed", "agg", SPEC).to_body(deflate=True))
    r = EvalReport("fed", "dev1", 4, "ab", 30, 0.7, {}, "a", 1.0)
    assert keys | set(r.to_body()) == set(wire.SHORT_KEYS)  # every field, nothing unused


def test_an_update_id_that_is_not_lowercase_hex_stays_text() -> None:
    for uid in ("ABCDEF0123456789", "dev1-000042-xyz", "abcdef012"):
        u = _update(update_id=uid)
        assert wire.decode(wire.encode(u, DEV_KEY), wire.Update, DEV_KEY).update_id == uid


def _reheader(payload: bytes, header: dict[str, Any]) -> bytes:
    return msgpack.packb(header) + bytes(wire.open_envelope(payload).body)


def test_flipping_the_unsigned_header_form_never_yields_a_message() -> None:
    u = _update()
    compact, long = wire.encode(u, DEV_KEY), wire.encode(u, DEV_KEY, compact=False)
    c_env, l_env = wire.open_envelope(compact), wire.open_envelope(long)
    as_long = _reheader(compact, {"v": 1, "alg": c_env.alg, "sig": c_env.sig})
    as_compact = _reheader(long, {"v": 2, "a": wire.ALG_CODES[l_env.alg], "s": l_env.sig})
    for forged, needle in ((as_long, "missing field"), (as_compact, "in a compact body")):
        with pytest.raises(DecodeError) as e:
            wire.decode(forged, wire.Update, DEV_KEY)  # the signature still matches the body
        assert e.value.reason == SCHEMA and needle in e.value.detail


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        ({"v": 2, "a": 9, "s": b""}, "algorithm code"),
        ({"v": 2, "a": "hmac-sha256", "s": b""}, "algorithm code"),
        ({"v": 2, "a": True, "s": b""}, "algorithm code"),
        ({"v": 2, "a": 2}, "algorithm code"),
        ({"v": 3, "a": 2, "s": b""}, "unsupported schema version 3"),
    ],
)
def test_a_malformed_compact_header_is_refused(header: dict[str, Any], needle: str) -> None:
    with pytest.raises(DecodeError) as e:
        wire.open_envelope(msgpack.packb(header) + msgpack.packb({"v": 1}))
    assert e.value.reason == SCHEMA and needle in e.value.detail


def test_a_signed_compact_body_with_an_unknown_key_is_refused() -> None:
    key = ChaChaPolyKey.generate()
    body = wire.compact_body(_update().to_body()) | {"zz": 1}
    body_bytes = msgpack.packb(body, use_bin_type=True)
    header = {"v": 2, "a": wire.ALG_CODES[key.alg], "s": key.sign(body_bytes)}
    with pytest.raises(DecodeError) as e:
        wire.decode(msgpack.packb(header) + body_bytes, wire.Update, key)
    assert e.value.reason == SCHEMA and "'zz'" in e.value.detail


def test_a_sender_cannot_seal_a_field_without_a_short_name() -> None:
    with pytest.raises(ValueError, match="no short name"):
        wire.seal({"v": 1, "type": "update", "surprise": 1}, DEV_KEY)


DIGITS_LIKE = ModelSpec(
    "softmax", 64, 10, feature_offset=(0.0,) * 64, feature_scale=(1.0 / 16.0,) * 64
)


def test_a_compact_spec_message_carries_its_spec_deflated_and_the_same_fingerprint() -> None:
    msg = wire.SpecMessage("fed", "agg", DIGITS_LIKE, 1.0)
    compact, long = wire.encode(msg, AGG_KEY), wire.encode(msg, AGG_KEY, compact=False)
    assert "spec_z" in wire.unpack_body(wire.open_envelope(compact))
    assert "spec" in wire.unpack_body(wire.open_envelope(long))  # what earlier releases read
    assert len(compact) < len(long) / 4  # 128 float64 constants, all repeats
    got = wire.decode(compact, wire.SpecMessage, AGG_KEY.verifier())
    assert got == msg and got.fingerprint == DIGITS_LIKE.fingerprint()


def test_a_spec_that_deflates_to_more_bytes_stays_a_map() -> None:
    tiny = ModelSpec("linear", 1, 1)
    body = wire.unpack_body(
        wire.open_envelope(wire.encode(wire.SpecMessage("f", "a", tiny), AGG_KEY))
    )
    assert "spec" in body and "spec_z" not in body


def _spec_body(**change: Any) -> bytes:
    """A compact spec message of DIGITS_LIKE, signed, with body fields changed (None: removed)."""
    body = wire.SpecMessage("fed", "agg", DIGITS_LIKE, 1.0).to_body(deflate=True)
    for k, v in change.items():
        if v is None:
            body.pop(k, None)
        else:
            body[k] = v
    return wire.seal(body, AGG_KEY)


_PACKED = msgpack.packb(DIGITS_LIKE.to_wire())


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"spec": DIGITS_LIKE.to_wire()}, "exactly one of spec and spec_z"),
        ({"spec_z": None}, "exactly one of spec and spec_z"),
        ({"spec_z": b"not zlib at all"}, "not a zlib stream"),
        ({"spec_z": zlib.compress(_PACKED)[:-6]}, "truncated or trailed"),
        ({"spec_z": zlib.compress(_PACKED) + b"tail"}, "truncated or trailed"),
        ({"spec_z": zlib.compress(msgpack.packb([1, 2, 3]))}, "map"),
        ({"spec_z": "text"}, "must be bytes"),
    ],
)
def test_a_malformed_spec_z_is_refused_as_schema(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(DecodeError) as e:
        wire.decode(_spec_body(**change), wire.SpecMessage, AGG_KEY.verifier())
    assert e.value.reason == SCHEMA and needle in e.value.detail


def test_a_spec_z_inflating_past_the_message_limit_is_refused() -> None:
    bomb = zlib.compress(b"\x00" * (8 << 20), 9)  # 8 MiB of zeros in ~8 KB
    payload = _spec_body(spec_z=bomb)
    with pytest.raises(DecodeError) as e:
        wire.decode(payload, wire.SpecMessage, AGG_KEY.verifier(), max_bytes=1 << 20)
    assert e.value.reason == SCHEMA and "more than 1048576 bytes" in e.value.detail
