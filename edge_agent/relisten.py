"""When a device that is always ready again soon subscribes to the announcements again
during a round (docs/agent.md, "Downlink").

A device with ``[training] fast_repeat_s`` trains again as soon as each round ends. It needs
the newest announcement then, not each one published while it fetches and trains; subscribing
only after the round would cost a round trip through the broker before every fetch. So it
unsubscribes when a fetch starts and subscribes again shortly before the round is expected to
end: at ``started + train_s - lead``, where ``train_s`` is how long the last round's training
took and ``lead`` is :data:`fedmqtt.readiness.RELISTEN_LEAD_FACTOR` times the median of the
recent times from subscribing to the arrival of the retained announcement (at least
:data:`fedmqtt.readiness.RELISTEN_MIN_LEAD_S`). Once it has verified an announcement newer
than the round's model it unsubscribes again (the agent's ``_heard_newer``): the fetch after
the round brings the retained, newest model whatever is announced meanwhile. Until both times
are measured, and while rounds train for less than twice the lead, the device stays
subscribed throughout.

Only the timing depends on these measurements: whatever arrives is verified as before, and
an announcement that arrives late only makes the device wait for it after the round.
"""

from __future__ import annotations

import collections
import statistics
import threading
from typing import Final

from fedmqtt.readiness import RELISTEN_LEAD_FACTOR, RELISTEN_MIN_LEAD_S

_SAMPLES: Final = 8  # the latencies remembered (the lead follows their median)


class Relisten:
    """Measures how long the retained announcement takes after a subscription, and how long
    a round trains, and says when to subscribe again during a round."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # heard() runs on the MQTT thread
        self._latencies: collections.deque[float] = collections.deque(maxlen=_SAMPLES)
        self._subscribed_at: float | None = None
        self._train_s: float | None = None

    def subscribed(self, now: float) -> None:
        """The device subscribed to the announcements at ``now`` (monotonic)."""
        with self._lock:
            self._subscribed_at = now

    def unsubscribed(self) -> None:
        with self._lock:
            self._subscribed_at = None

    def heard(self, now: float) -> None:
        """An announcement arrived at ``now``: the first one after subscribing measures the
        subscription's latency."""
        with self._lock:
            if self._subscribed_at is not None:
                self._latencies.append(max(now - self._subscribed_at, 0.0))
                self._subscribed_at = None

    def trained(self, seconds: float) -> None:
        """The last round's training took ``seconds``."""
        self._train_s = seconds

    def lead(self) -> float | None:
        with self._lock:
            if not self._latencies:
                return None
            return max(
                RELISTEN_MIN_LEAD_S, RELISTEN_LEAD_FACTOR * statistics.median(self._latencies)
            )

    def active(self) -> bool:
        """Whether the device listens again during its rounds (then it does not listen from
        the start of a fetch until :meth:`at`: an announcement heard then is of no use, it
        trains on what it fetches): both times are measured and a round trains at least twice
        the lead. Shorter rounds stay subscribed throughout: listening again would bring the
        retained announcement of the version just fetched and then the next one, no fewer
        than the versions published during such a round."""
        lead, train_s = self.lead(), self._train_s
        return lead is not None and train_s is not None and train_s >= 2 * lead

    def at(self, started: float) -> float | None:
        """When (monotonic) to subscribe again during a round that started at ``started``: the
        lead before its expected end; None: stay subscribed throughout (not :meth:`active`)."""
        lead, train_s = self.lead(), self._train_s
        if lead is None or train_s is None or not self.active():
            return None
        return started + train_s - lead
