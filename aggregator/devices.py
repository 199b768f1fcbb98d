"""Enrolled device keys, read from ``devices_dir/<device id>.chacha|.hmac|.pub`` and cached.

``fedmqtt-admin`` adds, rotates and removes key files while the aggregator runs (each change is
an atomic rename, so the directory's mtime changes). The cache is dropped whenever that mtime
changes, checked at most every :attr:`DeviceKeys.recheck_s` seconds: an enrolment is picked up
and a revoked device is refused within that delay, without a file-system call per message. A
device id that has no key is remembered as unknown too, so a flood from an unenrolled client
costs a dictionary lookup, not a ``stat``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from fedmqtt.errors import ConfigError
from fedmqtt.signing import DEVICE_KEY_SUFFIX, Verifier, load_device_verifier
from fedmqtt.topics import check_id

log = logging.getLogger(__name__)


class DeviceKeys:
    def __init__(self, directory: Path, *, recheck_s: float = 1.0) -> None:
        self.directory = Path(directory)
        self.recheck_s = recheck_s
        self._cache: dict[str, Verifier | None] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def get(self, device_id: str) -> Verifier | None:
        """The device's verifier, or None if it is not enrolled (or its key is unusable)."""
        with self._lock:
            self._maybe_invalidate()
            if device_id in self._cache:
                return self._cache[device_id]
            verifier = self._load(device_id)
            if len(self._cache) > 100_000:  # ids come from topics: bound the negative cache
                self._cache.clear()
            self._cache[device_id] = verifier
            return verifier

    def enrolled(self) -> int:
        """How many devices have a key file now (0 if the directory cannot be read)."""
        suffixes = set(DEVICE_KEY_SUFFIX.values())
        try:
            return len({p.stem for p in self.directory.iterdir() if p.suffix in suffixes})
        except OSError:
            return 0

    def _maybe_invalidate(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.recheck_s:
            return
        self._checked = now
        try:
            mtime = self.directory.stat().st_mtime
        except OSError:
            mtime = None
        if mtime != self._mtime:
            self._mtime = mtime
            self._cache.clear()

    def _load(self, device_id: str) -> Verifier | None:
        try:
            check_id("device id", device_id)
        except ConfigError:
            return None
        for suffix in DEVICE_KEY_SUFFIX.values():
            path = self.directory / f"{device_id}{suffix}"
            if path.exists():
                try:
                    return load_device_verifier(path)
                except ConfigError as e:
                    log.error("device %s: unusable key: %s", device_id, e)
                    return None
        return None
