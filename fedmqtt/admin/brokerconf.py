"""The broker's files, rendered from ``broker_config/`` templates, and telling Mosquitto to reload.

Files in the broker directory (default ``/etc/mosquitto/fedmqtt``): ``mosquitto.conf``,
``ca.crt``, ``broker.crt``, ``broker.key``, ``passwd`` (password identity), ``crl.pem``
(certificate identity) and ``acl``. Every one is written 0640 root:mosquitto, because Mosquitto 2
drops root right after parsing its configuration and reads all of them as the mosquitto user,
on start and again on SIGHUP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Final

from fedmqtt.admin.registry import ACTIVE, Edge, Identity, Registry
from fedmqtt.brokerfiles import config_dir
from fedmqtt.errors import ConfigError
from fedmqtt.topics import check_id

CONF: Final = "mosquitto.conf"
CA_CERT: Final = "ca.crt"
CERT: Final = "broker.crt"
KEY: Final = "broker.key"
PASSWD: Final = "passwd"
ACL: Final = "acl"
CRL: Final = "crl.pem"
TEMPLATES: Final[dict[Identity, str]] = {
    "password": "mosquitto.conf",
    "certificate": "mosquitto-certs.conf",
}
ACL_DEVICES: Final = "acl-devices.acl"
ACL_AGGREGATOR: Final = "acl-aggregator.acl"
ACL_BRIDGE: Final = "acl-bridge.acl"
BRIDGE_TEMPLATE: Final = "bridge.conf"
# An edge broker's client certificate for its bridge to the central broker (CN = edge id), and
# its password for a central broker with password identity.
BRIDGE_CERT: Final = "bridge.crt"
BRIDGE_KEY: Final = "bridge.key"


def templates_dir() -> Path:
    """``broker_config/``: the source tree's, or the copy an installer put in the venv."""
    candidates = [config_dir(), Path(sys.prefix) / "share" / "fedmqtt" / "broker_config"]
    for d in candidates:
        if (d / TEMPLATES["password"]).is_file():
            return d
    raise ConfigError(
        "broker_config templates not found (looked in "
        + ", ".join(str(d) for d in candidates)
        + "); set FEDMQTT_BROKER_CONFIG_DIR to the project's broker_config directory"
    )


def render_config(
    identity: Identity,
    *,
    port: int,
    bind_address: str,
    broker_dir: Path,
    data_dir: Path,
    max_packet_size: int,
    pid_file: Path,
    log_dest: str,
    local_port: int = 0,
) -> str:
    """The production mosquitto.conf for ``identity`` (same rendering as simulator.broker), with
    the loopback listener of :func:`local_listener` if ``local_port`` is not 0."""
    if not 0 <= local_port <= 65535:
        raise ConfigError(f"--local-port {local_port}: must be 1-65535 (or 0 for none)")
    if local_port and identity != "password":
        raise ConfigError(
            "--local-port needs password identity: a listener without TLS has no client "
            "certificate to identify the aggregator by (remove it with --local-port 0)"
        )
    if local_port == port:
        raise ConfigError(f"--local-port {local_port} is the TLS port; pick another (e.g. 1883)")
    text = (templates_dir() / TEMPLATES[identity]).read_text()
    return text.format(
        port=port,
        bind_address=bind_address,
        broker_dir=broker_dir,
        data_dir=data_dir,
        max_packet_size=max_packet_size,
        pid_file=pid_file,
        log_dest=log_dest,
        local_listener=local_listener(local_port) if local_port else "",
    )


def local_listener(port: int) -> str:
    """A listener on 127.0.0.1 without TLS, for an aggregator on the broker's own host.

    TLS on loopback protects nothing (the bytes never leave the machine, and whoever can read
    them there is root) but doubles what the aggregator pays to receive an update
    (bench/link.py). Accounts and ACL are the TLS listener's (``per_listener_settings false``);
    ``use_username_as_clientid`` is a per-listener option, so it is repeated here.
    """
    return (
        "\n# ---------------------------------------------------------------- local listener\n"
        "# Loopback only and without TLS, for the aggregator on this host (fedmqtt-admin\n"
        "# broker-config --local-port). Same accounts and ACL as the TLS listener.\n"
        f"listener {port} 127.0.0.1\n"
        "protocol mqtt\n"
        "use_username_as_clientid true\n"
    )


