"""The operator's actions: CA, broker certificate and config, aggregator account, devices.

A *site* is the admin directory (default ``/etc/fedmqtt-admin``, mode 0700): the CA key and
certificate and ``registry.json``. Everything the broker and the aggregator read is derived
from it and written into their own directories with the ownership they need:

* broker directory (``registry.broker.dir``): certificates, ``passwd``, ``acl``, ``crl.pem``,
  ``mosquitto.conf`` -- 0640 root:mosquitto;
* aggregator: its Ed25519 signing key, broker credentials and ``devices_dir/<id>.chacha|.hmac|.pub``
  -- owned by the aggregator's service user;
* an enrollment bundle per device: ``agent.toml`` plus the files it names, to be installed
  into ``/etc/fedmqtt-agent`` by ``scripts/install-agent --bundle``.

Every change is ordered so that a crash part-way leaves nothing that grants more access than
before: new secrets are written first, the registry next, and the broker is reloaded last;
revocation removes credentials and keys before recording the device as revoked, and the ACL
deny and CRL entry are regenerated from the registry on every run.
"""

from __future__ import annotations

import datetime as dt
import secrets
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from fedmqtt.admin import brokerconf, passwd, pki, tomlconf
from fedmqtt.admin.files import Owner, make_dir, write_file
from fedmqtt.admin.registry import (
    ACTIVE,
    REVOKED,
    Aggregator,
    BrokerSettings,
    Device,
    Edge,
    Identity,
    Registry,
    now_iso,
)
from fedmqtt.cohort import TAGS_SUFFIX, check_tag_map, tags_file_bytes
from fedmqtt.errors import ConfigError
from fedmqtt.fsutil import remove_durably
from fedmqtt.signing import (
    ALGORITHMS,
    DEFAULT_UPDATE_AUTH,
    DEVICE_KEY_SUFFIX,
    MAC_KEY_BYTES,
    SHARED_SECRET_ALGS,
    Ed25519Signer,
)
from fedmqtt.topics import PUBLIC_SHARED_GROUP, check_id, new_shared_group

DEFAULT_DIR: Final = Path("/etc/fedmqtt-admin")
AGENT_ETC: Final = "/etc/fedmqtt-agent"
AGENT_STATE: Final = "/var/lib/fedmqtt-agent"
# Bundle file names (installed under AGENT_ETC with the same names).
B_CONFIG: Final = "agent.toml"
B_CA: Final = "ca.crt"
B_AGG_PUB: Final = "aggregator.pub"
B_UPDATE_KEY: Final = "update.key"
B_PASSWORD: Final = "broker.password"
B_CERT: Final = "client.crt"
B_KEY: Final = "client.key"
SECRET_FILES: Final = (B_UPDATE_KEY, B_PASSWORD, B_KEY)


@dataclass
class AgentOptions:
    """What goes into a device's agent.toml besides identity and keys (kept for rotation)."""

    data_source: str = "csv"
    data_path: str = "/srv/fedmqtt-agent"
    label_column: str = "label"
    interval_s: float = 300.0
    etc_dir: str = AGENT_ETC
    state_dir: str = AGENT_STATE

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AgentOptions:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class DeviceRow:
    id: str
    federation: str
    status: str
    identity: str
    auth: str
    enrolled_at: str
    revoked_at: str | None
    cert_expires: str | None
    tags: dict[str, str] = field(default_factory=dict)
    edge: str = ""  # the edge broker it connects to ("" = the central broker)


