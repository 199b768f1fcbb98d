"""Wire format v1: round trips, schema errors, and authentication of the body bytes."""

from __future__ import annotations

import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmqtt import wire
from fedmqtt.errors import SCHEMA, SIGNATURE, SIZE, UNKNOWN_SPEC, DecodeError
from fedmqtt.models.spec import ModelSpec
from fedmqtt.signing import Ed25519Signer, HmacKey

DEV_KEY = HmacKey(b"k" * 32)
AGG_KEY = Ed25519Signer.generate()


def _update(**kw: object) -> wire.Update:
    base = dict(
        federation="fed",
        sender="dev1",
        update_id="a" * 32,
        seq=3,
        base_version=7,
        num_samples=90,
        spec_fingerprint="abcd",
        delta={"W0": {"c": "raw"}},
        metrics={"loss": 0.5},
        created_at=1.0,
    )
    base.update(kw)
    return wire.Update(**base)  # type: ignore[arg-type]


def test_update_round_trip() -> None:
    u = _update()
    assert wire.decode(wire.encode(u, DEV_KEY), wire.Update, DEV_KEY) == u


def test_plan_and_status_round_trip() -> None:
    p = wire.Plan("fed", "aggregator", 2, epochs=3, codec="topk:0.01")
    assert wire.decode(wire.encode(p, AGG_KEY), wire.Plan, AGG_KEY.verifier()) == p
    s = wire.Status("fed", "dev1", "offline", at=5.0)
    assert wire.decode(wire.encode(s, DEV_KEY), wire.Status, DEV_KEY) == s


def test_every_flipped_bit_fails_verification() -> None:
    payload = bytearray(wire.encode(_update(), DEV_KEY))
    for i in range(len(payload)):
        for bit in (0, 3, 7):
            bad = bytearray(payload)
            bad[i] ^= 1 << bit
            with pytest.raises(DecodeError):
                wire.decode(bytes(bad), wire.Update, DEV_KEY)


def test_signed_by_other_key_fails() -> None:
    payload = wire.encode(_update(), HmacKey(b"x" * 32))
    with pytest.raises(DecodeError) as e:
        wire.decode(payload, wire.Update, DEV_KEY)
    assert e.value.reason == SIGNATURE
    other = Ed25519Signer.generate()
    payload = wire.encode(wire.Plan("fed", "aggregator", 1), other)
    with pytest.raises(DecodeError) as e:
        wire.decode(payload, wire.Plan, AGG_KEY.verifier())
    assert e.value.reason == SIGNATURE


def test_algorithm_confusion_is_refused() -> None:
    payload = wire.encode(_update(), DEV_KEY)
    with pytest.raises(DecodeError) as e:
        wire.decode(payload, wire.Update, AGG_KEY.verifier())
    assert e.value.reason == SIGNATURE


def _forge(body: dict[str, object]) -> bytes:
    return wire.seal(body, DEV_KEY)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"v": 2}, "version"),
        ({"v": 1.0}, "unsupported schema version 1.0"),  # the version is an int
        ({"type": "model"}, "field 'type' must be 'update', got 'model'"),
        ({"seq": "3"}, "seq"),
        ({"seq": True}, "bool"),
        ({"num_samples": 0}, "field 'num_samples' must be >= 1"),
        ({"base_version": -1}, ">= 0"),
        ({"created_at": float("nan")}, "finite"),
        ({"metrics": {"loss": "x"}}, "numbers"),
    ],
)
def test_schema_errors_are_clear(change: dict[str, object], needle: str) -> None:
    body = _update().to_body()
    body.update(change)
    with pytest.raises(DecodeError) as e:
        wire.decode(_forge(body), wire.Update, DEV_KEY)
    assert e.value.reason == SCHEMA
    assert needle in str(e.value)


def test_a_header_with_a_float_version_is_refused() -> None:
    payload = wire.encode(_update(), DEV_KEY)
    env = wire.open_envelope(payload)
    forged = msgpack.packb({"v": 1.0, "alg": env.alg, "sig": env.sig}) + bytes(env.body)
    with pytest.raises(DecodeError) as e:
        wire.decode(forged, wire.Update, DEV_KEY)
    assert e.value.reason == SCHEMA
    assert "unsupported schema version 1.0" in e.value.detail


def test_missing_field_is_named() -> None:
    body = _update().to_body()
    del body["update_id"]
    with pytest.raises(DecodeError, match="update_id"):
        wire.decode(_forge(body), wire.Update, DEV_KEY)


def test_oversize_message_refused_before_parsing() -> None:
    with pytest.raises(DecodeError) as e:
        wire.decode(b"\x00" * 2000, wire.Update, DEV_KEY, max_bytes=1000)
    assert e.value.reason == SIZE


