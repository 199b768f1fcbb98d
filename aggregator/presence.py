"""Which devices are online, from their signed, retained presence messages.

Each agent publishes ``online`` on ``fl/<fed>/status/<id>`` after connecting and leaves a signed
``offline`` last will, both retained, so subscribing gives the current state of every device at
once. A presence message is believed only if it verifies with the device's enrolled key and
names the topic's device; an older timestamp never overrides a newer one (a retained message
redelivered after a reconnect must not resurrect a device).
"""

from __future__ import annotations

from aggregator.devices import DeviceKeys
from fedmqtt import wire
from fedmqtt.errors import SENDER_MISMATCH, UNKNOWN_DEVICE, RejectedError

_MAX_STATUS_BYTES = 4096


class Presence:
    def __init__(self, federation: str, keys: DeviceKeys) -> None:
        self.federation = federation
        self.keys = keys
        self._state: dict[str, tuple[str, float]] = {}

    def handle(self, device: str, payload: bytes) -> None:
        """Apply one status message; raises RejectedError if it is not believable."""
        if not payload:  # a cleared retained message: the device was removed
            self._state.pop(device, None)
            return
        verifier = self.keys.get(device)
        if verifier is None:
            raise RejectedError(UNKNOWN_DEVICE, f"status from unenrolled device {device!r}")
        msg = wire.decode(payload, wire.Status, verifier, max_bytes=_MAX_STATUS_BYTES)
        if msg.sender != device or msg.federation != self.federation:
            raise RejectedError(SENDER_MISMATCH, "status for another device or federation")
        old = self._state.get(device)
        if old is None or msg.at >= old[1]:
            self._state[device] = (msg.state, msg.at)

    def online(self) -> int:
        return sum(1 for state, _ in self._state.values() if state == "online")

    def state_of(self, device: str) -> str | None:
        """``online`` / ``offline`` as the device last said, None if unknown or removed."""
        s = self._state.get(device)
        return s[0] if s is not None else None

    def devices(self) -> dict[str, str]:
        return {d: s for d, (s, _) in sorted(self._state.items())}
