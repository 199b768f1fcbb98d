"""One device's weight is bounded: at most ``max_per_device`` rows per buffer (FedBuff, FedAvg)
or per window of versions (FedAsync), and a per-device rate; the excess is refused with a
counted reason, acknowledged in its turn, and changes nothing -- except that FedBuff and FedAvg
hold one update per device over the bound for the next buffer (aggregator.engine)."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest
from test_aggregator_support import FED, Federation, ModelWatcher, client, wait_until

from aggregator.checkpoint import decode_state
from aggregator.config import AggregatorConfig
from aggregator.devices import DeviceKeys
from aggregator.engine import Engine, Verified
from aggregator.metrics import Metrics
from aggregator.ratelimit import DeviceRate
from aggregator.service import warn_if_unfillable
from aggregator.validate import open_update
from fedmqtt import topics
from fedmqtt.aggregation import fedbuff_aggregate
from fedmqtt.errors import ConfigError, RejectedError
from fedmqtt.models.spec import ModelSpec
from simulator.aggregator_thread import AggregatorThread
from simulator.broker import Mosquitto

SPEC = ModelSpec("softmax", 6, 3)
D = SPEC.layout().size
HONEST = ("h0", "h1", "h2", "h3")


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return Federation(tmp_path, SPEC, devices=(*HONEST, "bad"))


def engine(fed: Federation, limits: dict[str, Any] | None = None, **strategy: Any) -> Engine:
    cfg = fed.config(
        "127.0.0.1",
        1883,
        strategy={"staleness": "constant", "max_staleness": 100, "max_per_device": 1, **strategy},
        limits={"norm_reject_factor": 0.0, **(limits or {})},
    )
    return Engine(cfg, Metrics(FED), keys=None)


def honest_delta(i: int) -> np.ndarray:
    return np.random.default_rng(i).normal(0, 0.01, D).astype(np.float32)


BAD = np.full(D, 5.0, dtype=np.float32)  # far from every honest coordinate


def msg(fed: Federation, device: str, delta: np.ndarray, **kw: Any) -> tuple[str, bytes]:
    return topics.updates(FED, device), fed.update(device, delta, **kw)


def flood_then_honest(fed: Federation, floods: int) -> list[tuple[str, bytes]]:
    """``floods`` updates of the attacker with fresh ids, then one of each honest device."""
    items = [msg(fed, "bad", BAD, seq=i) for i in range(floods)]
    return items + [msg(fed, d, honest_delta(i)) for i, d in enumerate(HONEST)]


@pytest.mark.parametrize("robust", ["median", "trimmed-mean"])
def test_fedbuff_robust_reducer_holds_with_one_row_per_device(fed: Federation, robust: str) -> None:
    e = engine(fed, buffer_size=5, robust=robust, trim_fraction=0.2)
    before = e.params.copy()
    needs = e.process(flood_then_honest(fed, floods=4), now=0.0)
    # One row of the attacker and four honest ones fill the buffer of five: one version. Its
    # later updates wait for the next buffer (flush 2) in turn, each refusing the one before
    # it as superseded, which was held for the same flush.
    assert e.version == 1
    assert needs == [1, 2, 2, 2, 1, 1, 1, 1]
    snap = e.metrics.snapshot()
    assert snap["rejected"] == {"superseded": 2} and snap["deferred"] == 3
    assert snap["accepted"] == 6
    assert [p.meta.sender for p in e.strategy.pending] == ["bad"]
    rows = np.stack([BAD, *(honest_delta(i) for i in range(4))])
    reducer = "median" if robust == "median" else "trimmed-mean"
    expected = fedbuff_aggregate(
        rows,
        np.ones(5, np.float32),
        np.full(5, 10, np.float32),
        reducer=reducer,
        trim_fraction=0.2,
    )
    np.testing.assert_allclose(e.params - before, expected, atol=1e-6)
    assert float(np.max(np.abs(e.params - before))) < 0.1  # the attacker's 5.0 is out


def test_unbounded_buffer_lets_one_device_own_the_median(fed: Federation) -> None:
    """What the bound prevents: four of the five rows are the attacker's."""
    e = engine(fed, buffer_size=5, robust="median", max_per_device=0)
    before = e.params.copy()
    e.process(flood_then_honest(fed, floods=4), now=0.0)
    assert e.version == 1 and e.metrics.snapshot()["rejected"] == {}
    np.testing.assert_allclose(e.params - before, BAD, atol=1e-6)


