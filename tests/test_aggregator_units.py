"""Aggregator parts without a broker: config, replay window, checkpoints, strategies, metrics."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import require
from prometheus_client import generate_latest

from aggregator.checkpoint import CheckpointError, CheckpointStore, decode_state, encode_state
from aggregator.config import AggregatorConfig, StrategyConfig, load_config
from aggregator.cpu import cpu_for, pin_current_thread, usable_cpus
from aggregator.durability import AckQueue
from aggregator.metrics import Metrics, RejectionLog
from aggregator.replay import ReplayWindow
from aggregator.statusfile import format_status, read_status, write_status
from aggregator.strategies import FedAsync, FedAvg, FedBuff, build_strategy
from aggregator.validate import UpdateMeta
from fedmqtt import topics
from fedmqtt.aggregation import fedbuff_aggregate
from fedmqtt.errors import ConfigError
from fedmqtt.mqttconf import backoff_delay

ROOT = Path(__file__).resolve().parent.parent


def raw_config(**tables: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "federation": {"id": "fed", "state_dir": "state"},
        "security": {"signing_key": "k.pem", "devices_dir": "devices"},
        "model": {"kind": "softmax", "n_features": 4, "n_outputs": 3},
    }
    for name, values in tables.items():
        raw.setdefault(name, {}).update(values)
    return raw


# ------------------------------------------------------------------ config
def test_config_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = AggregatorConfig.from_dict(raw_config(), base_dir=tmp_path)
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.security.signing_key == tmp_path / "k.pem"
    assert cfg.strategy.name == "fedbuff" and cfg.strategy.reducer == "mean"
    assert cfg.spec.layout().size == 15
    assert cfg.limits.max_update_bytes == 4 * 15 + 64 * 1024
    assert cfg.limits.inflight_window == 1000
    assert cfg.checkpoint.min_interval_s == 0.1 and cfg.checkpoint.keep == 5
    assert cfg.scaleout.pin_cpu is True


@pytest.mark.parametrize(
    ("tables", "needle"),
    [
        ({"strategy": {"name": "fedprox"}}, "[strategy] name"),
        ({"strategy": {"buffer_size": 0}}, "[strategy] buffer_size"),
        ({"strategy": {"staleness": "cubic"}}, "[strategy] staleness"),
        ({"strategy": {"robust": "krum"}}, "[strategy] robust"),
        ({"strategy": {"robust": "median+trimmed-mean"}}, "[strategy] robust"),
        ({"strategy": {"name": "fedasync", "robust": "median"}}, "[strategy] robust"),
        ({"strategy": {"momentum": 1.0}}, "[strategy] momentum"),
        ({"broker": {"protocol": "3.1.1"}}, "[broker] protocol"),
        ({"broker": {"port": 0}}, "[broker] port"),
        ({"broker": {"ca_file": "ca.crt"}}, "[broker] ca_file"),
        ({"broker": {"colour": "blue"}}, "[broker]: unknown option(s) colour"),
        ({"plan": {"codec": "int7"}}, "[plan] codec"),
        ({"model": {"kind": "tree"}}, "[model] kind"),
        ({"federation": {"id": "a/b"}}, "[federation] id"),
        ({"metrics": {"format": "xml"}}, "[metrics] format"),
        ({"limits": {"max_update_bytes": "big"}}, "[limits] max_update_bytes"),
        ({"scaleout": {"workers": 2, "worker_configs": ["a.toml"]}}, "[scaleout] workers"),
        ({"checkpoint": {"min_interval_s": -1}}, "[checkpoint] min_interval_s"),
        ({"checkpoint": {"min_interval_s": 61}}, "[checkpoint] min_interval_s"),
        ({"bogus": {}}, "unknown option(s) bogus"),
        (
            {"strategy": {"buffer_size": 50}, "limits": {"receive_maximum": 50}},
            "[limits] receive_maximum",
        ),
    ],
)
def test_config_errors_name_the_option(tmp_path: Path, tables: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        AggregatorConfig.from_dict(raw_config(**tables), base_dir=tmp_path)
    assert needle in str(e.value)


def test_config_robust_and_scaleout(tmp_path: Path) -> None:
    cfg = AggregatorConfig.from_dict(
        raw_config(strategy={"robust": "clip+median"}, scaleout={"workers": 2}),
        base_dir=tmp_path,
    )
    assert cfg.strategy.clip and cfg.strategy.reducer == "median"
    ids = [b.client_id for b in cfg.scaleout.worker_brokers]
    assert ids == ["fedmqtt-aggregator-w1", "fedmqtt-aggregator-w2"]


def test_example_config_loads() -> None:
    cfg = load_config(ROOT / "aggregator" / "aggregator.example.toml")
    assert cfg.federation.id and cfg.spec.layout().size > 0


def test_load_config_reports_file(tmp_path: Path) -> None:
    p = tmp_path / "a.toml"
    p.write_text("[federation]\nid = 'x'\n")
    with pytest.raises(ConfigError, match=str(p)):
        load_config(p)
    p.write_text("not toml [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)


# ------------------------------------------------------------------ replay window
def test_replay_window_prunes_by_base_version_and_round_trips() -> None:
    w = ReplayWindow()
    for i in range(10):
        w.add(f"id-{i:06d}", i)
    assert "id-000003" in w and len(w) == 10
    with pytest.raises(ValueError):
        w.add("id-000003", 3)
    assert w.prune(5) == 5
    assert "id-000004" not in w and "id-000005" in w
    w2 = ReplayWindow.from_state(w.to_state())
    assert sorted(w2.to_state()["ids"]) == sorted(w.to_state()["ids"])
    with pytest.raises(ValueError):
        ReplayWindow.from_state({"ids": ["a"], "bases": []})


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_roundtrip_keep_and_corruption_fallback(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ck", keep=2)
    for v in range(4):
        store.write(v, encode_state({"format": 1, "version": v, "x": np.arange(3).tolist()}))
    assert store.versions() == [3, 2]
    loaded = store.load_latest()
    assert loaded is not None and loaded.version == 3 and loaded.state["x"] == [0, 1, 2]
    # Flip one byte of the newest file: the checksum catches it and the previous one is used.
    p = store.path_for(3)
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    loaded = store.load_latest()
    assert loaded is not None and loaded.version == 2
    store.path_for(2).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable state file"):
        store.load_latest()
    with pytest.raises(CheckpointError):
        decode_state(b"FMQAGG1\n" + b"\0" * 10)


def test_checkpoint_store_empty(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "none").load_latest() is None


# ------------------------------------------------------------------ strategies
def meta(i: int, base: int = 0, n: int = 10) -> UpdateMeta:
    return UpdateMeta(f"dev{i % 3}", f"upd-{i:08d}", i, base, n, time.time(), 100)


def fill(strategy: Any, rows: np.ndarray, taus: list[int], ns: list[int]) -> None:
    for i, (row, tau, n) in enumerate(zip(rows, taus, ns, strict=True)):
        strategy.slot()[:] = row
        strategy.add(meta(i, n=n), tau, float(np.linalg.norm(row)))


def test_fedbuff_aggregates_at_k_with_staleness_and_momentum() -> None:
    cfg = StrategyConfig(buffer_size=3, server_lr=0.5, momentum=0.9, staleness="poly:0.5")
    rng = np.random.default_rng(1)
    rows = rng.normal(0, 1, (3, 20)).astype(np.float32)
    s = FedBuff(cfg, 20)
    fill(s, rows[:2], [0, 3], [10, 30])
    assert not s.ready(0.0)
    fill_one = rows[2]
    s.slot()[:] = fill_one
    s.add(meta(2, n=20), 1, 1.0)
    assert s.ready(0.0)
    w = np.zeros(20, dtype=np.float32)
    new = s.aggregate(w, None)
    weights = np.array([1.0, 0.5, 1 / np.sqrt(2)], dtype=np.float32)
    expected = 0.5 * fedbuff_aggregate(rows, weights, np.array([10, 30, 20], np.float32))
    np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)
    # The state (the momentum) round-trips, so a restored strategy continues identically.
    s.clear()
    restored = FedBuff(cfg, 20)
    restored.load_state(s.to_state())
    assert len(restored) == 0  # buffered updates are not state: the broker redelivers them
    for strategy in (s, restored):
        fill(strategy, rows, [0, 0, 0], [1, 1, 1])
    np.testing.assert_array_equal(restored.aggregate(new, None), s.aggregate(new, None))


def test_fedbuff_robust_median_resists_an_outlier_and_clip_bounds_rows() -> None:
    rows = np.ones((5, 4), dtype=np.float32)
    rows[4] = 1000.0
    med = FedBuff(StrategyConfig(buffer_size=5, robust=("median",), staleness="constant"), 4)
    fill(med, rows, [0] * 5, [1] * 5)
    np.testing.assert_allclose(med.aggregate(np.zeros(4, np.float32), None), np.ones(4))
    clip = FedBuff(
        StrategyConfig(buffer_size=5, robust=("clip",), clip_factor=1.0, staleness="constant"), 4
    )
    fill(clip, rows, [0] * 5, [1] * 5)
    out = clip.aggregate(np.zeros(4, np.float32), 2.0)  # median norm 2 -> rows clipped to 2
    assert np.linalg.norm(out) <= 2.0 + 1e-5


def test_fedavg_waits_for_n_or_deadline_and_refuses_stale() -> None:
    s = FedAvg(StrategyConfig(name="fedavg", min_updates=3, deadline_s=5.0), 4)
    assert s.max_staleness == 0
    s.on_version(1, now=100.0)
    fill(s, np.ones((1, 4), np.float32), [0], [2])
    assert not s.ready(102.0)
    assert s.ready(105.0)  # deadline passed with one update
    out = s.aggregate(np.zeros(4, np.float32), None)
    np.testing.assert_allclose(out, np.ones(4))


def test_fedbuff_applies_a_partial_buffer_at_its_deadline() -> None:
    """A buffer as large as the fleet waits for every device; ``deadline_s`` bounds the wait
    for a missing one: the buffer is applied ``deadline_s`` after the version was made if it
    holds at least one update, with the weights of the updates it holds."""
    s = FedBuff(StrategyConfig(buffer_size=20, deadline_s=2.0, staleness="constant"), 4)
    s.on_version(1, now=100.0)
    assert not s.ready(103.0)  # deadline passed, but nothing to apply
    fill(s, np.array([[1, 1, 1, 1], [3, 3, 3, 3]], np.float32), [0, 0], [10, 30])
    assert not s.ready(101.9)
    assert s.ready(102.0)
    out = s.aggregate(np.zeros(4, np.float32), None)
    np.testing.assert_allclose(out, np.full(4, 2.5))  # (10 * 1 + 30 * 3) / 40
    s.clear()
    s.on_version(2, now=102.0)
    fill(s, np.ones((1, 4), np.float32), [0], [10])
    assert not s.ready(103.0)  # the deadline counts from the new version
    # Without a deadline only a full buffer is applied, however long it waits.
    plain = FedBuff(StrategyConfig(buffer_size=2), 4)
    plain.on_version(1, now=0.0)
    fill(plain, np.ones((1, 4), np.float32), [0], [10])
    assert not plain.ready(1e9)
    fill(plain, np.ones((1, 4), np.float32), [0], [10])
    assert plain.ready(0.0)


def test_only_a_deadline_makes_a_strategy_timed() -> None:
    """The service ticks the engine only for a strategy whose readiness can change with time."""
    for name in ("fedavg", "fedbuff"):
        assert build_strategy(StrategyConfig(name=name, deadline_s=5.0), 4).timed
        assert not build_strategy(StrategyConfig(name=name, deadline_s=0.0), 4).timed
    assert not build_strategy(StrategyConfig(name="fedasync"), 4).timed


def test_fedasync_mixes_every_update() -> None:
    cfg = StrategyConfig(name="fedasync", alpha=0.5, staleness="constant")
    s = build_strategy(cfg, 3)
    assert isinstance(s, FedAsync) and s.capacity == 1
    s.slot()[:] = np.array([2, 2, 2], np.float32)
    s.add(meta(0), 0, 3.0)
    assert s.ready(0.0)
    np.testing.assert_allclose(s.aggregate(np.ones(3, np.float32), None), [2, 2, 2])


SEGMENTS = [(0, 30), (30, 33), (33, 40)]  # three tensors of a 40-value model


@pytest.mark.parametrize(
    "cfg",
    [
        StrategyConfig(buffer_size=4, staleness="poly:0.5"),
        StrategyConfig(buffer_size=4, server_lr=0.5, momentum=0.9),
        StrategyConfig(buffer_size=4, robust=("median",)),
        StrategyConfig(buffer_size=4, robust=("trimmed-mean",), trim_fraction=0.25),
        StrategyConfig(buffer_size=4, robust=("clip",), clip_factor=0.5),
        StrategyConfig(name="fedavg", min_updates=4),
        StrategyConfig(name="fedasync", alpha=0.5),
    ],
    ids=["mean", "momentum", "median", "trimmed", "clip", "fedavg", "fedasync"],
)
def test_rows_left_unscaled_aggregate_as_their_values(cfg: StrategyConfig) -> None:
    """A row holding int8 codes with its scales in slot_scales() aggregates exactly as the row
    of decoded values would, whatever the strategy and reducer (the mean folds the scales into
    its coefficients, everything else applies them first)."""
    rng = np.random.default_rng(3)
    scaled = build_strategy(cfg, 40, SEGMENTS)
    plain = build_strategy(cfg, 40, SEGMENTS)
    params = rng.normal(0, 1, 40).astype(np.float32)
    for rnd in range(2):  # the second round reuses the rows and scales of the first
        for i in range(scaled.capacity):
            codes = rng.integers(-127, 128, 40).astype(np.float32)
            scales = rng.uniform(0.001, 0.1, len(SEGMENTS)).astype(np.float32)
            values = codes * np.repeat(scales, [b - a for a, b in SEGMENTS])
            if i == 1:  # a row of values (a worker's), beside rows of codes
                scaled.slot()[:] = values
                scaled.slot_scales().fill(1.0)
            else:
                scaled.slot()[:] = codes
                scaled.slot_scales()[:] = scales
            plain.slot()[:] = values
            norm = float(np.linalg.norm(values))
            for s in (scaled, plain):
                s.add(meta(10 * rnd + i, n=i + 1), i, norm)
        assert scaled.ready(0.0) and plain.ready(0.0)
        median_norm = 0.5 if "clip" in cfg.robust else None
        got = scaled.aggregate(params, median_norm)
        want = plain.aggregate(params, median_norm)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        for s in (scaled, plain):
            s.clear()
        np.testing.assert_array_equal(scaled.scales, 1.0)
        params = want


def test_strategy_state_refuses_another_strategy() -> None:
    a = FedBuff(StrategyConfig(buffer_size=2), 3)
    b = FedAvg(StrategyConfig(name="fedavg", min_updates=2), 3)
    with pytest.raises(CheckpointError, match="strategy"):
        b.load_state(a.to_state())


# ------------------------------------------------------------------ small pieces
def test_ack_queue_releases_in_order() -> None:
    q = AckQueue()
    q.add(["a", "b", "c", "d"], [0, 2, 0, 1])
    assert q.release(0) == ["a"]  # "c" needs nothing but waits behind "b"
    assert q.release(1) == []
    assert q.release(2) == ["b", "c", "d"]
    assert len(q) == 0


def test_worker_pool_acks_each_incarnation_only_its_own_tokens(tmp_path: Path) -> None:
    """Worker 0 was restarted (incarnation 2): a release holding its old incarnation's token 480
    and the new one's token 5 must acknowledge up to 5 to the running process -- tokens restart
    at 1 in each incarnation, so 480 would acknowledge messages not yet in a checkpoint."""
    import msgpack

    from aggregator.workers import WorkerPool

    cfg = AggregatorConfig.from_dict(raw_config(scaleout={"workers": 2}), base_dir=tmp_path)
    pool = WorkerPool(cfg)
    ends = []
    for w, incarnation in zip(pool._workers, (2, 1), strict=True):
        parent, child = multiprocessing.Pipe()
        w.incarnation, w.conn, w.alive = incarnation, parent, True
        ends.append(child)

    def sent(i: int) -> list[Any]:
        out = []
        while ends[i].poll(0):
            out.append(msgpack.unpackb(ends[i].recv_bytes()))
        return out

    pool.ack([(0, 1, 480), (1, 1, 7), (0, 2, 5)])
    assert sent(0) == [{"ack": 5}]
    assert sent(1) == [{"ack": 7}]
    pool.ack([(0, 2, 9), (0, 1, 481)])  # the old incarnation's tokens after the new one's
    assert sent(0) == [{"ack": 9}]
    pool.ack([(0, 1, 482)])  # only a process that no longer exists: nothing to send
    assert sent(0) == []


def test_backoff_is_jittered_and_bounded() -> None:
    import random

    rng = random.Random(0)
    delays = [backoff_delay(a, 0.5, 10.0, rng) for a in range(12)]
    assert all(0.5 <= d <= 10.0 for d in delays)
    assert len({round(d, 6) for d in delays}) == len(delays)
    assert max(backoff_delay(3, 0.5, 10.0, rng) for _ in range(50)) <= 4.0


def test_metrics_snapshot_and_prometheus() -> None:
    m = Metrics("fed")
    m.record_batch(received=5, nbytes=500, accepted_taus=[0, 0, 3], rejected={"norm": 2})
    m.record_version(4, 0.01, 1)
    snap = m.snapshot()
    assert snap["accepted"] == 3 and snap["rejected"] == {"norm": 2}
    assert snap["staleness_histogram"] == {"0": 2, "3": 1} and snap["version"] == 4
    text = generate_latest(m.registry).decode()
    assert 'fedmqtt_updates_rejected_total{reason="norm"} 2.0' in text
    assert 'fedmqtt_updates_rejected_total{reason="replay"} 0.0' in text
    assert 'fedmqtt_update_staleness_bucket{le="2"} 2.0' in text
    assert "fedmqtt_model_version 4.0" in text
    restored = Metrics("fed")
    restored.restore(m.saved())
    assert restored.snapshot()["accepted"] == 3


def test_rejection_log_once_per_device_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    log = RejectionLog()
    with caplog.at_level("DEBUG", logger="aggregator.metrics"):
        for _ in range(3):
            log("dev1", "norm", "too big")
        log("dev1", "replay", "again")
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and len(caplog.records) == 4


def test_status_file_roundtrip(tmp_path: Path) -> None:
    write_status(
        tmp_path,
        {
            "federation": "f",
            "version": 3,
            "state": "running",
            "accepted": 2,
            "rejected": {"norm": 1},
            "rejected_total": 1,
            "accuracy": 0.5,
            "eval_version": 3,
        },
    )
    s = read_status(tmp_path)
    text = format_status(s)
    assert "model version   3" in text and "norm 1" in text and "0.5000" in text
    assert "not responding" in format_status(s, now=s["updated_at"] + 3600)


def test_scaleout_worker_configs_need_their_own_accounts(tmp_path: Path) -> None:
    for i, user in enumerate(("aggregator-w1", "aggregator-w2")):
        (tmp_path / f"w{i}.toml").write_text(
            f'[federation]\nid = "fed"\n[broker]\nusername = "{user}"\n'
            f'password_file = "w{i}.password"\n'
        )
    base = {"username": "aggregator", "password_file": "p"}
    scaleout = {"worker_configs": ["w0.toml", "w1.toml"], "group": SECRET_GROUP}
    cfg = AggregatorConfig.from_dict(raw_config(broker=base, scaleout=scaleout), base_dir=tmp_path)
    assert cfg.scaleout.workers == 2
    brokers = cfg.scaleout.worker_brokers
    assert [b.username for b in brokers] == ["aggregator-w1", "aggregator-w2"]
    assert brokers[1].password_file == tmp_path / "w1.password"
    assert len({b.client_id for b in brokers} | {cfg.broker.client_id}) == 3
    (tmp_path / "w1.toml").write_text('[broker]\nusername = "aggregator"\n')
    with pytest.raises(ConfigError, match="its own broker account"):
        AggregatorConfig.from_dict(raw_config(broker=base, scaleout=scaleout), base_dir=tmp_path)


SECRET_GROUP = "fedmqtt-00112233445566778899aabbccddeeff"
LOGINS = {
    "password": {"username": "aggregator", "password_file": "p"},
    "certificate": {"tls": True, "cert_file": "c.crt", "key_file": "c.key"},
}


@pytest.mark.parametrize("login", sorted(LOGINS))
def test_public_shared_group_refused_when_workers_log_in(tmp_path: Path, login: str) -> None:
    """Mosquitto 2.0 lets any client that logs in join a shared subscription whose group it
    knows: with workers on a broker with accounts, the public default group is refused."""
    broker = LOGINS[login]
    for scaleout in ({"workers": 1}, {"workers": 2, "group": topics.PUBLIC_SHARED_GROUP}):
        with pytest.raises(ConfigError, match=r"\[scaleout\] group: is the public default"):
            AggregatorConfig.from_dict(
                raw_config(broker=broker, scaleout=scaleout), base_dir=tmp_path
            )
    # Workers with accounts of their own (worker_configs) are checked too.
    (tmp_path / "w.toml").write_text('[broker]\nusername = "aggregator-w1"\npassword_file = "q"\n')
    with pytest.raises(ConfigError, match=r"\[scaleout\] group"):
        AggregatorConfig.from_dict(
            raw_config(scaleout={"worker_configs": ["w.toml"]}), base_dir=tmp_path
        )
    # A secret group, or no shared subscription at all (workers = 0), is accepted.
    ok = AggregatorConfig.from_dict(
        raw_config(broker=broker, scaleout={"workers": 1, "group": SECRET_GROUP}),
        base_dir=tmp_path,
    )
    assert ok.scaleout.group == SECRET_GROUP
    assert AggregatorConfig.from_dict(raw_config(broker=broker), base_dir=tmp_path).scaleout


def test_public_shared_group_allowed_on_an_anonymous_broker(tmp_path: Path) -> None:
    """The development broker has no accounts and so no ACL to protect: the default stands."""
    cfg = AggregatorConfig.from_dict(raw_config(scaleout={"workers": 2}), base_dir=tmp_path)
    assert cfg.scaleout.group == topics.PUBLIC_SHARED_GROUP


def test_tune_malloc_applies_on_glibc_and_defers_to_glibc_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import platform

    from aggregator import memtune

    assert memtune.tune_malloc() is (platform.libc_ver()[0] == "glibc")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert memtune.tune_malloc() is False  # the operator's own setting wins


# ------------------------------------------------------------------ CPU pinning
def test_cpu_for_gives_the_owner_the_last_cpu_and_workers_the_ones_before() -> None:
    assert cpu_for(0, [0, 1, 2, 3]) == 3
    assert [cpu_for(i + 1, [0, 1, 2, 3]) for i in range(4)] == [2, 1, 0, 3]  # round robin
    assert cpu_for(0, [5]) is None and cpu_for(0, []) is None  # nothing to choose


def test_pinning_a_thread_covers_the_threads_it_starts_later() -> None:
    cpus = usable_cpus()
    require(len(cpus) >= 2, "two CPUs to choose from")
    seen: dict[str, set[int]] = {}

    def child() -> None:
        seen["child"] = os.sched_getaffinity(0)

    def main() -> None:
        assert pin_current_thread(cpus[0], "test")
        seen["pinned"] = os.sched_getaffinity(0)
        t = threading.Thread(target=child)
        t.start()
        t.join()

    t = threading.Thread(target=main)
    t.start()
    t.join()
    assert seen == {"pinned": {cpus[0]}, "child": {cpus[0]}}
    assert os.sched_getaffinity(0) == set(cpus)  # this thread was left alone
