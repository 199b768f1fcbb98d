"""The window of update ids the aggregator has accepted, to refuse replays.

An update is identified by its ``update_id`` (8-64 characters chosen by the device, fresh for
every update). Every accepted id -- applied to the model or still waiting in the buffer -- is
remembered with its ``base_version``. An id can be forgotten once ``base_version < version -
max_staleness``: any message with that base version is refused as stale before the replay
check matters, so the window holds at most the updates of the last ``max_staleness + 1``
versions and never grows without bound. The window is part of every checkpoint, so a replay is
refused across restarts too (that is what makes redelivery after a crash harmless).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class ReplayWindow:
    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._by_base: dict[int, list[str]] = {}

    def __contains__(self, update_id: object) -> bool:
        return update_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, update_id: str, base_version: int) -> None:
        if update_id in self._ids:
            raise ValueError(f"update id {update_id!r} is already in the window")
        self._ids[update_id] = base_version
        self._by_base.setdefault(base_version, []).append(update_id)

    def prune(self, min_base_version: int) -> int:
        """Forget ids whose base version is below ``min_base_version``; returns how many."""
        dropped = 0
        for base in [b for b in self._by_base if b < min_base_version]:
            for uid in self._by_base.pop(base):
                del self._ids[uid]
                dropped += 1
        return dropped

    def to_state(self) -> dict[str, Any]:
        return {"ids": list(self._ids), "bases": list(self._ids.values())}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ReplayWindow:
        ids, bases = state.get("ids"), state.get("bases")
        if not isinstance(ids, list) or not isinstance(bases, list) or len(ids) != len(bases):
            raise ValueError("malformed replay window")
        w = cls()
        for uid, base in zip(ids, bases, strict=True):
            if not isinstance(uid, str) or isinstance(base, bool) or not isinstance(base, int):
                raise ValueError("malformed replay window entry")
            w.add(uid, base)
        return w

    @classmethod
    def of(cls, entries: Iterable[tuple[str, int]]) -> ReplayWindow:
        w = cls()
        for uid, base in entries:
            w.add(uid, base)
        return w
