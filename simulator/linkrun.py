"""Run an :class:`aggregator.mqtt.MqttLink` for one piece of work: a harness for tests and
``bench/link.py``, kept out of the service (which runs its link for its whole life)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aggregator.mqtt import MqttLink


@contextlib.asynccontextmanager
async def running(link: MqttLink, *, wait_connected: bool = True) -> AsyncIterator[MqttLink]:
    """:meth:`MqttLink.run` for the duration of a ``with`` block, stopped cleanly on exit.

    Args:
        link: the link to run.
        wait_connected: enter the block only once connected (SUBACKs in); false to enter at
            once, as the service does not wait either.
    """
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    try:
        if wait_connected:
            await asyncio.wait_for(link.connected.wait(), 10)
        yield link
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
