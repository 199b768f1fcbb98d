"""The engine (validation pipeline + strategy + snapshots) driven directly, without a broker."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from test_aggregator_support import FED, Federation, raw_tensor
from test_topics import TOPIC_WORDS, ids

from aggregator.checkpoint import decode_state
from aggregator.engine import Engine, Verified
from aggregator.metrics import Metrics
from aggregator.validate import UpdateMeta
from fedmqtt import topics, wire
from fedmqtt.errors import REASONS
from fedmqtt.models.spec import ModelSpec
from fedmqtt.signing import ChaChaPolyKey, HmacKey

SPEC = ModelSpec("softmax", 6, 3)


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return Federation(tmp_path, SPEC, devices=("dev0", "dev1"))


def engine(fed: Federation, **strategy: Any) -> Engine:
    tables: dict[str, Any] = {"strategy": {"buffer_size": 3, "max_staleness": 2, **strategy}}
    cfg = fed.config("127.0.0.1", 1883, **tables)
    return Engine(cfg, Metrics(FED), keys=None)


def small(seed: int = 0, scale: float = 0.01) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, scale, SPEC.layout().size).astype(np.float32)


def upd_topic(device: str = "dev0") -> str:
    return topics.updates(FED, device)


def test_valid_updates_make_versions_and_needs_track_durability(fed: Federation) -> None:
    e = engine(fed)
    items = [(upd_topic(), fed.update("dev0", small(i), seq=i)) for i in range(4)]
    needs = e.process(items, now=0.0)
    assert e.version == 1 and len(e.strategy) == 1
    # An update may be acknowledged once the flush that applies it is durable.
    assert needs == [1, 1, 1, 2] and e.flushes == 1
    assert e.metrics.snapshot()["accepted"] == 4


def garbage(fed: Federation, e: Engine) -> list[tuple[str, bytes, str]]:
    """(topic, payload, expected reason) for every kind of bad update."""
    ok = small(1)
    stranger = HmacKey.generate()
    layout = SPEC.layout()
    nan = ok.copy()
    nan[3] = np.nan
    wrong_spec = ModelSpec("softmax", 7, 3)
    huge = {"c": "raw", "s": [1 << 30, 1 << 20], "d": b""}
    zeros3 = raw_tensor(np.zeros(3, np.float32))
    huge_body = {"W0": huge, "b0": zeros3}
    wrong_shapes = {"W0": raw_tensor(np.zeros((3, 6), np.float32)), "b0": zeros3}
    missing = {"W0": raw_tensor(np.zeros((6, 3), np.float32))}
    bad_sig = bytearray(fed.update("dev0", ok))
    bad_sig[-5] ^= 0x01
    replayed_id = "replayed-0001"
    first = fed.update("dev0", ok, update_id=replayed_id)
    e.process([(upd_topic(), first)], 0.0)  # accepted once
    big = ok * np.float32(1e6)  # accepted norms are ~0.1: this is 1e6 times the median
    return [
        (upd_topic(), np.random.default_rng(0).bytes(200), "schema"),
        (upd_topic(), fed.update("dev0", ok)[:40], "schema"),
        # A well-formed header with no body: the MAC is checked before any body parsing.
        (upd_topic(), msgpack.packb({"v": 1, "alg": "hmac-sha256", "sig": b"x"}), "signature"),
        (upd_topic(), b"", "schema"),
        (upd_topic(), fed.update_encoded("dev0", wrong_shapes), "shape"),
        (upd_topic(), fed.update_encoded("dev0", missing), "shape"),
        (upd_topic(), fed.update_encoded("dev0", huge_body), "size"),
        (
            upd_topic(),
            fed.update_encoded(
                "dev0", {k: raw_tensor(v) for k, v in layout.unflatten(nan).items()}
            ),
            "nonfinite",
        ),
        (upd_topic(), bytes(bad_sig), "signature"),
        (upd_topic(), fed.update("dev0", ok, key=stranger), "signature"),
        (upd_topic(), first, "replay"),
        (upd_topic("stranger"), fed.update("stranger", ok, key=stranger), "unknown_device"),
        (upd_topic(), fed.update("dev0", ok, base_version=e.version + 1), "future"),
        (upd_topic("dev1"), fed.update("dev0", ok, key=fed.keys["dev1"]), "sender_mismatch"),
        (upd_topic(), fed.update("dev0", ok, federation="otherfed"), "federation"),
        (
            upd_topic(),
            fed.update("dev0", np.zeros(wrong_spec.layout().size, np.float32), spec=wrong_spec),
            "spec",
        ),
        (upd_topic(), b"\0" * (e.cfg.limits.max_update_bytes + 1), "size"),
        (upd_topic(), fed.update("dev0", big), "norm"),
        (
            upd_topic(),
            fed.update(
                "dev0",
                {"W0": layout.unflatten(ok)["W0"], "b0": layout.unflatten(ok)["b0"]},
                codec="int8",
            ),
            "accepted",
        ),
    ]


def test_every_kind_of_garbage_is_refused_with_its_reason(fed: Federation) -> None:
    e = engine(fed, buffer_size=100)
    # Build a norm history first, so the relative norm bound is active.
    e.process([(upd_topic(), fed.update("dev0", small(100 + i))) for i in range(6)], 0.0)
    cases = garbage(fed, e)
    before = e.metrics.snapshot()
    params_before = e.params.copy()
    buffered_before = len(e.strategy)
    needs = e.process([(t, p) for t, p, _ in cases], 0.0)
    after = e.metrics.snapshot()
    expected: dict[str, int] = {}
    for _, _, reason in cases:
        if reason != "accepted":
            expected[reason] = expected.get(reason, 0) + 1
    got = {r: after["rejected"].get(r, 0) - before["rejected"].get(r, 0) for r in REASONS}
    assert {r: n for r, n in got.items() if n} == expected
    assert after["accepted"] - before["accepted"] == 1
    assert after["updates_received"] - before["updates_received"] == len(cases)
    # Only the last (valid) one reached the buffer; the model is untouched and finite.
    assert len(e.strategy) == buffered_before + 1
    np.testing.assert_array_equal(e.params, params_before)
    assert np.isfinite(e.strategy.rows[: len(e.strategy)]).all()
    # Refusals need nothing durable, except the replay (its original is not on disk yet).
    reasons = [r for _, _, r in cases]
    # The replayed original is still buffered: its duplicate waits for the same flush.
    assert needs[reasons.index("replay")] == e.flushes + 1
    assert all(
        n == 0 for n, r in zip(needs, reasons, strict=True) if r not in ("replay", "accepted")
    )


def test_stale_updates_are_refused_and_window_pruned(fed: Federation) -> None:
    e = engine(fed, buffer_size=1, max_staleness=2)
    ids = []
    for i in range(5):
        uid = f"update-{i:04d}"
        ids.append(uid)
        e.process(
            [(upd_topic(), fed.update("dev0", small(i), base_version=e.version, update_id=uid))],
            0.0,
        )
    assert e.version == 5
    e.process([(upd_topic(), fed.update("dev0", small(9), base_version=2))], 0.0)
    assert e.metrics.snapshot()["rejected"] == {"stale": 1}
    # Ids older than version - max_staleness are forgotten; a replay of one is stale anyway.
    assert ids[0] not in e.window and ids[4] in e.window
    e.process([(upd_topic(), fed.update("dev0", small(0), base_version=0, update_id=ids[0]))], 0.0)
    assert e.metrics.snapshot()["rejected"]["stale"] == 2


def test_snapshot_restore_resumes_exactly(fed: Federation) -> None:
    e = engine(fed, buffer_size=3, momentum=0.5)
    first = [(upd_topic(), fed.update("dev0", small(i))) for i in range(5)]
    e.process(first, 0.0)
    state = decode_state(e.snapshot().data)
    again = engine(fed, buffer_size=3, momentum=0.5)
    again.restore(state)
    # The snapshot holds the applied updates only; the two buffered ones are left to the
    # broker, which redelivers them (unacknowledged) after a crash.
    assert (again.version, again.flushes, len(again.strategy)) == (1, 1, 0)
    assert again.metrics.snapshot()["accepted"] == 3
    assert again.process(first, 0.0)[:3] == [1, 1, 1]  # applied ones: refused as replays
    more = [(upd_topic(), fed.update("dev0", small(50 + i))) for i in range(4)]
    e.process(more, 0.0)
    again.process(more, 0.0)
    np.testing.assert_array_equal(again.params, e.params)
    assert again.metrics.snapshot()["accepted"] == e.metrics.snapshot()["accepted"] == 9
    assert again.metrics.snapshot()["rejected"] == {"replay": 3}


def test_restore_refuses_another_model(fed: Federation, tmp_path: Path) -> None:
    e = engine(fed)
    state = decode_state(e.snapshot().data)
    other = Federation(tmp_path / "other", ModelSpec("softmax", 5, 3))
    o = Engine(other.config("127.0.0.1", 1883), Metrics(FED), keys=None)
    from aggregator.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"\[model\]"):
        o.restore(state)


def test_verified_items_from_workers(fed: Federation) -> None:
    e = engine(fed, buffer_size=2)
    d = SPEC.layout().size

    def item(i: int, base: int = 0) -> Verified:
        m = UpdateMeta("dev0", f"worker-upd-{i:04d}", i, base, 5, 0.0, 100)
        return Verified("dev0", 100, m, 0.1, small(i).tobytes())

    needs = e.process_verified(
        [
            item(0),
            item(1),
            item(0),
            Verified("dev1", 10, reason="signature", detail="bad"),
            Verified(
                "dev0", 10, UpdateMeta("dev0", "short-delta", 0, 0, 5, 0.0, 10), 0.1, b"\0" * 8
            ),
        ],
        0.0,
    )
    assert e.version == 1
    snap = e.metrics.snapshot()
    assert snap["accepted"] == 2
    assert snap["rejected"] == {"replay": 1, "signature": 1, "shape": 1}
    assert needs[:3] == [1, 1, 1] and needs[3] == 0
    assert d == e.layout.size


def test_workers_compact_encoding_gives_the_same_model_as_float32_rows(fed: Federation) -> None:
    """Workers forward int8 updates as their wire encoding and large ones as float32 rows;
    both forms must apply the same decoded values, and a malformed encoding is refused."""
    from fedmqtt.codecs import Codec, decode_params, encode_params

    layout = SPEC.layout()
    engines = [engine(fed, buffer_size=2), engine(fed, buffer_size=2)]
    rng = np.random.default_rng(3)
    encoded = [
        encode_params(layout.unflatten(small(i)), Codec.parse("int8"), rng=rng) for i in range(2)
    ]
    meta = [UpdateMeta("dev0", f"enc-{i}", i, 0, 5, 0.0, 100) for i in range(2)]
    as_wire = [
        Verified("dev0", 100, meta[i], 0.1, msgpack.packb(encoded[i]), encoded=True)
        for i in range(2)
    ]
    as_rows = [
        Verified("dev0", 100, meta[i], 0.1, decode_params(encoded[i], layout).tobytes())
        for i in range(2)
    ]
    engines[0].process_verified(as_wire, 0.0)
    engines[1].process_verified(as_rows, 0.0)
    assert engines[0].version == engines[1].version == 1
    np.testing.assert_array_equal(engines[0].params, engines[1].params)

    before = engines[0].params.copy()
    bad = UpdateMeta("dev0", "enc-bad", 9, 1, 5, 0.0, 100)
    needs = engines[0].process_verified(
        [Verified("dev0", 100, bad, 0.1, b"\xc1 not msgpack", encoded=True)], 0.0
    )
    assert needs == [0]
    assert engines[0].metrics.snapshot()["rejected"] == {"schema": 1}
    np.testing.assert_array_equal(engines[0].params, before)


def test_presence_is_verified(fed: Federation) -> None:
    e = engine(fed)
    online = wire.encode(wire.Status(FED, "dev0", "online", 10.0), fed.keys["dev0"])
    forged = wire.encode(wire.Status(FED, "dev1", "online", 10.0), fed.keys["dev0"])
    older = wire.encode(wire.Status(FED, "dev0", "offline", 5.0), fed.keys["dev0"])
    e.process(
        [
            (topics.status(FED, "dev0"), online),
            (topics.status(FED, "dev1"), forged),
            (topics.status(FED, "dev0"), older),
        ],
        0.0,
    )
    assert e.metrics.snapshot()["devices_online"] == 1
    assert e.metrics.status_rejected == 1
    offline = wire.encode(wire.Status(FED, "dev0", "offline", 11.0), fed.keys["dev0"])
    e.process([(topics.status(FED, "dev0"), offline)], 0.0)
    assert e.metrics.snapshot()["devices_online"] == 0


BIG = ModelSpec("softmax", 2000, 10)


def _large_batch(f: Federation) -> tuple[Engine, list[tuple[str, bytes]]]:
    """An engine allowed 3 verification threads and 8 large updates from dev0 of ``f``."""
    cfg = f.config("127.0.0.1", 1883, strategy={"buffer_size": 4}, limits={"verify_threads": 3})
    rng = np.random.default_rng(0)
    size = BIG.layout().size
    items = [
        (upd_topic(), f.update("dev0", rng.normal(0, 0.01, size).astype(np.float32), seq=i))
        for i in range(8)
    ]
    return Engine(cfg, Metrics(FED), keys=None), items


def test_large_updates_are_opened_on_several_threads(fed: Federation) -> None:
    e, items = _large_batch(Federation(fed.root / "big", BIG))  # HMAC-SHA256 keys
    items.insert(3, (upd_topic(), b"junk"))
    e.process(items, 0.0)
    assert e._pool is not None  # the parallel path was taken
    assert e.version == 2 and e.metrics.snapshot()["rejected"] == {"schema": 1}
    e.close()


def test_updates_with_a_cheap_mac_stay_on_one_thread(fed: Federation) -> None:
    """ChaCha20-Poly1305 is too fast for a thread hand-off to pay (bench/engine.py): the same
    large batch as above, authenticated with it, is opened on the engine's thread alone."""
    f = Federation(fed.root / "cheap", BIG, devices=())
    key = ChaChaPolyKey.generate()
    key.save(f.root / "devices" / "dev0.chacha")
    f.keys["dev0"] = key  # type: ignore[assignment]
    e, items = _large_batch(f)
    e.process(items, 0.0)
    assert e._pool is None
    assert e.version == 2 and e.metrics.snapshot()["accepted"] == 8
    e.close()


