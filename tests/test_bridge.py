"""Edge brokers bridged to a central broker, as ``fedmqtt-admin edge-config`` renders them.

One site (client-certificate identity, and password identity): the central broker
(production config) where the aggregator's account is subscribed with a persistent session,
standing for the aggregator, and two edge brokers (edge-a, edge-b) run by real Mosquitto
processes with the rendered ``mosquitto.conf`` and its bridge section, each over TLS with its
own bridge identity. edge-a reaches the centre through a TCP relay the test can cut (a link cut
with both brokers up); edge-b dials the centre directly. Devices connect to their edge with
their enrollment bundle's credentials and publish QoS 1 updates with unique ids. Each fault
scenario asserts that every update an edge acknowledged to a device reaches the aggregator,
and that the newest retained model reaches a device that subscribes afresh at each edge.
QoS 1 is at least once: an update resent across a cut may arrive twice; the aggregator refuses
the copy by its replay check (tests/test_agent_duplicate.py, tests/test_aggregator_engine.py),
so the count of copies is reported, and ids are compared as sets.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mqtt_relay_support import TcpRelay as Relay
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from test_broker_security import (
    AGGREGATOR_TOML,
    MAX_PACKET,
    Site,
    _service_readable,
    aggregator_credentials,
    broker_steps,
    start_site,
)

from fedmqtt import topics
from fedmqtt.admin import tomlconf
from simulator.broker import Mosquitto, free_port

FED = "demo"
EDGES = {"edge-a": ("a1", "a2", "a3"), "edge-b": ("b1", "b2")}
ALL_DEVICES = [d for ids in EDGES.values() for d in ids]
NOT_AUTHORIZED = 0x87
TIMEOUT = 30.0
# How long a cut link stays down (the edge's bridge redials every 1-2 s meanwhile).
CUT_S = 3.0


def wait_until(what: str, cond: Any, timeout: float = TIMEOUT) -> float:
    """Seconds until ``cond()`` is true (polled every 20 ms); fails after ``timeout``."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)
    return time.monotonic() - t0


# --------------------------------------------------------------------------- clients


