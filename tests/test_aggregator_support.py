"""Shared helpers for the aggregator tests (no tests here): a federation on disk (keys, device
keys, config), signed updates, and MQTT publishers/watchers against the real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt
from conftest import WATCHED
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.checkpoint import CheckpointStore, f32
from aggregator.config import AggregatorConfig
from fedmqtt import codecs, topics, wire
from fedmqtt.admin.tomlconf import dumps
from fedmqtt.models.spec import ModelSpec
from fedmqtt.params import F32
from fedmqtt.signing import Ed25519Signer, Ed25519Verifier, HmacKey
from simulator.aggregator_thread import AggregatorThread

FED = "testfed"
ROOT = Path(__file__).resolve().parent.parent


class Federation:
    """A temp directory with the aggregator's signing key, enrolled device keys and config."""

    def __init__(
        self,
        root: Path,
        spec: ModelSpec,
        devices: Iterable[str] = ("dev0",),
        *,
        signing_key: bool = True,
        federation: str = FED,
    ) -> None:
        self.root = root
        self.federation = federation
        self.spec = spec
        self.layout = spec.layout()
        self.signer = Ed25519Signer.generate()
        if signing_key:  # else `fl-aggregator init` is expected to create it
            self.signer.save(root / "aggregator.key")
        self.verifier: Ed25519Verifier = self.signer.verifier()
        (root / "devices").mkdir(exist_ok=True)
        self.keys: dict[str, HmacKey] = {}
        for d in devices:
            self.enroll(d)

    def enroll(self, device: str) -> HmacKey:
        key = HmacKey.generate()
        key.save(self.root / "devices" / f"{device}.hmac")
        self.keys[device] = key
        return key

    def raw_config(self, host: str, port: int, **tables: dict[str, Any]) -> dict[str, Any]:
        model: dict[str, Any] = dict(self.spec.to_wire())
        raw: dict[str, Any] = {
            "federation": {"id": self.federation, "state_dir": "state"},
            "broker": {
                "host": host,
                "port": port,
                "client_id": "agg-test",
                "reconnect_min_s": 0.1,
                "reconnect_max_s": 1.0,
            },
            "security": {"signing_key": "aggregator.key", "devices_dir": "devices"},
            "model": model,
            "metrics": {"prometheus_port": 0, "status_interval_s": 0.2, "publish_interval_s": 0.5},
            # Most tests stream many updates from a few devices; the per-device bounds are
            # switched on by the tests about them (tests/test_device_bounds.py).
            "strategy": {"max_per_device": 0},
            "limits": {"device_rate": 0.0},
        }
        for name, values in tables.items():
            raw.setdefault(name, {}).update(values)
        return raw

    def config(self, host: str, port: int, **tables: dict[str, Any]) -> AggregatorConfig:
        return AggregatorConfig.from_dict(self.raw_config(host, port, **tables), base_dir=self.root)

    def write_toml(self, path: Path, host: str, port: int, **tables: dict[str, Any]) -> Path:
        raw = self.raw_config(host, port, **tables)
        path.write_text(dumps(raw))
        return path

    def update_encoded(
        self,
        device: str,
        delta: dict[str, Any],
        *,
        base_version: int = 0,
        update_id: str | None = None,
    ) -> bytes:
        """An update whose delta map is given already encoded (e.g. hand-made hostile maps)."""
        u = wire.Update(
            self.federation,
            device,
            update_id or uuid.uuid4().hex,
            0,
            base_version,
            10,
            self.spec.fingerprint(),
            delta,
        )
        return wire.encode(u, self.keys[device])

    def update(
        self,
        device: str,
        delta: F32 | dict[str, F32],
        *,
        base_version: int = 0,
        codec: str = "raw",
        update_id: str | None = None,
        num_samples: int = 10,
        seq: int = 0,
        key: Any = None,
        spec: ModelSpec | None = None,
        federation: str | None = None,
        sender: str | None = None,
    ) -> bytes:
        spec = spec or self.spec
        params = delta if isinstance(delta, dict) else spec.layout().unflatten(delta)
        enc = codecs.encode_params(
            params, codecs.Codec.parse(codec), rng=np.random.default_rng(seq)
        )
        u = wire.Update(
            federation or self.federation,
            sender or device,
            update_id or uuid.uuid4().hex,
            seq,
            base_version,
            num_samples,
            spec.fingerprint(),
            enc,
        )
        return wire.encode(u, key or self.keys[device])


def raw_tensor(a: np.ndarray[Any, Any]) -> dict[str, Any]:
    """A tensor's wire map built by hand (the encoder refuses NaN; a hostile device does not)."""
    return {"c": "raw", "s": list(a.shape), "d": np.asarray(a, "<f4").tobytes()}


def client(
    port: int, client_id: str | None = None, *, on_connect: Callable[..., None] | None = None
) -> mqtt.Client:
    """An MQTT 5 client on the loopback broker, its network loop running; ``on_connect`` is
    set before it connects (so it also runs for the first connection)."""
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id or uuid.uuid4().hex, protocol=mqtt.MQTTv5
    )
    if on_connect is not None:
        c.on_connect = on_connect
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    c.reconnect_delay_set(1, 2)  # paho's loop thread reconnects by itself after a broker restart
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def publish_all(port: int, messages: Iterable[tuple[str, bytes]], timeout: float = 60) -> None:
    """Publish at QoS 1 and wait for every PUBACK (success reason codes only)."""
    c = client(port)
    try:
        infos = [c.publish(t, p, qos=1) for t, p in messages]
        for info in infos:
            info.wait_for_publish(timeout)
            assert info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()


