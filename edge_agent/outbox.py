"""The durable outbox: every update is on disk before it is published, until the broker acks it.

paho-mqtt keeps its MQTT session (unacknowledged QoS-1 messages) only in memory, so an update
published while the link is down, or in flight when the device reboots, would be lost. The
agent therefore writes each signed update to ``<state_dir>/outbox/`` first and deletes it only
when the broker's PUBACK says it was accepted.

Layout: one file per update, named ``<seq:012d>-<base_version:012d>-<update_id>.upd`` and
containing the signed payload exactly as it will be published. The zero-padded seq makes the
lexical order the production order (flushed oldest first), and the name alone tells the agent,
at start, which seq and base version were already used (see
:meth:`edge_agent.state.AgentState.reconcile`) without reading any payload. Files are written
atomically (temp file, fsync, rename, fsync directory); a crash mid-write leaves a ``.*.tmp``
file that is removed at the next start.

Rules:

* **Supersede** (on by default): a new update replaces every older update of this device that
  was not yet handed to the MQTT client in this process. An update trained later, from the
  same or a newer global model, already contains what the device has to say; sending both
  would count its data twice in the aggregate. Updates already handed to the client (in
  flight, awaiting PUBACK) are kept: the broker may already have them.
* **Caps** by count and by total bytes: when a new update would exceed either, the oldest
  updates are dropped (with a log line and a counter) until it fits. An update bigger than
  the byte cap on its own is refused.
* **In flight**: :meth:`take_unsent` marks entries as handed to the client; :meth:`acked`
  deletes them, :meth:`drop` deletes them as unsendable, :meth:`release` returns them
  to the unsent queue (to retry after ``not_before``).

All methods are thread-safe: the agent's thread adds updates, the MQTT thread takes and acks.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from edge_agent.logs import DeviceLog
from fedmqtt.fsutil import atomic_write_bytes, clean_temp_files, remove_durably

log = logging.getLogger(__name__)

SUFFIX: Final = ".upd"
_NAME_RE: Final = re.compile(r"^(\d{12})-(\d{12})-([A-Za-z0-9_-]{8,64})\.upd$")


@dataclass(frozen=True)
class OutboxEntry:
    name: str
    seq: int
    base_version: int
    update_id: str
    size: int

    @staticmethod
    def file_name(seq: int, base_version: int, update_id: str) -> str:
        return f"{seq:012d}-{base_version:012d}-{update_id}{SUFFIX}"

    @staticmethod
    def update_id_of(name: str) -> str | None:
        """The ``update_id`` in an outbox file name (None if the name is not one)."""
        m = _NAME_RE.match(name)
        return m.group(3) if m is not None else None


@dataclass
class PutResult:
    entry: OutboxEntry | None  # None if the update was refused (bigger than the byte cap)
    superseded: list[OutboxEntry] = field(default_factory=list)
    dropped: list[OutboxEntry] = field(default_factory=list)


@dataclass
class OutboxCounters:
    superseded: int = 0
    dropped_cap: int = 0
    dropped_refused: int = 0  # could never be sent (bigger than the broker accepts)
    refused_too_big: int = 0


class Outbox:
    def __init__(
        self,
        directory: Path,
        *,
        label: str = "",
        max_updates: int = 100,
        max_bytes: int = 16 * 1024 * 1024,
        supersede: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.log = DeviceLog(log, label)
        self.max_updates = max_updates
        self.max_bytes = max_bytes
        self.supersede = supersede
        self.counters = OutboxCounters()
        self._lock = threading.Lock()
        self._entries: dict[str, OutboxEntry] = {}
        self._in_flight: set[str] = set()
        self._not_before: dict[str, float] = {}
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        removed = clean_temp_files(self.directory)
        if removed:
            self.log.info("outbox: removed %d interrupted write(s)", removed)
        for path in sorted(self.directory.iterdir()):
            m = _NAME_RE.match(path.name)
            if m is None:
                if not path.name.startswith("."):
                    self.log.warning("outbox: ignoring unexpected file %s", path)
                continue
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            self._entries[path.name] = OutboxEntry(
                path.name, int(m.group(1)), int(m.group(2)), m.group(3), size
            )

    # ---- inspection ------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def entries(self) -> list[OutboxEntry]:
        """All pending entries, oldest (lowest seq) first."""
        with self._lock:
            return self._sorted()

    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def max_seq(self) -> int | None:
        with self._lock:
            return max((e.seq for e in self._entries.values()), default=None)

    def max_base_version(self) -> int | None:
        with self._lock:
            return max((e.base_version for e in self._entries.values()), default=None)

    def read(self, entry: OutboxEntry) -> bytes | None:
        """The payload of ``entry``, or None if it was removed meanwhile."""
        try:
            return (self.directory / entry.name).read_bytes()
        except FileNotFoundError:
            return None

    # ---- producing -------------------------------------------------------------------------
    def put(self, payload: bytes, *, seq: int, base_version: int, update_id: str) -> PutResult:
        """Persist a new update durably, then apply the supersede rule and the caps."""
        name = OutboxEntry.file_name(seq, base_version, update_id)
        if not _NAME_RE.match(name):
            raise ValueError(f"update_id {update_id!r} is not usable in a file name")
        entry = OutboxEntry(name, seq, base_version, update_id, len(payload))
        if entry.size > self.max_bytes:
            with self._lock:
                self.counters.refused_too_big += 1
            self.log.error(
                "outbox: update seq=%d of %d bytes exceeds outbox.max_bytes=%d; not queued",
                seq,
                entry.size,
                self.max_bytes,
            )
            return PutResult(None)
        # Write first, delete after: a crash in between leaves one update too many (which the
        # aggregator's replay and staleness checks tolerate), never one too few.
        atomic_write_bytes(self.directory / name, payload, mode=0o600)
        result = PutResult(entry)
        with self._lock:
            self._entries[name] = entry
            if self.supersede:
                for old in self._sorted():
                    if old.seq < seq and old.name not in self._in_flight:
                        result.superseded.append(self._forget(old.name))
            self.counters.superseded += len(result.superseded)
            for old in self._sorted():
                if (
                    len(self._entries) <= self.max_updates
                    and sum(e.size for e in self._entries.values()) <= self.max_bytes
                ):
                    break
                if old.name != name:
                    result.dropped.append(self._forget(old.name))
            self.counters.dropped_cap += len(result.dropped)
        for old in result.superseded:
            self.log.info(
                "outbox: update seq=%d (base v%d) superseded by seq=%d",
                old.seq,
                old.base_version,
                seq,
            )
        for old in result.dropped:
            self.log.warning(
                "outbox: over cap (max_updates=%d, max_bytes=%d); dropped oldest update seq=%d "
                "(base v%d)",
                self.max_updates,
                self.max_bytes,
                old.seq,
                old.base_version,
            )
        for old in (*result.superseded, *result.dropped):
            remove_durably(self.directory / old.name)
        return result

    # ---- sending ---------------------------------------------------------------------------
    def take_unsent(self, limit: int, now: float | None = None) -> list[OutboxEntry]:
        """Up to ``limit`` entries not yet handed to the client, oldest first; marks them."""
        now = time.monotonic() if now is None else now
        out: list[OutboxEntry] = []
        with self._lock:
            for e in self._sorted():
                if len(out) >= limit:
                    break
                if e.name in self._in_flight or self._not_before.get(e.name, 0.0) > now:
                    continue
                self._in_flight.add(e.name)
                self._not_before.pop(e.name, None)
                out.append(e)
        return out

    def in_flight_count(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def next_retry_at(self) -> float | None:
        """Monotonic time of the earliest deferred retry, if any."""
        with self._lock:
            times = [t for n, t in self._not_before.items() if n in self._entries]
        return min(times, default=None)

    def acked(self, name: str) -> OutboxEntry | None:
        """The broker accepted the update: delete it for good."""
        with self._lock:
            entry = self._forget(name) if name in self._entries else None
            self._in_flight.discard(name)
        if entry is not None:
            remove_durably(self.directory / name)
        return entry

    def drop(self, name: str) -> OutboxEntry | None:
        """The update can never be sent (bigger than the broker accepts): delete and count it."""
        with self._lock:
            entry = self._forget(name) if name in self._entries else None
            self._in_flight.discard(name)
            if entry is not None:
                self.counters.dropped_refused += 1
        if entry is not None:
            remove_durably(self.directory / name)
        return entry

    def release(self, name: str, not_before: float = 0.0) -> None:
        """Return an in-flight entry to the unsent queue (retry at monotonic ``not_before``)."""
        with self._lock:
            self._in_flight.discard(name)
            if name in self._entries and not_before > 0:
                self._not_before[name] = not_before

    # ---- internals (lock held) -------------------------------------------------------------
    def _sorted(self) -> list[OutboxEntry]:
        return sorted(self._entries.values(), key=lambda e: (e.seq, e.name))

    def _forget(self, name: str) -> OutboxEntry:
        self._in_flight.discard(name)
        self._not_before.pop(name, None)
        return self._entries.pop(name)

    def __iter__(self) -> Iterator[OutboxEntry]:
        return iter(self.entries())
