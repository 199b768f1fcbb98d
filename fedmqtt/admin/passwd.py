"""Mosquitto password files, written without the ``mosquitto_passwd`` binary.

The format is the one Mosquitto 2.0 and 2.1 read: one ``username:$7$<iterations>$<salt>$<hash>``
line per user, where the hash is PBKDF2-HMAC-SHA512 over the password with a 12-byte salt, both
base64. Generating it here means the admin tool works on a host where only the Python package is
installed (e.g. the aggregator in a container next to a broker elsewhere), and lets us rewrite the
file atomically instead of calling a binary once per device.

Iterations: 101 is what ``mosquitto_passwd`` 2.0 writes. fedmqtt's broker passwords are 256-bit
random tokens, not human passwords, so key stretching buys nothing against guessing, while every
(re)connection costs the broker one PBKDF2 run; after a broker restart all devices reconnect at
once, and a high count would turn that into seconds of CPU.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from pathlib import Path
from typing import Final

from fedmqtt.errors import ConfigError
from fedmqtt.fsutil import atomic_write_bytes

ITERATIONS: Final = 101
SALT_BYTES: Final = 12
_PREFIX: Final = "$7$"


def new_password() -> str:
    """A random broker password (256 bits, URL-safe so it survives any config quoting)."""
    return secrets.token_urlsafe(32)


def hash_password(password: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    b64 = base64.b64encode
    return f"{_PREFIX}{iterations}${b64(salt).decode()}${b64(digest).decode()}"


def read(path: Path) -> dict[str, str]:
    """username -> hash; a missing file is an empty one. Comment and blank lines are dropped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    entries: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        if not sep or not user:
            raise ConfigError(f"{path}:{n}: not a 'username:hash' line")
        entries[user] = encoded
    return entries


def dumps(entries: dict[str, str]) -> bytes:
    """The file's content. Write it atomically (Mosquitto re-reads it on SIGHUP and must never
    see half of it): :func:`write`, or :func:`fedmqtt.admin.files.write_file` to set its group."""
    for user, encoded in entries.items():
        if not user or any(c in user for c in ":\n\r") or "\n" in encoded:
            raise ConfigError(f"invalid broker username {user!r}")
    return "".join(f"{user}:{encoded}\n" for user, encoded in sorted(entries.items())).encode()


def write(path: Path, entries: dict[str, str], *, mode: int = 0o640) -> None:
    atomic_write_bytes(path, dumps(entries), mode=mode)
