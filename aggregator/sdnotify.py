"""systemd ``Type=notify``: ``READY=1``, ``WATCHDOG=1``, ``STATUS=``, ``STOPPING=1`` datagrams.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op. Kept here rather than imported
from the agent: each service depends only on the ``fedmqtt`` core.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        addr = os.environ.get("NOTIFY_SOCKET") or None
        self._addr = ("\0" + addr[1:] if addr.startswith("@") else addr) if addr else None
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        ok = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_interval_s = int(usec) / 2e6 if ok and self._addr else None
        self._warned = False

    def notify(self, **fields: str) -> None:
        if self._addr is None:
            return
        data = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(data, self._addr)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self._addr, e)
