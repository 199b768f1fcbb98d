"""The production broker configuration, enforced by a real Mosquitto on loopback.

Each module-scoped site is built exactly as an operator builds one (``fedmqtt-admin ca init``,
``broker-cert``, ``broker-config``, ``aggregator-setup``, ``enroll``), then Mosquitto is started
with ``broker_config/mosquitto.conf`` (password identity) or ``mosquitto-certs.conf`` (client
certificates) rendered for a loopback port. Clients speak MQTT 5 over TLS with the credentials
from the enrollment bundles, so the reason codes asserted here are what devices will see.

Observed on Mosquitto 2.0.11 (Debian 12), asserted exactly:
* refused CONNECT (anonymous, unknown user, wrong password, revoked): CONNACK 0x87 "not
  authorized" -- Mosquitto 2.0 does not use 0x86 "bad user name or password";
* certificate problems: the TLS handshake fails, no CONNACK at all. A device that does not
  trust the broker's chain stops at CERTIFICATE_VERIFY_FAILED; a client certificate the broker
  does not accept gets the broker's TLS alert once the handshake is done (TLS 1.3: "certificate
  required", "unknown ca", "certificate revoked", "unsupported certificate"), and the broker logs
  the OpenSSL reason;
* publish outside the ACL: PUBACK 0x87 (after which 2.0.11 drops a TLS connection);
* packet above max_packet_size: DISCONNECT 0x95 "packet too large" from the broker (logged as
  "disconnected due to oversize packet"; the client occasionally sees only the reset).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import queue
import shutil
import socket
import ssl
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import STRICT, require
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion

from fedmqtt.admin import brokerconf, pki, tomlconf
from fedmqtt.admin.cli import main as admin
from fedmqtt.errors import FedMQTTError
from simulator.broker import Mosquitto, find_mosquitto, free_port

FED = "demo"
AGG_USER = "aggregator"
MAX_PACKET = 64 * 1024
NOT_AUTHORIZED = 0x87
PACKET_TOO_LARGE = 0x95
UNSPECIFIED = 0x80
NO_MATCHING_SUBSCRIBERS = 0x10
DEVICES = ("dev-a", "dev-b", "dev-r")

try:
    find_mosquitto()
except FedMQTTError:
    if STRICT:  # scripts/test installs it: under CI its absence is a broken set-up
        raise
    pytest.skip("mosquitto is not installed", allow_module_level=True)


# --------------------------------------------------------------------------- MQTT 5 client


@dataclass
class Client:
    """A paho MQTT 5 client (over TLS if given a CA) whose callbacks land in queues the test
    can wait on."""

    port: int
    ca: Path | None = None  # None: plain MQTT (the local listener), else TLS pinned to this CA
    username: str | None = None
    password: str | None = None
    cert: Path | None = None
    key: Path | None = None
    client_id: str = field(default_factory=lambda: f"t-{uuid.uuid4().hex[:10]}")

    def __post_init__(self) -> None:
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.acks: dict[int, queue.Queue[int]] = {}
        self.connack_props: Any = None
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        if self.username is not None:
            c.username_pw_set(self.username, self.password)
        if self.ca is not None:
            c.tls_set(
                ca_certs=str(self.ca),
                certfile=str(self.cert) if self.cert else None,
                keyfile=str(self.key) if self.key else None,
            )
        c.on_connect = self._on_connect
        c.on_disconnect = lambda _c, _u, flags, rc, _p: self.events.put(
            ("disconnect", (flags.is_disconnect_packet_from_server, rc.value))
        )
        c.on_publish = lambda _c, _u, mid, rc, _p: self._ack(mid).put(rc.value)
        c.on_subscribe = lambda _c, _u, mid, rcs, _p: self._ack(mid).put(rcs[0].value)
        c.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.mqtt = c
        self.started = False

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, props: Any) -> None:
        self.connack_props = props
        self.events.put(("connack", rc.value))

    def _ack(self, mid: int) -> queue.Queue[int]:
        return self.acks.setdefault(mid, queue.Queue())

    def connect(self, timeout: float = 5.0) -> int | None:
        """The CONNACK reason code, or None if the connection died before any CONNACK."""
        try:
            self.mqtt.connect("127.0.0.1", self.port, keepalive=30)
        except (ssl.SSLError, OSError):
            return None
        self.mqtt.loop_start()
        self.started = True
        kind, value = self.events.get(timeout=timeout)
        return int(value) if kind == "connack" else None

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        info = self.mqtt.publish(topic, payload, qos=1, retain=retain)
        mid: int = info.mid
        return self._ack(mid).get(timeout=5)

    def subscribe(self, topic: str) -> int:
        _, mid = self.mqtt.subscribe(topic, qos=1)
        assert mid is not None
        return self._ack(mid).get(timeout=5)

    def wait_disconnect(self, timeout: float = 5.0) -> tuple[bool, int]:
        while True:
            kind, value = self.events.get(timeout=timeout)
            if kind == "disconnect":
                return value  # type: ignore[no-any-return]

    def received(self, wait: float = 0.0) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + wait
        while True:
            try:
                m = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return out
            out.append((m.topic, bytes(m.payload)))

    def wait_for(self, topic: str, payload: bytes, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        """Everything received up to and including (topic, payload)."""
        seen: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + timeout
        while (topic, payload) not in seen:
            m = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            seen.append((m.topic, bytes(m.payload)))
        return seen

    def close(self) -> None:
        if self.started:
            self.mqtt.disconnect()
            self.mqtt.loop_stop()
            self.started = False


def tls_refusal(port: int, ca: Path, cert: Path | None = None, key: Path | None = None) -> str:
    """Open a TLS connection as a device would (trusting ``ca``, presenting ``cert``) and return
    the reason of the TLS error that ends it: our own verification of the broker's chain during
    the handshake, or the alert the broker sends once it has checked our certificate (TLS 1.3
    finishes the client's side of the handshake first). Fails the test if the broker keeps the
    connection open, or closes it without saying why."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.settimeout(5)
                data = tls.recv(1)  # a broker that accepted us waits for CONNECT: times out
        except ssl.SSLCertVerificationError as e:
            return f"{e.reason}: {e.verify_message}"
        except ssl.SSLError as e:
            return str(e.reason)
        except TimeoutError:
            pytest.fail("the broker accepted the TLS connection")
    pytest.fail(f"the connection ended without a TLS error (read {data!r})")


class BrokerLog:
    """The broker's log from the moment this object is made: waits for a line to appear."""

    def __init__(self, broker: Mosquitto) -> None:
        self.path = broker.log_path
        self.start = self.path.stat().st_size

    def new(self) -> str:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            return f.read().decode(errors="replace")

    def wait_for(self, text: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in (seen := self.new()):
            assert time.monotonic() < deadline, f"the broker did not log {text!r}; it logged {seen}"
            time.sleep(0.02)
        return seen


# --------------------------------------------------------------------------- sites


@dataclass
class Site:
    identity: str
    base: Path
    broker: Mosquitto
    local_port: int = 0  # the loopback listener without TLS (broker-config --local-port), if any
    clients: list[Client] = field(default_factory=list)

    @property
    def admin_dir(self) -> Path:
        return self.base / "admin"

    @property
    def bundles(self) -> Path:
        return self.base / "bundles"

    @property
    def agg_dir(self) -> Path:
        return self.base / "agg"

    def admin(self, *args: str) -> int:
        return admin(["--dir", str(self.admin_dir), *args])

    def device(self, device_id: str, **kw: Any) -> Client:
        b = self.bundles / device_id
        if self.identity == "password":
            kw.setdefault("username", device_id)
            kw.setdefault("password", (b / "broker.password").read_text().strip())
        else:
            kw.setdefault("cert", b / "client.crt")
            kw.setdefault("key", b / "client.key")
        kw.setdefault("ca", b / "ca.crt")
        return self.client(**kw)

    def aggregator(self, worker: int = 1) -> Client:
        d = self.agg_dir if worker == 1 else self.base / f"agg{worker}"
        if self.identity == "password":
            pw = (d / "broker.password").read_text().strip()
            user = AGG_USER if worker == 1 else f"{AGG_USER}-{worker}"
            return self.client(ca=d / "ca.crt", username=user, password=pw)
        return self.client(ca=d / "ca.crt", cert=d / "client.crt", key=d / "client.key")

    def add_model(self, holdout: Path, extra: str = "") -> Path:
        """Complete the aggregator's ``aggregator.toml`` as an operator would: a softmax model
        for digits, FedBuff with K = 1 (every update makes a version), a holdout, ``extra``."""
        toml = self.agg_dir / "aggregator.toml"
        raw = tomllib.loads(toml.read_text())
        added = tomllib.loads(MODEL.format(holdout=holdout, scale=[1 / 16] * 64) + extra)
        for name, table in added.items():  # merged: aggregator-setup wrote [scaleout] group
            raw[name] = raw.get(name, {}) | table
        toml.write_text(tomlconf.dumps(raw, "# completed by the test"))
        return toml

    def via_local_listener(self, aggregator_toml: Path) -> None:
        """Point an aggregator.toml at the local listener instead of the TLS one, as an
        operator does after ``broker-config --local-port`` (docs/deploy.md)."""
        assert self.local_port, "site built without --local-port"
        raw = tomllib.loads(aggregator_toml.read_text())
        raw["broker"].update(host="127.0.0.1", port=self.local_port, tls=False)
        del raw["broker"]["ca_file"]
        aggregator_toml.write_text(tomlconf.dumps(raw, "# local listener"))

    def agent_config(
        self,
        device: str,
        data: Path,
        state: Path,
        training: dict[str, Any] | None = None,
        *,
        port: int | None = None,
    ) -> Path:
        """The device's ``agent.toml`` from its enrollment bundle, filled in as its owner would
        (``[data]``, the state directory, changes to ``[training]``); the bundle's files stay
        in the bundle. The bundle must name ``port`` (default: this broker's)."""
        bundle = self.bundles / device
        raw = tomllib.loads((bundle / "agent.toml").read_text())
        port = self.broker.port if port is None else port
        assert raw["broker"]["tls"] is True and raw["broker"]["port"] == port
        # The bundle's files go to /etc/fedmqtt-agent/ on a device; here they stay in the bundle.
        for table in raw.values():
            for key, value in table.items():
                if isinstance(value, str) and value.startswith("/etc/fedmqtt-agent/"):
                    table[key] = str(bundle / value.removeprefix("/etc/fedmqtt-agent/"))
        raw["broker"]["host"] = "127.0.0.1"  # the certificate names broker.test and loopback
        raw["data"] = {"source": "npz", "path": str(data)}
        raw["device"]["state_dir"] = str(state)
        raw["training"].update(training or {})
        (bundle / "agent.toml").write_text(tomlconf.dumps(raw, "# filled in by the test"))
        return bundle / "agent.toml"

    def client(self, port: int | None = None, **kw: Any) -> Client:
        c = Client(self.broker.port if port is None else port, **kw)
        self.clients.append(c)
        return c

    def close_clients(self) -> None:
        for c in self.clients:
            c.close()
        self.clients.clear()

    def close(self) -> None:
        self.close_clients()
        self.broker.close()
        shutil.rmtree(self.base, ignore_errors=True)


# What an operator adds to the aggregator.toml that aggregator-setup wrote.
MODEL = """
[model]
kind = "softmax"
n_features = 64
n_outputs = 10
feature_scale = {scale}
seed = 0

[strategy]
name = "fedbuff"
buffer_size = 1

[evaluation]
holdout = "{holdout}"
"""

AGGREGATOR_TOML = """\
[federation]
id = "{fed}"
state_dir = "state"

[broker]
host = "127.0.0.1"
port = {port}
username = "{user}"
{credentials}
tls = true
ca_file = "ca.crt"

[security]
signing_key = "{keys}signing.key"
devices_dir = "{keys}devices"
"""


def _service_readable(base: Path, data_dir: Path) -> None:
    """As root, Mosquitto drops to its own user before reading anything: let it in."""
    if os.geteuid() != 0:
        return
    try:
        uid = pwd.getpwnam("mosquitto").pw_uid
        gid = grp.getgrnam("mosquitto").gr_gid
    except KeyError:  # Debian's package creates it
        require(False, "running as root without a mosquitto user: Mosquitto would drop to nobody")
        raise
    base.chmod(0o755)
    os.chown(data_dir, uid, gid)


def build_site(identity: str, *, local_port: int = 0) -> Site:
    base = Path(tempfile.mkdtemp(prefix=f"fedmqtt-sec-{identity}-"))
    port = free_port()
    creds = aggregator_credentials(identity)
    # Two aggregator workers: separate broker accounts, one signing key and devices_dir.
    for name, user, keys in (("agg", AGG_USER, ""), ("agg2", f"{AGG_USER}-2", "../agg/")):
        (base / name).mkdir()
        (base / name / "aggregator.toml").write_text(
            AGGREGATOR_TOML.format(fed=FED, port=port, user=user, credentials=creds, keys=keys)
        )
    steps = [
        *broker_steps(identity, base, port, local_port=local_port),
        *(
            [
                "aggregator-setup",
                "--aggregator-config",
                str(base / a / "aggregator.toml"),
                "--no-reload",
            ]
            for a in ("agg", "agg2")
        ),
        *(["enroll", d, "--out", str(base / "bundles" / d), "--no-reload"] for d in DEVICES),
    ]
    return start_site(identity, base, port, steps, local_port=local_port)


def aggregator_credentials(identity: str) -> str:
    """The [broker] credential lines of an aggregator.toml (AGGREGATOR_TOML's {credentials})."""
    if identity == "password":
        return 'password_file = "broker.password"'
    return 'cert_file = "client.crt"\nkey_file = "client.key"'


def broker_steps(identity: str, base: Path, port: int, *, local_port: int = 0) -> list[list[str]]:
    """The fedmqtt-admin commands that make a CA, the broker's certificate and its
    production config for a loopback ``port``, with everything under ``base``."""
    data, pid = base / "data", base / "data" / "mosquitto.pid"
    return [
        ["ca", "init"],
        [
            "broker-cert",
            "--host",
            "broker.test",
            "--broker-dir",
            str(base / "broker"),
            "--no-reload",
        ],
        [
            "broker-config",
            "--identity",
            identity,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--data-dir",
            str(data),
            "--pid-file",
            str(pid),
            "--log-dest",
            f"file {data}/mosquitto.log",
            "--reload",
            f"pidfile:{pid}",
            "--max-packet-size",
            str(MAX_PACKET),
            *(["--local-port", str(local_port)] if local_port else []),
        ],
    ]


def start_site(
    identity: str, base: Path, port: int, steps: list[list[str]], *, local_port: int = 0
) -> Site:
    """Run the fedmqtt-admin ``steps`` (which start with :func:`broker_steps`) on the admin
    directory ``base/admin``, then start Mosquitto with the config they rendered."""
    data = base / "data"
    data.mkdir()
    _service_readable(base, data)
    pid = data / "mosquitto.pid"
    for step in steps:
        assert admin(["--dir", str(base / "admin"), *step]) == 0, step
    template = "mosquitto.conf" if identity == "password" else "mosquitto-certs.conf"
    broker = Mosquitto(
        template=template,
        port=port,
        data_dir=data,
        max_packet_size=MAX_PACKET,
        extra={
            "broker_dir": str(base / "broker"),
            "bind_address": "127.0.0.1",
            "pid_file": str(pid),
            "log_dest": f"file {data}/mosquitto.log",
            "local_listener": brokerconf.local_listener(local_port) if local_port else "",
        },
    )
    broker.start()
    # fedmqtt-admin reloads through the pid file: wait until Mosquitto has written it.
    deadline = time.monotonic() + 5
    while not pid.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return Site(identity, base, broker, local_port)


@contextlib.contextmanager
def running_site(identity: str, *, local_port: int = 0) -> Iterator[Site]:
    """A site built with :func:`build_site`, closed and removed afterwards."""
    site = build_site(identity, local_port=local_port)
    try:
        yield site
    finally:
        site.close()


@pytest.fixture(scope="module")
def pw_site() -> Iterator[Site]:
    with running_site("password", local_port=free_port()) as site:
        yield site


@pytest.fixture(scope="module")
def cert_site() -> Iterator[Site]:
    with running_site("certificate") as site:
        yield site


@pytest.fixture
def pw(pw_site: Site) -> Iterator[Site]:
    yield pw_site
    pw_site.close_clients()


@pytest.fixture
def certs(cert_site: Site) -> Iterator[Site]:
    yield cert_site
    cert_site.close_clients()


def updates(device: str, fed: str = FED) -> str:
    return f"fl/{fed}/updates/{device}"


def aggregator_listening(site: Site) -> Client:
    agg = site.aggregator()
    assert agg.connect() == 0
    assert agg.subscribe(f"$share/aggregators/fl/{FED}/updates/+") == 1
    assert agg.subscribe(f"fl/{FED}/status/+") == 1
    return agg


# --------------------------------------------------------------------------- the config itself


@pytest.mark.parametrize("site_name", ["pw_site", "cert_site"])
def test_admin_renders_the_config_the_broker_runs(site_name: str, request: Any) -> None:
    site: Site = request.getfixturevalue(site_name)
    rendered_by_admin = (site.base / "broker" / "mosquitto.conf").read_text()
    assert rendered_by_admin == site.broker.config_path.read_text()
    deadline = time.monotonic() + 5
    while "running" not in (log := site.broker.log_path.read_text()):
        assert time.monotonic() < deadline, log
        time.sleep(0.02)
    # Configuration errors read "Error: ..." (OpenSSL's "Error[0]" lines are the start-up probe).
    assert "Error:" not in log


# --------------------------------------------------------------------------- connections


def test_anonymous_client_refused(pw: Site) -> None:
    c = pw.client(ca=pw.bundles / "dev-a" / "ca.crt")
    assert c.connect() == NOT_AUTHORIZED


def test_wrong_password_and_unknown_user_refused(pw: Site) -> None:
    assert pw.device("dev-a", password="not-the-password").connect() == NOT_AUTHORIZED
    # another device's password does not open this account
    other = (pw.bundles / "dev-b" / "broker.password").read_text().strip()
    assert pw.device("dev-a", password=other).connect() == NOT_AUTHORIZED
    assert pw.device("dev-a", username="ghost").connect() == NOT_AUTHORIZED


def test_enrolled_device_connects_and_learns_max_packet_size(pw: Site) -> None:
    dev = pw.device("dev-a")
    assert dev.connect() == 0
    assert dev.connack_props.MaximumPacketSize == MAX_PACKET


def test_device_refuses_a_broker_certified_by_another_ca(pw: Site, tmp_path: Path) -> None:
    """Devices pin the site CA: a broker with a certificate from any other CA is not trusted."""
    other = tmp_path / "other-ca.crt"
    other.write_bytes(pki.cert_pem(pki.CA.create("impostor").cert))
    # 19 with the chain the broker sends (our CA included), 20 if it sent its certificate alone
    assert tls_refusal(pw.broker.port, other) in (
        "CERTIFICATE_VERIFY_FAILED: self-signed certificate in certificate chain",
        "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate",
    )


def test_client_id_cannot_take_over_another_session(pw: Site) -> None:
    agg = aggregator_listening(pw)
    intruder = pw.device("dev-b", client_id=AGG_USER)  # tries the aggregator's client id
    assert intruder.connect() == 0
    # use_username_as_clientid: the intruder got its own session; the aggregator is still on.
    time.sleep(0.2)
    assert agg.mqtt.is_connected()
    assert agg.events.empty()
    # The flip side: two connections of one account share one client id, and the second takes
    # the session over. Aggregator workers therefore each need their own account.
    second = pw.aggregator()
    assert second.connect() == 0
    agg.wait_disconnect()


def test_local_listener_serves_the_aggregator_without_tls_on_loopback_only(pw: Site) -> None:
    """``broker-config --local-port``: plain MQTT on 127.0.0.1 for the aggregator on the broker's
    host, with the accounts, the ACL and the client-id rule of the TLS listener."""
    local = pw.local_port
    assert f"\nlistener {local} 127.0.0.1\n" in pw.broker.config_path.read_text()
    assert pw.client(port=local).connect() == NOT_AUTHORIZED  # anonymous
    agg_pw = (pw.agg_dir / "broker.password").read_text().strip()
    assert pw.client(port=local, username=AGG_USER, password="wrong").connect() == NOT_AUTHORIZED
    agg = pw.client(port=local, username=AGG_USER, password=agg_pw)
    assert agg.connect() == 0
    assert agg.subscribe(f"$share/aggregators/fl/{FED}/updates/+") == 1
    assert agg.publish(f"fl/{FED}/model", b"v1", retain=True) in (0, NO_MATCHING_SUBSCRIBERS)
    # A device's account works there too, under the same ACL and client-id rule.
    dev_pw = (pw.bundles / "dev-a" / "broker.password").read_text().strip()
    dev = pw.client(port=local, username="dev-a", password=dev_pw, client_id=AGG_USER)
    assert dev.connect() == 0
    time.sleep(0.2)
    assert agg.mqtt.is_connected()  # the aggregator's session was not taken over
    assert dev.publish(f"fl/{FED}/model", b"forged", retain=True) == NOT_AUTHORIZED
    # Loopback only: the kernel's table of listening sockets has that port bound to 127.0.0.1
    # alone, so no other address of the host reaches it (whether the host has one or not).
    assert listening_addresses(local) == {"127.0.0.1"}


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on ``port`` (IPv4 and IPv6), from the
    kernel's socket tables."""
    found: set[str] = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                address, port_hex = fields[1].split(":")
                if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(address)
                # Each 32-bit word is printed in host (little-endian) byte order.
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(family, raw))
    return found


# --------------------------------------------------------------------------- ACL


def test_device_publishes_its_own_update_and_status(pw: Site) -> None:
    agg = aggregator_listening(pw)
    dev = pw.device("dev-a")
    assert dev.connect() == 0
    assert dev.publish(updates("dev-a"), b"update-a") == 0
    assert dev.publish(f"fl/{FED}/status/dev-a", b"online", retain=True) == 0
    got = agg.wait_for(updates("dev-a"), b"update-a")
    got += agg.wait_for(f"fl/{FED}/status/dev-a", b"online")
    assert (updates("dev-a"), b"update-a") in got


@pytest.mark.parametrize(
    ("topic", "retain"),
    [
        (updates("dev-b"), False),  # another device's update topic
        (f"fl/{FED}/status/dev-b", True),  # another device's presence
        (f"fl/{FED}/model", True),  # the global model
        (f"fl/{FED}/announce", True),  # its version announcements
        (f"fl/{FED}/keyframe", True),  # the newest keyframe
        (f"fl/{FED}/delta/7", True),  # a delta from a keyframe
        (f"fl/{FED}/spec", True),  # its spec
        (f"fl/{FED}/model/onnx", True),
        (f"fl/{FED}/plan", True),
        (f"fl/{FED}/metrics", True),
        (updates("dev-a", "otherfed"), False),  # its own id in another federation
        ("$SYS/broker/x", False),
    ],
)
def test_device_publish_outside_its_topics_is_denied(pw: Site, topic: str, retain: bool) -> None:
    agg = aggregator_listening(pw)
    forged = f"forged-{uuid.uuid4().hex}".encode()
    attacker = pw.device("dev-a")
    assert attacker.connect() == 0
    assert attacker.publish(topic, forged, retain=retain) == NOT_AUTHORIZED
    # The broker handled the forged PUBLISH before answering it; a legitimate update sent
    # afterwards reaches the aggregator, and nothing forged came before it.
    honest = pw.device("dev-b")
    assert honest.connect() == 0
    marker = f"honest-{uuid.uuid4().hex}".encode()
    assert honest.publish(updates("dev-b"), marker) == 0
    seen = agg.wait_for(updates("dev-b"), marker)
    assert all(payload != forged for _, payload in seen)
    # Nothing forged was retained either: a fresh subscriber to the topic gets nothing forged.
    if retain:
        probe = pw.aggregator()
        assert probe.connect() == 0
        probe.subscribe(topic)
        assert all(p != forged for _, p in probe.received(wait=0.3))


def test_device_reads_model_onnx_and_plan_but_not_other_devices(pw: Site) -> None:
    agg = pw.aggregator()
    assert agg.connect() == 0
    retained = {
        f"fl/{FED}/model": b"MODEL-v1",
        f"fl/{FED}/announce": b"ANNOUNCE-v1",
        f"fl/{FED}/keyframe": b"KEYFRAME-v1",
        f"fl/{FED}/delta/1": b"DELTA-1-v2",
        f"fl/{FED}/spec": b"SPEC-1",
        f"fl/{FED}/model/onnx": b"ONNX-v1",
        f"fl/{FED}/plan": b"PLAN-r1",
    }
    for topic, payload in retained.items():
        assert agg.publish(topic, payload, retain=True) in (0, NO_MATCHING_SUBSCRIBERS)
    reader = pw.device("dev-b")
    assert reader.connect() == 0
    for topic in (
        *retained,
        updates("+"),
        f"fl/{FED}/status/+",
        f"$share/snoop/fl/{FED}/updates/+",
        f"fl/{FED}/metrics",
    ):
        # Granted even where reading is denied: Mosquitto filters each delivered message.
        assert reader.subscribe(topic) == 1
    writer = pw.device("dev-a")
    assert writer.connect() == 0
    assert writer.publish(updates("dev-a"), b"secret-update") in (0, NO_MATCHING_SUBSCRIBERS)
    assert writer.publish(f"fl/{FED}/status/dev-a", b"online", retain=True) in (
        0,
        NO_MATCHING_SUBSCRIBERS,
    )
    assert agg.publish(f"fl/{FED}/metrics", b"METRICS", retain=True) in (0, NO_MATCHING_SUBSCRIBERS)
    # Barrier: the broker delivers to one client in order, so once a new plan has arrived,
    # anything the reader was (wrongly) sent above would have arrived before it.
    assert agg.publish(f"fl/{FED}/plan", b"PLAN-r2", retain=True) == 0
    got = reader.wait_for(f"fl/{FED}/plan", b"PLAN-r2")
    assert sorted(got) == sorted([*retained.items(), (f"fl/{FED}/plan", b"PLAN-r2")])


def test_shared_subscription_splits_updates_between_aggregator_workers(pw: Site) -> None:
    """Two aggregator workers (two accounts) share the updates through $share: the ACL's read
    grant on fl/<fed>/updates/+ covers the shared subscription."""
    w1 = aggregator_listening(pw)
    w2 = pw.aggregator(worker=2)
    assert w2.connect() == 0
    assert w2.subscribe(f"$share/aggregators/fl/{FED}/updates/+") == 1
    dev = pw.device("dev-a")
    assert dev.connect() == 0
    sent = [f"u{i}".encode() for i in range(20)]
    for p in sent:
        assert dev.publish(updates("dev-a"), p) == 0
    got1: list[bytes] = []
    got2: list[bytes] = []
    deadline = time.monotonic() + 5
    while len(got1) + len(got2) < len(sent) and time.monotonic() < deadline:
        got1 += [p for t, p in w1.received(wait=0.05) if t == updates("dev-a")]
        got2 += [p for t, p in w2.received(wait=0.05) if t == updates("dev-a")]
    assert sorted(got1 + got2) == sorted(sent)  # each update once, to one worker
    assert got1 and got2


def test_oversize_publish_disconnected_with_packet_too_large(pw: Site) -> None:
    agg = aggregator_listening(pw)
    dev = pw.device("dev-a")
    assert dev.connect() == 0
    assert dev.publish(updates("dev-a"), b"x" * (MAX_PACKET - 1024)) == 0  # just fits
    big = b"y" * (MAX_PACKET + 1)
    dev.mqtt.publish(updates("dev-a"), big, qos=1)
    # The broker answers DISCONNECT 0x95 and closes. The client normally reads that packet;
    # when the close lands while it is still writing the payload, it sees only the reset.
    assert dev.wait_disconnect() in ((True, PACKET_TOO_LARGE), (False, UNSPECIFIED))
    deadline = time.monotonic() + 5
    while "Client dev-a disconnected due to oversize packet." not in pw.broker.log_path.read_text():
        assert time.monotonic() < deadline, "the broker did not report the oversize packet"
        time.sleep(0.02)
    marker = b"after-oversize"
    honest = pw.device("dev-b")
    assert honest.connect() == 0
    assert honest.publish(updates("dev-b"), marker) == 0
    seen = agg.wait_for(updates("dev-b"), marker)
    assert all(len(p) <= MAX_PACKET for _, p in seen)


def test_revoked_device_is_cut_off_and_refused(pw: Site) -> None:
    agg = aggregator_listening(pw)
    dev = pw.device("dev-r")
    assert dev.connect() == 0
    assert dev.publish(f"fl/{FED}/status/dev-r", b"online-r", retain=True) == 0
    agg.wait_for(f"fl/{FED}/status/dev-r", b"online-r")
    key = pw.agg_dir / "devices" / "dev-r.chacha"
    assert key.exists()

    assert pw.admin("revoke", "dev-r") == 0  # reloads the broker through its pid file
    # Connected: dropped at the reload (waits for the disconnect, fails on timeout) ...
    dev.wait_disconnect()
    # ... and refused from then on.
    again = pw.device("dev-r")
    assert again.connect() == NOT_AUTHORIZED
    assert not key.exists()
    acl = (pw.base / "broker" / "acl").read_text()
    assert "user dev-r\ntopic deny #" in acl
    # Its retained presence is no longer delivered (check_retain_source + deny).
    fresh = pw.aggregator()
    assert fresh.connect() == 0
    fresh.subscribe(f"fl/{FED}/status/dev-r")
    assert fresh.received(wait=0.3) == []
    # Other devices are untouched.
    assert pw.device("dev-a").connect() == 0


# --------------------------------------------------------------------------- certificate identity


def test_certificate_identity_needs_a_certificate(certs: Site) -> None:
    ca = certs.bundles / "dev-a" / "ca.crt"
    log = BrokerLog(certs.broker)
    assert tls_refusal(certs.broker.port, ca) == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    log.wait_for("peer did not return a certificate")
    # A password is no substitute: no CONNACK, and the broker logs the same reason (paho's
    # CONNECT may cross the broker's alert, so the client's error is only a lost connection).
    log = BrokerLog(certs.broker)
    c = certs.client(ca=ca, username="dev-a", password="x")
    assert c.connect() is None
    log.wait_for("peer did not return a certificate")


def test_certificate_from_another_ca_refused(certs: Site, tmp_path: Path) -> None:
    rogue = pki.CA.create("rogue")
    key, cert = rogue.issue_client("dev-a")  # the CN of an enrolled device
    (tmp_path / "c.crt").write_bytes(pki.cert_pem(cert))
    (tmp_path / "c.key").write_bytes(pki.key_pem(key))
    log = BrokerLog(certs.broker)
    ca = certs.bundles / "dev-a" / "ca.crt"
    refusal = tls_refusal(certs.broker.port, ca, tmp_path / "c.crt", tmp_path / "c.key")
    assert refusal == "TLSV1_ALERT_UNKNOWN_CA"
    log.wait_for("certificate verify failed")


def test_certificate_cn_is_the_identity_for_the_acl(certs: Site) -> None:
    agg = aggregator_listening(certs)
    dev = certs.device("dev-a")
    assert dev.connect() == 0
    assert dev.publish(updates("dev-a"), b"cert-update") == 0
    agg.wait_for(updates("dev-a"), b"cert-update")
    # Mosquitto 2.0.11 closes a TLS connection after a denied publish: one attempt each.
    for topic in (updates("dev-b"), f"fl/{FED}/model"):
        impostor = certs.device("dev-a")
        assert impostor.connect() == 0
        assert impostor.publish(topic, b"forged", retain=True) == NOT_AUTHORIZED


def test_revoked_certificate_loses_access_at_once_and_is_refused(certs: Site) -> None:
    dev = certs.device("dev-r")
    assert dev.connect() == 0
    assert dev.publish(updates("dev-r"), b"before") in (0, NO_MATCHING_SUBSCRIBERS)
    log = BrokerLog(certs.broker)
    assert certs.admin("revoke", "dev-r") == 0
    # The SIGHUP is asynchronous: Mosquitto logs the reload and handles every later packet
    # with the new ACL and CRL (one thread: nothing of ours is read in between).
    log.wait_for("Reloading config.")
    # Still connected with a valid TLS session, but the ACL now denies it everything.
    assert dev.mqtt.is_connected()
    assert dev.publish(updates("dev-r"), b"after") == NOT_AUTHORIZED
    # And the CRL refuses its certificate at the next handshake.
    bundle = certs.bundles / "dev-r"
    log = BrokerLog(certs.broker)
    refusal = tls_refusal(
        certs.broker.port, bundle / "ca.crt", bundle / "client.crt", bundle / "client.key"
    )
    assert refusal == "SSLV3_ALERT_CERTIFICATE_REVOKED"
    log.wait_for("certificate verify failed")
    assert certs.device("dev-a").connect() == 0


def test_broker_certificate_renewal_keeps_clients_connected(pw: Site) -> None:
    dev = pw.device("dev-a")
    assert dev.connect() == 0
    old = (pw.base / "broker" / "broker.crt").read_bytes()
    log = BrokerLog(pw.broker)
    assert pw.admin("broker-cert", "--host", "broker.test") == 0  # issues and reloads
    assert (pw.base / "broker" / "broker.crt").read_bytes() != old
    log.wait_for("Reloading config.")
    assert dev.mqtt.is_connected()
    assert dev.publish(updates("dev-a"), b"still-here") in (0, NO_MATCHING_SUBSCRIBERS)
    # New connections get the new certificate, which the devices' CA still verifies.
    fresh = pw.device("dev-a")
    assert fresh.connect() == 0
    sock = fresh.mqtt.socket()
    assert isinstance(sock, ssl.SSLSocket)
    served = sock.getpeercert(binary_form=True)
    assert served is not None
    assert x509.load_der_x509_certificate(served) == x509.load_pem_x509_certificate(
        (pw.base / "broker" / "broker.crt").read_bytes()
    )


def test_broker_certificate_is_not_a_client_identity(certs: Site) -> None:
    """EKU separates roles: the broker's serverAuth certificate (signed by the same CA) is
    refused as a client certificate."""
    broker_dir = certs.base / "broker"
    log = BrokerLog(certs.broker)
    ca = certs.bundles / "dev-a" / "ca.crt"
    refusal = tls_refusal(
        certs.broker.port, ca, broker_dir / "broker.crt", broker_dir / "broker.key"
    )
    assert refusal == "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE"  # wrong extended key usage
    log.wait_for("certificate verify failed")