def test_max_per_device_two_and_a_refused_update_is_accepted_later(fed: Federation) -> None:
    e = engine(fed, buffer_size=4, max_per_device=2)
    items = [msg(fed, "bad", BAD * 0.001, update_id=f"bad-update-{i}", seq=i) for i in range(4)]
    items.append(msg(fed, "h0", honest_delta(0)))
    needs = e.process(items, now=0.0)
    # Two rows; the third is held for the next buffer until the fourth takes its place.
    assert needs == [1, 1, 2, 2, 1] and e.metrics.snapshot()["rejected"] == {"superseded": 1}
    assert [p.meta.sender for p in e.strategy.pending] == ["bad", "bad", "h0"]
    # The refused update changed nothing: it is not in the replay window, and the same
    # update in the next buffer is accepted (after the held one).
    e.process([msg(fed, "h1", honest_delta(1))], now=0.0)
    assert e.version == 1
    assert [p.meta.update_id for p in e.strategy.pending] == ["bad-update-3"]
    again = msg(fed, "bad", BAD * 0.001, update_id="bad-update-2", seq=2)
    assert e.process([again], now=0.0) == [2]
    assert e.metrics.snapshot()["accepted"] == 6


def test_a_held_update_is_applied_by_the_flush_it_waits_for(fed: Federation) -> None:
    """A late update on an older version took the device's row; its next update waits for
    the next buffer, and is in it when that buffer makes flush 2 (the flush its
    acknowledgement waits for: one earlier would let the broker forget it)."""
    e = engine(fed, buffer_size=2)
    before = e.params.copy()
    late, fresh = honest_delta(1), honest_delta(2)
    needs = e.process(
        [
            msg(fed, "bad", late, update_id="1a" * 16),
            msg(fed, "bad", fresh, update_id="2b" * 16),
            msg(fed, "h0", honest_delta(3)),
        ],
        now=0.0,
    )
    assert needs == [1, 2, 1] and e.flushes == 1 and e.deferred == {}
    assert [p.meta.update_id for p in e.strategy.pending] == ["2b" * 16]
    assert [p.tau for p in e.strategy.pending] == [1]  # its staleness on the new version
    assert e.process([msg(fed, "h1", honest_delta(4), base_version=1)], now=0.0) == [2]
    assert e.flushes == 2 and len(e.strategy) == 0
    assert "2b" * 16 in e.window and e.metrics.snapshot()["rejected"] == {}
    assert e.metrics.snapshot()["accepted"] == 4
    # Every update is in the model: constant staleness weights, so each buffer's mean.
    expected = (late + honest_delta(3)) / 2 + (fresh + honest_delta(4)) / 2
    np.testing.assert_allclose(e.params - before, expected, atol=1e-6)


def test_one_update_held_per_device_the_latest_and_its_redelivery_waits_with_it(
    fed: Federation,
) -> None:
    """A device's updates arriving in a burst (u0 takes its row): the held update is the
    latest it made, whatever the order they arrive in; the others are refused as superseded."""
    e = engine(fed, buffer_size=3)

    def u(i: int) -> tuple[str, bytes]:
        return msg(fed, "bad", BAD, update_id=f"{i:032x}", seq=i)

    # u1 held, redelivered by the broker (waits with it), then u3 takes its place.
    assert e.process([u(0), u(1), u(1), u(3)], now=0.0) == [1, 2, 2, 2]
    assert e.deferred["bad"].meta is not None
    assert e.deferred["bad"].meta.update_id == f"{3:032x}"
    assert e.metrics.snapshot()["rejected"] == {"superseded": 1}
    # An earlier update arriving after it (here u2) is refused at once; u3 stays held.
    assert e.process([u(2)], now=0.0) == [0]
    assert e.deferred["bad"].meta.update_id == f"{3:032x}"
    assert e.metrics.snapshot()["rejected"] == {"superseded": 2}
    assert e.metrics.snapshot()["deferred"] == 2 and e.metrics.snapshot()["held"] == 1
    # The next flush applies u3 (the latest) into the new buffer.
    e.process([msg(fed, "h0", honest_delta(0)), msg(fed, "h1", honest_delta(1))], now=0.0)
    assert e.version == 1
    assert [p.meta.update_id for p in e.strategy.pending] == [f"{3:032x}"]


