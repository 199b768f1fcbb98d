"""A socket proxy that turns paho's many small reads into one large read.

paho reads a packet in pieces: ``recv(1)`` for the command byte, ``recv(1)`` for each byte of
the remaining length (three for a 100 KB update), then ``recv(rest)`` until the packet is
complete. Every ``recv`` is a system call that also releases the GIL, and taking the GIL back
while the engine or a verification thread holds it can take up to the interpreter's switch
interval. In a py-spy profile at d = 1e5 int8 these reads were 22 % of the event-loop
thread's time (docs/benchmarks.md). :class:`ReadAhead` answers those reads from one ``recv``
of up to :data:`CHUNK` bytes, so a burst of packets costs one system call instead of five or
more each.

Only ``recv`` and ``pending`` are changed; everything else (``send``, ``fileno``, ``close``,
TLS methods) goes to the wrapped socket. ``pending()`` counts the bytes held here (plus the TLS
layer's own, for an ``SSLSocket``): they are no longer visible to ``poll``/``epoll``, so a reader
must keep reading while ``pending()`` is non-zero -- see ``MqttLink._install_reader``.
"""

from __future__ import annotations

from typing import Any, Final

CHUNK: Final = 256 * 1024


class ReadAhead:
    """Wraps a connected non-blocking socket (plain or TLS); see the module docstring."""

    __slots__ = ("_buf", "_pos", "_sock")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, n: int) -> bytes:
        """Up to ``n`` bytes: from the read-ahead buffer, else from one large ``recv``.

        Raises what the socket raises when nothing is buffered (``BlockingIOError``,
        ``ssl.SSLWantReadError``, ``OSError``); returns ``b""`` at end of stream, as ``recv`` does.
        """
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail == 0:
            if n >= CHUNK:
                return bytes(self._sock.recv(n))
            buf = self._sock.recv(CHUNK)
            if len(buf) <= n:
                return bytes(buf)  # end of stream (b"") or no more than was asked for
            pos = 0
            avail = len(buf)
        if n >= avail:
            self._buf = b""
            self._pos = 0
            return buf[pos:] if pos else bytes(buf)
        self._buf = buf
        self._pos = pos + n
        return buf[pos : pos + n]

    def pending(self) -> int:
        """Bytes readable without touching the kernel: ours, plus the TLS layer's."""
        inner = getattr(self._sock, "pending", None)
        return len(self._buf) - self._pos + (inner() if callable(inner) else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def __repr__(self) -> str:
        return f"ReadAhead({self._sock!r}, buffered={len(self._buf) - self._pos})"
