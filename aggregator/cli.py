"""``fl-aggregator``: init, run (the systemd ExecStart), status, export-onnx, rollback,
history.

Exit codes: 0 success, 1 runtime failure, 2 usage error, 78 (EX_CONFIG) configuration error --
the unit's ``RestartPreventExitStatus=78`` stops systemd from restarting a service whose config
cannot work until an operator fixes it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from aggregator.config import AggregatorConfig, load_config
from fedmqtt.errors import ConfigError, FedMQTTError
from fedmqtt.fsutil import atomic_write_bytes
from fedmqtt.signing import Ed25519Signer

log = logging.getLogger("aggregator")

EX_CONFIG = 78


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fl-aggregator",
        description="fedmqtt aggregator: federated learning over MQTT (docs/aggregator.md)",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, text in (
        (
            "init",
            "create the signing key (if missing), the state directory and the version-0 model",
        ),
        ("run", "run the service until SIGTERM"),
        ("status", "show version, counters, devices online, last evaluation (from status.json)"),
        ("export-onnx", "write the current global model as an ONNX file"),
        ("devices", "list each device: presence, updates, staleness, last evaluation, tags"),
        (
            "rollback",
            "publish the parameters of a kept version as a new, higher version (running or not)",
        ),
        ("history", "list recent versions with their evaluation and the gate's verdict"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", type=Path, required=True, metavar="PATH", help="aggregator.toml")
        if name in ("status", "devices"):
            p.add_argument("--json", action="store_true", help="print JSON")
        if name == "export-onnx":
            p.add_argument("--out", type=Path, required=True, metavar="FILE")
        if name == "rollback":
            p.add_argument("--to-version", type=int, required=True, metavar="V")
            p.add_argument(
                "--timeout",
                type=float,
                default=60.0,
                metavar="S",
                help="seconds to wait for a running service's answer (default 60)",
            )
        if name == "history":
            p.add_argument("--json", action="store_true", help="print history.json as is")
            p.add_argument("-n", type=int, default=20, help="versions to list (default 20)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        if args.cmd == "init":
            return _init(cfg)
        if args.cmd == "run":
            return _run(cfg)
        if args.cmd == "status":
            return _status(cfg, args.json)
        if args.cmd == "devices":
            return _devices(cfg, args.json)
        if args.cmd == "rollback":
            return _rollback(cfg, args.to_version, args.timeout)
        if args.cmd == "history":
            return _history(cfg, args.json, args.n)
        return _export(cfg, args.out)
    except ConfigError as e:
        print(f"fl-aggregator: configuration error: {e}", file=sys.stderr)
        return EX_CONFIG
    except FedMQTTError as e:
        print(f"fl-aggregator: {e}", file=sys.stderr)
        return 1


def _init(cfg: AggregatorConfig) -> int:
    from aggregator.service import initialize

    key = cfg.security.signing_key
    if key.exists():
        signer = Ed25519Signer.load(key)
        print(f"signing key      {key} (kept)")
    else:
        signer = Ed25519Signer.generate()
        signer.save(key)
        print(f"signing key      {key} (new)")
    pub = key.with_suffix(".pub")
    if not pub.exists():
        signer.verifier().save(pub)
    print(f"public key       {pub}: {signer.verifier().public_hex()}")
    print("                 (devices pin it: [security] aggregator_public_key)")
    cfg.security.devices_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    print(f"device keys      {cfg.security.devices_dir}/<device id>.chacha|.hmac|.pub")
    version = initialize(cfg)
    print(f"state directory  {cfg.state_dir} (model version {version})")
    return 0


def _setup_logging(level: str) -> None:
    fmt = "%(levelname)s %(name)s: %(message)s"
    if sys.stderr.isatty():
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    logging.getLogger("aiomqtt").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _run(cfg: AggregatorConfig) -> int:
    from aggregator.service import Aggregator

    _setup_logging(cfg.logging.level)

    async def body() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await Aggregator(cfg).run(stop)

    try:
        asyncio.run(body())
    except ConfigError:
        raise
    except FedMQTTError as e:
        log.error("%s", e)
        return 1
    log.info("stopped")
    return 0


def _status(cfg: AggregatorConfig, as_json: bool) -> int:
    from aggregator.statusfile import format_status, read_status

    s = read_status(cfg.state_dir)
    if as_json:
        print(json.dumps(s, indent=1, sort_keys=True))
    else:
        print(format_status(s, time.time()))
    return 0


def _devices(cfg: AggregatorConfig, as_json: bool) -> int:
    from aggregator.telemetry import format_devices, read_devices

    devices = read_devices(cfg.state_dir, cfg.security.devices_dir)
    if as_json:
        print(json.dumps(devices, indent=1, sort_keys=True))
    else:
        print(format_devices(devices, time.time()))
    return 0


def _rollback(cfg: AggregatorConfig, to_version: int, timeout: float) -> int:
    """Offline on the state directory when the service is stopped, else through a request
    file that the running service answers (aggregator/rollout.py)."""
    from aggregator.rollback import rollback_offline
    from aggregator.rollout import wait_result, write_request

    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    if to_version < 0:
        raise FedMQTTError("--to-version must be >= 0")
    v = rollback_offline(cfg, to_version)
    if v is not None:
        print(
            f"version {v} = the parameters of version {to_version} (service stopped: it "
            "publishes it when it starts)"
        )
        return 0
    rid = write_request(cfg.state_dir, to_version)
    result = wait_result(cfg.state_dir, rid, timeout)
    if not result.get("ok"):
        raise FedMQTTError(f"rollback refused: {result.get('error')}")
    state = "checkpointed and published" if result.get("durable") else "made"
    print(f"version {result['new_version']} = the parameters of version {to_version} ({state})")
    return 0


def _history(cfg: AggregatorConfig, as_json: bool, n: int) -> int:
    from aggregator.rollout import format_history, read_history
    from aggregator.service import checkpoint_store

    entries = read_history(cfg.state_dir)
    if as_json:
        print(json.dumps(entries[-n:], indent=1))
    else:
        print(format_history(entries, set(checkpoint_store(cfg).versions()), n))
    return 0


def _export(cfg: AggregatorConfig, out: Path) -> int:
    from aggregator.checkpoint import CheckpointError, f32
    from aggregator.publish import onnx_bytes
    from aggregator.service import checkpoint_store

    try:
        loaded = checkpoint_store(cfg).load_latest()
    except CheckpointError as e:
        raise FedMQTTError(str(e)) from None
    if loaded is None:
        raise FedMQTTError(f"no checkpoint in {cfg.state_dir}: run fl-aggregator init first")
    params = f32(loaded.state["params"], "params")
    try:
        data = onnx_bytes(
            cfg.spec,
            params,
            cfg.federation.id,
            loaded.version,
            float(loaded.state.get("version_created_at", time.time())),
            (loaded.state.get("threshold") or {}).get("value"),
        )
    except ImportError as e:
        raise FedMQTTError(
            f"the ONNX export needs the onnx package ({e}); pip install 'fedmqtt[onnx]'"
        ) from None
    atomic_write_bytes(out, data, mode=0o644)
    print(f"wrote {out}: model version {loaded.version}, {len(data)} bytes")
    return 0
