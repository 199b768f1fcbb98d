"""fedmqtt-admin without a broker: PKI, password hashes, bundles, revocation, sizing.

What the broker does with these files is tested in test_broker_security.py; here we check that
the files are right: a bundle the agent's own config loader accepts and whose keys match the
aggregator's, secrets only readable by their owner, revocation that leaves nothing behind.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from conftest import require
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aggregator.config import AggregatorConfig
from fedmqtt import topics, wire
from fedmqtt.admin import brokerconf, passwd, pki, sizing, tomlconf
from fedmqtt.admin.cli import main as admin
from fedmqtt.admin.registry import Aggregator, Device, Registry
from fedmqtt.admin.site import AgentOptions, Site
from fedmqtt.codecs import Codec, encode_params
from fedmqtt.errors import ConfigError
from fedmqtt.models import ModelSpec, init_params
from fedmqtt.signing import (
    DEVICE_KEY_SUFFIX,
    Ed25519Signer,
    Ed25519Verifier,
    load_device_verifier,
    load_update_signer,
)


def check_password(encoded: str, password: str) -> bool:
    """True if ``password`` matches a Mosquitto ``$7$`` hash (PBKDF2-HMAC-SHA512)."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(expected))
    return hmac.compare_digest(digest, expected)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


AGG_TOML = """\
[federation]
id = "{fed}"
state_dir = "state"

[broker]
host = "localhost"
username = "{user}"
password_file = "broker.password"
cert_file = "client.crt"
key_file = "client.key"
tls = true
ca_file = "ca.crt"

[security]
signing_key = "signing.key"
devices_dir = "devices"

[model]
kind = "mlp"
n_features = 20
n_outputs = 3
hidden = [16]
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class Env:
    """An admin directory, broker directory and aggregator config under tmp_path."""

    def __init__(self, tmp: Path, identity: str = "password", fed: str = "demo") -> None:
        self.tmp = tmp
        self.dir = tmp / "admin"
        self.broker = tmp / "broker"
        self.agg = tmp / "agg"
        self.agg.mkdir()
        (self.agg / "aggregator.toml").write_text(AGG_TOML.format(fed=fed, user="aggregator"))
        self.pid = tmp / "mosquitto.pid"
        for step in (
            ["ca", "init"],
            [
                "broker-cert",
                "--host",
                "broker.example.org",
                "--ip",
                "192.0.2.10",
                "--broker-dir",
                str(self.broker),
                "--no-reload",
            ],
            [
                "broker-config",
                "--identity",
                identity,
                "--port",
                "8883",
                "--aggregator-config",
                str(self.agg / "aggregator.toml"),
                "--reload",
                "none",
                "--data-dir",
                str(tmp / "data"),
                "--pid-file",
                str(self.pid),
            ],
            ["aggregator-setup", "--aggregator-config", str(self.agg / "aggregator.toml")],
        ):
            assert self.run(*step) == 0, step

    def run(self, *args: str) -> int:
        return admin(["--dir", str(self.dir), *args])

    def site(self) -> Site:
        return Site.open(self.dir)

    def passwd(self) -> dict[str, str]:
        return passwd.read(self.broker / "passwd")


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


# --------------------------------------------------------------------------- password hashes


def test_password_hash_is_mosquitto_format_and_verifies() -> None:
    h = passwd.hash_password("s3cret", salt=b"0123456789ab")
    assert h.startswith("$7$101$") and len(h.split("$")) == 5
    assert check_password(h, "s3cret")
    assert not check_password(h, "s3cret ")
    assert not check_password("$6$x$y", "s3cret")
    assert passwd.hash_password("s3cret") != passwd.hash_password("s3cret")  # random salt


@pytest.mark.requires(shutil.which("mosquitto_passwd"), "needs mosquitto_passwd")
def test_hashes_written_by_mosquitto_passwd_verify(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(f), "dev-1", "hunter2"], check=True)
    entries = passwd.read(f)
    assert check_password(entries["dev-1"], "hunter2")
    assert not check_password(entries["dev-1"], "hunter3")


def test_password_file_refuses_bad_usernames(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        passwd.dumps({"a:b": "x"})
    (tmp_path / "pw").write_text("no-colon-here\n")
    with pytest.raises(ConfigError):
        passwd.read(tmp_path / "pw")


# --------------------------------------------------------------------------- PKI


def test_ca_issues_broker_and_client_certificates_and_crl() -> None:
    ca = pki.CA.create("test CA")
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    _, cert = ca.issue_server(["broker.example.org"], ["192.0.2.10"])
    cert.verify_directly_issued_by(ca.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example.org"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.10"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.not_valid_after_utc <= ca.cert.not_valid_after_utc

    _, ccert = ca.issue_client("dev-7")
    ccert.verify_directly_issued_by(ca.cert)
    cn = ccert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "dev-7"
    eku = ccert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ccert.serial_number != cert.serial_number

    crl = x509.load_pem_x509_crl(ca.crl({pki.serial_hex(ccert): dt.datetime.now(dt.UTC)}))
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(ccert.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is None
    assert crl.next_update_utc is not None
    assert crl.next_update_utc >= ca.cert.not_valid_after_utc - dt.timedelta(minutes=10)


def test_ca_round_trips_and_refuses_overwrite(tmp_path: Path) -> None:
    assert admin(["--dir", str(tmp_path), "ca", "init"]) == 0
    assert mode(tmp_path / "ca.key") == 0o600
    assert mode(tmp_path) == 0o700
    loaded = pki.CA.load(tmp_path)
    assert admin(["--dir", str(tmp_path), "ca", "init"]) == 1  # would orphan every cert
    assert pki.CA.load(tmp_path).cert == loaded.cert


# --------------------------------------------------------------------------- broker files


def test_broker_files_are_group_readable_only(env: Env) -> None:
    for name in (
        "mosquitto.conf",
        "passwd",
        "acl",
        "crl.pem",
        "ca.crt",
        "broker.crt",
        "broker.key",
    ):
        assert mode(env.broker / name) == 0o640, name
    import grp

    # The broker's key goes to the mosquitto group only when fedmqtt-admin runs as root on a
    # host that has the group (where Mosquitto is installed).
    require(os.geteuid() == 0, "not root: broker files keep the caller's group")
    groups = {g.gr_name: g.gr_gid for g in grp.getgrall()}
    require("mosquitto" in groups, "no mosquitto group on this host")
    assert (env.broker / "broker.key").stat().st_gid == groups["mosquitto"]


def test_broker_config_is_sized_from_the_model_and_fully_rendered(env: Env) -> None:
    text = (env.broker / "mosquitto.conf").read_text()
    spec = ModelSpec("mlp", 20, 3, hidden=(16,))
    assert f"max_packet_size {sizing.for_spec(spec)}\n" in text
    assert f"password_file {env.broker}/passwd\n" in text
    assert "listener 8883 \n" in text  # all interfaces
    settings = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert not any("{" in ln or "}" in ln for ln in settings)
    for setting in (
        "allow_anonymous false",
        "max_queued_messages 0",
        "max_queued_bytes 0",
        "use_username_as_clientid true",
        "persistence true",
    ):
        assert f"\n{setting}\n" in text


def test_local_listener_is_rendered_kept_and_removed(env: Env) -> None:
    conf = env.broker / "mosquitto.conf"
    base = ["broker-config", "--aggregator-config", str(env.agg / "aggregator.toml")]
    assert "127.0.0.1" not in conf.read_text()  # none unless asked for
    assert env.run(*base, "--local-port", "1883") == 0
    text = conf.read_text()
    block = text[text.index("\nlistener 1883 127.0.0.1\n") :]
    assert block.startswith(
        "\nlistener 1883 127.0.0.1\nprotocol mqtt\nuse_username_as_clientid true\n"
    )
    assert "cafile" not in block.split("\n# ---")[0]  # no TLS on it
    assert env.site().registry.broker.local_port == 1883
    assert env.run(*base) == 0  # re-rendered without the option (as the installer does): kept
    assert "\nlistener 1883 127.0.0.1\n" in conf.read_text()
    assert env.run(*base, "--local-port", "0") == 0
    assert "127.0.0.1" not in conf.read_text()
    assert env.run(*base, "--local-port", "8883") == 1  # the TLS port


def test_local_listener_needs_password_identity(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="password identity"):
        brokerconf.render_config(
            "certificate",
            port=8883,
            bind_address="",
            broker_dir=tmp_path,
            data_dir=tmp_path,
            max_packet_size=65536,
            pid_file=tmp_path / "pid",
            log_dest="syslog",
            local_port=1883,
        )


def test_acl_is_rendered_from_the_registry() -> None:
    reg = Registry()
    reg.aggregators = [Aggregator("alpha", "agg-a"), Aggregator("beta", "agg-b")]
    reg.devices = {
        "d1": Device("alpha", "password", "hmac-sha256"),
        "d2": Device("beta", "password", "hmac-sha256", status="revoked"),
        "d3": Device("beta", "certificate", "ed25519"),
    }
    acl = brokerconf.render_acl(reg)
    lines = [ln for ln in acl.splitlines() if ln and not ln.startswith("#")]
    # No pattern line: a pattern applies to every client, whatever its federation.
    assert not any(ln.startswith("pattern") for ln in lines)
    blocks: dict[str, list[str]] = {}
    for ln in lines:
        if ln.startswith("user "):
            user = ln.removeprefix("user ")
            assert user not in blocks, f"two blocks for {user}"
            blocks[user] = []
        else:
            blocks[user].append(ln)
    # Each account's rights name its own federation's topics, and nothing else.
    assert blocks["d1"] == [
        "topic write fl/alpha/updates/d1",
        "topic write fl/alpha/status/d1",
        "topic write fl/alpha/eval/d1",
        "topic read fl/alpha/model",
        "topic read fl/alpha/announce",
        "topic read fl/alpha/keyframe",
        "topic read fl/alpha/delta/+",
        "topic read fl/alpha/spec",
        "topic read fl/alpha/model/onnx",
        "topic read fl/alpha/plan",
    ]
    assert blocks["d3"] == [ln.replace("alpha", "beta").replace("d1", "d3") for ln in blocks["d1"]]
    assert blocks["agg-a"] == [
        "topic read fl/alpha/updates/+",
        "topic read fl/alpha/status/+",
        "topic read fl/alpha/eval/+",
        "topic readwrite fl/alpha/model",
        "topic readwrite fl/alpha/announce",
        "topic readwrite fl/alpha/keyframe",
        "topic readwrite fl/alpha/delta/+",
        "topic readwrite fl/alpha/spec",
        "topic readwrite fl/alpha/model/onnx",
        "topic readwrite fl/alpha/plan",
        "topic readwrite fl/alpha/metrics",
    ]
    assert blocks["agg-b"] == [ln.replace("alpha", "beta") for ln in blocks["agg-a"]]
    # Revoked: denied everything and granted nothing.
    assert blocks["d2"] == ["topic deny #"]
    assert set(blocks) == {"d1", "d2", "d3", "agg-a", "agg-b"}


def test_acl_refuses_an_id_that_would_inject_lines() -> None:
    """A hand-edited registry cannot smuggle rights into the ACL."""
    reg = Registry()
    reg.aggregators = [Aggregator("alpha", "agg-a")]
    reg.devices = {"d1\ntopic read #": Device("alpha", "password", "hmac-sha256")}
    with pytest.raises(ConfigError, match="device id"):
        brokerconf.render_acl(reg)


def test_reload_rewrites_an_acl_of_an_older_version(env: Env) -> None:
    """Migration: ``fedmqtt-admin reload`` (like every enroll, rotate and revoke) regenerates
    the ACL from the registry, so an ACL written with per-federation patterns is replaced."""
    assert env.run("enroll", "dev-1", "--out", str(env.tmp / "b1")) == 0
    acl = env.broker / "acl"
    rendered = acl.read_text()
    acl.write_text("pattern read fl/demo/model\npattern write fl/demo/updates/%u\n")
    assert env.run("reload") == 0
    assert acl.read_text() == rendered
    assert mode(acl) == 0o640
    assert "\nuser dev-1\ntopic write fl/demo/updates/dev-1\n" in rendered


# --------------------------------------------------------------------------- aggregator


def test_aggregator_setup_creates_keys_and_credentials(env: Env) -> None:
    key = env.agg / "signing.key"
    assert mode(key) == 0o600
    assert mode(env.agg / "devices") == 0o700
    assert mode(env.agg / "broker.password") == 0o600
    pw = (env.agg / "broker.password").read_text().strip()
    assert check_password(env.passwd()["aggregator"], pw)
    assert (env.agg / "ca.crt").read_bytes() == (env.dir / "ca.crt").read_bytes()
    public = Ed25519Signer.load(key).verifier().public_hex()
    assert env.site().registry.aggregators[0].public_key == public

    # Idempotent: the signing key survives (devices pin it); the broker secret is renewed.
    assert env.run("aggregator-setup", "--aggregator-config", str(env.agg / "aggregator.toml")) == 0
    assert Ed25519Signer.load(key).verifier().public_hex() == public
    pw2 = (env.agg / "broker.password").read_text().strip()
    assert pw2 != pw and check_password(env.passwd()["aggregator"], pw2)
    assert len(env.site().registry.aggregators) == 1


@pytest.mark.requires(os.geteuid() == 0, "chown needs root")
def test_aggregator_keys_belong_to_its_service_user(tmp_path: Path) -> None:
    e = Env(tmp_path)
    # aggregator.toml as install-aggregator leaves it: root:<service group> 0640, no group yet.
    import grp

    config = e.agg / "aggregator.toml"
    config.write_text(AGG_TOML.format(fed="demo", user="aggregator"))
    nogroup = grp.getgrnam("nogroup").gr_gid
    os.chown(config, 0, nogroup)
    config.chmod(0o640)
    assert (
        e.run(
            "aggregator-setup",
            "--aggregator-config",
            str(e.agg / "aggregator.toml"),
            "--owner",
            "nobody",
        )
        == 0
    )
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    for p in (e.agg / "signing.key", e.agg / "broker.password", e.agg / "devices"):
        assert p.stat().st_uid == nobody, p
    # The secret group was written into it without changing who may read it.
    assert "group" in tomllib.loads(config.read_text())["scaleout"]
    assert (config.stat().st_uid, config.stat().st_gid, mode(config)) == (0, nogroup, 0o640)
    assert e.run("enroll", "dev-1", "--out", str(tmp_path / "b")) == 0
    assert (e.agg / "devices" / "dev-1.chacha").stat().st_uid == nobody


def scaleout_group(config: Path) -> str:
    group = tomllib.loads(config.read_text())["scaleout"]["group"]
    assert isinstance(group, str)
    return group


def test_aggregator_setup_writes_a_secret_scaleout_group(env: Env) -> None:
    """A random group per federation in [scaleout] group, valid as a topic level, accepted by
    the aggregator's own config loader with workers on an account; kept on every re-run, also
    when aggregator.toml was replaced by one without it."""
    config = env.agg / "aggregator.toml"
    group = scaleout_group(config)
    assert re.fullmatch(r"fedmqtt-[0-9a-f]{32}", group)  # 128 bits, no + # / $
    assert topics.check_id("group", group) == group
    assert env.site().registry.scaleout_groups == {"demo": group}
    raw = tomllib.loads(config.read_text())
    raw["scaleout"]["workers"] = 1
    cfg = AggregatorConfig.from_dict(raw, base_dir=env.agg)
    assert cfg.scaleout.group == group

    config.chmod(0o640)
    text = config.read_text()
    assert env.run("aggregator-setup", "--aggregator-config", str(config)) == 0
    assert config.read_text() == text and mode(config) == 0o640  # re-run: untouched

    config.write_text(AGG_TOML.format(fed="demo", user="aggregator"))  # e.g. install --config
    assert env.run("aggregator-setup", "--aggregator-config", str(config)) == 0
    assert scaleout_group(config) == group

    other = env.tmp / "agg-other"
    other.mkdir()
    (other / "aggregator.toml").write_text(AGG_TOML.format(fed="other", user="agg-other"))
    assert env.run("aggregator-setup", "--aggregator-config", str(other / "aggregator.toml")) == 0
    assert scaleout_group(other / "aggregator.toml") not in (group, topics.PUBLIC_SHARED_GROUP)


SCALEOUT_TABLE = """
[scaleout]
# how many worker processes
workers = 2   # two
group = "fedmqtt-aggregators"
pin_cpu = false