class Site:
    """Load with :meth:`open`; every public method leaves registry and files consistent."""

    def __init__(self, directory: Path, registry: Registry) -> None:
        self.dir = Path(directory)
        self.registry = registry

    @classmethod
    def open(cls, directory: Path) -> Site:
        return cls(directory, Registry.load(Path(directory)))

    # ------------------------------------------------------------------ helpers

    @property
    def broker(self) -> BrokerSettings:
        return self.registry.broker

    @property
    def broker_dir(self) -> Path:
        return Path(self.broker.dir)

    def _broker_owner(self) -> Owner:
        return Owner.group_if_exists(self.broker.group)

    def _write_broker_file(self, name: str, data: bytes) -> None:
        write_file(self.broker_dir / name, data, mode=0o640, owner=self._broker_owner())

    def _save(self) -> None:
        self.registry.save(self.dir)

    def ca(self) -> pki.CA:
        return pki.CA.load(self.dir)

    def has_ca(self) -> bool:
        return (self.dir / pki.CA_KEY).exists()

    # ------------------------------------------------------------------ CA and broker

    def init_ca(
        self, common_name: str = "fedmqtt CA", days: int = pki.CA_DAYS, force: bool = False
    ) -> pki.CA:
        make_dir(self.dir, mode=0o700)
        if self.has_ca() and not force:
            raise ConfigError(
                f"a CA already exists in {self.dir}; replacing it invalidates every certificate"
                " issued so far (use --force if that is what you want)"
            )
        ca = pki.CA.create(common_name, days)
        ca.save(self.dir)
        self._save()
        return ca

    def broker_cert(
        self, hosts: list[str], ips: list[str], days: int = pki.LEAF_DAYS, localhost: bool = True
    ) -> Path:
        """Issue the broker's certificate (SAN: hosts, IPs, and loopback for a local aggregator)."""
        ca = self.ca()
        if localhost:
            hosts = [*hosts, *(h for h in ("localhost",) if h not in hosts)]
            ips = [*ips, *(a for a in ("127.0.0.1", "::1") if a not in ips)]
        key, cert = ca.issue_server(hosts, ips, days)
        make_dir(self.broker_dir, mode=0o750, owner=self._broker_owner())
        self._write_broker_file(brokerconf.KEY, pki.key_pem(key))
        self._write_broker_file(brokerconf.CERT, pki.cert_pem(cert))
        self._write_broker_file(brokerconf.CA_CERT, pki.cert_pem(ca.cert))
        public = [h for h in hosts if h != "localhost"] or [
            a for a in ips if a not in ("127.0.0.1", "::1")
        ]
        if public and not self.broker.host:
            self.broker.host = public[0]
        self._save()
        return self.broker_dir / brokerconf.CERT

    def configure_broker(
        self,
        *,
        identity: Identity,
        port: int,
        max_packet_size: int,
        bind_address: str = "",
        data_dir: Path = Path("/var/lib/mosquitto"),
        pid_file: Path = Path("/run/mosquitto/mosquitto.pid"),
        log_dest: str = "file /var/log/mosquitto/mosquitto.log",
        reload: str | None = None,
        host: str | None = None,
        local_port: int | None = None,
    ) -> Path:
        """Render mosquitto.conf into the broker directory and (re)generate passwd/acl/crl.

        ``local_port``: the loopback listener without TLS for the aggregator (0 = none, None =
        keep the registry's setting, so that re-rendering, e.g. by the installer, keeps it)."""
        b = self.broker
        if b.identity != identity:
            other = [k for k, d in self.registry.active_devices().items() if d.identity != identity]
            if other:
                raise ConfigError(
                    f"{len(other)} active device(s) use {b.identity} identity (e.g. {other[0]});"
                    " rotate or revoke them before switching the broker to " + identity
                )
        local = b.local_port if local_port is None else local_port
        b.identity, b.port = identity, port
        if reload is not None:
            b.reload = reload
        if host:
            b.host = host
        make_dir(self.broker_dir, mode=0o750, owner=self._broker_owner())
        text = brokerconf.render_config(
            identity,
            port=port,
            bind_address=bind_address,
            broker_dir=self.broker_dir,
            data_dir=data_dir,
            max_packet_size=max_packet_size,
            pid_file=pid_file,
            log_dest=log_dest,
            local_port=local,
        )
        b.local_port = local
        self._write_broker_file(brokerconf.CONF, text.encode())
        if not (self.broker_dir / brokerconf.PASSWD).exists():
            self._write_broker_file(brokerconf.PASSWD, b"")
        self._save()
        self.sync_broker_files()
        return self.broker_dir / brokerconf.CONF

    def sync_broker_files(self) -> None:
        """Regenerate the ACL and CRL from the registry (idempotent), on the central broker and
        on every active edge broker (with the device passwords an edge needs)."""
        make_dir(self.broker_dir, mode=0o750, owner=self._broker_owner())
        self._write_broker_file(brokerconf.ACL, brokerconf.render_acl(self.registry).encode())
        crl: bytes | None = None
        ca_pem = b""
        if self.has_ca():
            ca = self.ca()
            revoked = {
                s: dt.datetime.fromisoformat(t) for s, t in self.registry.revoked_serials.items()
            }
            crl, ca_pem = ca.crl(revoked), pki.cert_pem(ca.cert)
            self._write_broker_file(brokerconf.CRL, crl)
            self._write_broker_file(brokerconf.CA_CERT, ca_pem)
        for edge_id in self.registry.active_edges():
            self._sync_edge(edge_id, crl, ca_pem)

    def _sync_edge(self, edge_id: str, crl: bytes | None, ca_pem: bytes) -> None:
        """An edge's acl, passwd (its federation's active devices, as hashed on the central
        broker) and crl.pem."""
        edge = self.registry.edge(edge_id)
        owner = Owner.group_if_exists(edge.group)
        edge_dir = Path(edge.dir)
        make_dir(edge_dir, mode=0o750, owner=owner)

        def put(name: str, data: bytes) -> None:
            write_file(edge_dir / name, data, mode=0o640, owner=owner)

        put(brokerconf.ACL, brokerconf.render_edge_acl(self.registry, edge_id).encode())
        devices = {
            k for k, d in self.registry.active_devices().items() if d.federation == edge.federation
        }
        put(
            brokerconf.PASSWD,
            passwd.dumps({u: h for u, h in self._passwd().items() if u in devices}),
        )
        if crl is not None:
            put(brokerconf.CRL, crl)
            put(brokerconf.CA_CERT, ca_pem)

    def reload_broker(self, *, edges: bool = True) -> str:
        """Reload the central broker, then (``edges``) every active edge broker that has a
        reload method: a revocation is not done until every broker a device can reach has
        applied it."""
        done = [brokerconf.reload_broker(self.broker.reload)]
        if not edges:
            return done[0]
        for edge_id, edge in sorted(self.registry.active_edges().items()):
            if edge.reload != "none":
                done.append(f"edge {edge_id}: {brokerconf.reload_broker(edge.reload)}")
            else:
                done.append(f"edge {edge_id}: not reloaded (reload = none): reload it yourself")
        return "\n".join(done)

    # ------------------------------------------------------------------ edge brokers

    def configure_edge(
        self,
        edge_id: str,
        *,
        edge_dir: Path,
        federation: str | None = None,
        hosts: list[str],
        ips: list[str],
        port: int = 8883,
        bind_address: str = "",
        central_host: str | None = None,
        central_port: int | None = None,
        max_packet_size: int,
        data_dir: Path = Path("/var/lib/mosquitto"),
        pid_file: Path = Path("/run/mosquitto/mosquitto.pid"),
        log_dest: str = "file /var/log/mosquitto/mosquitto.log",
        reload: str = "none",
        group: str = "mosquitto",
        restart_timeout: tuple[int, int] = (5, 60),
        days: int = pki.LEAF_DAYS,
    ) -> Path:
        """Register edge broker ``edge_id`` and render its directory: ``mosquitto.conf`` (the
        central broker's listener, access and queue settings, plus the bridge section), its
        TLS certificate for ``hosts``/``ips`` (and loopback), the bridge's identity at the
        central broker (a client certificate with CN ``edge_id``, or a password), ``ca.crt``,
        ``crl.pem``, ``acl`` and ``passwd``. Re-running it renews the certificates and the
        bridge's credentials (the old bridge certificate is revoked). The central broker's ACL
        gets the bridge's block: reload the central broker, then start the edge."""
        check_id("edge id", edge_id)
        if edge_id in self.registry.devices or edge_id in self.registry.aggregator_users():
            raise ConfigError(f"{edge_id!r} is a device or aggregator account; pick another id")
        old = self.registry.edges.get(edge_id)
        if old is not None and old.status != ACTIVE:
            raise ConfigError(f"edge {edge_id!r} was revoked; give the new edge another id")
        fed = self._federation_for(federation)
        if old is not None and old.federation != fed:
            raise ConfigError(
                f"edge {edge_id!r} serves federation {old.federation!r}; an edge serves one"
            )
        if not hosts and not ips:
            raise ConfigError("give the edge broker's name with --host (and/or --ip)")
        identity = self.broker.identity
        edge = Edge(
            federation=fed,
            dir=str(edge_dir.resolve()),
            host=(hosts or ips)[0],
            port=port,
            central_host=central_host or self.broker.host,
            central_port=central_port or self.broker.port,
            reload=reload,
            group=group,
        )
        if old is not None:
            edge.created_at = old.created_at
        owner = Owner.group_if_exists(group)
        out = Path(edge.dir)
        make_dir(out, mode=0o750, owner=owner)

        def put(name: str, data: bytes) -> None:
            write_file(out / name, data, mode=0o640, owner=owner)

        ca = self.ca()
        hosts = [*hosts, *(h for h in ("localhost",) if h not in hosts)]
        ips = [*ips, *(a for a in ("127.0.0.1", "::1") if a not in ips)]
        key, cert = ca.issue_server(hosts, ips, days)
        put(brokerconf.KEY, pki.key_pem(key))
        put(brokerconf.CERT, pki.cert_pem(cert))
        put(brokerconf.CA_CERT, pki.cert_pem(ca.cert))
        bridge_password: str | None = None
        if identity == "certificate":
            bkey, bcert = ca.issue_client(edge_id, days)
            put(brokerconf.BRIDGE_KEY, pki.key_pem(bkey))
            put(brokerconf.BRIDGE_CERT, pki.cert_pem(bcert))
            edge.cert_serial = pki.serial_hex(bcert)
            self._drop_password(edge_id)
        else:
            bridge_password = self._set_password(edge_id)
        if old is not None and old.cert_serial and old.cert_serial != edge.cert_serial:
            self.registry.revoked_serials[old.cert_serial] = now_iso()
        text = brokerconf.render_config(
            identity,
            port=port,
            bind_address=bind_address,
            broker_dir=out,
            data_dir=data_dir,
            max_packet_size=max_packet_size,
            pid_file=pid_file,
            log_dest=log_dest,
        ) + brokerconf.render_bridge(
            edge_id,
            edge,
            identity=identity,
            password=bridge_password,
            restart_timeout=restart_timeout,
        )
        put(brokerconf.CONF, text.encode())
        self.registry.edges[edge_id] = edge
        self._save()
        self.sync_broker_files()
        return out / brokerconf.CONF

    def revoke_edge(self, edge_id: str) -> list[str]:
        """Cut an edge broker's bridge off the central broker: its password removed or its
        certificate in the CRL, and ``topic deny #`` for its account. Reload the central broker
        afterwards; the devices it served must be moved to another broker."""
        edge = self.registry.edge(edge_id)
        if edge.status != ACTIVE:
            raise ConfigError(f"edge {edge_id!r} is already revoked")
        done: list[str] = []
        if self._drop_password(edge_id):
            done.append("bridge password removed")
        if edge.cert_serial:
            self.registry.revoked_serials[edge.cert_serial] = now_iso()
            done.append(f"bridge certificate {edge.cert_serial} added to the CRL")
        edge.status, edge.revoked_at = REVOKED, now_iso()
        self._save()
        self.sync_broker_files()
        done.append("central ACL denies it everything")
        stranded = sorted(k for k, d in self.registry.active_devices().items() if d.edge == edge_id)
        if stranded:
            done.append(
                f"{len(stranded)} device(s) connect to it: {', '.join(stranded)}; move each "
                "with `fedmqtt-admin rotate ID --out DIR --edge OTHER` (or --central)"
            )
        return done

    # ------------------------------------------------------------------ password file

    def _passwd(self) -> dict[str, str]:
        return passwd.read(self.broker_dir / brokerconf.PASSWD)

    def _set_password(self, user: str) -> str:
        entries = self._passwd()
        password = passwd.new_password()
        entries[user] = passwd.hash_password(password)
        self._write_broker_file(brokerconf.PASSWD, passwd.dumps(entries))
        return password

    def _drop_password(self, user: str) -> bool:
        entries = self._passwd()
        if entries.pop(user, None) is None:
            return False
        self._write_broker_file(brokerconf.PASSWD, passwd.dumps(entries))
        return True

    # ------------------------------------------------------------------ aggregator

    def setup_aggregator(
        self, config: Path, *, owner: str | None = None, user: str | None = None
    ) -> Aggregator:
        """Signing key, device-key directory, broker account and secret scale-out group for
        the aggregator of ``config``; idempotent (an existing signing key and group are kept,
        the broker secret renewed)."""
        cfg = tomlconf.AggregatorConfig.load(config)
        account = user or cfg.username
        check_id("aggregator user", account)
        check_id("federation", cfg.federation)
        if account in self.registry.devices or account in self.registry.edges:
            raise ConfigError(
                f"{account!r} is a device or edge id; pick another aggregator user name"
            )
        elsewhere = sorted(
            a.federation
            for a in self.registry.aggregators
            if a.user == account and a.federation != cfg.federation
        )
        if elsewhere:
            raise ConfigError(
                f"broker account {account!r} already serves federation {elsewhere[0]!r}; an "
                f"account reads and writes one federation only, so give federation "
                f"{cfg.federation!r} its own ([broker] username or --user)"
            )
        own = Owner.named(owner) if owner else Owner()
        new_pem: bytes | None = None
        if cfg.signing_key.exists():
            signer = Ed25519Signer.load(cfg.signing_key)
        else:
            signer, new_pem = _new_ed25519()
        previous = next(
            (a for a in self.registry.aggregators_of(cfg.federation) if a.user == account), None
        )
        agg = Aggregator(
            federation=cfg.federation,
            user=account,
            config=str(cfg.path.resolve()),
            devices_dir=str(cfg.devices_dir.resolve()),
            signing_key=str(cfg.signing_key.resolve()),
            public_key=signer.verifier().public_hex(),
        )
        # Checked before anything is written: devices pin one key per federation.
        for other in self.registry.aggregators_of(agg.federation):
            if other.user == agg.user or other.public_key == agg.public_key:
                continue
            if other.signing_key != agg.signing_key:
                raise ConfigError(
                    f"federation {agg.federation!r} already has aggregator {other.user!r} with "
                    f"another signing key ({other.signing_key}): devices pin one key, so every "
                    f"worker of a federation must use the same signing_key file"
                )
            other.public_key = agg.public_key  # the shared key file was replaced (rotation)

        group = self._scaleout_group(cfg)
        if new_pem is not None:
            write_file(cfg.signing_key, new_pem, mode=0o600, owner=own)
        else:
            own.apply(cfg.signing_key)  # a re-run with --owner hands existing keys over too
        make_dir(cfg.devices_dir, mode=0o700, owner=own)
        for key in cfg.devices_dir.iterdir():
            own.apply(key)
        agg.cert_serial = self._broker_credentials(cfg, account, own)
        if (
            previous is not None
            and previous.cert_serial
            and previous.cert_serial != agg.cert_serial
        ):
            self.registry.revoked_serials[previous.cert_serial] = now_iso()
        if cfg.ca_file is not None:
            write_file(cfg.ca_file, pki.cert_pem(self.ca().cert), mode=0o644, owner=own)
        self.registry.aggregators = [
            a
            for a in self.registry.aggregators
            if (a.federation, a.user) != (agg.federation, agg.user)
        ] + [agg]
        self.registry.scaleout_groups[agg.federation] = group
        self._save()
        self.sync_broker_files()
        return agg

    def _scaleout_group(self, cfg: tomlconf.AggregatorConfig) -> str:
        """The federation's shared-subscription group, written into ``[scaleout] group`` of the
        config unless it names one other than the public default already: the one recorded for
        the federation, or a new random one. Mosquitto 2.0 grants any client's SUBSCRIBE, so
        a known group lets any device take a share of the updates (docs/security.md, ACL)."""
        current = cfg.scaleout_group
        if current is not None and current != PUBLIC_SHARED_GROUP:
            return current
        group = self.registry.scaleout_groups.get(cfg.federation) or new_shared_group()
        path = cfg.path.resolve()
        text = tomlconf.with_scaleout_group(path.read_text(), group, path)
        st = path.stat()
        write_file(path, text.encode(), mode=stat.S_IMODE(st.st_mode), owner=Owner.of(path))
        return group

    def _broker_credentials(
        self, cfg: tomlconf.AggregatorConfig, account: str, own: Owner
    ) -> str | None:
        """New broker credentials for the aggregator; the certificate serial, if one."""
        if self.broker.identity == "password":
            if cfg.password_file is None:
                raise ConfigError(
                    f"{cfg.path}: [broker] password_file is needed (password identity)"
                )
            password = self._set_password(account)
            write_file(cfg.password_file, (password + "\n").encode(), mode=0o600, owner=own)
            return None
        if cfg.cert_file is None or cfg.key_file is None:
            raise ConfigError(
                f"{cfg.path}: [broker] cert_file and key_file are needed (certificate identity)"
            )
        key, cert = self.ca().issue_client(account)
        write_file(cfg.key_file, pki.key_pem(key), mode=0o600, owner=own)
        write_file(cfg.cert_file, pki.cert_pem(cert), mode=0o644, owner=own)
        self._drop_password(account)
        return pki.serial_hex(cert)

    # ------------------------------------------------------------------ devices

    def _federation_for(self, federation: str | None) -> str:
        feds = self.registry.federations()
        if federation is None:
            if len(feds) != 1:
                raise ConfigError(
                    "say which federation with --federation (known: "
                    + (", ".join(feds) or "none; run fedmqtt-admin aggregator-setup first")
                    + ")"
                )
            return feds[0]
        if federation not in feds:
            raise ConfigError(
                f"federation {federation!r} has no aggregator; run "
                "fedmqtt-admin aggregator-setup with its aggregator.toml first"
            )
        return federation

    def _aggregator(self, federation: str) -> Aggregator:
        return self.registry.aggregators_of(federation)[0]

    def _devices_dirs(self, federation: str) -> list[Path]:
        """Every distinct devices_dir of the federation's aggregator workers."""
        dirs = dict.fromkeys(Path(a.devices_dir) for a in self.registry.aggregators_of(federation))
        for d in dirs:
            if not d.is_dir():
                raise ConfigError(
                    f"the aggregator's devices_dir {d} does not exist; run "
                    "fedmqtt-admin aggregator-setup"
                )
        return list(dirs)

    def enroll(
        self,
        device_id: str,
        out: Path,
        *,
        federation: str | None = None,
        auth: str = DEFAULT_UPDATE_AUTH,
        options: AgentOptions | None = None,
        reenroll: bool = False,
        tags: Mapping[str, str] | None = None,
        edge: str = "",
    ) -> Path:
        """Create a device's credentials and update key, and its bundle in ``out``; ``tags``
        go into its agent.toml and, for the plan's selection, ``<devices_dir>/<id>.tags``; with
        ``edge``, the bundle connects to that edge broker (from the registry) instead of the
        central broker."""
        check_id("device id", device_id)
        if auth not in ALGORITHMS:
            raise ConfigError(f"update authentication must be one of {ALGORITHMS}")
        if device_id in self.registry.aggregator_users():
            raise ConfigError(f"{device_id!r} is an aggregator account name")
        if device_id in self.registry.edges:
            raise ConfigError(f"{device_id!r} is an edge broker's account name")
        old = self.registry.devices.get(device_id)
        if old is not None and old.status == ACTIVE:
            raise ConfigError(f"{device_id!r} is already enrolled; use rotate for new keys")
        if old is not None and not reenroll:
            raise ConfigError(
                f"{device_id!r} was revoked; pass --reenroll to enroll that id"
                " again with new credentials"
            )
        fed = self._federation_for(federation)
        if not self.broker.host:
            raise ConfigError(
                "the broker's host name is unknown: run fedmqtt-admin broker-cert"
                " --host NAME (or broker-config --host NAME)"
            )
        opts = options or AgentOptions()
        device = Device(
            federation=fed,
            identity=self.broker.identity,
            auth=auth,
            tags=check_tag_map(dict(tags or {})),
            edge=edge,
        )
        self._issue(device_id, device, out, opts)
        self.registry.devices[device_id] = device
        self._save()
        self.sync_broker_files()  # a re-enrolled id loses its deny block
        return out

    def rotate(
        self,
        device_id: str,
        out: Path,
        *,
        auth: str | None = None,
        options: AgentOptions | None = None,
        edge: str | None = None,
    ) -> Path:
        """New broker credentials and update key for an enrolled device; the old ones stop
        working at the next broker reload (credentials) and at once (update key). ``edge``
        moves it to that edge broker ("" = the central broker; None = where it is)."""
        device = self.registry.device(device_id)
        if device.status != ACTIVE:
            raise ConfigError(f"{device_id!r} is revoked; enroll it again with --reenroll")
        if device.identity != self.broker.identity:
            device.identity = self.broker.identity
        old_serial = device.cert_serial
        if auth is not None:
            device.auth = auth
        if edge is not None:
            device.edge = edge
        self._issue(device_id, device, out, options or AgentOptions.from_dict(device.options))
        if old_serial and old_serial != device.cert_serial:
            self.registry.revoked_serials[old_serial] = now_iso()
        device.rotated_at = now_iso()
        self._save()
        self.sync_broker_files()
        return out

    def _endpoint(self, device: Device) -> tuple[str, int]:
        """Where the device's bundle connects: its edge broker, or the central broker. An edge
        broker's certificate is issued by the site's CA, the CA every bundle carries."""
        if not device.edge:
            return self.broker.host, self.broker.port
        e = self.registry.edge(device.edge)
        if e.status != ACTIVE:
            raise ConfigError(
                f"edge {device.edge!r} is revoked; give another edge with --edge or --central"
            )
        if e.federation != device.federation:
            raise ConfigError(
                f"edge {device.edge!r} serves federation {e.federation!r}, "
                f"not {device.federation!r}"
            )
        return e.host, e.port

    def _issue(self, device_id: str, device: Device, out: Path, opts: AgentOptions) -> None:
        host, port = self._endpoint(device)
        agg = self._aggregator(device.federation)
        key_dirs = self._devices_dirs(device.federation)
        _fresh_dir(out)
        etc = opts.etc_dir
        write_file(out / B_CA, pki.cert_pem(self.ca().cert), mode=0o644)
        write_file(out / B_AGG_PUB, (agg.public_key + "\n").encode(), mode=0o644)

        # Update-authentication key: the device keeps the secret, the aggregator the verifier
        # (owned like its devices_dir, i.e. by the aggregator's service user).
        for d in key_dirs:
            for suffix in DEVICE_KEY_SUFFIX.values():
                remove_durably(d / f"{device_id}{suffix}")
        suffix = DEVICE_KEY_SUFFIX[device.auth]
        if device.auth in SHARED_SECRET_ALGS:
            secret = (secrets.token_bytes(MAC_KEY_BYTES).hex() + "\n").encode()
            write_file(out / B_UPDATE_KEY, secret, mode=0o600)
            for d in key_dirs:
                write_file(d / f"{device_id}{suffix}", secret, mode=0o600, owner=Owner.of(d))
        else:
            signer, pem = _new_ed25519()
            write_file(out / B_UPDATE_KEY, pem, mode=0o600)
            pub = (signer.verifier().public_hex() + "\n").encode()
            for d in key_dirs:
                write_file(d / f"{device_id}{suffix}", pub, mode=0o644, owner=Owner.of(d))
        for d in key_dirs:
            tags_path = d / f"{device_id}{TAGS_SUFFIX}"
            if device.tags:
                data = tags_file_bytes(device.tags)
                write_file(tags_path, data, mode=0o644, owner=Owner.of(d))
            else:
                remove_durably(tags_path)

        broker: dict[str, tomlconf.TomlValue] = {"host": host, "port": port}
        if device.identity == "password":
            password = self._set_password(device_id)
            write_file(out / B_PASSWORD, (password + "\n").encode(), mode=0o600)
            broker |= {"username": device_id, "password_file": f"{etc}/{B_PASSWORD}"}
            device.cert_serial = device.cert_expires = None
        else:
            key, cert = self.ca().issue_client(device_id)
            write_file(out / B_KEY, pki.key_pem(key), mode=0o600)
            write_file(out / B_CERT, pki.cert_pem(cert), mode=0o644)
            broker |= {"cert_file": f"{etc}/{B_CERT}", "key_file": f"{etc}/{B_KEY}"}
            device.cert_serial = pki.serial_hex(cert)
            device.cert_expires = cert.not_valid_after_utc.isoformat()
            self._drop_password(device_id)
        broker |= {
            "tls": True,
            "ca_file": f"{etc}/{B_CA}",
            "keepalive": 60,
            "session_expiry_s": 86400,
        }
        tables: dict[str, dict[str, tomlconf.TomlValue]] = {
            "device": {
                "id": device_id,
                "federation": device.federation,
                "state_dir": opts.state_dir,
            },
            **({"device.tags": dict(device.tags)} if device.tags else {}),
            "broker": broker,
            "security": {
                "aggregator_public_key": f"{etc}/{B_AGG_PUB}",
                "update_auth": device.auth,
                "update_key": f"{etc}/{B_UPDATE_KEY}",
            },
            "data": _data_table(opts),
            "training": {"interval_s": float(opts.interval_s)},
        }
        header = (
            f"fedmqtt agent configuration for device {device_id!r} in federation "
            f"{device.federation!r},\nwritten by fedmqtt-admin on {now_iso()}. Install this "
            f"directory with:\n  sudo scripts/install-agent --bundle <this directory>\n"
            f"Edit [data] to point at this device's training data (readable by the "
            f"fedmqtt-agent user).\nEvery option: edge_agent/agent.example.toml."
        )
        write_file(out / B_CONFIG, tomlconf.dumps(tables, header).encode(), mode=0o644)
        device.options = asdict(opts)

    def revoke(self, device_id: str) -> list[str]:
        """Remove the device's broker credentials and update key and deny it in the ACL
        (and the CRL); returns what was done. Reload the broker afterwards."""
        device = self.registry.device(device_id)
        if device.status == REVOKED:
            raise ConfigError(f"{device_id!r} is already revoked")
        done: list[str] = []
        if self._drop_password(device_id):
            done.append("broker password removed")
        if device.cert_serial:
            self.registry.revoked_serials[device.cert_serial] = now_iso()
            done.append(f"certificate {device.cert_serial} added to the CRL")
        for d in dict.fromkeys(
            Path(a.devices_dir) for a in self.registry.aggregators_of(device.federation)
        ):
            for suffix in DEVICE_KEY_SUFFIX.values():
                path = d / f"{device_id}{suffix}"
                if path.exists():
                    remove_durably(path)
                    done.append(f"update key {path} deleted")
            remove_durably(d / f"{device_id}{TAGS_SUFFIX}")
        device.status, device.revoked_at = REVOKED, now_iso()
        self._save()
        self.sync_broker_files()
        done.append("ACL denies it everything")
        return done

    def aggregator_public_key(self, federation: str | None = None) -> str:
        return self._aggregator(self._federation_for(federation)).public_key

    def devices(self) -> list[DeviceRow]:
        return [
            DeviceRow(
                k,
                d.federation,
                d.status,
                d.identity,
                d.auth,
                d.enrolled_at,
                d.revoked_at,
                d.cert_expires,
                dict(d.tags),
                d.edge,
            )
            for k, d in sorted(self.registry.devices.items())
        ]


def _new_ed25519() -> tuple[Ed25519Signer, bytes]:
    """A fresh Ed25519 key as a signer and as PKCS#8 PEM (the format Ed25519Signer.load reads),
    so the PEM can be written with the owner the key's user needs."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Ed25519Signer(key), pem


def _data_table(opts: AgentOptions) -> dict[str, tomlconf.TomlValue]:
    if opts.data_source == "plugin":
        return {"source": "plugin", "plugin": opts.data_path}
    table: dict[str, tomlconf.TomlValue] = {"source": opts.data_source, "path": opts.data_path}
    if opts.data_source == "csv":
        table |= {"label_column": opts.label_column, "header": True}
    return table


def _fresh_dir(out: Path) -> None:
    """The bundle directory: created 0700, or reused only if empty (never mix two bundles)."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; give a new directory for the bundle")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    out.chmod(0o700)
