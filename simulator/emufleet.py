"""A light fleet emulator: thousands of devices per process over real MQTT connections.

Each emulated device is a paho-mqtt MQTT 5 client with its own TCP connection to the broker,
client id, persistent session (``clean_start=False`` with a session expiry), a retained,
signed ``offline`` last will and a retained, signed ``online`` status after each CONNACK, and
its own enrolled ChaCha20-Poly1305 update key. What it sends is byte for byte what an
:class:`edge_agent.agent.EdgeAgent` sends (``wire.Update`` and ``wire.Status``, MAC'd with the
device key); what it does follows the agent's downlink rules (docs/agent.md, *Downlink*):

* it stays subscribed to the plan and the spec (QoS 1);
* while it is ready (idle and its round interval has passed) it is subscribed to the
  announcements (QoS 0): the retained one arrives at once, new ones while it stays ready;
* when a newer version is announced (or it holds no model) and it is ready, it unsubscribes
  from the announcements, fetches the retained model (subscribe, take one message,
  unsubscribe), "trains" for ``compute_s`` and publishes one update at QoS 1 based on the
  version it fetched; at most one update per version; a fetch that brings nothing within
  15 s is retried. While fetching, training or throttled it receives no announcement.

What is not emulated is the device's own CPU work: the delta is one of a few precomputed
random tensors, encoded with the plan's codec, and a model, announcement, spec or plan
payload is verified (Ed25519) and parsed once per process, not once per device -- every
device receiving the same bytes would reach the same verdict. No thread per device: one
process runs one :mod:`selectors` loop over all its clients, using paho's external-loop API
(``loop_read``/``loop_write``/``loop_misc`` and the socket open/close/write callbacks), so
each device costs one file descriptor.

:func:`run_fleet` starts a Mosquitto from ``broker_config/`` (file-descriptor limit raised to
the hard limit), the real aggregator in this process (its ``on_update`` hook records every
update id it received and what it did with it), enrols one key per device and spreads the
devices over host processes. ``bench/fleet_scale.py`` drives it at 1k-10k devices;
``tests/test_emufleet.py`` at 200.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import random
import resource
import secrets
import selectors
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedmqtt import topics, wire
from fedmqtt.codecs import Codec, encode_params
from fedmqtt.errors import HELD, DecodeError
from fedmqtt.models.spec import ModelSpec
from fedmqtt.signing import MAC_KEY_BYTES, ChaChaPolyKey, Ed25519Signer, Ed25519Verifier
from simulator.broker import Mosquitto

log = logging.getLogger("fedmqtt.emufleet")

FEDERATION: Final = "emu"
#: File descriptors a host process needs besides one per device (pipes, logging, imports).
FD_RESERVE: Final = 200
_FETCH_TIMEOUT_S: Final = 15.0
_FETCH_RETRY_S: Final = 5.0
_MISC_EVERY_S: Final = 2.0  # paho loop_misc (keep-alive pings) per client, this often
_TICK_S: Final = 1.0
_CACHE_MAX: Final = 16
_CONNECTS_PER_TURN: Final = 20
_DELTAS: Final = 8  # distinct precomputed deltas per process


@dataclass(frozen=True)
class HostSettings:
    """Everything a host process needs, in a form that pickles."""

    host: str
    port: int
    federation: str
    aggregator_pub: str  # hex
    round_interval_s: float
    compute_s: float
    keepalive: int = 60
    session_expiry_s: int = 3600
    connect_per_s: float = 500.0
    num_samples: int = 100
    seed: int = 0


@dataclass
class HostReport:
    """What one host process's devices did; ``acked``: update ids the broker acknowledged."""

    devices: int = 0
    connected_at_end: int = 0
    connects: int = 0
    disconnects: int = 0
    rounds: int = 0
    fetches: int = 0
    fetch_timeouts: int = 0
    announcements: int = 0  # announcement messages received
    acked: list[str] = field(default_factory=list)
    refused: Counter[int] = field(default_factory=Counter)
    unacked_at_end: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # downlink messages refused
    bytes_up: Counter[str] = field(default_factory=Counter)  # payload bytes sent, by kind
    bytes_down: Counter[str] = field(default_factory=Counter)  # payload bytes received
    slow_connects: int = 0  # TCP connects that blocked the loop for more than 0.5 s
    max_stall_s: float = 0.0  # longest time the loop spent away from select()
    cpu_s: float = 0.0
    rss: int = 0