class ModelWatcher:
    """Subscribes to the model topic and records every verified global model, across broker
    restarts (it subscribes again on every connect). A model that does not verify or is not
    finite goes to ``bad`` instead (an exception would end paho's thread and leave the test
    waiting). Every watcher registers itself with ``conftest``, which fails the test after it
    ran if :meth:`problems` reports any: ``bad`` models, a traceback in ``log`` (the log of a
    service process) or one logged in the test process."""

    def __init__(self, port: int, verifier: Ed25519Verifier, *, log: Path | None = None) -> None:
        self.log = log
        WATCHED.append(self)
        self.versions: list[int] = []
        self.bad: list[str] = []
        self.latest: wire.GlobalModel | None = None
        self.cond = threading.Condition()
        self._verifier = verifier
        self._specs: dict[str, Any] = {}  # a model names its spec, published before it
        subscribed = threading.Event()

        def on_connect(c: mqtt.Client, *a: Any) -> None:
            c.on_message = self._on_message
            c.on_subscribe = lambda *a: subscribed.set()
            c.subscribe([(topics.spec(FED), 1), (topics.model(FED), 1)])

        self.c = client(port, on_connect=on_connect)
        if not subscribed.wait(10):
            raise TimeoutError("the model watcher could not subscribe")

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        try:
            if msg.topic == topics.spec(FED):
                spec = wire.decode(msg.payload, wire.SpecMessage, self._verifier)
                self._specs[spec.fingerprint] = spec.spec
                return
            m = wire.decode(msg.payload, wire.GlobalModel, self._verifier, specs=self._specs)
        except Exception as e:  # recorded for the test
            self.bad.append(repr(e))
            return
        if not all(np.all(np.isfinite(v)) for v in m.params.values()):
            self.bad.append(f"version {m.version} is not finite")
        with self.cond:
            self.versions.append(m.version)
            self.latest = m
            self.cond.notify_all()

    def wait(self, pred: Callable[[wire.GlobalModel], bool], timeout: float) -> wire.GlobalModel:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.latest is None or not pred(self.latest):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching model; versions seen {self.versions[-5:]}")
                self.cond.wait(left)
            return self.latest

    def problems(self) -> list[str]:
        out = list(self.bad)
        if self.log is not None:
            try:
                text = self.log.read_text(errors="replace")
            except OSError as e:
                text = f"Traceback: the service log cannot be read: {e}"
            if "Traceback" in text:
                out.append(f"a traceback in {self.log}:\n{text[-3000:]}")
        return out

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def wait_until(pred: Callable[[], bool], timeout: float, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def snapshot_after_restart(cfg: AggregatorConfig, settle_s: float) -> dict[str, Any]:
    """Start the aggregator again on ``cfg``'s state directory, give it ``settle_s`` to take
    whatever the broker still holds for its session, and return its snapshot (then stop it)."""
    agg = AggregatorThread(cfg).start()
    try:
        time.sleep(settle_s)
        return agg.snapshot()
    finally:
        agg.stop()


def start_service(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    """``python -m aggregator run --config cfg`` as its own process (so that it can be killed),
    its stderr appended to ``log``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "ab") as err:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "aggregator", "run", "--config", str(cfg)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def service_status(state: Path) -> dict[str, Any]:
    """The service's status file (``{}`` while it does not exist or is being replaced)."""
    try:
        return dict(json.loads((state / "status.json").read_text()))
    except (OSError, ValueError):
        return {}


def wait_service_ready(state: Path, since: float, timeout: float = 20) -> None:
    """Until the service is ready (connected, and with workers every worker subscribed), as
    reported in a status file written after ``since``."""
    wait_until(
        lambda: (
            service_status(state).get("ready") is True
            and float(str(service_status(state).get("updated_at", 0))) > since
        ),
        timeout,
        "aggregator up",
    )


def unit_vector_strategy(k: int) -> dict[str, Any]:
    """FedBuff with K = ``k``, constant staleness, server lr 1: see :func:`unit_vector_service`."""
    return {"buffer_size": k, "staleness": "constant", "max_staleness": 1_000_000}


def unit_vector_service(
    root: Path, broker_port: int, spec: ModelSpec, devices: Iterable[str], *, k: int, workers: int
) -> tuple[Federation, Path]:
    """A federation and the service's config file for a ledger test: FedBuff with K = ``k``,
    constant staleness, server lr 1 and a model starting at zero. If update i is the unit
    vector e_i, coordinate i of the parameters is 1/k per application, so the final model says
    which updates were applied and how many times (:func:`applications`)."""
    fed = Federation(root, spec, devices)
    cfg = fed.write_toml(
        root / "aggregator.toml",
        "127.0.0.1",
        broker_port,
        strategy=unit_vector_strategy(k),
        scaleout={"workers": workers},
    )
    return fed, cfg


def applications(state: Path, k: int, n: int) -> tuple[npt.NDArray[np.int64], int]:
    """From the newest checkpoint of a :func:`unit_vector_service`: how many times each
    coordinate's update was applied, and the checkpoint's version. Asserts that the model is
    finite and that nothing was applied twice (or in part) and that none of the first ``n``
    updates is missing."""
    loaded = CheckpointStore(state / "checkpoints").load_latest()
    assert loaded is not None, "no checkpoint"
    params = f32(loaded.state["params"], "params")
    assert np.all(np.isfinite(params)), "the model is not finite"
    applied = params * k
    assert np.all(np.isin(np.round(applied, 4), [0.0, 1.0])), "an update was applied twice"
    count = np.round(applied).astype(np.int64)
    assert np.all(count[:n] == 1), f"lost: {np.flatnonzero(count[:n] == 0)[:10]}"
    return count, loaded.version
