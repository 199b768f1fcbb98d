"""``fedmqtt-admin``: the operator's command line (see docs/deploy.md for the whole walkthrough).

    fedmqtt-admin ca init
    fedmqtt-admin broker-cert --host broker.example.org
    fedmqtt-admin broker-config --aggregator-config /etc/fedmqtt-aggregator/aggregator.toml
    fedmqtt-admin aggregator-setup --aggregator-config /etc/fedmqtt-aggregator/aggregator.toml \\
        --owner fedmqtt-aggregator
    fedmqtt-admin enroll pi-kitchen-01 --out ./pi-kitchen-01
    fedmqtt-admin list
    fedmqtt-admin rotate pi-kitchen-01 --out ./pi-kitchen-01-new
    fedmqtt-admin revoke pi-kitchen-01
    fedmqtt-admin edge-config site-a --host gw-a.example.org --edge-dir ./site-a \\
        --aggregator-config /etc/fedmqtt-aggregator/aggregator.toml
    fedmqtt-admin enroll pi-shed-07 --out ./pi-shed-07 --edge site-a

Exit status: 0 done; 1 refused or failed (the message says why and how to fix it); 2 usage.
A change the broker has not been told about (reload failed) is exit 1 with the reason, because
a revocation the broker has not applied is not a revocation yet.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from fedmqtt.admin import sizing
from fedmqtt.admin.registry import IDENTITIES
from fedmqtt.admin.site import DEFAULT_DIR, AgentOptions, Site
from fedmqtt.admin.tomlconf import AggregatorConfig
from fedmqtt.cohort import tag_map
from fedmqtt.errors import ConfigError
from fedmqtt.signing import ALGORITHMS, DEFAULT_UPDATE_AUTH

ENV_DIR = "FEDMQTT_ADMIN_DIR"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmqtt-admin",
        description="Operator tooling for a fedmqtt site: CA, broker, aggregator, devices.",
    )
    p.add_argument(
        "--dir",
        "--pki-dir",
        dest="dir",
        type=Path,
        default=Path(os.environ.get(ENV_DIR, str(DEFAULT_DIR))),
        help=f"admin directory with the CA and registry (default ${ENV_DIR} or {DEFAULT_DIR})",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    ca = sub.add_parser("ca", help="certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_cmd", required=True, metavar="ACTION")
    init = ca_sub.add_parser("init", help="create the CA (EC P-256, 10 years)")
    init.add_argument("--name", default="fedmqtt CA", help="CA common name")
    init.add_argument("--days", type=int, default=3650)
    init.add_argument("--force", action="store_true", help="replace an existing CA")

    bc = sub.add_parser("broker-cert", help="issue the broker's TLS certificate")
    bc.add_argument("--host", action="append", default=[], help="DNS name clients dial (repeat)")
    bc.add_argument("--ip", action="append", default=[], help="IP address clients dial (repeat)")
    bc.add_argument("--days", type=int, default=825)
    bc.add_argument(
        "--no-localhost",
        action="store_true",
        help="do not add localhost/127.0.0.1/::1 to the certificate",
    )
    _broker_location(bc)
    _reload_flag(bc)

    cfg = sub.add_parser("broker-config", help="render the production mosquitto.conf")
    cfg.add_argument(
        "--identity",
        choices=IDENTITIES,
        default=None,
        help="device identity: broker password (default) or client certificate",
    )
    cfg.add_argument("--port", type=int, default=None, help="TLS port (default 8883)")
    cfg.add_argument("--bind", default="", help="listen address (default: all interfaces)")
    cfg.add_argument(
        "--local-port",
        type=int,
        default=None,
        metavar="N",
        help="also listen on 127.0.0.1:N without TLS, for the aggregator on this host "
        "(password identity; 0 removes it; default: keep the previous setting, none at first)",
    )
    cfg.add_argument("--host", default=None, help="broker host name written into bundles")
    _process_args(cfg)
    cfg.add_argument(
        "--reload",
        dest="reload_how",
        default=None,
        metavar="HOW",
        help="how to reload the broker: systemctl:<unit> (default "
        "systemctl:mosquitto), pidfile:<path> or none",
    )
    _broker_location(cfg)
    _size_args(cfg)

    edge = sub.add_parser(
        "edge-config",
        help="register an edge broker and render its config with the bridge to the central broker",
    )
    edge.add_argument("edge_id", help="edge id: the bridge's account at the central broker")
    edge.add_argument(
        "--edge-dir",
        type=Path,
        required=True,
        help="where the edge broker's files go (copy them to the edge host's /etc/mosquitto/"
        "fedmqtt if it is another machine)",
    )
    edge.add_argument("--federation", default=None, help="the federation it serves")
    edge.add_argument("--host", action="append", default=[], help="DNS name devices dial")
    edge.add_argument("--ip", action="append", default=[], help="IP address devices dial")
    edge.add_argument("--port", type=int, default=8883, help="TLS port for devices (8883)")
    edge.add_argument("--bind", default="", help="listen address (default: all interfaces)")
    edge.add_argument(
        "--central-host",
        default=None,
        help="the central broker's name as in its certificate (default: the site's broker host)",
    )
    edge.add_argument(
        "--central-port", type=int, default=None, help="central TLS port (default: the site's)"
    )
    edge.add_argument(
        "--restart-timeout",
        type=int,
        nargs=2,
        default=(5, 60),
        metavar=("BASE", "CAP"),
        help="seconds before the bridge reconnects after a cut, backing off to CAP (5 60)",
    )
    _process_args(edge)
    edge.add_argument(
        "--reload",
        dest="reload_how",
        default="none",
        metavar="HOW",
        help="how fedmqtt-admin reloads this edge after enroll/rotate/revoke: "
        "systemctl:<unit>, pidfile:<path> or none (default: the operator does)",
    )
    edge.add_argument(
        "--group", default="mosquitto", help="group that must read the edge's files (mosquitto)"
    )
    _size_args(edge)
    _reload_flag(edge)

    erev = sub.add_parser("edge-revoke", help="cut an edge broker's bridge off the central broker")
    erev.add_argument("edge_id")
    _reload_flag(erev)

    size = sub.add_parser("size", help="print max_packet_size for a model")
    _size_args(size)

    agg = sub.add_parser(
        "aggregator-setup",
        help="aggregator signing key, devices dir, broker account and secret scale-out group",
    )
    agg.add_argument("--aggregator-config", type=Path, required=True, metavar="TOML")
    agg.add_argument(
        "--owner",
        default=None,
        help="service user that must own the aggregator's keys (fedmqtt-aggregator)",
    )
    agg.add_argument(
        "--user",
        default=None,
        help="broker account name (default: [broker] username of the config)",
    )
    _reload_flag(agg)

    enr = sub.add_parser("enroll", help="enroll a device and write its bundle")
    enr.add_argument("device_id")
    enr.add_argument("--out", type=Path, required=True, help="bundle directory (new or empty)")
    enr.add_argument("--federation", default=None)
    enr.add_argument("--reenroll", action="store_true", help="allow reusing a revoked id")
    enr.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a tag for the plan's selection, e.g. site=north (repeatable)",
    )
    enr.add_argument(
        "--edge",
        default="",
        metavar="EDGE",
        help="the device connects to this edge broker (see edge-config) instead of the "
        "central broker",
    )
    _agent_args(enr, auth_default=DEFAULT_UPDATE_AUTH)
    _reload_flag(enr)

    rot = sub.add_parser("rotate", help="new credentials and update key for a device")
    rot.add_argument("device_id")
    rot.add_argument("--out", type=Path, required=True, help="bundle directory (new or empty)")
    where = rot.add_mutually_exclusive_group()
    where.add_argument(
        "--edge", default=None, metavar="EDGE", help="move the device to this edge broker"
    )
    where.add_argument(
        "--central", action="store_true", help="move the device to the central broker"
    )
    _agent_args(rot, auth_default=None)
    _reload_flag(rot)

    rev = sub.add_parser("revoke", help="revoke a device: credentials, ACL and key")
    rev.add_argument("device_id")
    _reload_flag(rev)

    ls = sub.add_parser("list", help="list devices")
    ls.add_argument("--json", action="store_true")

    pub = sub.add_parser("pubkey", help="print the aggregator's public key (aggregator.pub)")
    pub.add_argument("--federation", default=None)

    sub.add_parser("reload", help="regenerate ACL/CRL and reload the broker")
    return p


def _broker_location(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--broker-dir",
        type=Path,
        default=None,
        help="where the broker's files go (default /etc/mosquitto/fedmqtt)",
    )
    p.add_argument(
        "--group", default=None, help="group that must read the broker's files (default mosquitto)"
    )


def _process_args(p: argparse.ArgumentParser) -> None:
    """Where the broker process keeps its data, pid and log (rendered into mosquitto.conf)."""
    p.add_argument("--data-dir", type=Path, default=Path("/var/lib/mosquitto"))
    p.add_argument("--pid-file", type=Path, default=Path("/run/mosquitto/mosquitto.pid"))
    p.add_argument("--log-dest", default="file /var/log/mosquitto/mosquitto.log")


def _reload_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-reload", action="store_true", help="do not reload the broker")


def _size_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--aggregator-config",
        type=Path,
        metavar="TOML",
        help="size the broker for the [model] of this aggregator config",
    )
    g.add_argument("--params", type=int, help="number of model parameters")
    g.add_argument("--max-packet-size", type=int, help="bytes, as is")
    p.add_argument("--features", type=int, default=0, help="input features (with --params)")


def _agent_args(p: argparse.ArgumentParser, *, auth_default: str | None) -> None:
    d = AgentOptions()
    p.add_argument(
        "--auth",
        choices=ALGORITHMS,
        default=auth_default,
        help=f"update authentication (default {DEFAULT_UPDATE_AUTH})",
    )
    p.add_argument("--data-source", choices=("csv", "npz", "plugin"), default=None)
    p.add_argument(
        "--data-path",
        default=None,
        help=f"file or directory with training data, or module:callable for plugin "
        f"(default {d.data_path})",
    )
    p.add_argument(
        "--label-column", default=None, help=f"csv label column (default {d.label_column})"
    )
    p.add_argument(
        "--interval-s",
        type=float,
        default=None,
        help=f"seconds between training rounds (default {d.interval_s:g})",
    )


def _options(a: argparse.Namespace, base: AgentOptions) -> AgentOptions:
    o = AgentOptions(**asdict(base))
    if a.data_source is not None:
        o.data_source = a.data_source
    if a.data_path is not None:
        o.data_path = a.data_path
    if a.label_column is not None:
        o.label_column = a.label_column
    if a.interval_s is not None:
        o.interval_s = a.interval_s
    return o


def _packet_size(a: argparse.Namespace, *, required: bool) -> int | None:
    if a.max_packet_size is not None:
        if a.max_packet_size < 20:
            raise ConfigError("--max-packet-size must be at least 20 bytes")
        return int(a.max_packet_size)
    if a.params is not None:
        return sizing.max_packet_size(a.params, a.features)
    if a.aggregator_config is not None:
        spec = AggregatorConfig.load(a.aggregator_config).spec
        if spec is None:
            raise ConfigError(
                f"{a.aggregator_config}: [model] does not describe a complete model;"
                " give --params N --features F instead"
            )
        return sizing.for_spec(spec)
    if required:
        raise ConfigError(
            "size the broker for the model: give --aggregator-config, --params or --max-packet-size"
        )
    return None


def _locate_broker(site: Site, a: argparse.Namespace) -> None:
    if a.broker_dir is not None:
        site.registry.broker.dir = str(a.broker_dir.resolve())
    if a.group is not None:
        site.registry.broker.group = a.group


def _reload(site: Site, a: argparse.Namespace, what: str, *, edges: bool = True) -> int:
    if getattr(a, "no_reload", False):
        print(f"{what}; broker NOT reloaded (--no-reload): run `fedmqtt-admin reload`")
        return 0
    try:
        print(site.reload_broker(edges=edges))
    except ConfigError as e:
        print(
            f"error: {what}, but the broker was not reloaded: {e}\n"
            "The change takes effect at the next reload: fix the problem and run "
            "`fedmqtt-admin reload`.",
            file=sys.stderr,
        )
        return 1
    return 0


def run(a: argparse.Namespace) -> int:
    if a.cmd == "size":
        n = _packet_size(a, required=True)
        assert n is not None
        limit = n - sizing.PACKET_OVERHEAD
        print(f"max_packet_size {n}")
        print(f"# aggregator [limits] max_update_bytes must not exceed {limit}")
        return 0
    site = Site.open(a.dir)
    if a.cmd == "ca":
        ca = site.init_ca(a.name, a.days, a.force)
        print(
            f"CA created in {site.dir} (valid until {ca.cert.not_valid_after_utc:%Y-%m-%d}); "
            f"keep {site.dir}/ca.key secret and backed up"
        )
        return 0
    if a.cmd == "broker-cert":
        _locate_broker(site, a)
        if not a.host and not a.ip:
            raise ConfigError("give the broker's name with --host (and/or --ip)")
        path = site.broker_cert(a.host, a.ip, a.days, localhost=not a.no_localhost)
        print(f"broker certificate written to {path}")
        return _reload(site, a, "new broker certificate installed")
    if a.cmd == "broker-config":
        _locate_broker(site, a)
        b = site.registry.broker
        size = _packet_size(a, required=True)
        assert size is not None
        path = site.configure_broker(
            identity=a.identity or b.identity,
            port=a.port or b.port,
            max_packet_size=size,
            bind_address=a.bind,
            data_dir=a.data_dir,
            pid_file=a.pid_file,
            log_dest=a.log_dest,
            reload=a.reload_how,
            host=a.host,
            local_port=a.local_port,
        )
        local = f", local port {b.local_port} on 127.0.0.1" if b.local_port else ""
        print(f"wrote {path} (identity {b.identity}, port {b.port}{local}, max_packet_size {size})")
        print(
            "start Mosquitto with it (systemd/mosquitto.service.d/fedmqtt.conf does) and "
            "restart it: systemctl restart mosquitto"
        )
        return 0
    if a.cmd == "aggregator-setup":
        agg = site.setup_aggregator(a.aggregator_config, owner=a.owner, user=a.user)
        print(
            f"aggregator account {agg.user!r} for federation {agg.federation!r}; device keys "
            f"go to {agg.devices_dir}; public key {agg.public_key}; the federation's secret "
            f"scale-out group is in [scaleout] group of {agg.config}"
        )
        return _reload(site, a, "aggregator account created")
    if a.cmd == "enroll":
        out = site.enroll(
            a.device_id,
            a.out,
            federation=a.federation,
            auth=a.auth,
            options=_options(a, AgentOptions()),
            reenroll=a.reenroll,
            tags=tag_map(a.tag),
            edge=a.edge,
        )
        via = f" (connects to edge broker {a.edge})" if a.edge else ""
        print(
            f"enrolled {a.device_id}{via}; bundle in {out} (contains secrets: move it to the "
            f"device and delete it here)"
        )
        return _reload(site, a, f"{a.device_id} enrolled")
    if a.cmd == "rotate":
        device = site.registry.device(a.device_id)
        out = site.rotate(
            a.device_id,
            a.out,
            auth=a.auth,
            options=_options(a, AgentOptions.from_dict(device.options)),
            edge="" if a.central else a.edge,
        )
        print(
            f"new credentials and update key for {a.device_id} in {out}; the old ones no "
            f"longer work once the broker is reloaded"
        )
        return _reload(site, a, f"{a.device_id} rotated")
    if a.cmd == "revoke":
        for line in site.revoke(a.device_id):
            print(f"{a.device_id}: {line}")
        return _reload(site, a, f"{a.device_id} revoked")
    if a.cmd == "edge-config":
        size = _packet_size(a, required=True)
        assert size is not None
        path = site.configure_edge(
            a.edge_id,
            edge_dir=a.edge_dir,
            federation=a.federation,
            hosts=a.host,
            ips=a.ip,
            port=a.port,
            bind_address=a.bind,
            central_host=a.central_host,
            central_port=a.central_port,
            max_packet_size=size,
            data_dir=a.data_dir,
            pid_file=a.pid_file,
            log_dest=a.log_dest,
            reload=a.reload_how,
            group=a.group,
            restart_timeout=tuple(a.restart_timeout),
        )
        e = site.registry.edge(a.edge_id)
        print(
            f"wrote {path} (edge {a.edge_id} of federation {e.federation}, port {e.port}, "
            f"bridge to {e.central_host}:{e.central_port}); start Mosquitto with it on the edge"
        )
        # The new edge is not running yet: only the central broker learns the bridge's account.
        return _reload(site, a, f"edge {a.edge_id} registered", edges=False)
    if a.cmd == "edge-revoke":
        for line in site.revoke_edge(a.edge_id):
            print(f"{a.edge_id}: {line}")
        return _reload(site, a, f"edge {a.edge_id} revoked")
    if a.cmd == "list":
        rows = site.devices()
        if a.json:
            print(json.dumps([asdict(r) for r in rows], indent=2))
            return 0
        print(
            f"{'DEVICE':<24} {'FEDERATION':<16} {'STATUS':<8} {'IDENTITY':<11} "
            f"{'AUTH':<12} {'ENROLLED':<26} NOTE"
        )
        for r in rows:
            note = (
                f"revoked {r.revoked_at}"
                if r.revoked_at
                else f"certificate expires {r.cert_expires[:10]}"
                if r.cert_expires
                else ""
            )
            if r.tags:
                tags = ",".join(f"{k}={v}" for k, v in r.tags.items())
                note = f"{note}; tags {tags}" if note else f"tags {tags}"
            if r.edge:
                note = f"via edge {r.edge}; {note}" if note else f"via edge {r.edge}"
            print(
                f"{r.id:<24} {r.federation:<16} {r.status:<8} {r.identity:<11} {r.auth:<12} "
                f"{r.enrolled_at:<26} {note}".rstrip()
            )
        return 0
    if a.cmd == "pubkey":
        print(site.aggregator_public_key(a.federation))
        return 0
    if a.cmd == "reload":
        site.sync_broker_files()
        return _reload(site, a, "ACL and CRL regenerated")
    raise AssertionError(a.cmd)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except PermissionError as e:
        print(f"error: {e} (run fedmqtt-admin as root)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
