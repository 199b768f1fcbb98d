"""Unit tests of the edge agent's parts: config, outbox, backoff, data, sdnotify, trainer, state."""

from __future__ import annotations

import dataclasses
import random
import re
import socket
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_agent_helpers import SPEC, digits_like, global_model, make_device

from edge_agent import config as cfgmod
from edge_agent.config import AgentConfig, DataConfig, TrainingConfig, load_config
from edge_agent.data import DataError, load_data
from edge_agent.outbox import Outbox
from edge_agent.state import AgentState, StateDirLock, StateDirLockedError, StateStore
from edge_agent.trainer import Hyper, build_update, compute_delta, resolve_hyper
from fedmqtt import wire
from fedmqtt.codecs import Codec, ErrorFeedback, decode_params
from fedmqtt.errors import SIGNATURE, ConfigError, DecodeError
from fedmqtt.mqttconf import backoff_delay, read_password
from fedmqtt.sdnotify import Notifier
from fedmqtt.signing import HmacKey

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "edge_agent" / "agent.example.toml"
DOCS = ROOT / "docs" / "agent.md"


def _minimal(**tables: dict[str, Any]) -> dict[str, Any]:
    d: dict[str, Any] = {
        "device": {"id": "d1", "federation": "f", "state_dir": "state"},
        "security": {"aggregator_public_key": "agg.pub", "update_key": "d1.hmac"},
        "data": {"source": "csv", "path": "data"},
    }
    for k, v in tables.items():
        d.setdefault(k, {}).update(v)
    return d


# ------------------------------------------------------------------------------ config


def test_example_config_loads_and_resolves_paths() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.device.id == "sensor-0042"
    assert cfg.broker.tls and cfg.broker.port == 8883
    assert cfg.security.update_key == Path("/etc/fedmqtt/update.key")
    assert cfg.data.label_column == "label"


