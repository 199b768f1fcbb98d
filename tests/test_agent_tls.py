"""The agent over TLS with a broker password, both from its config, against a real Mosquitto.

The broker here is a minimal TLS + password_file listener (not the production template, which
the broker-security tests cover): what is under test is that the agent's [broker] options
reach paho (CA, host-name check, username, password file) and that refusals are reported.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_agent_helpers import AgentThread, FakeAggregator, make_device, wait_until

from edge_agent.agent import EdgeAgent
from edge_agent.check import run_check
from simulator.broker import Mosquitto

pytestmark = pytest.mark.timeout(60)

TEMPLATE = """\
per_listener_settings false
allow_anonymous false
password_file {tls_dir}/passwd
listener {port} 127.0.0.1
cafile {tls_dir}/ca.crt
certfile {tls_dir}/broker.crt
keyfile {tls_dir}/broker.key
persistence false
log_dest file {data_dir}/mosquitto.log
max_packet_size {max_packet_size}
"""


@dataclass
class TlsBroker:
    broker: Mosquitto
    ca: Path
    passwords: dict[str, str]


@pytest.fixture
def tls_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TlsBroker]:
    from fedmqtt.admin import passwd, pki

    # Mosquitto drops root before reading its files: they live in a world-readable directory.
    tls_dir = Path(tempfile.mkdtemp(prefix="fedmqtt-agent-tls-"))
    tls_dir.chmod(0o755)
    try:
        ca = pki.CA.create()
        key, cert = ca.issue_server(["localhost"], ["127.0.0.1"])
        (tls_dir / "ca.crt").write_bytes(pki.cert_pem(ca.cert))
        (tls_dir / "broker.crt").write_bytes(pki.cert_pem(cert))
        (tls_dir / "broker.key").write_bytes(pki.key_pem(key))
        passwords = {"dev-1": passwd.new_password(), "agg": passwd.new_password()}
        passwd.write(
            tls_dir / "passwd",
            {u: passwd.hash_password(p, iterations=1000) for u, p in passwords.items()},
        )
        for p in tls_dir.iterdir():
            p.chmod(0o644)
        conf_dir = tmp_path / "conf"
        conf_dir.mkdir()
        (conf_dir / "agent-tls.conf").write_text(TEMPLATE)
        monkeypatch.setenv("FEDMQTT_BROKER_CONFIG_DIR", str(conf_dir))
        broker = Mosquitto(
            template="agent-tls.conf",
            data_dir=tmp_path / "broker",
            extra={"tls_dir": str(tls_dir)},
        )
        broker.start()
        try:
            yield TlsBroker(broker, tls_dir / "ca.crt", passwords)
        finally:
            broker.close()
    finally:
        shutil.rmtree(tls_dir, ignore_errors=True)


def test_agent_over_tls_with_password(tmp_path: Path, tls_broker: TlsBroker) -> None:
    device = make_device(tmp_path / "dev-1")
    pw_file = device.root / "broker.password"
    pw_file.write_text(tls_broker.passwords["dev-1"] + "\n")
    pw_file.chmod(0o600)
    tls = {
        "tls": True,
        "ca_file": str(tls_broker.ca),
        "username": "dev-1",
        "password_file": str(pw_file),
    }
    config_path = device.write_toml(tls_broker.broker, broker=tls)
    out = io.StringIO()
    assert run_check(config_path, out) == 0, out.getvalue()
    assert "accepted MQTT 5 CONNECT as dev-1 over TLS" in out.getvalue()

    agg = FakeAggregator(
        tls_broker.broker,
        device.aggregator,
        {device.device_id: device.key},
        tls_ca=tls_broker.ca,
        username="agg",
        password=tls_broker.passwords["agg"],
    )
    try:
        agg.publish_model(1)
        agent = EdgeAgent(device.config(tls_broker.broker, broker=tls))
        runner = AgentThread(agent)
        try:
            [update] = agg.wait_updates(1)
            assert update.base_version == 1
        finally:
            runner.stop()
    finally:
        agg.close()


def test_wrong_password_is_reported_and_retried(tmp_path: Path, tls_broker: TlsBroker) -> None:
    device = make_device(tmp_path / "dev-1")
    pw_file = device.root / "broker.password"
    pw_file.write_text("not-the-password\n")
    pw_file.chmod(0o600)
    tls = {
        "tls": True,
        "ca_file": str(tls_broker.ca),
        "username": "dev-1",
        "password_file": str(pw_file),
    }
    out = io.StringIO()
    assert run_check(device.write_toml(tls_broker.broker, broker=tls), out) == 1
    assert "refused the MQTT connection: Not authorized (0x87)" in out.getvalue()
    agent = EdgeAgent(device.config(tls_broker.broker, broker=tls))
    runner = AgentThread(agent)
    try:
        wait_until(lambda: agent.link is not None and agent.link.counters.connect_refusals >= 2)
        assert agent.link is not None and not agent.link.connected
        assert "Not authorized" in agent.link.last_error
    finally:
        runner.stop()


def test_tls_without_the_right_ca_fails_the_handshake(
    tmp_path: Path, tls_broker: TlsBroker
) -> None:
    device = make_device(tmp_path / "dev-1")
    pw_file = device.root / "broker.password"
    pw_file.write_text(tls_broker.passwords["dev-1"] + "\n")
    pw_file.chmod(0o600)
    config = device.write_toml(
        tls_broker.broker,
        broker={"tls": True, "username": "dev-1", "password_file": str(pw_file)},
    )  # no ca_file: the system store does not know our test CA
    out = io.StringIO()
    assert run_check(config, out) == 1
    assert "FAIL broker: MQTT connection to 127.0.0.1" in out.getvalue()
    assert "CERTIFICATE_VERIFY_FAILED" in out.getvalue()