def test_a_rollback_applies_the_held_updates_before_its_own_flush(fed: Federation) -> None:
    e = engine(fed, buffer_size=3)
    before = e.params.copy()
    needs = e.process([msg(fed, "bad", BAD * 0.01), msg(fed, "bad", BAD * 0.02)], now=0.0)
    assert needs == [1, 2]
    assert e.rollback(before, None, 0, now=0.0) == 3
    assert e.flushes == 3 and len(e.strategy) == 0 and e.deferred == {}
    np.testing.assert_array_equal(e.params, before)


def test_fedasync_and_a_stale_update_hold_nothing(fed: Federation) -> None:
    e = engine(fed, buffer_size=3, max_staleness=0)
    assert e.process([msg(fed, "bad", BAD), msg(fed, "bad", BAD)], now=0.0) == [1, 0]
    a = engine(fed, name="fedasync", device_window=3)
    assert a.process([msg(fed, "bad", BAD), msg(fed, "bad", BAD)], now=0.0) == [1, 0]
    assert e.deferred == {} == a.deferred


def test_fedavg_round_takes_one_update_per_device(fed: Federation) -> None:
    e = engine(fed, name="fedavg", min_updates=3)
    items = [msg(fed, "bad", BAD), msg(fed, "bad", BAD), msg(fed, "h0", honest_delta(0))]
    items.append(msg(fed, "h1", honest_delta(1)))
    # Not held for the next round: it would be stale there.
    assert e.process(items, now=0.0) == [1, 0, 1, 1]
    assert e.version == 1 and e.metrics.snapshot()["rejected"] == {"device_quota": 1}
    assert e.metrics.snapshot()["deferred"] == 0


def test_fedasync_version_window_survives_a_restart(fed: Federation) -> None:
    e = engine(fed, name="fedasync", device_window=3)
    order = ["bad", "bad", "h0", "bad", "h1", "bad", "bad"]
    needs = e.process([msg(fed, d, honest_delta(i)) for i, d in enumerate(order)], now=0.0)
    # bad makes v1; refused while it made one of the last two versions; in again after h0, h1.
    assert needs == [1, 0, 2, 0, 3, 4, 0]
    assert e.version == 4 and e.metrics.snapshot()["rejected"] == {"device_quota": 3}
    assert list(e.strategy.recent) == ["h1", "bad"]

    again = engine(fed, name="fedasync", device_window=3)
    again.restore(decode_state(e.snapshot().data))
    assert again.process([msg(fed, "bad", honest_delta(9))], now=0.0) == [0]
    assert again.metrics.snapshot()["rejected"]["device_quota"] == 4
    assert again.process([msg(fed, "h2", honest_delta(8))], now=0.0) == [5]


def test_fedasync_window_of_one_is_no_bound(fed: Federation) -> None:
    e = engine(fed, name="fedasync", device_window=1)
    e.process([msg(fed, "bad", honest_delta(i)) for i in range(3)], now=0.0)
    assert e.version == 3 and e.metrics.snapshot()["rejected"] == {}


def test_device_rate_token_bucket() -> None:
    r = DeviceRate(2.0, 3)
    for _ in range(3):
        r.take("a", 10.0)
    with pytest.raises(RejectedError) as err:
        r.take("a", 10.0)
    assert err.value.reason == "rate_limited"
    r.take("b", 10.0)  # another device has its own bucket
    r.take("a", 10.5)  # 0.5 s at 2/s: one token
    with pytest.raises(RejectedError):
        r.take("a", 10.5)
    for t in (100.0, 100.0, 100.0):  # refilled to the burst, no more
        r.take("a", t)
    with pytest.raises(RejectedError):
        r.take("a", 100.0)
    DeviceRate(0.0, 1).take("a", 0.0)  # off


