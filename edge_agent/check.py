"""``edge-agent check``: is this device ready to run? Config, keys, state, data, broker.

Meant for the person installing a device (and for provisioning scripts): every check prints
one line, ``ok`` or ``FAIL`` with what to fix, and the exit status is 0 only if all passed.
The broker check opens a TCP connection and then an MQTT 5 CONNECT with the configured
credentials and TLS settings, and reports the CONNACK reason code, so "wrong password" and
"not authorized" are told apart from "host unreachable". It connects as ``<device id>-check``
with a clean, non-persistent session so that a running agent's session is left alone.
"""

from __future__ import annotations

import select
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from edge_agent import state as st
from edge_agent.config import AgentConfig, load_config
from edge_agent.data import load_data
from edge_agent.keyframe import load_newest
from edge_agent.mqtt import make_client
from fedmqtt import wire
from fedmqtt.errors import FedMQTTError
from fedmqtt.mqttconf import read_password
from fedmqtt.signing import Ed25519Verifier, load_update_signer


class _Report:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.failures = 0

    def run(self, what: str, fn: Callable[[], str]) -> bool:
        try:
            detail = fn()
        except (FedMQTTError, OSError, ValueError) as e:
            self.failures += 1
            print(f"FAIL {what}: {e}", file=self.out)
            return False
        print(f"ok   {what}: {detail}", file=self.out)
        return True


def run_check(config_path: Path, out: TextIO, *, broker: bool = True) -> int:
    """Run every check, print one line each; 0 if all passed, else 1."""
    rep = _Report(out)
    holder: dict[str, AgentConfig] = {}

    def config() -> str:
        holder["cfg"] = load_config(config_path)
        c = holder["cfg"]
        return f"device {c.device.id}, federation {c.device.federation}"

    if not rep.run("config", config):
        print("1 check failed; fix the config first", file=out)
        return 1
    cfg = holder["cfg"]
    verifier: dict[str, Ed25519Verifier] = {}

    def aggregator_key() -> str:
        verifier["v"] = Ed25519Verifier.load(cfg.security.aggregator_public_key)
        return f"{cfg.security.aggregator_public_key} (Ed25519, pinned)"

    def update_key() -> str:
        load_update_signer(cfg.security.update_auth, cfg.security.update_key)
        return f"{cfg.security.update_key} ({cfg.security.update_auth}, mode 0600)"

    rep.run("aggregator key", aggregator_key)
    rep.run("update key", update_key)
    if cfg.broker.password_file is not None:
        pw_file = cfg.broker.password_file
        rep.run("broker password", lambda: (read_password(pw_file), f"{pw_file} (mode 0600)")[1])
    if cfg.broker.tls:
        rep.run("TLS files", lambda: _tls_files(cfg))
    rep.run("state directory", lambda: _state_dir(cfg, verifier.get("v")))
    rep.run("data", lambda: _data(cfg, verifier.get("v")))
    if broker:
        rep.run("broker", lambda: _broker(cfg))
    if rep.failures:
        print(f"{rep.failures} check(s) failed", file=out)
        return 1
    print("all checks passed", file=out)
    return 0


def _tls_files(cfg: AgentConfig) -> str:
    b = cfg.broker
    for p in (b.ca_file, b.cert_file):
        if p is not None:
            p.read_bytes()
    if b.key_file is not None:
        mode = b.key_file.stat().st_mode & 0o777
        if mode & 0o077:
            raise ValueError(
                f"{b.key_file} is readable by group/others (mode {mode:o}); "
                f"run: chmod 600 {b.key_file}"
            )
        b.key_file.read_bytes()
    ca = b.ca_file or "system CA store"
    client = f", client cert {b.cert_file}" if b.cert_file else ""
    return f"CA {ca}{client}"


def _state_dir(cfg: AgentConfig, verifier: Ed25519Verifier | None) -> str:
    d = cfg.device.state_dir
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.NamedTemporaryFile(dir=d, prefix=".check-", suffix=".tmp"):
        pass
    notes = []
    model = _saved_model(cfg, verifier)
    if model is not None:
        notes.append(f"global model v{model.version}")
    outbox = d / st.OUTBOX_DIR
    if outbox.is_dir():
        n = sum(1 for p in outbox.iterdir() if p.suffix == ".upd")
        notes.append(f"{n} queued update(s)")
    return f"{d} writable" + (f" ({', '.join(notes)})" if notes else "")


def _saved_model(cfg: AgentConfig, verifier: Ed25519Verifier | None) -> wire.GlobalModel | None:
    """The newest verified model stored (full, keyframe, or keyframe plus delta)."""
    if verifier is None:
        return None
    d = cfg.device.state_dir
    return load_newest(d, verifier, st.stored_specs(d, verifier))


def _data(cfg: AgentConfig, verifier: Ed25519Verifier | None) -> str:
    X, y = load_data(cfg.data)
    text = f"{X.shape[0]} samples x {X.shape[1]} features from {cfg.data.source}"
    if y.ndim == 1 and y.size and y.dtype.kind in "iuf" and y.size < 10_000_000:
        labels = len(set(y.tolist()))
        if labels <= 100:
            text += f", {labels} distinct label(s)"
    model = _saved_model(cfg, verifier)
    if model is not None and model.spec.n_features != X.shape[1]:
        raise ValueError(
            f"{text}, but global model v{model.version} expects {model.spec.n_features} features"
        )
    if X.shape[0] < cfg.data.min_samples:
        raise ValueError(f"{text}; [data] min_samples is {cfg.data.min_samples}")
    return text


def _broker(cfg: AgentConfig) -> str:
    b = cfg.broker
    try:
        with socket.create_connection((b.host, b.port), timeout=b.connect_timeout_s):
            pass
    except OSError as e:
        raise OSError(f"cannot open TCP connection to {b.host}:{b.port}: {e}") from None
    password = read_password(b.password_file) if b.password_file is not None else None
    client = make_client(b, f"{cfg.device.id}-check", password)
    result: dict[str, Any] = {}

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        result["reason"] = reason

    client.on_connect = on_connect
    try:
        client.connect(b.host, b.port, keepalive=b.keepalive, clean_start=True)
    except Exception as e:  # ssl errors, refused, ...
        raise OSError(
            f"MQTT connection to {b.host}:{b.port} failed: {type(e).__name__}: {e}"
        ) from None
    deadline = time.monotonic() + b.connect_timeout_s
    try:
        while "reason" not in result and time.monotonic() < deadline:
            sock = client.socket()
            if sock is None:
                break
            w = [sock] if client.want_write() else []
            r, _, _ = select.select([sock], w, [], 0.1)
            if r:
                client.loop_read()
            if client.socket() is not None and client.want_write():
                client.loop_write()
    finally:
        reason = result.get("reason")
        if reason is not None and not reason.is_failure:
            client.disconnect()
            if client.socket() is not None:
                client.loop_write()
    if reason is None:
        raise OSError(
            f"no CONNACK from {b.host}:{b.port} within {b.connect_timeout_s}s "
            "(is it an MQTT listener? TLS mismatch?)"
        )
    if reason.is_failure:
        raise OSError(
            f"{b.host}:{b.port} refused the MQTT connection: {reason} "
            f"(0x{reason.value:02x}); check username/password/certificate"
        )
    tls = "TLS" if b.tls else "plain TCP"
    user = f" as {b.username}" if b.username else ""
    return f"{b.host}:{b.port} accepted MQTT 5 CONNECT{user} over {tls} ({reason})"
