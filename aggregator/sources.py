"""Where the service's messages come from: its own MQTT link, or the scale-out worker pool.

Both feed the one ingest loop of :class:`aggregator.service.Aggregator` through
:class:`Source`: ``take`` a batch (handles to acknowledge later, items for the engine),
``apply`` it on the engine thread, and ``ack`` the handles once the checkpoint that covers them
is durable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from aggregator.engine import Engine
from aggregator.mqtt import Incoming, MqttLink

if TYPE_CHECKING:
    from aggregator.workers import WorkerPool


class Source(Protocol):
    async def take(self, n: int, timeout: float) -> tuple[list[Any], list[Any]] | None:
        """Up to ``n`` messages as ``(handles, items)``; None if none came within
        ``timeout``."""
        ...

    def apply(self, engine: Engine, items: Sequence[Any], now: float) -> list[int]:
        """Run ``items`` through ``engine`` (on the engine thread); per item, the flush that
        must be durable before it is acknowledged."""
        ...

    def applied(self, handles: Sequence[Any]) -> None:
        """The batch of ``handles`` is applied: drop what acknowledging it does not need."""
        ...

    def ack(self, handles: Sequence[Any]) -> None:
        """Acknowledge ``handles`` (their checkpoint is durable), in order."""
        ...


class LinkSource:
    """Raw messages of the service's own MQTT link: updates (unless workers take them) and
    presence."""

    def __init__(self, link: MqttLink) -> None:
        self.link = link

    async def take(self, n: int, timeout: float) -> tuple[list[Any], list[Any]] | None:
        if not await self.link.wait(timeout):
            return None
        batch = self.link.take(n)
        return batch, [(m.topic, m.payload) for m in batch]

    def apply(self, engine: Engine, items: Sequence[Any], now: float) -> list[int]:
        return engine.process(items, now)

    def applied(self, handles: Sequence[Incoming]) -> None:
        for h in handles:
            h.payload = b""  # only the packet id is needed until the PUBACK

    def ack(self, handles: Sequence[Incoming]) -> None:
        self.link.ack(handles)


class PoolSource:
    """Updates authenticated and decoded by the worker processes
    (:class:`aggregator.workers.WorkerPool`)."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    async def take(self, n: int, timeout: float) -> tuple[list[Any], list[Any]] | None:
        handles, items = await self.pool.take(n, timeout=timeout)
        return (handles, items) if items else None

    def apply(self, engine: Engine, items: Sequence[Any], now: float) -> list[int]:
        return engine.process_verified(items, now)

    def applied(self, handles: Sequence[Any]) -> None:
        pass

    def ack(self, handles: Sequence[Any]) -> None:
        self.pool.ack(handles)