@pytest.mark.parametrize("strategy", [{}, {"robust": "median"}, {"name": "fedasync"}])
def test_large_int8_updates_left_unscaled_give_the_model_of_their_values(
    fed: Federation, strategy: dict[str, Any]
) -> None:
    """In a model above 8192 values the engine leaves int8 tensors as codes and their scales
    to the strategy. The model must be the one that the fully decoded updates make."""
    from fedmqtt.codecs import Codec, decode_params, encode_params

    big = Federation(fed.root / "big", BIG)
    layout = BIG.layout()
    cfg = big.config(
        "127.0.0.1", 1883, strategy={"buffer_size": 4, "max_staleness": 100, **strategy}
    )
    deferred, decoded = (Engine(cfg, Metrics(FED), keys=None) for _ in range(2))
    rng = np.random.default_rng(5)
    items, rows = [], []
    for i in range(8):
        delta = layout.unflatten(rng.normal(0, 0.01, layout.size).astype(np.float32))
        enc = encode_params(delta, Codec.parse("int8"), rng=rng)
        payload = big.update_encoded("dev0", enc, update_id=f"update-{i:04d}")
        items.append((upd_topic(), payload))
        values = decode_params(enc, layout)
        meta = UpdateMeta(
            "dev0", f"update-{i:04d}", 0, 0, 10, 0.0, len(payload)
        )  # update_encoded's
        norm = float(np.linalg.norm(values))
        rows.append(Verified("dev0", len(payload), meta, norm, values.tobytes()))
    assert deferred.strategy.scales is not None
    deferred.process(items, 0.0)
    decoded.process_verified(rows, 0.0)
    assert deferred.metrics.accepted == decoded.metrics.accepted == 8
    assert deferred.version == decoded.version > 0
    np.testing.assert_allclose(deferred.params, decoded.params, rtol=1e-5, atol=1e-7)
    deferred.close()
    decoded.close()