def render_acl(registry: Registry) -> str:
    """The central broker's whole ACL file, regenerated from the registry.

    Federation by federation: a ``user`` block per aggregator account (``acl-aggregator.acl``),
    per edge broker's bridge (``acl-bridge.acl``) and per active device (``acl-devices.acl``),
    whose ``topic`` lines name that federation's topics only. There are no ``pattern`` lines: a
    pattern applies to every client, so it would grant a device the topics of every federation.
    Each revoked device or edge gets ``user <id>`` with ``topic deny #`` and nothing else, so a
    revoked client that is still connected (or whose certificate is still accepted) can neither
    publish nor receive anything. Ids are checked again here, so that a hand-edited registry
    cannot inject ACL lines.
    """
    tdir = templates_dir()
    agg_block = _acl_block(tdir / ACL_AGGREGATOR)
    bridge_block = _acl_block(tdir / ACL_BRIDGE)
    aggregators: dict[str, set[str]] = {}
    for agg in registry.aggregators:
        aggregators.setdefault(agg.federation, set()).add(agg.user)
    bridges: dict[str, list[str]] = {}
    for edge_id, edge in registry.active_edges().items():
        bridges.setdefault(edge.federation, []).append(edge_id)
    devices = _devices_by_federation(registry)
    parts = [
        "# Generated by fedmqtt-admin from its registry (templates broker_config/acl-*.acl);\n"
        "# do not edit: `fedmqtt-admin reload`, enroll, rotate and revoke rewrite it.\n"
        "# One block per account. A device writes only fl/<its federation>/updates/<its id>,\n"
        "# .../status/<its id> and .../eval/<its id> and reads fl/<its federation>/model,\n"
        "# .../model/onnx and .../plan; an aggregator account reads and writes its own\n"
        "# federation's topics only; an edge broker's bridge relays its federation's device\n"
        "# topics. Clients matched by no block may do nothing.\n"
    ]
    for fed in sorted(aggregators.keys() | devices.keys() | bridges.keys()):
        check_id("federation", fed)
        users = sorted(aggregators.get(fed, ()))
        edges = sorted(bridges.get(fed, ()))
        ids = sorted(devices.get(fed, ()))
        parts.append(
            f"# ---------------- federation {fed}: {len(users)} aggregator account(s), "
            f"{len(edges)} edge bridge(s), {len(ids)} device(s)\n"
        )
        for user in users:
            parts.append(agg_block.format(federation=fed, aggregator_user=check_id("user", user)))
        for edge_id in edges:
            parts.append(bridge_block.format(federation=fed, bridge=check_id("edge id", edge_id)))
        parts.extend(_device_blocks(fed, ids))
    revoked = sorted(registry.revoked_devices()) + sorted(
        k for k, e in registry.edges.items() if e.status != ACTIVE
    )
    parts.extend(_deny_blocks(revoked))
    return "\n".join(parts)


def render_edge_acl(registry: Registry, edge_id: str) -> str:
    """The ACL file of edge broker ``edge_id``: the device blocks of its federation, exactly as
    on the central broker, the revoked devices' deny blocks, and a block for the bridge's own
    name that lets it write, at the edge, what it reads at the centre.

    Mosquitto does not check its bridge against the ACL when it publishes what comes down, but
    ``check_retain_source`` does check the retained model later, when a device subscribes: by
    the publisher's user name, which for a bridge is its ``remote_username`` (the edge id).
    Without this block the edge would deliver the model live and never as retained. No device
    can log in with that name at the edge: no password is kept for it there and no device
    certificate has it as CN."""
    edge = registry.edge(edge_id)
    fed = check_id("federation", edge.federation)
    ids = sorted(_devices_by_federation(registry).get(fed, ()))
    parts = [
        f"# Generated by fedmqtt-admin for edge broker {edge_id} (federation {fed}); do not\n"
        "# edit: `fedmqtt-admin reload`, enroll, rotate and revoke rewrite it. A device writes\n"
        "# only its own update, status and eval topics and reads its federation's model topics.\n",
        f"# ---------------- federation {fed}: {len(ids)} device(s)\n",
        *_device_blocks(fed, ids),
        "# ---------------- the bridge, publishing what it brings down from the central broker\n",
        _bridge_local_block(edge_id, fed),
        *_deny_blocks(sorted(registry.revoked_devices())),
    ]
    return "\n".join(parts)


def _bridge_local_block(edge_id: str, fed: str) -> str:
    """``user <edge id>`` with write access to each topic ``acl-bridge.acl`` lets the bridge
    read at the centre (one list of the topics that come down)."""
    block = _acl_block(templates_dir() / ACL_BRIDGE).format(bridge=edge_id, federation=fed)
    lines = [f"user {check_id('edge id', edge_id)}"] + [
        "topic write " + ln.removeprefix("topic read ").strip()
        for ln in block.splitlines()
        if ln.startswith("topic read ")
    ]
    return "\n".join(lines) + "\n"


