"""The aggregator service in a thread of its own, with its own event loop (simulator, tests,
benchmarks): the in-process way to run :class:`aggregator.service.Aggregator` next to other
work. The service itself (``fl-aggregator run``) runs in the caller's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from aggregator.config import AggregatorConfig
from aggregator.engine import UpdateObserver
from aggregator.service import Aggregator

log = logging.getLogger(__name__)


class AggregatorThread:
    """Run an :class:`Aggregator` in its own thread with its own event loop."""

    def __init__(
        self, config: AggregatorConfig, *, on_update: UpdateObserver | None = None
    ) -> None:
        self.service = Aggregator(config, on_update=on_update)
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="aggregator", daemon=True)

    def _main(self) -> None:
        async def body() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self.service.run(self._stop)

        try:
            asyncio.run(body())
        except BaseException as e:
            self.error = e
            log.exception("aggregator stopped with an error")
        finally:
            self.service.ready.set()

    def start(self, timeout: float = 30.0) -> AggregatorThread:
        self._thread.start()
        self.service.ready.wait(timeout)
        if self.error is not None:
            raise self.error
        return self

    def snapshot(self) -> dict[str, Any]:
        return self.service.snapshot()

    def presence(self) -> dict[str, str]:
        """Each device's last believed presence state ("online"/"offline"), as a copy.

        Read from another thread than the engine's: ``Presence.devices`` copies its dict in one
        C-level ``sorted(dict.items())`` call, which the GIL makes atomic for str keys."""
        engine = getattr(self.service, "engine", None)
        return dict(engine.presence.devices()) if engine is not None else {}

    def federated_eval(self, n: int = 256) -> list[dict[str, Any]]:
        """The federated evaluation of the newest ``n`` versions devices reported on."""
        engine = getattr(self.service, "engine", None)
        return [s.to_dict() for s in engine.evals.history(n)] if engine is not None else []

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.snapshot()):
                return True
            if self.error is not None:
                raise self.error
            time.sleep(0.05)
        return predicate(self.snapshot())

    def stop(self, timeout: float = 30.0) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout)