[logging]
level = "DEBUG"
"""


def test_aggregator_setup_replaces_the_public_group_and_keeps_the_rest(env: Env) -> None:
    config = env.agg / "aggregator.toml"
    original = AGG_TOML.format(fed="demo", user="aggregator") + SCALEOUT_TABLE
    config.write_text(original)
    assert env.run("aggregator-setup", "--aggregator-config", str(config)) == 0
    group = env.site().registry.scaleout_groups["demo"]
    assert config.read_text() == original.replace(topics.PUBLIC_SHARED_GROUP, group)
    # A group other than the public one is the operator's: kept, and recorded.
    mine = original.replace(topics.PUBLIC_SHARED_GROUP, "ops-chosen-name")
    config.write_text(mine)
    assert env.run("aggregator-setup", "--aggregator-config", str(config)) == 0
    assert config.read_text() == mine
    assert env.site().registry.scaleout_groups["demo"] == "ops-chosen-name"


@pytest.mark.parametrize(
    "layout",
    [
        "scaleout = { workers = 2 }\n",  # an inline table (before [federation])
        "scaleout.workers = 2\n",  # a dotted key
        '[scaleout]\ngroup = """\nfedmqtt-aggregators"""\n',  # a multi-line string
    ],
)
def test_aggregator_setup_refuses_a_scaleout_table_it_cannot_edit(env: Env, layout: str) -> None:
    """Nothing is written: the operator is told which line to add by hand."""
    config = env.tmp / "agg-other" / "aggregator.toml"
    config.parent.mkdir()
    text = AGG_TOML.format(fed="other", user="agg-other")
    text = layout + text if not layout.startswith("[") else text + layout
    config.write_text(text)
    registry = (env.dir / "registry.json").read_bytes()
    with pytest.raises(
        ConfigError, match=r"write it there by hand: group = \"fedmqtt-[0-9a-f]{32}\""
    ):
        env.site().setup_aggregator(config)
    assert config.read_text() == text
    assert (env.dir / "registry.json").read_bytes() == registry
    assert not (config.parent / "signing.key").exists()


def test_second_worker_must_share_the_signing_key(env: Env) -> None:
    other = env.tmp / "agg2"
    other.mkdir()
    (other / "aggregator.toml").write_text(AGG_TOML.format(fed="demo", user="aggregator-2"))
    assert env.run("aggregator-setup", "--aggregator-config", str(other / "aggregator.toml")) == 1


def test_an_aggregator_account_serves_one_federation(env: Env) -> None:
    """Rights are per federation: the account of federation demo cannot also be another's."""
    other = env.tmp / "agg-other"
    other.mkdir()
    (other / "aggregator.toml").write_text(AGG_TOML.format(fed="other", user="aggregator"))
    registry = (env.dir / "registry.json").read_bytes()
    with pytest.raises(ConfigError, match="already serves federation 'demo'"):
        env.site().setup_aggregator(other / "aggregator.toml")
    assert (env.dir / "registry.json").read_bytes() == registry
    assert not (other / "signing.key").exists()
    (other / "aggregator.toml").write_text(AGG_TOML.format(fed="other", user="agg-other"))
    assert env.run("aggregator-setup", "--aggregator-config", str(other / "aggregator.toml")) == 0