def test_hostile_length_prefix_does_not_allocate() -> None:
    header = msgpack.packb({"v": 1, "alg": "hmac-sha256", "sig": b""})
    body = b"\xc6\xff\xff\xff\xf0"  # bin32 claiming ~4 GiB
    env = wire.open_envelope(header + body)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        with pytest.raises(DecodeError) as e:
            wire.unpack_body(env, max_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert e.value.reason == SCHEMA
    # Refused from the 5-byte prefix: nothing near the claimed size, nor the 1 MiB limit.
    assert peak < 64 * 1024, peak


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        wire.decode(data, wire.Update, DEV_KEY)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=400))
def test_truncated_messages_raise_only_decode_error(cut: int) -> None:
    payload = wire.encode(_update(), DEV_KEY)
    with pytest.raises(DecodeError):
        wire.decode(payload[: min(cut, len(payload) - 1)], wire.Update, DEV_KEY)


SPEC = ModelSpec("softmax", 4, 3, feature_offset=(0.5,) * 4, feature_scale=(2.0,) * 4)


def _model(version: int = 5, spec: ModelSpec = SPEC) -> wire.GlobalModel:
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in spec.param_shapes().items()}
    return wire.GlobalModel(
        "fed", "aggregator", version, spec, params, stats={"acc": 0.9}, created_at=2.0
    )


def test_global_model_round_trip_resolves_its_spec_by_fingerprint() -> None:
    g = _model()
    payload = wire.encode(g, AGG_KEY)
    body = wire.unpack_body(wire.open_envelope(payload))
    assert body["v"] == wire.MODEL_VERSION and body["spec"] == SPEC.fingerprint()
    assert "feature_offset" not in str(body)  # the spec itself is not in the model message
    back = wire.decode(
        payload, wire.GlobalModel, AGG_KEY.verifier(), specs={SPEC.fingerprint(): SPEC}
    )
    assert back.version == 5 and back.spec == SPEC and back.stats == {"acc": 0.9}
    for k, v in g.params.items():
        np.testing.assert_array_equal(back.params[k], v)


@pytest.mark.parametrize("specs", [None, {}, {"0123456789abcdef": SPEC}])
def test_a_model_naming_an_unknown_spec_is_refused(specs: dict[str, ModelSpec] | None) -> None:
    with pytest.raises(DecodeError) as e:
        wire.decode(
            wire.encode(_model(), AGG_KEY), wire.GlobalModel, AGG_KEY.verifier(), specs=specs
        )
    assert e.value.reason == UNKNOWN_SPEC


def test_a_v1_model_with_its_spec_inline_is_still_read() -> None:
    body = {**_model().to_body(), "v": 1, "spec": SPEC.to_wire()}
    back = wire.decode(wire.seal(body, AGG_KEY), wire.GlobalModel, AGG_KEY.verifier())
    assert back.spec == SPEC and back.version == 5


def test_only_the_model_speaks_v2() -> None:
    for msg in (wire.SpecMessage("fed", "aggregator", SPEC), wire.Announce("fed", "a", 3, "ab")):
        body = {**msg.to_body(), "v": 2}
        with pytest.raises(DecodeError, match="version"):
            wire.decode(wire.seal(body, AGG_KEY), type(msg), AGG_KEY.verifier())
    body = {**_model().to_body(), "v": 3}
    with pytest.raises(DecodeError, match="version"):
        wire.decode(wire.seal(body, AGG_KEY), wire.GlobalModel, AGG_KEY.verifier(), specs={})


def test_spec_message_round_trip_and_fingerprint_check() -> None:
    msg = wire.SpecMessage("fed", "aggregator", SPEC, created_at=3.0)
    back = wire.decode(wire.encode(msg, AGG_KEY), wire.SpecMessage, AGG_KEY.verifier())
    assert back == msg and back.fingerprint == SPEC.fingerprint()
    # a declared fingerprint that is not the spec's is refused, even when signed
    body = {**msg.to_body(), "fingerprint": "0123456789abcdef"}
    with pytest.raises(DecodeError, match="fingerprint") as e:
        wire.decode(wire.seal(body, AGG_KEY), wire.SpecMessage, AGG_KEY.verifier())
    assert e.value.reason == SCHEMA


def test_announce_round_trip() -> None:
    msg = wire.Announce("fed", "aggregator", 12, SPEC.fingerprint(), created_at=4.0)
    payload = wire.encode(msg, AGG_KEY)
    assert wire.decode(payload, wire.Announce, AGG_KEY.verifier()) == msg
    assert len(payload) < 200
    # Without its (informative) spec, as the announcements of a later release may be sent.
    body = {k: v for k, v in msg.to_body().items() if k != "spec"}
    back = wire.decode(wire.seal(body, AGG_KEY), wire.Announce, AGG_KEY.verifier())
    assert back == wire.Announce("fed", "aggregator", 12, wire.UNSTATED_SPEC, created_at=4.0)


def test_layout_offsets_are_computed_once_and_read_only() -> None:
    from fedmqtt.models.spec import ModelSpec

    layout = ModelSpec("mlp", 7, 3, hidden=(5,)).layout()
    assert layout.offsets() is layout.offsets()
    assert dict(layout.offsets()) == {"W0": (0, 35), "b0": (35, 40), "W1": (40, 55), "b1": (55, 58)}
    assert layout.size == 58 and layout.sizes == (35, 5, 15, 3)
    with pytest.raises(TypeError):
        layout.offsets()["W0"] = (0, 1)  # type: ignore[index]