@pytest.mark.parametrize("fed_id", TOPIC_WORDS)
def test_a_federation_named_like_a_topic_word_routes_updates_and_presence(
    tmp_path: Path, fed_id: str
) -> None:
    """Topics are parsed level by level: ``fl/status/updates/dev0`` is an update of federation
    ``status``, ``fl/updates/status/dev0`` a presence message of federation ``updates``."""
    routes_updates_and_presence(tmp_path, fed_id, "dev0")


@settings(max_examples=25, deadline=None)
@given(fed_id=ids, device=ids)
def test_any_valid_federation_and_device_id_routes_updates_and_presence(
    fed_id: str, device: str
) -> None:
    with tempfile.TemporaryDirectory() as d:
        routes_updates_and_presence(Path(d), fed_id, device)


def routes_updates_and_presence(root: Path, fed_id: str, device: str) -> None:
    f = Federation(root, SPEC, devices=(device,), federation=fed_id)
    cfg = f.config("127.0.0.1", 1883, strategy={"buffer_size": 2})
    e = Engine(cfg, Metrics(fed_id), keys=None)
    online = wire.encode(wire.Status(fed_id, device, "online", 10.0), f.keys[device])
    items = [(topics.updates(fed_id, device), f.update(device, small(i), seq=i)) for i in range(2)]
    items.insert(1, (topics.status(fed_id, device), online))
    assert e.process(items, 0.0) == [1, 0, 1]  # presence needs nothing durable
    snap = e.metrics.snapshot()
    assert snap["accepted"] == 2 and snap["rejected"] == {} and e.version == 1
    assert snap["devices_online"] == 1 and e.metrics.status_rejected == 0
    # Another federation's topics, or this one's with an extra level, are not its messages.
    other = "other" if fed_id != "other" else "another"
    e.process(
        [(topics.updates(other, device), items[0][1]), (items[0][0] + "/x", items[0][1])], 0.0
    )
    assert e.metrics.snapshot()["rejected"] == {"schema": 2}


