"""systemd ``Type=notify`` support without a dependency: datagrams to ``$NOTIFY_SOCKET``.

Both services use it. The protocol is a newline-separated list of ``KEY=value`` assignments
sent as one datagram to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` means
the Linux abstract namespace). A service sends ``READY=1`` once it is set up, ``STATUS=...``
when something an operator would want in ``systemctl status`` changes, ``WATCHDOG=1``
periodically when the unit has ``WatchdogSec=`` (systemd then exports ``$WATCHDOG_USEC``), and
``STOPPING=1`` on shutdown.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op, so service code does not need to
care where it runs; a notification that cannot be delivered is logged once, never raised:
losing ``STATUS`` must not kill a device. Nor may waiting for it: a datagram socket holds only
``net.unix.max_dgram_qlen`` (10 by default) unread messages, after which a plain ``sendto``
blocks until the reader catches up -- forever if systemd is wedged, freezing the agent's main
loop or the aggregator's event loop. Each send therefore waits at most
:data:`SEND_TIMEOUT_S`, then the notification is dropped (and logged). A lost ``WATCHDOG=1``
is followed by another half a ``WatchdogSec`` later; a lost ``READY=1`` makes systemd restart
the service after ``TimeoutStartSec``, which is what a hang would have come to anyway.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Final

log = logging.getLogger(__name__)

SEND_TIMEOUT_S: Final = 1.0


class Notifier:
    """Sends notifications to systemd; a disabled notifier (``address=None``) does nothing."""

    def __init__(
        self,
        address: str | None,
        watchdog_usec: int | None = None,
        *,
        send_timeout_s: float = SEND_TIMEOUT_S,
    ) -> None:
        self._address: str | None = None
        self._send_timeout_s = send_timeout_s
        if address:
            self._address = "\0" + address[1:] if address.startswith("@") else address
        self._watchdog_usec = watchdog_usec
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for through the environment (disabled if none).

        ``$WATCHDOG_PID``, when set, names the process the watchdog applies to; a child
        process (e.g. a test harness running the agent) must not ping its parent's watchdog.
        """
        env = os.environ if env is None else env
        watchdog: int | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(usec)
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send ``WATCHDOG=1``: half the timeout, as sd_watchdog_enabled(3) advises."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2e6

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=value`` lines; returns whether the datagram was sent."""
        if self._address is None:
            return False
        text = "\n".join(f"{k}={v}" for k, v in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.settimeout(self._send_timeout_s)
                s.sendto(text.encode("utf-8", "replace"), self._address)
        except OSError as e:
            if not self._warned:
                log.warning("cannot notify systemd at %r: %s", self._address, e)
                self._warned = True
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY="1", STATUS=_one_line(status))

    def status(self, status: str) -> bool:
        return self.notify(STATUS=_one_line(status))

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG="1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify(STOPPING="1", STATUS=_one_line(status))


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]