# --------------------------------------------------------------------------- enrollment


def bundle_config_pointing_into(env: Env, device: str, auth: str) -> Path:
    """Enroll with the bundle's own directory as etc_dir, so its paths resolve here."""
    out = env.tmp / f"bundle-{device}"
    site = env.site()
    site.enroll(device, out, auth=auth, options=AgentOptions(etc_dir=str(out)))
    return out


@pytest.mark.parametrize("auth", ["chacha20-poly1305", "hmac-sha256", "ed25519"])
def test_bundle_is_accepted_by_the_agent_and_matches_the_aggregator(env: Env, auth: str) -> None:
    from edge_agent.config import load_config

    out = bundle_config_pointing_into(env, "dev-1", auth)
    cfg = load_config(out / "agent.toml")
    assert (cfg.device.id, cfg.device.federation) == ("dev-1", "demo")
    assert cfg.broker.tls and cfg.broker.host == "broker.example.org" and cfg.broker.port == 8883
    assert cfg.broker.username == "dev-1"
    assert cfg.security.update_auth == auth
    for secret in ("update.key", "broker.password"):
        assert mode(out / secret) == 0o600
    assert mode(out) == 0o700

    # broker credentials: the password in the bundle matches the broker's hash
    assert cfg.broker.password_file is not None
    password = cfg.broker.password_file.read_text().splitlines()[0]
    assert check_password(env.passwd()["dev-1"], password)

    # update authentication: what the device signs, the aggregator verifies
    signer = load_update_signer(cfg.security.update_auth, cfg.security.update_key)
    verifier = load_device_verifier(env.agg / "devices" / f"dev-1{DEVICE_KEY_SUFFIX[auth]}")
    spec = ModelSpec("softmax", 4, 3)
    rng = np.random.default_rng(0)
    delta = encode_params(init_params(spec, rng), Codec.parse("raw"), rng=rng)
    update = wire.Update("demo", "dev-1", "a" * 16, 1, 0, 10, spec.fingerprint(), delta)
    assert wire.decode(wire.encode(update, signer), wire.Update, verifier).sender == "dev-1"

    # the pinned aggregator key verifies what the aggregator signs
    agg_signer = Ed25519Signer.load(env.agg / "signing.key")
    pinned = Ed25519Verifier.load(cfg.security.aggregator_public_key)
    model = wire.GlobalModel("demo", "aggregator", 1, spec, init_params(spec, rng))
    wire.decode(
        wire.encode(model, agg_signer), wire.GlobalModel, pinned, specs={spec.fingerprint(): spec}
    )

    # and the CA in the bundle is the one that signed the broker's certificate
    broker_cert = load_cert(env.broker / "broker.crt")
    assert cfg.broker.ca_file is not None
    broker_cert.verify_directly_issued_by(load_cert(cfg.broker.ca_file))


