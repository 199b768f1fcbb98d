"""The operator's record of the site: broker settings, aggregators and enrolled devices.

One small JSON file (``registry.json`` next to the CA key, root-only) rewritten atomically after
every change, so an interrupted ``enroll`` or ``revoke`` leaves either the old or the new record.
It is the source from which the broker's ACL and CRL are regenerated: those files are outputs,
never edited by hand, so a revoked device cannot come back because someone restored an old ACL.
Secrets are not stored here (password hashes live in the broker's password file, keys in their
own 0600 files), except each federation's shared-subscription group name, which the
aggregator's config holds too: kept here so that re-running ``aggregator-setup`` on a replaced
``aggregator.toml`` writes the same group again.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from fedmqtt.errors import ConfigError
from fedmqtt.fsutil import atomic_write_bytes

FORMAT: Final = 1
FILENAME: Final = "registry.json"
Identity = Literal["password", "certificate"]
IDENTITIES: Final[tuple[Identity, ...]] = ("password", "certificate")
ACTIVE: Final = "active"
REVOKED: Final = "revoked"


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


@dataclass
class BrokerSettings:
    """Where the broker's files live and how to make Mosquitto re-read them."""

    dir: str = "/etc/mosquitto/fedmqtt"
    host: str = ""
    port: int = 8883
    identity: Identity = "password"
    # "systemctl:<unit>", "pidfile:<path>" or "none"
    reload: str = "systemctl:mosquitto"
    # Group that must be able to read the broker's files after it drops root ("" = leave as is).
    group: str = "mosquitto"
    # Port of the loopback listener without TLS for an aggregator on the broker's host; 0 = none.
    local_port: int = 0


@dataclass
class Aggregator:
    """A broker account allowed to consume one federation's updates and publish its model."""

    federation: str
    user: str
    config: str = ""
    devices_dir: str = ""
    signing_key: str = ""  # path of its Ed25519 key; workers of one federation share it
    public_key: str = ""  # Ed25519, hex: pinned in every device bundle
    cert_serial: str | None = None  # its client certificate (certificate identity)


@dataclass
class Device:
    federation: str
    identity: Identity
    auth: str
    status: str = ACTIVE
    enrolled_at: str = field(default_factory=now_iso)
    rotated_at: str | None = None
    revoked_at: str | None = None
    cert_serial: str | None = None
    cert_expires: str | None = None
    # The enrollment's agent.toml options (data source, paths, interval), reused by rotate.
    options: dict[str, Any] = field(default_factory=dict)
    # Tags (enroll --tag key=value): in agent.toml and <devices_dir>/<id>.tags for the plan.
    tags: dict[str, str] = field(default_factory=dict)
    # The edge broker its bundle connects to ("" = the central broker).
    edge: str = ""


@dataclass
class Edge:
    """An edge broker: serves one federation's devices and bridges to the central broker.

    Its files (``mosquitto.conf`` with the bridge section, certificates, ``passwd``, ``acl``,
    ``crl.pem``) are rendered into ``dir`` by ``fedmqtt-admin edge-config`` and re-rendered on
    every change to the devices, so a revocation reaches the edge at its next reload."""

    federation: str
    dir: str
    host: str = ""  # the name devices dial
    port: int = 8883
    central_host: str = ""
    central_port: int = 8883
    # "systemctl:<unit>", "pidfile:<path>" or "none": how fedmqtt-admin reloads the edge.
    reload: str = "none"
    group: str = "mosquitto"
    status: str = ACTIVE
    cert_serial: str | None = None  # the bridge's client certificate (certificate identity)
    revoked_at: str | None = None
    created_at: str = field(default_factory=now_iso)


@dataclass
class Registry:
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    aggregators: list[Aggregator] = field(default_factory=list)
    devices: dict[str, Device] = field(default_factory=dict)
    # Every client certificate serial ever revoked (hex -> ISO time): the CRL is built from it.
    revoked_serials: dict[str, str] = field(default_factory=dict)
    # Federation -> the secret [scaleout] group its aggregators subscribe with.
    scaleout_groups: dict[str, str] = field(default_factory=dict)
    # Edge id (= its bridge's account at the central broker) -> edge broker.
    edges: dict[str, Edge] = field(default_factory=dict)

    # ------------------------------------------------------------------ queries

    def federations(self) -> list[str]:
        return sorted({a.federation for a in self.aggregators})

    def aggregators_of(self, federation: str) -> list[Aggregator]:
        return [a for a in self.aggregators if a.federation == federation]

    def aggregator_users(self) -> set[str]:
        return {a.user for a in self.aggregators}

    def active_devices(self) -> dict[str, Device]:
        return {k: d for k, d in self.devices.items() if d.status == ACTIVE}

    def revoked_devices(self) -> dict[str, Device]:
        return {k: d for k, d in self.devices.items() if d.status == REVOKED}

    def active_edges(self) -> dict[str, Edge]:
        return {k: e for k, e in self.edges.items() if e.status == ACTIVE}

    def edge(self, edge_id: str) -> Edge:
        try:
            return self.edges[edge_id]
        except KeyError:
            raise ConfigError(f"no edge broker {edge_id!r} in the registry") from None

    def device(self, device_id: str) -> Device:
        try:
            return self.devices[device_id]
        except KeyError:
            raise ConfigError(f"no device {device_id!r} in the registry") from None

    # ------------------------------------------------------------------ persistence

    @classmethod
    def load(cls, directory: Path) -> Registry:
        path = directory / FILENAME
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ConfigError(f"{path}: not a fedmqtt-admin registry (format {FORMAT})")
        try:
            return cls(
                broker=BrokerSettings(**raw.get("broker", {})),
                aggregators=[Aggregator(**a) for a in raw.get("aggregators", [])],
                devices={k: Device(**v) for k, v in raw.get("devices", {}).items()},
                revoked_serials=dict(raw.get("revoked_serials", {})),
                scaleout_groups=dict(raw.get("scaleout_groups", {})),
                edges={k: Edge(**v) for k, v in raw.get("edges", {}).items()},
            )
        except TypeError as e:
            raise ConfigError(f"{path}: unexpected content ({e})") from None

    def save(self, directory: Path) -> None:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "broker": asdict(self.broker),
            "aggregators": [asdict(a) for a in self.aggregators],
            "devices": {k: asdict(v) for k, v in sorted(self.devices.items())},
            "revoked_serials": dict(sorted(self.revoked_serials.items())),
            "scaleout_groups": dict(sorted(self.scaleout_groups.items())),
            "edges": {k: asdict(v) for k, v in sorted(self.edges.items())},
        }
        data = (json.dumps(doc, indent=2) + "\n").encode()
        atomic_write_bytes(directory / FILENAME, data, mode=0o600)