def test_rate_limited_updates_are_refused_at_once_and_counted(fed: Federation) -> None:
    e = engine(fed, limits={"device_rate": 1.0, "device_burst": 2}, buffer_size=3, max_per_device=0)
    flood = [msg(fed, "bad", honest_delta(i)) for i in range(10)]
    needs = e.process([*flood, msg(fed, "h0", honest_delta(20))], now=5.0)
    assert needs == [1, 1] + [0] * 8 + [1]
    snap = e.metrics.snapshot()
    assert snap["rejected"] == {"rate_limited": 8} and snap["accepted"] == 3
    assert e.version == 1
    # A second later the device has one token again.
    assert e.process([msg(fed, "bad", honest_delta(30))], now=6.0) == [2]
    text = generate_latest(e.metrics.registry).decode()
    assert 'fedmqtt_updates_rejected_total{reason="rate_limited"} 8.0' in text
    assert 'fedmqtt_updates_rejected_total{reason="device_quota"} 0.0' in text


def test_worker_path_applies_the_same_bounds(fed: Federation) -> None:
    """Updates a scale-out worker verified go through the same rate and quota checks."""
    e = engine(fed, buffer_size=3)
    verified = []
    for i, device in enumerate(["bad", "bad", "h0", "h1"]):
        topic, payload = msg(fed, device, honest_delta(i))
        meta, _ = open_update(
            topic,
            payload,
            federation=FED,
            fingerprint=e.fingerprint,
            keys=e.keys,
            max_bytes=e.cfg.limits.max_update_bytes,
        )
        delta = honest_delta(i)
        norm = float(np.linalg.norm(delta))
        verified.append(Verified(device, len(payload), meta, norm, delta.tobytes()))
    assert e.process_verified(verified, now=0.0) == [1, 2, 1, 1]
    assert e.metrics.snapshot()["rejected"] == {} and e.version == 1
    assert [p.meta.sender for p in e.strategy.pending] == ["bad"]  # held for the next buffer


def test_config_defaults_and_ranges(fed: Federation) -> None:
    raw = fed.raw_config("127.0.0.1", 1883)
    del raw["strategy"], raw["limits"]
    cfg = AggregatorConfig.from_dict(raw, base_dir=fed.root)
    assert cfg.strategy.max_per_device == 1 and cfg.strategy.device_window == 2
    assert cfg.limits.device_rate == 10.0 and cfg.limits.device_burst == 20
    for table, key, value in (
        ("strategy", "max_per_device", -1),
        ("strategy", "device_window", 0),
        ("limits", "device_rate", -1.0),
        ("limits", "device_burst", 0),
    ):
        with pytest.raises(ConfigError, match=f"\\[{table}\\] {key}"):
            fed.config("127.0.0.1", 1883, **{table: {key: value}})


# ------------------------------------------------------------------ over a real broker
FLOOD_SPEC = ModelSpec("softmax", 153, 10)  # 1540 values: coordinate 0 is the flooder's
ROUNDS = 15