def test_default_bundle_targets_the_installed_layout(env: Env) -> None:
    out = env.tmp / "b"
    assert (
        env.run(
            "enroll", "dev-1", "--out", str(out), "--data-path", "/srv/x.csv", "--interval-s", "60"
        )
        == 0
    )
    doc = tomllib.loads((out / "agent.toml").read_text())
    assert doc["security"]["update_key"] == "/etc/fedmqtt-agent/update.key"
    assert doc["broker"]["password_file"] == "/etc/fedmqtt-agent/broker.password"
    assert doc["device"]["state_dir"] == "/var/lib/fedmqtt-agent"
    assert doc["data"] == {
        "source": "csv",
        "path": "/srv/x.csv",
        "label_column": "label",
        "header": True,
    }
    assert doc["training"]["interval_s"] == 60.0
    assert sorted(p.name for p in out.iterdir()) == [
        "agent.toml",
        "aggregator.pub",
        "broker.password",
        "ca.crt",
        "update.key",
    ]


def test_certificate_identity_bundle(tmp_path: Path) -> None:
    from edge_agent.config import load_config

    e = Env(tmp_path, identity="certificate")
    assert (e.agg / "client.crt").exists() and mode(e.agg / "client.key") == 0o600
    out = tmp_path / "b"
    e.site().enroll("dev-1", out, options=AgentOptions(etc_dir=str(out)))
    cfg = load_config(out / "agent.toml")
    assert cfg.broker.username is None and cfg.broker.password_file is None
    assert cfg.broker.cert_file is not None and cfg.broker.key_file is not None
    cert = load_cert(cfg.broker.cert_file)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    cert.verify_directly_issued_by(load_cert(e.dir / "ca.crt"))
    assert mode(cfg.broker.key_file) == 0o600
    assert "dev-1" not in e.passwd()
    assert e.site().registry.devices["dev-1"].cert_serial == pki.serial_hex(cert)


