"""Shared helpers of the edge-agent tests: keys, configs, data, and a paho "aggregator".

The aggregator side is played by a plain paho client (not the real aggregator) so that these
tests exercise only the agent: it publishes retained, signed models and plans with a fresh
Ed25519 key and collects the updates the agent sends, verified with the device's key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import AgentConfig
from edge_agent.state import GLOBAL_MODEL_FILE, spec_file
from fedmqtt import topics, wire
from fedmqtt.models.dense import init_params
from fedmqtt.models.spec import ModelSpec
from fedmqtt.params import Params
from fedmqtt.signing import ChaChaPolyKey, Ed25519Signer, Signer
from simulator.broker import Mosquitto

FED = "testfed"
N_FEATURES = 64
N_CLASSES = 10
SPEC = ModelSpec("softmax", N_FEATURES, N_CLASSES, feature_scale=(1.0 / 16,) * N_FEATURES)


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def digits_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A separable 10-class problem shaped like sklearn's digits (64 features in 0..16)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(1234).uniform(0, 16, size=(N_CLASSES, N_FEATURES))
    y = rng.integers(0, N_CLASSES, size=n)
    X = np.clip(centers[y] + rng.normal(0, 3.0, size=(n, N_FEATURES)), 0, 16)
    return X.astype(np.float32), y.astype(np.int64)


def accuracy(params: Params, X: np.ndarray, y: np.ndarray) -> float:
    from fedmqtt.models.dense import forward

    return float((forward(SPEC, params, X).argmax(axis=1) == y).mean())


@dataclass
class Device:
    """A provisioned device: its key files, data and state directory under ``root``."""

    root: Path
    device_id: str
    key: ChaChaPolyKey
    aggregator: Ed25519Signer

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def config_dict(
        self, mosq: Mosquitto | None, port: int | None = None, **tables: dict[str, Any]
    ) -> dict[str, Any]:
        d: dict[str, Any] = {
            "device": {"id": self.device_id, "federation": FED, "state_dir": str(self.state_dir)},
            "broker": {
                "host": "127.0.0.1",
                "port": port if port is not None else (mosq.port if mosq else 1),
                "keepalive": 10,
                "reconnect_min_s": 0.05,
                "reconnect_max_s": 0.4,
                "connect_timeout_s": 2.0,
            },
            "security": {
                "aggregator_public_key": str(self.root / "aggregator.pub"),
                "update_key": str(self.root / "device.key"),
            },
            "data": {"source": "npz", "path": str(self.root / "data")},
            "training": {"seed": 7, "retry_s": 0.5},
            "outbox": {"retry_s": 0.2},
            "logging": {"level": "DEBUG"},
        }
        for name, values in tables.items():
            d.setdefault(name, {}).update(values)
        return d

    def config(self, mosq: Mosquitto | None, **tables: dict[str, Any]) -> AgentConfig:
        return AgentConfig.from_dict(self.config_dict(mosq, None, **tables))

    def write_toml(
        self, mosq: Mosquitto | None, port: int | None = None, **tables: dict[str, Any]
    ) -> Path:
        path = self.root / "agent.toml"
        path.write_text(to_toml(self.config_dict(mosq, port, **tables)))
        return path


def make_device(
    root: Path,
    device_id: str = "dev-1",
    n_samples: int = 300,
    aggregator: Ed25519Signer | None = None,
) -> Device:
    root.mkdir(parents=True, exist_ok=True)
    agg = aggregator or Ed25519Signer.generate()
    agg.verifier().save(root / "aggregator.pub")
    key = ChaChaPolyKey.generate()
    key.save(root / "device.key")
    (root / "data").mkdir(exist_ok=True)
    X, y = digits_like(n_samples, seed=sum(device_id.encode()))
    np.savez(root / "data" / "shard.npz", X=X, y=y)
    return Device(root, device_id, key, agg)


def to_toml(d: dict[str, Any]) -> str:
    """Just enough TOML for the configs built above (tables of scalars / nested tables)."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def table(prefix: str, t: dict[str, Any]) -> None:
        lines.append(f"[{prefix}]")
        subs = {k: v for k, v in t.items() if isinstance(v, dict)}
        lines.extend(f"{k} = {value(v)}" for k, v in t.items() if not isinstance(v, dict))
        for k, v in subs.items():
            table(f"{prefix}.{k}", v)

    for name, t in d.items():
        table(name, t)
    return "\n".join(lines) + "\n"


def global_model(version: int, params: Params | None = None, fed: str = FED) -> wire.GlobalModel:
    if params is None:
        params = init_params(SPEC, np.random.default_rng(0))
    return wire.GlobalModel(
        federation=fed, sender="aggregator", version=version, spec=SPEC, params=params
    )


def model_payload(
    version: int, signer: Signer, params: Params | None = None, compact: bool = True
) -> bytes:
    return wire.encode(global_model(version, params), signer, compact=compact)


def spec_payload(
    signer: Signer, spec: ModelSpec = SPEC, fed: str = FED, compact: bool = True
) -> bytes:
    return wire.encode(wire.SpecMessage(fed, "aggregator", spec), signer, compact=compact)