def _devices_by_federation(registry: Registry) -> dict[str, list[str]]:
    devices: dict[str, list[str]] = {}
    for device_id, device in registry.active_devices().items():
        devices.setdefault(device.federation, []).append(device_id)
    return devices


def _device_blocks(fed: str, ids: list[str]) -> list[str]:
    block = _acl_block(templates_dir() / ACL_DEVICES)
    return [block.format(federation=fed, device=check_id("device id", d)) for d in ids]


def _deny_blocks(ids: list[str]) -> list[str]:
    if not ids:
        return []
    return [
        "# ---------------- revoked accounts: denied everything, granted nothing\n",
        *(f"user {check_id('id', d)}\ntopic deny #\n" for d in ids),
    ]


def render_bridge(
    edge_id: str,
    edge: Edge,
    *,
    identity: Identity,
    password: str | None = None,
    restart_timeout: tuple[int, int] = (5, 60),
) -> str:
    """The bridge section of edge ``edge_id``'s mosquitto.conf (``broker_config/bridge.conf``).

    ``identity`` is the central broker's: a client certificate (``bridge.crt``/``bridge.key``
    in the edge's directory, CN = edge id) or the edge id's ``password``."""
    check_id("edge id", edge_id)
    check_id("federation", edge.federation)
    if not edge.central_host:
        raise ConfigError("the central broker's host is unknown: give --central-host")
    base, cap = restart_timeout
    if not 1 <= base <= cap:
        raise ConfigError(f"--restart-timeout {base} {cap}: need 1 <= base <= cap")
    edge_dir = Path(edge.dir)
    # remote_username also with a certificate (where the central broker takes the CN instead):
    # it is the name the edge's own ACL knows the bridge by (render_edge_acl).
    credentials = f"remote_username {edge_id}\n"
    if identity == "certificate":
        credentials += (
            f"bridge_certfile {edge_dir / BRIDGE_CERT}\nbridge_keyfile {edge_dir / BRIDGE_KEY}"
        )
    else:
        if not password or any(c.isspace() for c in password):
            raise ConfigError("the bridge needs a password without white space")
        credentials += f"remote_password {password}"
    host = edge.central_host
    address = f"[{host}]:{edge.central_port}" if ":" in host else f"{host}:{edge.central_port}"
    text = (templates_dir() / BRIDGE_TEMPLATE).read_text()
    return text.format(
        connection=f"fedmqtt-{edge_id}",
        address=address,
        edge_id=edge_id,
        edge_dir=edge_dir,
        federation=edge.federation,
        credentials=credentials,
        restart_timeout_base=base,
        restart_timeout_cap=cap,
    )


def _acl_block(path: Path) -> str:
    """A broker_config/acl-*.acl template without its leading comment (template documentation)."""
    lines = path.read_text().splitlines(keepends=True)
    return "".join(ln for ln in lines if not ln.startswith("#"))


def reload_broker(how: str) -> str:
    """Make Mosquitto re-read passwd, acl, crl.pem and certificates; returns what was done.

    ``how``: ``systemctl:<unit>`` (the Debian unit's ExecReload sends SIGHUP), ``pidfile:<path>``
    (send SIGHUP to the pid written by ``pid_file``), or ``none``.
    """
    kind, _, arg = how.partition(":")
    if kind == "none":
        return "broker not reloaded (reload = none): reload it yourself"
    if kind == "systemctl" and arg:
        try:
            subprocess.run(
                ["systemctl", "reload", arg], check=True, capture_output=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            raise ConfigError(
                f"systemctl reload {arg} failed: {e} {detail.decode(errors='replace').strip()}"
            ) from None
        return f"reloaded {arg} (systemctl)"
    if kind == "pidfile" and arg:
        try:
            pid = int(Path(arg).read_text().split()[0])
        except (OSError, ValueError, IndexError) as e:
            raise ConfigError(f"cannot read the broker pid from {arg}: {e}") from None
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as e:
            raise ConfigError(f"cannot signal broker pid {pid}: {e.strerror}") from None
        return f"sent SIGHUP to broker pid {pid}"
    raise ConfigError(
        f"reload method {how!r} not understood: use systemctl:<unit>, pidfile:<path> or none"
    )