@pytest.mark.parametrize(
    ("device_id", "extra"),
    [
        ("a/b", []),  # topic separator
        ("+", []),  # wildcard
        ("aggregator", []),  # the aggregator's account
        ("dev-1", ["--federation", "nope"]),  # federation without an aggregator
    ],
)
def test_enroll_refuses(
    env: Env, device_id: str, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert env.run("enroll", device_id, "--out", str(env.tmp / "x"), *extra) == 1
    assert "error:" in capsys.readouterr().err
    assert device_id not in env.site().registry.devices


def test_enroll_twice_and_nonempty_bundle_dir_refused(env: Env) -> None:
    assert env.run("enroll", "dev-1", "--out", str(env.tmp / "b1")) == 0
    assert env.run("enroll", "dev-1", "--out", str(env.tmp / "b2")) == 1
    assert env.run("enroll", "dev-2", "--out", str(env.tmp / "b1")) == 1  # b1 is not empty


# --------------------------------------------------------------------------- revoke, rotate


def test_revoke_removes_credentials_key_and_access(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    assert env.run("enroll", "dev-1", "--out", str(env.tmp / "b1")) == 0
    assert env.run("enroll", "dev-2", "--out", str(env.tmp / "b2")) == 0
    assert env.run("revoke", "dev-1") == 0
    assert "dev-1" not in env.passwd() and "dev-2" in env.passwd()
    assert not (env.agg / "devices" / "dev-1.chacha").exists()
    assert (env.agg / "devices" / "dev-2.chacha").exists()
    assert "user dev-1\ntopic deny #\n" in (env.broker / "acl").read_text()
    dev = env.site().registry.devices["dev-1"]
    assert dev.status == "revoked" and dev.revoked_at is not None
    capsys.readouterr()

    assert env.run("list", "--json") == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["dev-1"]["status"] == "revoked" and rows["dev-2"]["status"] == "active"

    assert env.run("revoke", "dev-1") == 1  # already revoked
    assert env.run("revoke", "nobody-here") == 1
    # The id comes back only on purpose, with new credentials and without the deny block.
    assert env.run("enroll", "dev-1", "--out", str(env.tmp / "b3")) == 1
    assert env.run("enroll", "dev-1", "--out", str(env.tmp / "b4"), "--reenroll") == 0
    acl = (env.broker / "acl").read_text()
    assert "topic deny #" not in acl
    assert "\nuser dev-1\ntopic write fl/demo/updates/dev-1\n" in acl
    old = (env.tmp / "b1" / "broker.password").read_text().strip()
    assert not check_password(env.passwd()["dev-1"], old)


def test_revoke_with_certificates_fills_the_crl(tmp_path: Path) -> None:
    e = Env(tmp_path, identity="certificate")
    assert e.run("enroll", "dev-1", "--out", str(tmp_path / "b")) == 0
    serial = int(load_cert(tmp_path / "b" / "client.crt").serial_number)
    assert e.run("revoke", "dev-1") == 0
    crl = x509.load_pem_x509_crl((e.broker / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None


@pytest.mark.parametrize("identity", ["password", "certificate"])
def test_rotate_replaces_every_secret(tmp_path: Path, identity: str) -> None:
    e = Env(tmp_path, identity=identity)
    assert (
        e.run("enroll", "dev-1", "--out", str(tmp_path / "old"), "--data-path", "/srv/d.csv") == 0
    )
    old_key = (e.agg / "devices" / "dev-1.chacha").read_text()
    assert e.run("rotate", "dev-1", "--out", str(tmp_path / "new"), "--auth", "ed25519") == 0
    assert not (e.agg / "devices" / "dev-1.chacha").exists()
    new_pub = Ed25519Verifier.load(e.agg / "devices" / "dev-1.pub")
    new_signer = load_update_signer("ed25519", tmp_path / "new" / "update.key")
    assert new_pub.verify(b"x", new_signer.sign(b"x"))
    assert old_key != (tmp_path / "new" / "update.key").read_text()
    doc = tomllib.loads((tmp_path / "new" / "agent.toml").read_text())
    assert doc["data"]["path"] == "/srv/d.csv"  # enrollment options are kept
    assert doc["security"]["update_auth"] == "ed25519"
    if identity == "password":
        old_pw = (tmp_path / "old" / "broker.password").read_text().strip()
        new_pw = (tmp_path / "new" / "broker.password").read_text().strip()
        assert not check_password(e.passwd()["dev-1"], old_pw)
        assert check_password(e.passwd()["dev-1"], new_pw)
    else:
        old = load_cert(tmp_path / "old" / "client.crt").serial_number
        new = load_cert(tmp_path / "new" / "client.crt").serial_number
        crl = x509.load_pem_x509_crl((e.broker / "crl.pem").read_bytes())
        assert crl.get_revoked_certificate_by_serial_number(old) is not None
        assert crl.get_revoked_certificate_by_serial_number(new) is None


# --------------------------------------------------------------------------- reload


def test_reload_through_pid_file(tmp_path: Path) -> None:
    flag = tmp_path / "hup"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time, pathlib\n"
            f"signal.signal(signal.SIGHUP, lambda *a: pathlib.Path({str(flag)!r}).touch())\n"
            "print('ready', flush=True)\n"
            "time.sleep(10)\n",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        pid = tmp_path / "m.pid"
        pid.write_text(f"{child.pid}\n")
        assert "SIGHUP" in brokerconf.reload_broker(f"pidfile:{pid}")
        deadline = time.monotonic() + 5
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert flag.exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with pytest.raises(ConfigError):
        brokerconf.reload_broker(f"pidfile:{tmp_path / 'missing.pid'}")
    with pytest.raises(ConfigError):
        brokerconf.reload_broker("carrier-pigeon")
    assert "not reloaded" in brokerconf.reload_broker("none")


def test_failed_reload_is_an_error_after_the_change(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    site = env.site()
    site.registry.broker.reload = f"pidfile:{env.tmp / 'no-such.pid'}"
    site.registry.save(env.dir)
    assert env.run("enroll", "dev-1", "--out", str(env.tmp / "b")) == 1
    assert "not reloaded" in capsys.readouterr().err
    assert "dev-1" in env.site().registry.devices  # done, but the broker must still be told


# --------------------------------------------------------------------------- sizing, TOML


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec("linear", 3, 1),
        ModelSpec("softmax", 64, 10, feature_offset=(0.5,) * 64, feature_scale=(2.0,) * 64),
        ModelSpec(
            "mlp",
            784,
            10,
            hidden=(128,),
            classes=tuple(range(10)),
            feature_offset=(0.25,) * 784,
            feature_scale=(1 / 255,) * 784,
            feature_names=tuple(f"pixel_{i:04d}" for i in range(784)),
        ),
        ModelSpec("mlp", 30, 2, hidden=(256, 128)),
    ],
    ids=["linear", "softmax", "mlp-784", "mlp-2h"],
)
def test_packet_limit_fits_every_message_of_the_model(spec: ModelSpec) -> None:
    from fedmqtt.onnx_export import export_onnx

    rng = np.random.default_rng(0)
    params = init_params(spec, rng)
    signer = Ed25519Signer.generate()
    limit = sizing.max_message_bytes(spec.layout().size, spec.n_features)
    model = wire.encode(
        wire.GlobalModel(
            "a-federation-name",
            "aggregator-worker-1",
            10**9,
            spec,
            params,
            stats={f"stat{i}": float(i) for i in range(16)},
        ),
        signer,
    )
    onnx = wire.encode(
        wire.OnnxModel(
            "a-federation-name",
            "aggregator-worker-1",
            10**9,
            export_onnx(
                spec, params, federation="a-federation-name", version=10**9, created_at=1.7e9
            ),
        ),
        signer,
    )
    update = wire.encode(
        wire.Update(
            "a-federation-name",
            "d" * 64,
            "u" * 64,
            10**9,
            10**9,
            10**9,
            spec.fingerprint(),
            encode_params(params, Codec.parse("raw"), rng=rng),
            metrics={f"m{i}": 1.0 for i in range(16)},
        ),
        signer,
    )
    spec_msg = wire.encode(
        wire.SpecMessage("a-federation-name", "aggregator-worker-1", spec), signer
    )
    for payload in (model, spec_msg, onnx, update):
        assert len(payload) <= limit
    assert sizing.for_spec(spec) >= limit + sizing.PACKET_OVERHEAD
    assert sizing.for_spec(spec) % sizing.ROUND == 0


def test_size_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert admin(["size", "--params", "1000000", "--features", "100"]) == 0
    out = capsys.readouterr().out
    assert f"max_packet_size {sizing.max_packet_size(1_000_000, 100)}" in out
    with pytest.raises(ValueError):
        sizing.max_packet_size(100_000_000)  # beyond MQTT's 256 MB


def test_toml_writer_round_trips_awkward_strings() -> None:
    values: dict[str, tomlconf.TomlValue] = {
        "quote": 'say "hi"',
        "backslash": "C:\\path\\x",
        "unicode": "Zürich ✓",
        "newline": "a\nb",
        "tab": "a\tb",
        "int": 7,
        "float": 1e-05,
        "flag": False,
        "list": ["x", "y"],
    }
    doc = tomllib.loads(tomlconf.dumps({"t": values}, header="line 1\n\nline 3"))
    assert doc["t"] == values
    with pytest.raises(ConfigError):
        tomlconf.dumps({"t": {"bad": "bell\x07"}})


def test_registry_round_trip_and_corruption(tmp_path: Path) -> None:
    reg = Registry()
    reg.devices["d"] = Device("f", "password", "hmac-sha256", options={"interval_s": 5.0})
    reg.revoked_serials["abc"] = "2025-01-01T00:00:00+00:00"
    reg.save(tmp_path)
    assert mode(tmp_path / "registry.json") == 0o600
    again = Registry.load(tmp_path)
    assert again.devices == reg.devices and again.revoked_serials == reg.revoked_serials
    (tmp_path / "registry.json").write_text('{"format": 99}')
    with pytest.raises(ConfigError):
        Registry.load(tmp_path)


def test_signing_key_rotation_updates_every_worker(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg2 = env.tmp / "agg2" / "aggregator.toml"
    cfg2.parent.mkdir()
    cfg2.write_text(
        AGG_TOML.format(fed="demo", user="aggregator-2")
        .replace('"signing.key"', f'"{env.agg}/signing.key"')
        .replace('"devices"', f'"{env.agg}/devices"')
    )
    assert env.run("aggregator-setup", "--aggregator-config", str(cfg2)) == 0
    capsys.readouterr()
    assert env.run("pubkey") == 0
    old = capsys.readouterr().out.strip()
    (env.agg / "signing.key").rename(env.tmp / "signing.key.old")
    assert env.run("aggregator-setup", "--aggregator-config", str(env.agg / "aggregator.toml")) == 0
    capsys.readouterr()
    assert env.run("pubkey", "--federation", "demo") == 0
    new = capsys.readouterr().out.strip()
    assert new != old
    assert new == Ed25519Signer.load(env.agg / "signing.key").verifier().public_hex()
    assert {a.public_key for a in env.site().registry.aggregators} == {new}
    assert env.run("enroll", "dev-1", "--out", str(env.tmp / "b")) == 0
    assert (env.tmp / "b" / "aggregator.pub").read_text().strip() == new


# --------------------------------------------------------------------------- edge brokers


def edge_config(e: Env, edge: str, *extra: str) -> int:
    return e.run(
        "edge-config",
        edge,
        "--edge-dir",
        str(e.tmp / edge),
        "--host",
        f"{edge}.example.org",
        "--aggregator-config",
        str(e.agg / "aggregator.toml"),
        *extra,
    )


def test_edge_config_renders_the_bridge_and_follows_the_devices(tmp_path: Path) -> None:
    e = Env(tmp_path, identity="certificate")
    assert e.run("enroll", "dev-1", "--out", str(tmp_path / "b1")) == 0
    assert edge_config(e, "site-a") == 0
    d = tmp_path / "site-a"
    conf = (d / "mosquitto.conf").read_text()
    for line in (
        "address broker.example.org:8883",
        "remote_clientid site-a",
        "remote_username site-a",
        f"bridge_certfile {d}/bridge.crt",
        "cleansession false",
        "try_private true",
        "topic fl/demo/updates/+ out 1",
        "topic fl/demo/model in 1",
        f"acl_file {d}/acl",
        "require_certificate true",
    ):
        assert f"\n{line}\n" in conf, line
    settings = [ln for ln in conf.splitlines() if not ln.startswith("#")]
    assert not [ln for ln in settings if "{" in ln]  # every placeholder filled
    assert load_cert(d / "bridge.crt").subject.rfc4514_string().startswith("CN=site-a")
    central = (e.broker / "acl").read_text()
    assert "\nuser site-a\ntopic write fl/demo/updates/+\n" in central
    assert "topic readwrite" not in central.split("user site-a")[1].split("user ")[0]
    edge_acl = (d / "acl").read_text()
    assert "\nuser dev-1\ntopic write fl/demo/updates/dev-1\n" in edge_acl
    assert "\nuser site-a\ntopic write fl/demo/model\n" in edge_acl
    # Devices enrolled and revoked later reach the edge's files.
    assert e.run("enroll", "dev-2", "--out", str(tmp_path / "b2")) == 0
    assert "\nuser dev-2\n" in (d / "acl").read_text()
    serial = int(load_cert(tmp_path / "b2" / "client.crt").serial_number)
    assert e.run("revoke", "dev-2") == 0
    assert "user dev-2\ntopic deny #\n" in (d / "acl").read_text()
    crl = x509.load_pem_x509_crl((d / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    # The edge's bridge is cut off at the centre.
    bridge_serial = int(load_cert(d / "bridge.crt").serial_number)
    assert e.run("edge-revoke", "site-a") == 0
    assert "user site-a\ntopic deny #\n" in (e.broker / "acl").read_text()
    crl = x509.load_pem_x509_crl((e.broker / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(bridge_serial) is not None
    assert edge_config(e, "site-a") == 1  # a revoked edge id is not reused


def test_edge_with_password_identity_copies_its_federations_hashes(env: Env) -> None:
    assert env.run("enroll", "dev-1", "--out", str(env.tmp / "b1")) == 0
    assert edge_config(env, "site-a") == 0
    conf = (env.tmp / "site-a" / "mosquitto.conf").read_text()
    password = conf.split("\nremote_password ")[1].split("\n")[0]
    assert check_password(env.passwd()["site-a"], password)
    edge_passwd = passwd.read(env.tmp / "site-a" / "passwd")
    assert edge_passwd == {"dev-1": env.passwd()["dev-1"]}  # devices only, not the bridge
    assert env.run("revoke", "dev-1") == 0
    assert passwd.read(env.tmp / "site-a" / "passwd") == {}


def test_edge_ids_do_not_collide_with_accounts(env: Env) -> None:
    assert env.run("enroll", "dev-1", "--out", str(env.tmp / "b1")) == 0
    assert edge_config(env, "dev-1") == 1
    assert edge_config(env, "aggregator") == 1
    assert edge_config(env, "site-a") == 0
    assert env.run("enroll", "site-a", "--out", str(env.tmp / "b2")) == 1
    assert edge_config(env, "bad/id") == 1


def test_enroll_at_an_edge_points_the_bundle_at_that_edge_broker(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """``enroll --edge``: the bundle's [broker] is the edge's host and port from the registry,
    its CA verifies the edge broker's certificate and the edge's ACL knows the device; rotate
    keeps the edge or moves the device; a revoked or unknown edge is refused."""
    from edge_agent.config import load_config

    assert edge_config(env, "site-a", "--port", "8884") == 0
    out = env.tmp / "b1"
    env.site().enroll("dev-1", out, edge="site-a", options=AgentOptions(etc_dir=str(out)))
    cfg = load_config(out / "agent.toml")
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.tls) == ("site-a.example.org", 8884, True)
    assert cfg.broker.ca_file is not None
    load_cert(env.tmp / "site-a" / "broker.crt").verify_directly_issued_by(
        load_cert(cfg.broker.ca_file)
    )
    assert (
        "\nuser dev-1\ntopic write fl/demo/updates/dev-1\n"
        in (env.tmp / "site-a" / "acl").read_text()
    )
    capsys.readouterr()
    assert env.run("list", "--json") == 0
    assert [d["edge"] for d in json.loads(capsys.readouterr().out)] == ["site-a"]

    def broker_of(bundle: Path) -> tuple[str, int]:
        b = tomllib.loads((bundle / "agent.toml").read_text())["broker"]
        return b["host"], b["port"]

    assert env.run("rotate", "dev-1", "--out", str(env.tmp / "b2")) == 0
    assert broker_of(env.tmp / "b2") == ("site-a.example.org", 8884)  # kept
    assert env.run("rotate", "dev-1", "--out", str(env.tmp / "b3"), "--central") == 0
    assert broker_of(env.tmp / "b3") == ("broker.example.org", 8883)
    assert env.run("rotate", "dev-1", "--out", str(env.tmp / "b4"), "--edge", "site-a") == 0
    assert broker_of(env.tmp / "b4") == ("site-a.example.org", 8884)

    assert env.run("enroll", "dev-2", "--out", str(env.tmp / "b5"), "--edge", "nowhere") == 1
    assert "no edge broker 'nowhere'" in capsys.readouterr().err
    assert not (env.tmp / "b5").exists() and "dev-2" not in env.site().registry.devices
    assert env.run("edge-revoke", "site-a") == 0
    assert "1 device(s) connect to it: dev-1" in capsys.readouterr().out
    assert env.run("enroll", "dev-3", "--out", str(env.tmp / "b6"), "--edge", "site-a") == 1
    assert env.run("rotate", "dev-1", "--out", str(env.tmp / "b7")) == 1
    assert "edge 'site-a' is revoked" in capsys.readouterr().err
    assert env.run("rotate", "dev-1", "--out", str(env.tmp / "b8"), "--central") == 0