@dataclass
class Peer:
    """A persistent-session MQTT 5 client that reconnects by itself (paho's loop), as the
    agent and the aggregator do: QoS 1 publishes are resent after a reconnect."""

    port: int
    client_id: str
    ca: Path
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password: str | None = None
    acked: list[str] = field(default_factory=list)
    received: list[tuple[str, bytes, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._pending: dict[int, str] = {}
        self._early: dict[int, int] = {}
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self.subs: list[str] = []
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        c.tls_set(
            ca_certs=str(self.ca),
            certfile=str(self.cert) if self.cert else None,
            keyfile=str(self.key) if self.key else None,
        )
        if self.username is not None:
            c.username_pw_set(self.username, self.password)
        c.reconnect_delay_set(min_delay=1, max_delay=1)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *_: self.connected.clear()
        c.on_publish = self._on_publish
        c.on_message = lambda _c, _u, m: self.received.append(
            (m.topic, bytes(m.payload), bool(m.retain))
        )
        self.mqtt = c

    def _on_connect(self, c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.value == 0:
            for t in self.subs:
                c.subscribe(t, qos=1)
            self.connected.set()

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self._lock:
            payload = self._pending.pop(mid, None)
            if payload is None:  # acknowledged before publish() recorded the mid
                self._early[mid] = rc.value
                return
        if rc.value < 0x80:
            self.acked.append(payload)

    def start(self, *subs: str) -> Peer:
        self.subs = list(subs)
        props = Properties(mqtt.PacketTypes.CONNECT)  # type: ignore[attr-defined]
        props.SessionExpiryInterval = 3600
        self.mqtt.connect_async(
            "127.0.0.1", self.port, keepalive=5, clean_start=False, properties=props
        )
        self.mqtt.loop_start()
        assert self.connected.wait(10), f"{self.client_id} did not connect to {self.port}"
        return self

    def publish(self, topic: str, payload: str, *, retain: bool = False) -> None:
        # Not under self._lock: paho may run on_publish (which takes it) on its network
        # thread while holding its own lock, which publish() needs too.
        info = self.mqtt.publish(topic, payload.encode(), qos=1, retain=retain)
        with self._lock:
            rc = self._early.pop(info.mid, None)
            if rc is None:
                self._pending[info.mid] = payload
        if rc is not None and rc < 0x80:
            self.acked.append(payload)

    def stop(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


# --------------------------------------------------------------------------- the topology


@dataclass
class Topology:
    site: Site
    edges: dict[str, Mosquitto]
    relay: Relay
    aggregator: Peer
    devices: dict[str, Peer]
    seq: int = 0
    model_version: int = 0

    @property
    def central(self) -> Mosquitto:
        return self.site.broker

    def edge_dir(self, edge: str) -> Path:
        return self.site.base / edge

    def device_peer(self, device: str, edge: str) -> Peer:
        b = self.site.bundles / device
        return Peer(self.edges[edge].port, device, **credentials(self.site.identity, b, device))

    def burst(self, n: int) -> list[str]:
        """``n`` updates from every device; returns the ids the devices got PUBACK for once
        every publish has been acknowledged by the device's edge."""
        sent = []
        for _ in range(n):
            for device, peer in self.devices.items():
                self.seq += 1
                payload = f"{device}:{self.seq}"
                peer.publish(topics.updates(FED, device), payload)
                sent.append(payload)
        wait_until("PUBACK from the edges", lambda: self.acked() >= set(sent))
        return sent

    def bridge_drops(self, edge: str) -> int:
        """How often the edge has logged its bridge's connection going away."""
        log = self.edges[edge].log_path.read_text()
        return sum(
            log.count(f"Client {edge}.local {what}")
            for what in ("closed its connection", "disconnected")
        )

    def cut_link(self, edge: str) -> None:
        """Cut ``edge``'s link (the relay) and wait until the edge has noticed; the link stays
        down for :data:`CUT_S` more seconds of the scenario, while the edge redials."""
        drops = self.bridge_drops(edge)
        self.relay.cut()
        wait_until(f"{edge} noticing the cut", lambda: self.bridge_drops(edge) > drops)

    def acked(self) -> set[str]:
        return {p for peer in self.devices.values() for p in peer.acked}

    def applied(self) -> list[str]:
        return [
            p.decode()
            for t, p, _ in list(self.aggregator.received)
            if t.startswith(f"fl/{FED}/updates/")
        ]

    def all_arrive(self) -> float:
        """Seconds until every acknowledged update has reached the aggregator."""
        try:
            return wait_until(
                "every acknowledged update at the aggregator",
                lambda: self.acked() <= set(self.applied()),
            )
        except AssertionError as e:
            missing = sorted(self.acked() - set(self.applied()))
            logs = {
                name: m.log_path.read_text()[-1500:]
                for name, m in [("central", self.central), *self.edges.items()]
            }
            raise AssertionError(f"{e}; missing {missing}; logs {logs}") from None

    def publish_model(self) -> bytes:
        """A new model, and a delta to it from keyframe 0 (the same payload: the bridge carries
        the delta topics as it carries the model)."""
        self.model_version += 1
        payload = f"model-v{self.model_version}"
        self.aggregator.publish(topics.delta(FED, 0), payload, retain=True)
        self.aggregator.publish(topics.model(FED), payload, retain=True)
        wait_until("the model's PUBACK", lambda: payload in self.aggregator.acked)
        return payload.encode()

    def model_everywhere(self, payload: bytes) -> float:
        """Seconds until a device that subscribes afresh at each edge gets ``payload`` as the
        retained model (so the edge keeps the newest model for devices that join later)."""
        t0 = time.monotonic()
        for edge, ids in EDGES.items():
            device = ids[0]

            def fresh_gets_it(edge: str = edge, device: str = device) -> bool:
                c = self.site.device(
                    device,
                    port=self.edges[edge].port,
                    client_id=f"{device}-probe-{uuid.uuid4().hex[:6]}",
                )
                try:
                    if c.connect() != 0:
                        return False
                    c.subscribe(topics.model(FED))
                    c.subscribe(topics.delta(FED, 0))
                    got = c.received(wait=0.3)
                    return {(topics.model(FED), payload), (topics.delta(FED, 0), payload)} <= set(
                        got
                    )
                finally:
                    c.close()

            wait_until(f"model {payload!r} retained at {edge}", fresh_gets_it)
        return time.monotonic() - t0


def edge_steps(base: Path, edge: str, port: int, central_port: int) -> list[str]:
    data = base / f"{edge}-data"
    data.mkdir()
    return [
        "edge-config",
        edge,
        "--edge-dir",
        str(base / edge),
        "--host",
        f"{edge}.test",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--central-host",
        "127.0.0.1",
        "--central-port",
        str(central_port),
        "--data-dir",
        str(data),
        "--pid-file",
        str(data / "mosquitto.pid"),
        "--log-dest",
        f"file {data}/mosquitto.log",
        "--reload",
        f"pidfile:{data / 'mosquitto.pid'}",
        "--restart-timeout",
        "1",
        "2",
        "--max-packet-size",
        str(MAX_PACKET),
        "--no-reload",
    ]


def credentials(identity: str, d: Path, user: str) -> dict[str, Any]:
    """A bundle directory's (or the aggregator's) TLS trust and broker credentials."""
    if identity == "password":
        return {
            "ca": d / "ca.crt",
            "username": user,
            "password": (d / "broker.password").read_text().strip(),
        }
    return {"ca": d / "ca.crt", "cert": d / "client.crt", "key": d / "client.key"}


@contextlib.contextmanager
def topology(identity: str, *, stand_ins: bool = True) -> Iterator[Topology]:
    """The site, both edges and the relay; with ``stand_ins`` also the aggregator's stand-in
    and the devices' clients, connected, and both bridges shown to carry updates."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="fedmqtt-bridge-"))
    port = free_port()
    relay = Relay(port)
    (base / "agg").mkdir()
    (base / "agg" / "aggregator.toml").write_text(
        AGGREGATOR_TOML.format(
            fed=FED,
            port=port,
            user="aggregator",
            credentials=aggregator_credentials(identity),
            keys="",
        )
    )
    edge_ports = {e: free_port() for e in EDGES}
    steps = [
        *broker_steps(identity, base, port),
        [
            "aggregator-setup",
            "--aggregator-config",
            str(base / "agg" / "aggregator.toml"),
            "--no-reload",
        ],
        edge_steps(base, "edge-a", edge_ports["edge-a"], relay.port),
        edge_steps(base, "edge-b", edge_ports["edge-b"], port),
    ]
    # Each device's bundle names its edge broker (enroll --edge).
    steps += [
        ["enroll", d, "--out", str(base / "bundles" / d), "--edge", e, "--no-reload"]
        for e, ids in EDGES.items()
        for d in ids
    ]
    site = start_site(identity, base, port, steps)
    edges: dict[str, Mosquitto] = {}
    peers: list[Peer] = []
    try:
        for e in EDGES:
            data = base / f"{e}-data"
            _service_readable(base, data)
            edges[e] = Mosquitto(
                rendered=base / e / "mosquitto.conf", port=edge_ports[e], data_dir=data
            ).start()
        agg_dir = site.agg_dir
        aggregator = Peer(port, "aggregator", **credentials(identity, agg_dir, "aggregator"))
        topo = Topology(site, edges, relay, aggregator, {})
        if not stand_ins:
            yield topo
            return
        peers.append(aggregator.start(topics.updates_filter(FED)))
        for e, ids in EDGES.items():
            for d in ids:
                topo.devices[d] = topo.device_peer(d, e).start(topics.model(FED))
                peers.append(topo.devices[d])
        # Both bridges are up once an update from each edge arrives.
        topo.burst(1)
        topo.all_arrive()
        yield topo
    finally:
        for p in peers:
            with contextlib.suppress(Exception):
                p.stop()
        for m in edges.values():
            m.kill()
        relay.close()
        site.close()


@pytest.fixture(params=["certificate", "password"])
def topo(request: pytest.FixtureRequest) -> Iterator[Topology]:
    with topology(request.param) as t:
        yield t


def report(name: str, **numbers: float) -> None:
    print(f"\n[bridge] {name}: " + ", ".join(f"{k}={v:.2f}" for k, v in numbers.items()))


def check_no_loss(topo: Topology) -> int:
    """Every acknowledged update applied; returns the number of duplicate deliveries."""
    applied = topo.applied()
    assert topo.acked() <= set(applied)
    assert set(applied) <= topo.acked() | {p for p in applied if p.endswith(":probe")}
    return len(applied) - len(set(applied))


# --------------------------------------------------------------------------- tests


def recovered(topo: Topology, scenario: str, sent: list[str], t0: float) -> None:
    """After a fault: every update acknowledged to a device (``sent`` among them) reaches the
    aggregator, and a new model version reaches a device subscribing afresh at each edge.
    Prints the measured times (seconds since the fault began at ``t0``, catch-up of the updates
    from the repair, model to both edges) and the count of duplicate deliveries."""
    t_repair = time.monotonic()
    t_up = topo.all_arrive()
    assert set(sent) <= set(topo.applied())
    model = topo.publish_model()
    t_down = topo.model_everywhere(model)
    dups = check_no_loss(topo)
    report(
        scenario,
        fault_s=t_repair - t0,
        catch_up_s=t_up,
        model_to_edges_s=t_down,
        updates=len(set(topo.applied())),
        duplicates=dups,
    )


def test_updates_up_and_the_model_down_to_every_edge(topo: Topology) -> None:
    sent = topo.burst(5)
    recovered(topo, "steady", sent, time.monotonic())
    # Devices subscribed at the edges get each version live too.
    model = f"model-v{topo.model_version}".encode()
    for device, peer in topo.devices.items():
        wait_until(
            f"{device} receives {model!r}",
            lambda peer=peer: any(p == model for _, p, _ in peer.received),
        )


def test_link_cut_and_restored_loses_nothing(topo: Topology) -> None:
    t0 = time.monotonic()
    topo.cut_link("edge-a")
    sent = topo.burst(4)  # acknowledged by edge-a while its link is down
    model = topo.publish_model()  # published while edge-a is cut off
    time.sleep(CUT_S)  # the fault's duration: the edge redials and is refused
    topo.relay.restore()
    recovered(topo, "link cut", sent, t0)
    for device in EDGES["edge-a"]:  # the version published during the cut arrived live too
        assert any(p == model for _, p, _ in topo.devices[device].received), device


def test_edge_restarted_with_updates_queued_loses_nothing(topo: Topology) -> None:
    t0 = time.monotonic()
    topo.cut_link("edge-a")
    sent = topo.burst(4)  # queued at edge-a for the bridge
    topo.edges["edge-a"].stop()  # SIGTERM: Mosquitto saves its persistence database
    topo.edges["edge-a"].start()
    wait_until(
        "edge-a's devices reconnected",
        lambda: all(topo.devices[d].connected.is_set() for d in EDGES["edge-a"]),
    )
    sent += topo.burst(1)  # through the restarted edge, link still cut
    topo.relay.restore()
    recovered(topo, "edge restart", sent, t0)


def test_central_restarted_loses_nothing(topo: Topology) -> None:
    t0 = time.monotonic()
    topo.aggregator.stop()
    sent = topo.burst(3)  # queued at the centre for the aggregator's session
    topo.central.stop()  # SIGTERM: sessions and queues saved
    sent += topo.burst(3)  # acknowledged by both edges while the centre is down
    topo.central.start()
    topo.aggregator.start(topics.updates_filter(FED))
    recovered(topo, "central restart", sent, t0)


def test_the_bridge_identity_writes_device_topics_only(topo: Topology) -> None:
    """At the centre the bridge's certificate (CN = edge id) may relay its federation's device
    topics, but not write what the aggregator publishes nor any other federation's topics."""
    d = topo.edge_dir("edge-b")
    if topo.site.identity == "password":
        conf = (d / "mosquitto.conf").read_text()
        password = re.search(r"^remote_password (\S+)$", conf, re.M)
        assert password is not None
        creds: dict[str, Any] = {"username": "edge-b", "password": password.group(1)}
    else:
        creds = {"cert": d / "bridge.crt", "key": d / "bridge.key"}
    bridge = topo.site.client(ca=d / "ca.crt", client_id="edge-b", **creds)
    assert bridge.connect() == 0
    assert bridge.publish(topics.updates(FED, "b1"), b"x:probe") < 0x80
    assert bridge.publish(topics.model(FED), b"forged-model", retain=True) == NOT_AUTHORIZED


def test_revocation_reaches_the_edges(topo: Topology) -> None:
    """``fedmqtt-admin revoke`` re-renders every edge's CRL and ACL and reloads the edges: the
    revoked device is refused at its edge."""
    topo.devices["a2"].stop()
    assert topo.site.admin("revoke", "a2") == 0
    acl = (topo.edge_dir("edge-a") / "acl").read_text()
    assert "user a2\ntopic deny #" in acl

    def refused() -> bool:
        c = topo.site.device("a2", port=topo.edges["edge-a"].port, client_id="a2-probe")
        try:
            return c.connect() != 0
        finally:
            c.close()

    wait_until("a2 refused at edge-a", refused, timeout=10)
    # The others keep working through the edge.
    topo.devices.pop("a2")
    topo.burst(1)
    topo.all_arrive()


def test_real_aggregator_and_agents_across_a_cut_link(tmp_path: Path) -> None:
    """The real aggregator at the centre (FedBuff, K = 1) and a real agent at each edge: across
    a cut of edge-a's link every update an agent delivered (PUBACK from its edge) is accepted
    once, and the only refusals are replays of copies the bridge sent twice."""
    import tomllib

    import numpy as np

    from aggregator.config import load_config as load_aggregator_config
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import AgentConfig
    from simulator import datasets
    from simulator.aggregator_thread import AggregatorThread

    ds = datasets.load("digits", seed=0)
    np.savez(tmp_path / "holdout.npz", X=ds.X_test, y=ds.y_test)
    with topology("password", stand_ins=False) as topo:
        agg_toml = topo.site.add_model(tmp_path / "holdout.npz")
        raw_agg = tomllib.loads(agg_toml.read_text())
        raw_agg["strategy"]["max_staleness"] = 1000  # updates from behind the cut are not stale
        agg_toml.write_text(tomlconf.dumps(raw_agg, "# completed by the test"))
        agg = AggregatorThread(load_aggregator_config(agg_toml)).start()
        agents: list[EdgeAgent] = []
        threads: list[threading.Thread] = []
        stop = threading.Event()
        try:
            for i, (edge, ids) in enumerate(EDGES.items()):
                device = ids[0]
                data = tmp_path / device
                data.mkdir()
                rows = slice(300 * i, 300 * (i + 1))
                np.savez(data / "shard.npz", X=ds.X_train[rows], y=ds.y_train[rows])
                toml = topo.site.agent_config(
                    device,
                    data,
                    tmp_path / f"{device}-state",
                    {"interval_s": 0.3, "max_updates_per_version": 0},
                    port=topo.edges[edge].port,  # the bundle names its edge broker
                )
                raw = tomllib.loads(toml.read_text())
                agent = EdgeAgent(AgentConfig.from_dict(raw, base_dir=toml.parent))
                agents.append(agent)
                t = threading.Thread(target=agent.run, args=(stop,), daemon=True)
                t.start()
                threads.append(t)
            assert agg.wait_for(lambda s: s["accepted"] >= 4, timeout=60), agg.snapshot()
            topo.cut_link("edge-a")
            during = agents[0].updates_sent
            wait_until(
                "edge-a's agent delivering during the cut",
                lambda: agents[0].updates_sent >= during + 2,
                timeout=60,
            )
            time.sleep(CUT_S)
            topo.relay.restore()
            stop.set()
            for t in threads:
                t.join(30)
            sent = sum(a.updates_sent for a in agents)
            ok = agg.wait_for(lambda s: s["accepted"] >= sent, timeout=60)
            snap = agg.snapshot()
            assert ok and snap["accepted"] == sent, (sent, snap)
            assert set(snap["rejected"]) <= {"replay"}, snap["rejected"]
            report(
                "real aggregator, link cut",
                delivered=sent,
                accepted=snap["accepted"],
                replays=snap["rejected"].get("replay", 0),
            )
        finally:
            stop.set()
            agg.stop()
