"""The ``[broker]`` table both services share: where the broker is and how to log in.

:class:`BrokerConfig` holds the options with a device's defaults; the aggregator subclasses it
for its own defaults (a week's session instead of a day, quicker first retry) and its client id.
The options and their checks live here once, with what both services do with them: read the
password file (:func:`read_password`, refusing one that group or others may read) and space
reconnects (:func:`backoff_delay`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmqtt.errors import ConfigError
from fedmqtt.tomltable import Table


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "localhost"
    port: int = 1883
    username: str | None = None
    password_file: Path | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive: int = 60
    session_expiry_s: int = 86_400
    connect_timeout_s: float = 10.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 120.0


def read_connection(t: Table, d: BrokerConfig, *, min_session_expiry_s: int = 0) -> dict[str, Any]:
    """The shared ``[broker]`` options as keyword arguments for a BrokerConfig."""
    tls = t.flag("tls", d.tls)
    port = t.integer("port", 8883 if tls else 1883, lo=1, hi=65535)
    cert, key = t.opt_path("cert_file"), t.opt_path("key_file")
    if (cert is None) != (key is None):
        raise t.error("cert_file", "cert_file and key_file must be given together")
    if not tls:
        for name in ("ca_file", "cert_file", "key_file"):
            if t.has(name):
                raise t.error(name, "is set but tls = false; set tls = true to use it")
    username = t.opt_text("username")
    password_file = t.opt_path("password_file")
    if password_file is not None and username is None:
        raise t.error("password_file", "needs username")
    rmin = t.number("reconnect_min_s", d.reconnect_min_s, lo=0.01, hi=3600)
    rmax = t.number("reconnect_max_s", d.reconnect_max_s, lo=0.01, hi=86_400)
    if rmax < rmin:
        raise t.error("reconnect_max_s", f"must be >= reconnect_min_s ({rmin})")
    return {
        "host": t.text("host", d.host),
        "port": port,
        "username": username,
        "password_file": password_file,
        "tls": tls,
        "ca_file": t.opt_path("ca_file"),
        "cert_file": cert,
        "key_file": key,
        "keepalive": t.integer("keepalive", d.keepalive, lo=5, hi=65535),
        "session_expiry_s": t.integer(
            "session_expiry_s", d.session_expiry_s, lo=min_session_expiry_s, hi=2**32 - 1
        ),
        "connect_timeout_s": t.number("connect_timeout_s", d.connect_timeout_s, lo=0.1, hi=600),
        "reconnect_min_s": rmin,
        "reconnect_max_s": rmax,
    }


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random) -> float:
    """Reconnect delay: uniform between ``lo`` and ``min(hi, lo * 2**attempt)``.

    Full jitter spreads a fleet's reconnects over the whole window after a broker restart
    instead of synchronising them; the floor keeps a client from hammering a broker that
    accepts and immediately drops it.
    """
    cap = min(hi, lo * (2.0 ** min(attempt, 60)))
    return rng.uniform(lo, max(lo, cap))


def read_password(path: Path) -> str:
    """The broker password: the first line of ``path``, a file group and others cannot read.

    Raises ConfigError naming ``[broker] password_file`` if the file cannot be read, is empty,
    or has any group/other permission bit (with the ``chmod`` that fixes it).
    """
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"[broker] password_file: cannot read {path}: {e.strerror}") from None
    if st.st_mode & 0o077:
        raise ConfigError(
            f"[broker] password_file: {path} is readable by group/others "
            f"(mode {st.st_mode & 0o777:o}); run: chmod 600 {path}"
        )
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise ConfigError(f"[broker] password_file: {path} is empty")
    return lines[0]


def broker_password(cfg: BrokerConfig) -> str | None:
    """The password of ``cfg`` (:func:`read_password`), None without ``password_file``."""
    return None if cfg.password_file is None else read_password(cfg.password_file)