def test_messages_and_worker_items_take_the_same_path(tmp_path: Path) -> None:
    """An update applied from its raw message (``process``) and the same update opened by a
    worker (``process_verified``) meet the same checks in the same order -- staleness, replay,
    the per-device bound, the norm gate -- and make the same model."""
    from aggregator.validate import open_update
    from fedmqtt.codecs import decode_params

    f = Federation(tmp_path, SPEC, devices=("dev0", "dev1", "dev2"))
    cfg = f.config(
        "127.0.0.1",
        1883,
        strategy={"buffer_size": 2, "max_staleness": 1, "max_per_device": 1},
        limits={"max_norm": 1.0},
    )
    raw, verified = (Engine(cfg, Metrics(FED), keys=None) for _ in range(2))
    script = [  # device, update id, base version, delta scale
        ("dev0", "u0", 0, 0.01),
        ("dev1", "u1", 0, 10.0),  # norm above max_norm
        ("dev0", "u9", 0, 0.01),  # a second row of dev0: held for the next buffer
        ("dev1", "u2", 0, 0.01),  # fills the buffer: version 1, u9 in the next one
        ("dev0", "u0", 0, 0.01),  # replay
        ("dev2", "u3", 0, 0.01),  # version 2
        ("dev0", "u4", 1, 0.01),
        ("dev1", "u5", 0, 0.01),  # stale
        ("dev2", "u6", 5, 0.01),  # from the future
    ]
    items = [
        (upd_topic(d), f.update(d, small(i, scale), base_version=b, update_id=f"update-{u}", seq=i))
        for i, (d, u, b, scale) in enumerate(script)
    ]
    rows = []
    for topic, payload in items:
        meta, delta = open_update(
            topic,
            payload,
            federation=FED,
            fingerprint=SPEC.fingerprint(),
            keys=verified.keys,
            max_bytes=cfg.limits.max_update_bytes,
        )
        values = decode_params(delta, SPEC.layout())
        norm = float(np.linalg.norm(values))
        rows.append(Verified(meta.sender, len(payload), meta, norm, values.tobytes()))
    needs = raw.process(items, 0.0)
    assert verified.process_verified(rows, 0.0) == needs
    a, b = raw.metrics.snapshot(), verified.metrics.snapshot()
    assert b["rejected"] == a["rejected"] == {"norm": 1, "replay": 1, "stale": 1, "future": 1}
    assert a["accepted"] == b["accepted"] == 5 and a["deferred"] == b["deferred"] == 1
    assert a["bytes_received"] == b["bytes_received"]
    assert raw.version == verified.version == 2
    np.testing.assert_allclose(raw.params, verified.params, rtol=1e-6, atol=1e-8)


def test_fedbuff_deadline_applies_a_partial_buffer_on_tick(fed: Federation) -> None:
    """With ``deadline_s`` the engine is timed: a tick that long after the version applies the
    buffer it holds (the service calls tick periodically); before, nothing changes."""
    e = engine(fed, buffer_size=20, deadline_s=30.0)
    assert e.timed
    start = time.monotonic()  # the version started when the engine was made (at or before)
    e.process([(upd_topic(), fed.update("dev0", small(1), seq=1))], now=start)
    assert e.version == 0 and len(e.strategy) == 1
    assert not e.tick(start + 1.0)
    assert e.version == 0
    assert e.tick(start + 30.0)
    assert e.version == 1 and len(e.strategy) == 0
    assert not engine(fed, buffer_size=20).timed
