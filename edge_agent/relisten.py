"""When a device that is always ready again soon listens to the announcements (docs/agent.md,
"Downlink").

A device with ``[training] fast_repeat_s`` can start a round again soon after each one: when
its training ends, or when its interval has passed since the round started, whichever is
later. It needs the newest announcement then, not each one published while it fetches, trains
and waits; subscribing only then would cost a round trip through the broker before every
round. So it does not listen from the start of a fetch until a lead before that moment, the
lead being :data:`fedmqtt.readiness.RELISTEN_LEAD_FACTOR` times the median of the recent times
from subscribing to the arrival of the retained announcement (at least
:data:`fedmqtt.readiness.RELISTEN_MIN_LEAD_S`), and it stops listening again once it has
verified an announcement of a newer version it will fetch (the fetch brings the retained,
newest model, whatever is announced meanwhile). Until the training time and the lead are
measured, and while a round lasts less than twice the lead (listening again would bring the
retained announcement of the version just fetched and then the next one, no fewer than are
published in such a round), it stays subscribed throughout.

It also stays subscribed throughout while the versions a device trains on advance by one per
round (the median of the last few rounds): listening throughout then brings one announcement
per round, the one it needs, while listening again brings the retained announcement of the
version it holds as well -- with a buffer of every device, no version can be published
before this device's update arrives. Listening again saves announcements only when two or
more versions are published per round.

Only the timing depends on these measurements: whatever arrives is verified as before, and
an announcement that arrives late only makes the device wait for it.
"""

from __future__ import annotations

import collections
import statistics
import threading
from typing import Final

from fedmqtt.readiness import RELISTEN_LEAD_FACTOR, RELISTEN_MIN_LEAD_S

_SAMPLES: Final = 8  # latencies and version advances remembered (their medians decide)


class Relisten:
    """Measures how long the retained announcement takes after a subscription, and how long
    a round trains, and says when to subscribe again during a round."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # heard() runs on the MQTT thread
        self._latencies: collections.deque[float] = collections.deque(maxlen=_SAMPLES)
        self._subscribed_at: float | None = None
        self._train_s: float | None = None
        self._advances: collections.deque[int] = collections.deque(maxlen=_SAMPLES)
        self._last_version: int | None = None

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

    def round_on(self, version: int) -> None:
        """A round starts on ``version``: its advance over the previous round's version is
        measured (a version not newer, after a rollback or a retrain, measures nothing)."""
        last, self._last_version = self._last_version, version
        if last is not None and version > last:
            self._advances.append(version - last)

    def lead(self) -> float | None:
        with self._lock:
            if not self._latencies:
                return None
            return max(
                RELISTEN_MIN_LEAD_S, RELISTEN_LEAD_FACTOR * statistics.median(self._latencies)
            )

    def active(self, interval: float) -> bool:
        """Whether the device listens only from a lead before it can start its next round
        (rounds at least ``interval`` seconds apart): the training time and the lead are
        measured, a round lasts at least twice the lead, and at least two versions are
        published per round (the median advance of the recent rounds)."""
        lead, train_s = self.lead(), self._train_s
        if lead is None or train_s is None or max(train_s, interval) < 2 * lead:
            return False
        return len(self._advances) > 0 and statistics.median(self._advances) >= 2

    def one_per_round(self, upcoming: int | None = None) -> bool:
        """Whether the versions this device trains on advance by one per round (the median
        of the recent rounds, and of the round on ``upcoming`` after the last one, if newer):
        it trains on every version published."""
        advances = list(self._advances)
        last = self._last_version
        if upcoming is not None and last is not None and upcoming > last:
            advances.append(upcoming - last)
        return len(advances) > 0 and statistics.median(advances) <= 1

    def at(self, started: float, interval: float) -> float | None:
        """When (monotonic) to subscribe again for the round after the one that started at
        ``started``: the lead before its training is expected to end or its interval to pass,
        whichever is later; None: stay subscribed throughout (not :meth:`active`)."""
        lead, train_s = self.lead(), self._train_s
        if lead is None or train_s is None or not self.active(interval):
            return None
        return started + max(train_s, interval) - lead