def store_model(state_dir: Path, version: int, signer: Signer) -> None:
    """Leave a verified model in a state directory, as an agent that received it would."""
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / spec_file(SPEC.fingerprint())).write_bytes(spec_payload(signer))
    (state_dir / GLOBAL_MODEL_FILE).write_bytes(model_payload(version, signer))


@dataclass
class Received:
    payload: bytes
    update: wire.Update


@dataclass
class FakeAggregator:
    """Publishes signed retained models (with their spec and announcement) and plans; collects
    and verifies updates."""

    broker: Mosquitto
    signer: Ed25519Signer
    device_keys: dict[str, ChaChaPolyKey]
    tls_ca: Path | None = None
    username: str | None = None
    password: str | None = None
    updates: list[Received] = field(default_factory=list)
    status_payloads: list[bytes] = field(default_factory=list)
    invalid: list[bytes] = field(default_factory=list)
    statuses: dict[str, wire.Status] = field(default_factory=dict)
    spec_published: bool = False
    compact: bool = True  # the wire form it writes (False: an aggregator of an earlier release)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _subscribed: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="fake-aggregator", protocol=paho.MQTTv5
        )
        c.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]  # floats work; fast tests
        if self.username is not None:
            c.username_pw_set(self.username, self.password)
        if self.tls_ca is not None:
            c.tls_set(ca_certs=str(self.tls_ca))
        c.on_connect = self._on_connect
        c.on_subscribe = lambda *a: self._subscribed.set()
        c.on_message = self._on_message
        self.client = c
        c.connect(self.broker.host, self.broker.port, keepalive=10)
        c.loop_start()
        assert self._subscribed.wait(5), "fake aggregator could not subscribe"

    def _on_connect(self, client: paho.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        client.subscribe([(topics.updates_filter(FED), 1), (topics.status_filter(FED), 1)])

    def _on_message(self, client: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
        """Keeps what verifies with the key of the topic's device, names that device as sender
        and this federation; anything else goes to ``invalid`` (checked by ``close``)."""
        parsed = topics.device_topic(msg.topic, FED)
        device = parsed[1] if parsed is not None else ""
        payload = bytes(msg.payload)
        status = parsed is not None and parsed[0] == topics.STATUS
        if status and not payload:  # a cleared retained status
            return
        kind: type[wire.Status | wire.Update] = wire.Status if status else wire.Update
        with self._lock:
            try:
                m = wire.decode(payload, kind, self.device_keys[device])
                ok = m.sender == device and m.federation == FED
            except Exception:
                ok = False
            if not ok:
                self.invalid.append(payload)
            elif isinstance(m, wire.Status):
                self.statuses[device] = m
                self.status_payloads.append(payload)
            else:
                self.updates.append(Received(payload, m))

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published()

    def publish_spec(self, spec: ModelSpec = SPEC) -> None:
        self.publish(topics.spec(FED), spec_payload(self.signer, spec, compact=self.compact))
        self.spec_published = True

    def publish_model(
        self, version: int, params: Params | None = None, signer: Signer | None = None
    ) -> bytes:
        if not self.spec_published:
            self.publish_spec()
        payload = model_payload(version, signer or self.signer, params, self.compact)
        self.publish(topics.model(FED), payload)
        self.announce(version)
        return payload

    def announce_payload(self, version: int, signer: Signer | None = None) -> bytes:
        msg = wire.Announce(FED, "aggregator", version, SPEC.fingerprint(), created_at=1.0)
        return wire.encode(msg, signer or self.signer, compact=self.compact)

    def announce(self, version: int, signer: Signer | None = None) -> bytes:
        """The aggregator's announcement that ``version`` is the newest (retained)."""
        payload = self.announce_payload(version, signer)
        self.publish(topics.announce(FED), payload)
        return payload

    def publish_plan(self, revision: int = 1, **kw: Any) -> None:
        plan = wire.Plan(federation=FED, sender="aggregator", revision=revision, **kw)
        self.publish(topics.plan(FED), wire.encode(plan, self.signer, compact=self.compact))

    def received(self) -> list[wire.Update]:
        with self._lock:
            return [r.update for r in self.updates]

    def wait_updates(self, n: int, timeout: float = 10.0) -> list[wire.Update]:
        wait_until(lambda: len(self.received()) >= n, timeout)
        return self.received()

    def close(self) -> None:
        """Disconnect, then fail if any message on the updates or status topics did not verify
        (bad MAC, wrong sender or federation, undecodable): an agent sending those must not
        pass a test that only counts what arrived."""
        self.client.loop_stop()
        self.client.disconnect()
        with self._lock:
            invalid = list(self.invalid)
        assert invalid == [], f"{len(invalid)} invalid message(s) reached the fake aggregator"


class AgentThread:
    """Runs an EdgeAgent on a thread; ``stop()`` returns how long stopping took."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.agent.run(self.stop_event)
        except BaseException as e:
            self.error = e

    def stop(self, timeout: float = 10.0) -> float:
        t0 = time.monotonic()
        self.stop_event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "agent did not stop"
        if self.error is not None:
            raise self.error
        return time.monotonic() - t0