class _Device:
    __slots__ = (
        "announced",
        "busy",
        "client",
        "connected",
        "fetch_started",
        "fetching",
        "id",
        "key",
        "listening",
        "model_spec",
        "model_version",
        "pending",
        "ready_at",
        "seq",
        "timer",
        "trained",
    )

    def __init__(self, dev_id: str, key: Any, client: Any) -> None:
        self.id = dev_id
        self.key = key
        self.client = client
        self.connected = False
        self.announced = -1
        self.model_version = -1
        self.model_spec = ""  # fingerprint of the fetched model's spec
        self.trained = -1  # the version of the last update sent
        self.fetching = False
        self.listening = False  # subscribed to the announcements (while ready)
        self.fetch_started = 0.0
        self.busy = False
        self.ready_at = 0.0
        self.seq = 0
        self.timer = 0.0  # when the pending "maybe start" timer fires (0: none)
        self.pending: dict[int, str] = {}  # mid -> update_id, until PUBACK


class _Host:
    """One process's devices and its event loop."""

    def __init__(
        self, cfg: HostSettings, devices: list[tuple[str, str]], conn: mpc.Connection
    ) -> None:
        self.cfg = cfg
        self.conn = conn
        self.rng = random.Random(cfg.seed)
        self.verifier = Ed25519Verifier.from_bytes(bytes.fromhex(cfg.aggregator_pub))
        self.sel = selectors.DefaultSelector()
        self.sel.register(conn, selectors.EVENT_READ, None)
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = 0
        self.report = HostReport(devices=len(devices))
        self.draining = False
        self.closing = False
        fed = cfg.federation
        self.t_plan, self.t_spec = topics.plan(fed), topics.spec(fed)
        self.t_announce, self.t_model = topics.announce(fed), topics.model(fed)
        self.specs: dict[str, Any] = {}
        self.codec = "int8"
        self._cache: dict[tuple[str, bytes], Any] = {}
        self._deltas: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.devices = [
            self._make(dev_id, ChaChaPolyKey(bytes.fromhex(key))) for dev_id, key in devices
        ]

    # ------------------------------------------------------------------ set-up
    def _make(self, dev_id: str, key: Any) -> _Device:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=dev_id,
            protocol=paho.MQTTv5,
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(24)
        dev = _Device(dev_id, key, client)
        client.user_data_set(dev)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return dev

    def _status(self, dev: _Device, state: str) -> bytes:
        payload = wire.encode(wire.Status(self.cfg.federation, dev.id, state), dev.key)
        self.report.bytes_up["status"] += len(payload)
        return payload

    def _connect(self, dev: _Device) -> None:
        if self.closing:
            return
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        dev.client.will_set(
            topics.status(self.cfg.federation, dev.id),
            self._status(dev, "offline"),
            qos=1,
            retain=True,
        )
        t = time.monotonic()
        try:
            dev.client.connect(
                self.cfg.host,
                self.cfg.port,
                keepalive=self.cfg.keepalive,
                clean_start=False,
                properties=props,
            )
        except OSError:
            self._later(self.rng.uniform(0.5, 5.0), lambda: self._connect(dev))
        if time.monotonic() - t > 0.5:  # a SYN dropped by a full listen backlog: 1 s
            self.report.slow_connects += 1

    # ------------------------------------------------------------------ paho socket callbacks
    def _on_socket_open(self, client: Any, dev: _Device, sock: Any) -> None:
        self.sel.register(sock, selectors.EVENT_READ, dev)

    def _on_socket_close(self, client: Any, dev: _Device, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)

    def _on_register_write(self, client: Any, dev: _Device, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, dev)

    def _on_unregister_write(self, client: Any, dev: _Device, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, selectors.EVENT_READ, dev)

    # ------------------------------------------------------------------ MQTT callbacks
    def _on_connect(self, client: Any, dev: _Device, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            return  # paho closes the socket; _on_disconnect schedules the next attempt
        dev.connected = True
        self.report.connects += 1
        subs = [(self.t_plan, SubscribeOptions(qos=1)), (self.t_spec, SubscribeOptions(qos=1))]
        if dev.listening:
            subs.append((self.t_announce, SubscribeOptions(qos=0)))
        if dev.fetching:
            subs.append((self.t_model, SubscribeOptions(qos=1)))
        client.subscribe(subs)
        idle = [
            t
            for t, on in ((self.t_announce, dev.listening), (self.t_model, dev.fetching))
            if not on
        ]
        if idle and flags.session_present:  # held over by the persistent session
            client.unsubscribe(idle)
        client.publish(
            topics.status(self.cfg.federation, dev.id), self._status(dev, "online"), 1, True
        )
        self._maybe_start(dev)

    def _on_disconnect(self, client: Any, dev: _Device, flags: Any, rc: Any, props: Any) -> None:
        if dev.connected:
            self.report.disconnects += 1
        dev.connected = False
        if not self.closing:
            self._later(self.rng.uniform(0.5, 5.0), lambda: self._reconnect(dev))

    def _reconnect(self, dev: _Device) -> None:
        if self.closing or dev.connected:
            return
        try:
            dev.client.reconnect()
        except OSError:
            self._later(self.rng.uniform(0.5, 5.0), lambda: self._reconnect(dev))

    def _on_publish(self, client: Any, dev: _Device, mid: int, rc: Any, props: Any) -> None:
        uid = dev.pending.pop(mid, None)
        if uid is None:
            return  # a status message
        code = int(rc.value)
        if code < 0x80 and code != 0x10:  # 0x10: no subscriber received it
            self.report.acked.append(uid)
        else:
            self.report.refused[code] += 1

    def _on_message(self, client: Any, dev: _Device, msg: Any) -> None:
        payload: bytes = msg.payload
        topic: str = msg.topic
        if topic == self.t_announce:
            self.report.bytes_down["announce"] += len(payload)
            self.report.announcements += 1
            version = self._verified("announce", payload)
            if version is not None and version > dev.announced:
                dev.announced = version
                self._maybe_start(dev)
        elif topic == self.t_model:
            self.report.bytes_down["model"] += len(payload)
            if not dev.fetching:
                return
            if self.draining:  # the run is over: no new round
                dev.fetching = False
                client.unsubscribe(self.t_model)
                return
            got = self._verified("model", payload)
            if got is None:
                return  # refused (counted); the fetch times out and is retried
            version, spec_fp = got
            dev.fetching = False
            client.unsubscribe(self.t_model)
            if version <= dev.trained:
                self._later(_FETCH_RETRY_S, lambda: self._maybe_start(dev))
                return
            dev.model_version, dev.model_spec = version, spec_fp
            dev.announced = max(dev.announced, version)
            dev.busy = True
            self._later(self.cfg.compute_s, lambda: self._send_update(dev))
        elif topic == self.t_spec:
            self.report.bytes_down["spec"] += len(payload)
            self._verified("spec", payload)
        elif topic == self.t_plan:
            self.report.bytes_down["plan"] += len(payload)
            self._verified("plan", payload)
        else:
            self.report.bytes_down["other"] += len(payload)

    # ------------------------------------------------------------------ downlink, verified once
    def _verified(self, kind: str, payload: bytes) -> Any:
        """The version of an announcement, ``(version, spec fingerprint)`` of a model, or True
        for a spec or plan, if ``payload`` verifies and parses, else None (counted). Each
        distinct payload is checked once per process."""

        key = (kind, payload)
        if key in self._cache:
            result = self._cache[key]
        else:
            try:
                if kind == "announce":
                    result = wire.decode(payload, wire.Announce, self.verifier).version
                elif kind == "model":
                    m = wire.decode(payload, wire.GlobalModel, self.verifier, specs=self.specs)
                    result = (m.version, m.spec.fingerprint())
                elif kind == "spec":
                    s = wire.decode(payload, wire.SpecMessage, self.verifier)
                    self.specs[s.spec.fingerprint()] = s.spec
                    result = True
                else:
                    self.codec = wire.decode(payload, wire.Plan, self.verifier).codec
                    result = True
            except DecodeError as e:
                result = None
                self.report.rejected[f"{kind}/{e.reason}"] += 1
                if e.reason == "unknown_spec":
                    return None  # not cached: the spec may arrive later
            if len(self._cache) >= _CACHE_MAX:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = result
        if result is None:
            self.report.rejected[f"{kind}/cached"] += 1
        return result

    # ------------------------------------------------------------------ rounds
    def _listen(self, dev: _Device, on: bool) -> None:
        """Be subscribed to the announcements exactly while ``on`` (the device is ready)."""
        if on == dev.listening:
            return
        dev.listening = on
        if dev.connected:
            if on:
                dev.client.subscribe(self.t_announce, options=SubscribeOptions(qos=0))
            else:
                dev.client.unsubscribe(self.t_announce)

    def _maybe_start(self, dev: _Device) -> None:
        """Listen to the announcements while ready; fetch the model if the device is connected,
        idle, ready and has something to fetch."""
        if self.draining or dev.busy or dev.fetching:
            self._listen(dev, False)
            return
        now = time.monotonic()
        if now < dev.ready_at:  # throttled: no announcements until the interval has passed
            self._listen(dev, False)
            if dev.timer == 0.0 or dev.timer > dev.ready_at:
                dev.timer = dev.ready_at
                self._later(dev.ready_at - now, lambda: self._timer_start(dev))
            return
        if not dev.connected or (dev.model_version >= 0 and dev.announced <= dev.trained):
            self._listen(dev, True)  # nothing newer than what it trained on: wait for news
            return
        self._listen(dev, False)
        dev.fetching = True
        dev.fetch_started = now
        dev.ready_at = now + self.cfg.round_interval_s
        self.report.fetches += 1

        dev.client.subscribe(self.t_model, options=SubscribeOptions(qos=1))
        started = now
        self._later(_FETCH_TIMEOUT_S, lambda: self._fetch_timeout(dev, started))

    def _timer_start(self, dev: _Device) -> None:
        dev.timer = 0.0
        self._maybe_start(dev)

    def _fetch_timeout(self, dev: _Device, started: float) -> None:
        if dev.fetching and dev.fetch_started == started:
            self.report.fetch_timeouts += 1
            dev.fetching = False
            if dev.connected:
                dev.client.unsubscribe(self.t_model)
            dev.ready_at = time.monotonic() + _FETCH_RETRY_S
            self._maybe_start(dev)

    def _delta(self, spec_fp: str) -> dict[str, Any]:
        key = (spec_fp, self.codec)
        if key not in self._deltas:
            layout = self.specs[spec_fp].layout()
            rng = np.random.default_rng(self.cfg.seed)
            self._deltas[key] = [
                encode_params(
                    {
                        n: rng.normal(0.0, 0.01, s).astype(np.float32)
                        for n, s in zip(layout.names, layout.shapes, strict=True)
                    },
                    Codec.parse(self.codec),
                    rng=rng,
                )
                for _ in range(_DELTAS)
            ]
        return self.rng.choice(self._deltas[key])

    def _send_update(self, dev: _Device) -> None:
        dev.busy = False
        fp = dev.model_spec
        if not dev.connected:
            # The link dropped while "training": the round is dropped, the next one fetches.
            self._later(_FETCH_RETRY_S, lambda: self._maybe_start(dev))
            return
        dev.seq += 1
        update = wire.Update(
            federation=self.cfg.federation,
            sender=dev.id,
            update_id=secrets.token_hex(16),
            seq=dev.seq,
            base_version=dev.model_version,
            num_samples=self.cfg.num_samples,
            spec_fingerprint=fp,
            delta=self._delta(fp),
            metrics={"loss": 1.0, "steps": 4.0, "train_cpu_s": self.cfg.compute_s},
        )
        payload = wire.encode(update, dev.key)
        info = dev.client.publish(topics.updates(self.cfg.federation, dev.id), payload, 1, False)
        dev.pending[info.mid] = update.update_id
        dev.trained = dev.model_version
        self.report.rounds += 1
        self.report.bytes_up["update"] += len(payload)
        self._maybe_start(dev)

    # ------------------------------------------------------------------ loop
    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        self._timer_seq += 1
        heapq.heappush(self.timers, (time.monotonic() + max(0.0, delay), self._timer_seq, fn))

    def run(self) -> None:
        to_connect = list(self.devices)
        to_connect.reverse()
        t_start = time.monotonic()
        next_misc = next_tick = t_start
        connect_per_s = max(1.0, self.cfg.connect_per_s)
        started = 0
        while True:
            now = t_top = time.monotonic()
            # A connect blocks the loop until the TCP handshake is done (about a second when
            # the broker's listen backlog dropped the SYN), so a few per turn of the loop: one
            # slow connect must not leave thousands of connected devices unserved.
            batch = 0
            while (
                to_connect
                and batch < _CONNECTS_PER_TURN
                and started < (now - t_start) * connect_per_s + 1
            ):
                batch += 1
                dev = to_connect.pop()
                started += 1
                dev.ready_at = now + self.rng.uniform(0.0, self.cfg.round_interval_s)
                self._connect(dev)
            timeout = 0.2 if to_connect else 0.5
            if self.timers:
                timeout = min(timeout, max(0.0, self.timers[0][0] - now))
            t_select = time.monotonic()
            events = self.sel.select(timeout)
            busy_from = time.monotonic()
            for key, mask in events:
                dev = key.data
                if dev is None:
                    if not self._command():
                        return
                    continue
                if mask & selectors.EVENT_READ:
                    dev.client.loop_read()
                if mask & selectors.EVENT_WRITE:
                    dev.client.loop_write()
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                heapq.heappop(self.timers)[2]()
            if now >= next_misc:
                next_misc = now + _MISC_EVERY_S
                for d in self.devices:
                    if d.connected:
                        d.client.loop_misc()
            stall = (t_select - t_top) + (time.monotonic() - busy_from)
            self.report.max_stall_s = max(self.report.max_stall_s, stall)
            if now >= next_tick:
                next_tick = now + _TICK_S
                self.conn.send(
                    (
                        "tick",
                        sum(d.connected for d in self.devices),
                        len(self.report.acked),
                        self.report.rounds,
                    )
                )

    def _command(self) -> bool:
        """Handle one command from the parent; False when the host should exit."""
        cmd = self.conn.recv()
        if cmd == "drain":
            # The fleet's state at the end of the run, then no new round; in-flight updates
            # are still acknowledged while the parent waits.
            self.report.connected_at_end = sum(d.connected for d in self.devices)
            self.draining = True
            self.conn.send(("draining",))
        elif cmd == "report":
            # Updates not yet acknowledged, and rounds still fetching or "training" (each may
            # send one more).
            self.report.unacked_at_end = sum(
                len(d.pending) + d.busy + d.fetching for d in self.devices
            )
            ru = resource.getrusage(resource.RUSAGE_SELF)
            self.report.cpu_s = ru.ru_utime + ru.ru_stime
            self.report.rss = ru.ru_maxrss * 1024
            self.conn.send(("report", self.report))
        elif cmd == "close":
            self.closing = True
            for d in self.devices:
                if d.connected:
                    d.client.disconnect()
            return False
        return True


def host_main(cfg: HostSettings, devices: list[tuple[str, str]], conn: mpc.Connection) -> None:
    """Entry point of a host process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < len(devices) + FD_RESERVE:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    _Host(cfg, devices, conn).run()


# ---------------------------------------------------------------------------- orchestration


@dataclass(frozen=True)
class FleetConfig:
    """One emulated-fleet run: ``devices`` over ``processes`` host processes (0: enough that
    each stays within its open-file limit). The steady window lasts ``duration_s`` from the
    moment the aggregator sees every device online, or from ``connect_limit_s`` after the
    start if that never happens."""

    devices: int
    processes: int = 0
    duration_s: float = 60.0
    round_interval_s: float = 60.0
    compute_s: float = 1.0
    buffer_size: int = 0  # FedBuff K (0: devices / 20, at least 10)
    n_features: int = 60
    n_classes: int = 10
    connect_per_s: float = 1000.0  # over the whole fleet
    keepalive: int = 60
    workdir: Path | None = None
    seed: int = 0
    drain_s: float = 120.0
    connect_limit_s: float = 300.0


def processes_for(devices: int, requested: int = 0) -> int:
    """Host processes to use: ``requested`` if positive, else the fewest that keep each one
    within this process's open-file hard limit (one descriptor per device + a reserve), and
    at most 2,500 devices each (one event loop per process is the bottleneck, not the fds)."""
    if requested > 0:
        return min(requested, devices)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    per = max(1, min(2500, hard - FD_RESERVE)) if hard != resource.RLIM_INFINITY else 2500
    return max(1, -(-devices // per))


def proc_stats(pid: int) -> tuple[float, int, int]:
    """(CPU seconds, RSS bytes, peak RSS bytes) of process ``pid`` from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return cpu, rss, hwm


def _aggregator_config(
    cfg: FleetConfig, workdir: Path, host: str, port: int, signing_key: Path
) -> Any:
    from aggregator.config import AggregatorConfig

    spec = ModelSpec(
        "softmax",
        n_features=cfg.n_features,
        n_outputs=cfg.n_classes,
        classes=tuple(range(cfg.n_classes)),
        feature_offset=(0.0,) * cfg.n_features,
        feature_scale=(1.0,) * cfg.n_features,
    )
    model = dict(spec.to_wire())
    model["seed"] = cfg.seed
    k = cfg.buffer_size or max(10, cfg.devices // 20)
    raw = {
        "federation": {"id": FEDERATION, "state_dir": str(workdir / "aggregator")},
        "broker": {"host": host, "port": port, "client_id": "fedmqtt-aggregator-emu"},
        "security": {
            "signing_key": str(signing_key),
            "devices_dir": str(workdir / "devices"),
        },
        "model": model,
        "strategy": {"name": "fedbuff", "buffer_size": k, "max_staleness": 50},
        "plan": {"codec": "int8"},
        "metrics": {"prometheus_port": 0},
    }
    return AggregatorConfig.from_dict(raw, base_dir=workdir)


class _Ledger:
    """The aggregator's ``on_update`` hook: what it did with each update id it received."""

    def __init__(self) -> None:
        self.events: list[tuple[str | None, str | None]] = []

    def record(self, update_id: str | None, reason: str | None) -> None:
        self.events.append((update_id, reason))


def run_fleet(cfg: FleetConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one emulated fleet against a fresh Mosquitto and the real aggregator; the result
    says what was connected, acknowledged, received, accepted and lost, and what it cost."""
    with contextlib.ExitStack() as stack:
        if cfg.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="emufleet-")))
        else:
            workdir = cfg.workdir
        return _run(cfg, workdir, stack, progress or (lambda s: None))


def _run(
    cfg: FleetConfig, workdir: Path, stack: contextlib.ExitStack, say: Callable[[str], None]
) -> dict[str, Any]:
    from simulator.aggregator_thread import AggregatorThread

    t_setup = time.monotonic()
    broker = Mosquitto(data_dir=workdir / "broker")
    stack.callback(broker.close)
    broker.start()
    assert broker.proc is not None
    broker_pid = broker.proc.pid
    signer = Ed25519Signer.generate()
    signer.save(workdir / "aggregator.key")
    (workdir / "devices").mkdir(parents=True, exist_ok=True)
    devices: list[tuple[str, str]] = []
    for i in range(cfg.devices):
        dev_id = f"emu{i:05d}"
        raw = secrets.token_bytes(MAC_KEY_BYTES)
        ChaChaPolyKey(raw).save(workdir / "devices" / f"{dev_id}.chacha")  # enrolled
        devices.append((dev_id, raw.hex()))
    ledger = _Ledger()
    agg = AggregatorThread(
        _aggregator_config(cfg, workdir, broker.host, broker.port, workdir / "aggregator.key"),
        on_update=ledger.record,
    )
    agg.start()
    stack.callback(agg.stop)
    n_proc = processes_for(cfg.devices, cfg.processes)
    ctx = mp.get_context("spawn")
    hosts: list[tuple[Any, mpc.Connection]] = []
    for p in range(n_proc):
        settings = HostSettings(
            host=broker.host,
            port=broker.port,
            federation=FEDERATION,
            aggregator_pub=signer.verifier().public_hex(),
            round_interval_s=cfg.round_interval_s,
            compute_s=cfg.compute_s,
            keepalive=cfg.keepalive,
            connect_per_s=cfg.connect_per_s / n_proc,
            seed=cfg.seed * 1000 + p,
        )
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=host_main, args=(settings, devices[p::n_proc], child), daemon=True
        )
        proc.start()
        child.close()
        hosts.append((proc, parent))

    def stop_hosts() -> None:
        for proc, _ in hosts:
            if proc.is_alive():
                proc.kill()
            proc.join(10)

    stack.callback(stop_hosts)
    ticks: dict[int, tuple[int, int, int]] = {}

    def pump(timeout: float) -> None:
        ready = mpc.wait([c for _, c in hosts], timeout)
        for c in ready:
            assert isinstance(c, mpc.Connection)
            with contextlib.suppress(EOFError):
                while c.poll():
                    msg = c.recv()
                    if msg[0] == "tick":
                        ticks[id(c)] = msg[1:]
        for proc, _ in hosts:
            if not proc.is_alive():
                raise RuntimeError(f"emulator host process exited with {proc.exitcode}")

    t0 = time.monotonic()
    setup_s = t0 - t_setup
    all_connected_s: float | None = None
    all_online_s: float | None = None
    deadline = t0 + cfg.connect_limit_s + cfg.duration_s
    cpu0: dict[str, tuple[float, float]] = {}
    accepted0 = 0
    history: list[dict[str, Any]] = []
    while (now := time.monotonic()) < deadline:
        pump(0.5)
        connected = sum(t[0] for t in ticks.values())
        snap = agg.snapshot()
        online = int(snap.get("devices_online", 0))
        if all_connected_s is None and connected >= cfg.devices:
            all_connected_s = now - t0
        if all_online_s is None and online >= cfg.devices:
            all_online_s = now - t0
            # The steady-state window starts once every device is online.
            deadline = now + cfg.duration_s
            accepted0 = int(snap["accepted"])
            cpu0 = {
                "broker": (proc_stats(broker_pid)[0], now),
                "aggregator": (proc_stats(os.getpid())[0], now),
            }
        if not history or now - t0 - history[-1]["t"] >= 5.0:
            history.append(
                {
                    "t": round(now - t0, 1),
                    "connected": connected,
                    "online": online,
                    "received": int(snap["updates_received"]),
                    "accepted": int(snap["accepted"]),
                    "version": int(snap["version"]),
                }
            )
            say(f"t={now - t0:.0f}s {history[-1]}")
        if agg.error is not None:
            raise RuntimeError(f"aggregator failed: {agg.error!r}")
        if not cpu0 and now - t0 >= cfg.connect_limit_s:  # not all online: measure anyway
            accepted0 = int(snap["accepted"])
            cpu0 = {
                "broker": (proc_stats(broker_pid)[0], now),
                "aggregator": (proc_stats(os.getpid())[0], now),
            }
    t_end = time.monotonic()
    end_snap = agg.snapshot()
    presence = agg.presence()
    broker_end = proc_stats(broker_pid)
    agg_end = proc_stats(os.getpid())
    for _, c in hosts:
        c.send("drain")
    # Updates in flight at the end are still acknowledged (or refused); wait for their PUBACKs.
    reports: list[HostReport] = []
    drain_until = time.monotonic() + 30.0
    for _, c in hosts:
        while True:
            c.send("report")
            while (msg := c.recv())[0] != "report":
                pass
            rep: HostReport = msg[1]
            if rep.unacked_at_end == 0 or time.monotonic() > drain_until:
                reports.append(rep)
                break
            time.sleep(0.2)
    acked = {uid for r in reports for uid in r.acked}

    def received() -> set[str]:
        return {uid for uid, _ in list(ledger.events) if uid is not None}

    wait_until = time.monotonic() + cfg.drain_s
    last, last_change = -1, time.monotonic()
    while time.monotonic() < wait_until and agg.error is None:
        missing = len(acked - received())
        if missing == 0:
            break
        if missing != last:
            last, last_change = missing, time.monotonic()
        elif time.monotonic() - last_change > 20.0:
            break
        time.sleep(0.2)
    for _, c in hosts:
        c.send("close")
    for proc, _ in hosts:
        proc.join(30)
    agg.stop()
    final = agg.snapshot()
    events = list(ledger.events)
    got = {uid for uid, _ in events if uid is not None}
    accepted = Counter(uid for uid, reason in events if reason is None and uid is not None)
    rejected_acked = Counter(
        reason for uid, reason in events if reason not in (None, HELD) and uid in acked
    )
    window = None
    if cpu0:
        window = t_end - cpu0["broker"][1]
    total_s = t_end - t0
    bytes_up: Counter[str] = Counter()
    bytes_down: Counter[str] = Counter()
    for r in reports:
        bytes_up.update(r.bytes_up)
        bytes_down.update(r.bytes_down)
    hours = total_s / 3600.0
    n = cfg.devices
    accepted_in_run = int(end_snap["accepted"])
    return {
        "devices": n,
        "processes": n_proc,
        "setup_s": round(setup_s, 1),
        "duration_s": round(total_s, 1),
        "steady_s": None if window is None else round(window, 1),
        "all_connected_s": None if all_connected_s is None else round(all_connected_s, 1),
        "all_online_s": None if all_online_s is None else round(all_online_s, 1),
        "connected_at_end": sum(r.connected_at_end for r in reports),
        "online_at_end": sum(1 for s in presence.values() if s == "online"),
        "disconnects": sum(r.disconnects for r in reports),
        "rounds": sum(r.rounds for r in reports),
        "fetches": sum(r.fetches for r in reports),
        "fetch_timeouts": sum(r.fetch_timeouts for r in reports),
        "announcements": sum(r.announcements for r in reports),
        "acked": len(acked),
        "refused_by_broker": dict(sum((r.refused for r in reports), Counter())),
        "unacked_at_end": sum(r.unacked_at_end for r in reports),
        "received": len(got),
        "accepted": len(accepted),
        "accepted_twice": sorted(u for u, c in accepted.items() if c > 1),
        "rejected_acked": dict(rejected_acked),
        "lost": sorted(acked - got),
        "downlink_rejected": dict(sum((r.rejected for r in reports), Counter())),
        "versions": int(final["version"]),
        "accepted_per_s": round(accepted_in_run / total_s, 1),
        "accepted_per_s_steady": (
            None if window is None else round((accepted_in_run - accepted0) / max(window, 1e-9), 1)
        ),
        "broker_cpu_pct": (
            None if window is None else round(100 * (broker_end[0] - cpu0["broker"][0]) / window, 1)
        ),
        "aggregator_cpu_pct": (
            None
            if window is None
            else round(100 * (agg_end[0] - cpu0["aggregator"][0]) / window, 1)
        ),
        "broker_rss_mb": round(broker_end[1] / 2**20, 1),
        "broker_peak_rss_mb": round(broker_end[2] / 2**20, 1),
        "aggregator_rss_mb": round(agg_end[1] / 2**20, 1),
        "aggregator_peak_rss_mb": round(agg_end[2] / 2**20, 1),
        "emulator_cpu_s": round(sum(r.cpu_s for r in reports), 1),
        "emulator_slow_connects": sum(r.slow_connects for r in reports),
        "emulator_max_stall_s": round(max(r.max_stall_s for r in reports), 2),
        "emulator_peak_rss_mb_per_process": round(max(r.rss for r in reports) / 2**20, 1),
        "bytes_up": dict(bytes_up),
        "bytes_down": dict(bytes_down),
        "up_bytes_per_device_hour": round(sum(bytes_up.values()) / n / hours),
        "down_bytes_per_device_hour": round(sum(bytes_down.values()) / n / hours),
        "history": history,
    }