@pytest.mark.parametrize("workers", [0, 2], ids=["single-process", "two-workers"])
def test_a_flooding_device_does_not_stall_honest_devices(
    broker: Mosquitto, tmp_path: Path, workers: int
) -> None:
    """One device floods (fresh update ids, as fast as its client can) through a Receive
    Maximum window of 40 while four honest devices each send their next update once the
    previous one is in a published version, as agents do. Its excess is refused at once
    (``rate_limited``, ``device_quota``, ``superseded``) and acknowledged in its turn, so the
    honest updates keep arriving: all of them are applied within the time limit, and the
    flooder holds at most one row of each buffer. (Refusals that held their PUBACKs would fill
    the window with the flood and starve the honest devices: the test then times out.)"""
    fed = Federation(tmp_path, FLOOD_SPEC, devices=(*HONEST, "bad"))
    layout = FLOOD_SPEC.layout()
    cfg = fed.config(
        broker.host,
        broker.port,
        strategy={
            "buffer_size": 4,
            "staleness": "constant",
            "max_staleness": 1_000_000,
            "max_per_device": 1,
        },
        limits={
            "receive_maximum": 40,
            "device_rate": 20.0,
            "device_burst": 20,
            "norm_reject_factor": 0.0,
        },
        scaleout={"workers": workers},
    )
    watcher = ModelWatcher(broker.port, fed.verifier)
    agg = AggregatorThread(cfg).start()
    stop = threading.Event()
    flooded = [0]

    def flood() -> None:
        c = client(broker.port)
        delta = np.zeros(layout.size, dtype=np.float32)
        delta[0] = 1.0
        payload_topic = topics.updates(FED, "bad")
        while not stop.is_set():
            info = c.publish(payload_topic, fed.update("bad", delta, num_samples=1), qos=1)
            flooded[0] += 1
            if flooded[0] % 100 == 0:
                info.wait_for_publish(10)  # keep paho's queue short
        c.disconnect()
        c.loop_stop()

    flooder = threading.Thread(target=flood, daemon=True)
    honest = client(broker.port)
    try:
        flooder.start()
        wait_until(lambda: agg.snapshot()["rejected_total"] > 0, 30, "the flood refused")
        wait_until(lambda: watcher.latest is not None, 30, "the first model")
        started = time.monotonic()
        sent: dict[str, int | None] = dict.fromkeys(HONEST)  # coordinate awaiting application
        rounds = dict.fromkeys(HONEST, 0)
        while any(c is not None for c in sent.values()) or min(rounds.values()) < ROUNDS:
            assert time.monotonic() - started < 60, f"honest devices stalled at {rounds}"
            model = watcher.latest
            assert model is not None
            params = layout.flatten(model.params)
            for j, dev in enumerate(HONEST):
                c = sent[dev]
                if c is not None and params[c] == 0:
                    continue  # its previous update is not in a published version yet
                sent[dev] = None
                if rounds[dev] < ROUNDS:
                    coord = 1 + rounds[dev] * len(HONEST) + j
                    delta = np.zeros(layout.size, dtype=np.float32)
                    delta[coord] = 1.0
                    payload = fed.update(dev, delta, base_version=model.version, num_samples=1)
                    honest.publish(topics.updates(FED, dev), payload, qos=1)
                    sent[dev], rounds[dev] = coord, rounds[dev] + 1
            with contextlib.suppress(TimeoutError):
                watcher.wait(lambda m, v=model.version: m.version > v, 1.0)
        took = time.monotonic() - started
        stop.set()
        flooder.join(30)
        snap = agg.snapshot()
    finally:
        stop.set()
        honest.disconnect()
        honest.loop_stop()
        agg.stop()
        watcher.close()
    n_honest = ROUNDS * len(HONEST)
    rejected = snap["rejected"]
    assert set(rejected) <= {"rate_limited", "device_quota", "superseded"}, rejected
    assert rejected["rate_limited"] > 10 * n_honest, (rejected, flooded[0])
    bad_rows = snap["accepted"] - n_honest
    # One row of the flooder per buffer at most: the versions made, plus the buffer in hand.
    assert 0 < bad_rows <= snap["aggregations"] + 1, snap
    print(f"{n_honest} honest updates in {took:.1f} s beside {flooded[0]} flooded; {snap}")


def test_warning_when_too_few_devices_are_enrolled_to_fill_a_buffer(
    fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    keys = DeviceKeys(fed.root / "devices")
    assert keys.enrolled() == 5
    for strategy, warns in (
        ({"buffer_size": 10, "max_per_device": 1}, True),
        ({"buffer_size": 10, "max_per_device": 2}, False),
        ({"buffer_size": 10, "max_per_device": 0}, False),
        ({"name": "fedavg", "min_updates": 6, "max_per_device": 1}, True),
        ({"name": "fedasync", "device_window": 6, "max_per_device": 1}, True),
        ({"name": "fedasync", "max_per_device": 1}, False),
    ):
        caplog.clear()
        warn_if_unfillable(fed.config("127.0.0.1", 1883, strategy=strategy), keys)
        assert ("needs updates from at least" in caplog.text) == warns, strategy
