"""A token bucket per device: ``[limits] device_rate`` updates a second, ``device_burst`` at once.

An update over its device's rate is refused at once (``rate_limited``), counted and
acknowledged in its turn like any other refusal. It is never delayed: PUBACKs go to the broker
in arrival order for every device together, so holding back one device's acknowledgements to
slow it down would hold back everyone's. Only authenticated updates reach the bucket (the
device is the topic's, which the broker's ACL pins to the device's account), so a bucket
exists only for enrolled devices. The buckets are not checkpointed: after a restart every
device starts with a full burst.
"""

from __future__ import annotations

from fedmqtt.errors import RATE_LIMITED, RejectedError


class DeviceRate:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, at)

    def take(self, device: str, now: float) -> None:
        """Spend one of ``device``'s tokens at monotonic time ``now``, or RejectedError
        (``rate_limited``) if it has none; a refused update spends nothing."""
        if self.rate <= 0:
            return
        tokens, at = self._buckets.get(device, (self.burst, now))
        if now > at:
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            at = now
        if tokens < 1.0:
            self._buckets[device] = (tokens, at)
            raise RejectedError(
                RATE_LIMITED,
                f"device {device!r} sends faster than [limits] device_rate {self.rate:g}/s "
                f"(burst {self.burst:g})",
            )
        self._buckets[device] = (tokens - 1.0, at)
