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

from fedmqtt.admin.registry import Identity, Registry
from fedmqtt.broker import config_dir
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
    """The production mosquitto.conf for ``identity`` (same rendering as fedmqtt.broker), with
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
    """The whole ACL file, regenerated from the registry.

    Federation by federation: a ``user`` block per aggregator account (``acl-aggregator.acl``)
    and per active device (``acl-devices.acl``), whose ``topic`` lines name that federation's
    topics only. There are no ``pattern`` lines: a pattern applies to every client, so it would
    grant a device the topics of every federation. Each revoked device gets ``user <id>`` with
    ``topic deny #`` and nothing else, so a revoked client that is still connected (or whose
    certificate is still accepted) can neither publish nor receive anything. Ids are checked
    again here, so that a hand-edited registry cannot inject ACL lines.
    """
    tdir = templates_dir()
    device_block = _acl_block(tdir / ACL_DEVICES)
    agg_block = _acl_block(tdir / ACL_AGGREGATOR)
    aggregators: dict[str, set[str]] = {}
    for agg in registry.aggregators:
        aggregators.setdefault(agg.federation, set()).add(agg.user)
    devices: dict[str, list[str]] = {}
    for device_id, device in registry.active_devices().items():
        devices.setdefault(device.federation, []).append(device_id)
    parts = [
        "# Generated by fedmqtt-admin from its registry (templates broker_config/acl-*.acl);\n"
        "# do not edit: `fedmqtt-admin reload`, enroll, rotate and revoke rewrite it.\n"
        "# One block per account. A device writes only fl/<its federation>/updates/<its id>\n"
        "# and fl/<its federation>/status/<its id> and reads fl/<its federation>/model,\n"
        "# .../model/onnx and .../plan; an aggregator account reads and writes its own\n"
        "# federation's topics only. Clients matched by no block may do nothing.\n"
    ]
    for fed in sorted(aggregators.keys() | devices.keys()):
        check_id("federation", fed)
        users = sorted(aggregators.get(fed, ()))
        ids = sorted(devices.get(fed, ()))
        parts.append(
            f"# ---------------- federation {fed}: "
            f"{len(users)} aggregator account(s), {len(ids)} device(s)\n"
        )
        for user in users:
            parts.append(agg_block.format(federation=fed, aggregator_user=check_id("user", user)))
        for device_id in ids:
            parts.append(
                device_block.format(federation=fed, device=check_id("device id", device_id))
            )
    revoked = sorted(registry.revoked_devices())
    if revoked:
        parts.append("# ---------------- revoked devices: denied everything, granted nothing\n")
        parts.extend(f"user {check_id('device id', d)}\ntopic deny #\n" for d in revoked)
    return "\n".join(parts)


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