def test_every_option_is_in_the_example_and_documented() -> None:
    """The example and docs/agent.md must not fall behind the code."""
    example = EXAMPLE.read_text()
    docs = DOCS.read_text()
    tables = {f.name: f.type for f in dataclasses.fields(AgentConfig) if f.name != "path"}
    classes = {
        "device": cfgmod.DeviceConfig,
        "broker": cfgmod.BrokerConfig,
        "security": cfgmod.SecurityConfig,
        "data": cfgmod.DataConfig,
        "training": cfgmod.TrainingConfig,
        "evaluation": cfgmod.EvaluationConfig,
        "outbox": cfgmod.OutboxConfig,
        "inference": cfgmod.InferenceConfig,
        "personalise": cfgmod.PersonaliseConfig,
        "logging": cfgmod.LoggingConfig,
        "privacy": cfgmod.PrivacyConfig,
    }
    assert set(classes) == set(tables)
    for table, cls in classes.items():
        assert f"[{table}]" in example and f"[{table}]" in docs
        for f in dataclasses.fields(cls):
            pattern = rf"^#? ?({f.name} = |\[{table}\.{f.name}\])"
            assert re.search(pattern, example, re.M), f"{table}.{f.name} not in example"
            assert f"`{f.name}`" in docs, f"[{table}] {f.name} not documented in docs/agent.md"


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    cfg_dir = tmp_path / "etc"
    cfg_dir.mkdir()
    (cfg_dir / "agent.toml").write_text(
        '[device]\nid = "d1"\nfederation = "f"\nstate_dir = "state"\n'
        '[security]\naggregator_public_key = "keys/agg.pub"\nupdate_key = "/abs/d1.hmac"\n'
        '[data]\nsource = "npz"\npath = "~/data"\n'
    )
    cfg = load_config(cfg_dir / "agent.toml")
    assert cfg.device.state_dir == cfg_dir.resolve() / "state"
    assert cfg.security.aggregator_public_key == cfg_dir.resolve() / "keys" / "agg.pub"
    assert cfg.security.update_key == Path("/abs/d1.hmac")
    assert cfg.data.path == Path.home() / "data"
    assert cfg.broker == cfgmod.BrokerConfig()  # every broker default


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ({"broker": {"port": "1883"}}, "[broker] port: must be an integer"),
        ({"broker": {"port": 70000}}, "[broker] port: must be <= 65535"),
        ({"broker": {"hots": "x"}}, "[broker]: unknown option(s) hots"),
        ({"broker": {"ca_file": "ca.crt"}}, "[broker] ca_file: is set but tls = false"),
        ({"broker": {"tls": True, "cert_file": "c.crt"}}, "[broker] cert_file: "),
        ({"broker": {"password_file": "pw"}}, "[broker] password_file: needs username"),
        ({"broker": {"reconnect_min_s": 5, "reconnect_max_s": 1}}, "[broker] reconnect_max_s"),
        ({"device": {"id": "a/b"}}, "[device] id: "),
        ({"device": {"federation": "+"}}, "[device] federation: "),
        ({"security": {"update_auth": "rsa"}}, "[security] update_auth: must be one of"),
        ({"data": {"source": "sql"}}, "[data] source: must be one of csv, npz, plugin"),
        ({"data": {"source": "plugin"}}, "[data] plugin: is required"),
        ({"data": {"source": "plugin", "plugin": "nocolon"}}, "[data] plugin: must look like"),
        ({"data": {"label_column": True}}, "[data] label_column: must be"),
        ({"data": {"delimiter": ";;"}}, "[data] delimiter: must be a single character"),
        ({"training": {"codec": "zip"}}, "[training] codec: unknown codec"),
        ({"training": {"max_updates_per_version": 3}}, "needs interval_s > 0"),
        ({"training": {"momentum": 1.0}}, "[training] momentum: must be in [0, 1)"),
        ({"training": {"epochs": 0}}, "[training] epochs: must be >= 1"),
        ({"outbox": {"max_bytes": 10}}, "[outbox] max_bytes: must be >= 1024"),
        ({"logging": {"level": "LOUD"}}, "[logging] level: must be one of"),
        ({"extra": {"x": 1}}, "top level: unknown option(s) extra"),
    ],
)
def test_config_errors_name_the_option(tables: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        AgentConfig.from_dict(_minimal(**tables), base_dir=Path("/"))
    assert message in str(e.value)


def test_missing_required_option() -> None:
    d = _minimal()
    del d["security"]["update_key"]
    with pytest.raises(ConfigError, match=r"\[security\] update_key: is required"):
        AgentConfig.from_dict(d)


def test_load_config_reports_toml_syntax(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text("[device\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    assert tomllib.loads(EXAMPLE.read_text())  # the example itself is valid TOML


def test_password_file_must_be_private(tmp_path: Path) -> None:
    p = tmp_path / "pw"
    p.write_text("s3cret\n")
    p.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_password(p)
    p.chmod(0o600)
    assert read_password(p) == "s3cret"


# ------------------------------------------------------------------------------ outbox


def _put(ob: Outbox, seq: int, size: int = 100, version: int = 1) -> Any:
    return ob.put(bytes(size), seq=seq, base_version=version, update_id=f"{seq:08d}abcdef")


def test_outbox_files_are_durable_and_ordered(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "ob", supersede=False)
    for seq in (10, 2, 7):
        _put(ob, seq)
    (tmp_path / "ob" / ".x.upd.123.tmp").write_bytes(b"torn")  # an interrupted write
    (tmp_path / "ob" / "README").write_text("not an update")
    again = Outbox(tmp_path / "ob", supersede=False)
    assert [e.seq for e in again.entries()] == [2, 7, 10]
    assert again.max_seq() == 10 and again.max_base_version() == 1
    assert not list((tmp_path / "ob").glob(".*.tmp"))
    names = sorted(p.name for p in (tmp_path / "ob").glob("*.upd"))
    assert names[0] == "000000000002-000000000001-00000002abcdef.upd"


def test_outbox_supersedes_only_unsent_updates(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "ob")
    _put(ob, 0)
    [sent] = ob.take_unsent(10)  # handed to the MQTT client: must survive
    _put(ob, 1)
    r = _put(ob, 2)
    assert [e.seq for e in r.superseded] == [1]
    assert [e.seq for e in ob.entries()] == [0, 2]
    assert ob.counters.superseded == 1
    ob.acked(sent.name)
    assert [e.seq for e in ob.entries()] == [2]
    assert sorted(p.name for p in (tmp_path / "ob").iterdir()) == [ob.entries()[0].name]


def test_outbox_caps_drop_the_oldest(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "ob", max_updates=3, max_bytes=2000, supersede=False)
    for seq in range(5):
        _put(ob, seq)
    assert [e.seq for e in ob.entries()] == [2, 3, 4]
    assert ob.counters.dropped_cap == 2
    r = _put(ob, 5, size=1900)  # the count cap needs one to go, the byte cap two
    assert [e.seq for e in r.dropped] == [2, 3]
    assert [e.seq for e in ob.entries()] == [4, 5]
    assert ob.total_bytes() == 2000
    r = _put(ob, 6, size=3000)  # alone bigger than the cap: refused, nothing dropped
    assert r.entry is None and ob.counters.refused_too_big == 1
    assert 6 not in [e.seq for e in ob.entries()]
    assert len(list((tmp_path / "ob").glob("*.upd"))) == len(ob)


def test_outbox_release_defers_and_drop_counts(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "ob", supersede=False)
    _put(ob, 0)
    _put(ob, 1)
    a, b = ob.take_unsent(10, now=100.0)
    assert ob.take_unsent(10, now=100.0) == []
    ob.release(a.name, not_before=105.0)
    assert ob.take_unsent(10, now=104.0) == []
    assert ob.next_retry_at() == 105.0
    assert [e.seq for e in ob.take_unsent(10, now=105.0)] == [0]
    ob.drop(b.name)
    assert ob.counters.dropped_refused == 1
    assert [e.seq for e in ob.entries()] == [0]


def test_state_reconciles_with_the_outbox(tmp_path: Path) -> None:
    s = AgentState(next_seq=4, last_trained_version=2, updates_for_version=1)
    assert not s.reconcile(None, None)
    assert s.reconcile(4, 3)  # seq 4 and v3 reached the outbox, agent.json did not
    assert (s.next_seq, s.last_trained_version, s.updates_for_version) == (5, 3, 1)
    store = StateStore(tmp_path)
    store.save(s)
    assert store.load() == s
    store.path.write_text("{not json")
    assert store.load() == AgentState()


def test_state_dir_lock_is_exclusive(tmp_path: Path) -> None:
    a, b = StateDirLock(tmp_path), StateDirLock(tmp_path)
    a.acquire()
    with pytest.raises(StateDirLockedError, match="in use"):
        b.acquire()
    a.release()
    b.acquire()
    b.release()


# ------------------------------------------------------------------------------ backoff


def test_backoff_is_jittered_exponential_within_bounds() -> None:
    rng = random.Random(1)
    for attempt in range(12):
        delays = [backoff_delay(attempt, 1.0, 60.0, rng) for _ in range(200)]
        cap = min(60.0, 2.0**attempt)
        assert all(1.0 <= d <= cap for d in delays)
        if cap > 1.0:
            assert len(set(delays)) == 200  # jittered: no two devices in step
            assert max(delays) > 1.0 + 0.8 * (cap - 1.0)
    assert backoff_delay(1000, 1.0, 60.0, rng) <= 60.0


# ------------------------------------------------------------------------------ data


def _csv(path: Path, rows: list[list[float]], header: list[str] | None = None) -> None:
    lines = [",".join(header)] if header else []
    lines += [",".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def test_csv_directory_with_header_and_label_name(tmp_path: Path) -> None:
    _csv(tmp_path / "a.csv", [[1, 0, 2], [3, 1, 4]], ["t", "label", "h"])
    cfg = DataConfig(source="csv", path=tmp_path, label_column="label")
    X, y = load_data(cfg)
    assert X.dtype == np.float32 and X.tolist() == [[1, 2], [3, 4]] and y.tolist() == [0, 1]
    # re-read at every round: a new file is picked up
    _csv(tmp_path / "b.csv", [[5, 2, 6]], ["t", "label", "h"])
    X, y = load_data(cfg)
    assert X.shape == (3, 2) and y.tolist() == [0, 1, 2]
    assert load_data(dataclasses.replace(cfg, max_samples=2))[1].tolist() == [1, 2]


def test_csv_without_header_label_by_index(tmp_path: Path) -> None:
    _csv(tmp_path / "a.csv", [[7, 1, 2], [8, 3, 4]])
    X, y = load_data(
        DataConfig(source="csv", path=tmp_path / "a.csv", header=False, label_column=0)
    )
    assert X.tolist() == [[1, 2], [3, 4]] and y.tolist() == [7, 8]
    X, y = load_data(DataConfig(source="csv", path=tmp_path, header=False))
    assert y.tolist() == [2, 4]  # default: last column


@pytest.mark.parametrize(
    ("files", "kw", "message"),
    [
        ({"a.csv": "x,y\n1,2\n", "b.csv": "x,z,y\n1,2,3\n"}, {}, "different numbers of features"),
        ({"a.csv": "x,y\n1,abc\n"}, {}, "not a numeric CSV"),
        ({"a.csv": "x,y\n1,2\n"}, {"label_column": "label"}, "no column named 'label'"),
        ({"a.csv": "x,y\nnan,1\n"}, {"label_column": "y"}, "X contains NaN"),
        ({"a.csv": "x,y\n1,nan\n"}, {"label_column": "y"}, "y contains NaN"),
        ({}, {}, "no *.csv files"),
    ],
)
def test_csv_errors_name_the_file(
    tmp_path: Path, files: dict[str, str], kw: dict[str, Any], message: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(DataError) as e:
        load_data(DataConfig(source="csv", path=tmp_path, **kw))
    assert message in str(e.value)


def test_npz_files_and_no_pickles(tmp_path: Path) -> None:
    X, y = digits_like(20)
    np.savez(tmp_path / "1.npz", X=X[:10], y=y[:10])
    np.savez(tmp_path / "2.npz", X=X[10:], y=y[10:])
    X2, y2 = load_data(DataConfig(source="npz", path=tmp_path))
    assert np.array_equal(X2, X) and np.array_equal(y2, y)
    np.savez(tmp_path / "3.npz", X=np.array([object()], dtype=object), y=y[:1])
    with pytest.raises(DataError, match="cannot load"):
        load_data(DataConfig(source="npz", path=tmp_path))


def test_plugin_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fake_sensor.py").write_text(
        "def read(n, width=3):\n    return [[i] * width for i in range(n)], list(range(n))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = DataConfig(source="plugin", plugin="fake_sensor:read", plugin_args={"n": 4})
    X, y = load_data(cfg)
    assert X.shape == (4, 3) and y.tolist() == [0, 1, 2, 3]
    with pytest.raises(DataError, match="cannot import"):
        load_data(dataclasses.replace(cfg, plugin="no_such_module_xyz:read"))
    with pytest.raises(DataError, match="failed: TypeError"):
        load_data(dataclasses.replace(cfg, plugin_args={}))
    sys.modules.pop("fake_sensor", None)


# ------------------------------------------------------------------------------ sdnotify


def test_sdnotify_sends_datagrams(tmp_path: Path) -> None:
    path = str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"})
        assert n.enabled and n.watchdog_interval_s == 1.5
        assert n.ready("up\nand running")
        assert s.recv(100) == b"READY=1\nSTATUS=up and running"
        assert n.watchdog()
        assert s.recv(100) == b"WATCHDOG=1"


def test_sdnotify_abstract_socket_and_disabled() -> None:
    name = f"fedmqtt-test-{random.getrandbits(40)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        assert Notifier(f"@{name}").status("hello")
        assert s.recv(100) == b"STATUS=hello"
    off = Notifier.from_env({})
    assert not off.enabled and not off.ready("x") and off.watchdog_interval_s is None
    other_pid = Notifier.from_env(
        {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "10", "WATCHDOG_PID": "1"}
    )
    assert other_pid.watchdog_interval_s is None  # the watchdog belongs to another process
    assert not Notifier("/nonexistent/socket").status("x")  # logged, never raised


def test_sdnotify_never_blocks_on_a_reader_that_does_not_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A datagram socket queues only net.unix.max_dgram_qlen (10) unread messages; a plain
    sendto then blocks until the reader drains it. A wedged systemd must not freeze the
    service: every send gives up after its timeout, and the loss is logged once."""
    path = str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        n = Notifier(path, 2_000_000, send_timeout_s=0.05)
        t0 = time.monotonic()
        sent = [n.watchdog() for _ in range(40)]
        elapsed = time.monotonic() - t0
        assert sent[0] and not sent[-1]  # the queue filled up; later pings were dropped
        assert elapsed < 40 * 0.05 + 5, elapsed
        assert caplog.text.count("cannot notify systemd") == 1
        assert s.recv(100) == b"WATCHDOG=1"


# ------------------------------------------------------------------------------ trainer


def test_hyperparameters_follow_the_plan_unless_overridden() -> None:
    plan = wire.Plan(
        "f",
        "agg",
        3,
        epochs=4,
        lr=0.2,
        batch_size=16,
        codec="topk:0.1",
        extra={"max_grad_norm": 5.0},
    )
    h = resolve_hyper(plan, TrainingConfig())
    assert (h.train.epochs, h.train.lr, h.train.batch_size) == (4, 0.2, 16)
    assert h.train.max_grad_norm == 5.0 and h.uses_feedback
    h = resolve_hyper(plan, TrainingConfig(epochs=1, codec="fp16"))
    assert h.train.epochs == 1 and h.train.lr == 0.2 and str(h.codec) == "fp16"
    assert not h.uses_feedback
    h = resolve_hyper(plan, TrainingConfig(codec="int4"))
    assert h.uses_feedback and not h.persists_feedback  # kept in memory only
    assert resolve_hyper(None, TrainingConfig()).codec == Codec("int8")  # Plan defaults
    odd = wire.Plan("f", "agg", 4, codec="brotli")
    assert resolve_hyper(odd, TrainingConfig()).codec == Codec("raw")


def test_update_is_signed_encoded_and_feedback_carries_the_rest(tmp_path: Path) -> None:
    model = global_model(7)
    X, y = digits_like(200)
    hyper = Hyper(resolve_hyper(None, TrainingConfig()).train, Codec.parse("topk:0.1"))
    result = compute_delta(model, X, y, hyper, np.random.default_rng(0))
    key = HmacKey.generate()
    fb = ErrorFeedback()
    update, payload = build_update(
        model,
        result,
        hyper,
        device_id="d1",
        federation="testfed",
        seq=12,
        signer=key,
        rng=np.random.default_rng(1),
        feedback=fb,
    )
    got = wire.decode(payload, wire.Update, key)
    assert got == update
    assert (got.seq, got.base_version, got.num_samples) == (12, 7, 200)
    layout = SPEC.layout()
    sent = decode_params(got.delta, layout)
    full = layout.flatten(result.delta)
    # what was not sent is exactly the residual kept for the next round
    np.testing.assert_allclose(sent + layout.flatten(fb.residual), full, rtol=1e-6, atol=1e-7)
    assert np.count_nonzero(sent) <= int(np.ceil(0.1 * 640)) + int(np.ceil(0.1 * 10))
    with pytest.raises(DecodeError, match=r"^signature: signature does not match$") as e:
        wire.decode(payload, wire.Update, HmacKey.generate())
    assert e.value.reason == SIGNATURE


def test_delta_transform_hook_is_applied() -> None:
    model = global_model(1)
    X, y = digits_like(50)
    hyper = resolve_hyper(None, TrainingConfig())
    plain = compute_delta(model, X, y, hyper, np.random.default_rng(0))
    flipped = compute_delta(
        model,
        X,
        y,
        hyper,
        np.random.default_rng(0),
        delta_transform=lambda d: {k: -v for k, v in d.items()},
    )
    for k in plain.delta:
        np.testing.assert_array_equal(flipped.delta[k], -plain.delta[k])


def test_make_device_helper_writes_private_keys(tmp_path: Path) -> None:
    dev = make_device(tmp_path / "d")
    assert (dev.root / "device.key").stat().st_mode & 0o777 == 0o600
