"""The ``[broker]`` table both services share: where the broker is and how to log in.

The agent and the aggregator keep their own ``BrokerConfig`` dataclasses (their defaults
differ: a device keeps a one-day session, the aggregator a week, and only the aggregator has a
client id of its own), but the options and their checks are the same and live here once.
"""

from __future__ import annotations

from typing import Any, Protocol

from fedmqtt.tomltable import Table


class ConnectionDefaults(Protocol):
    """What a service's (frozen) BrokerConfig provides as defaults for the shared options."""

    @property
    def host(self) -> str: ...
    @property
    def tls(self) -> bool: ...
    @property
    def keepalive(self) -> int: ...
    @property
    def session_expiry_s(self) -> int: ...
    @property
    def connect_timeout_s(self) -> float: ...
    @property
    def reconnect_min_s(self) -> float: ...
    @property
    def reconnect_max_s(self) -> float: ...


def read_connection(
    t: Table, d: ConnectionDefaults, *, min_session_expiry_s: int = 0
) -> dict[str, Any]:
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
