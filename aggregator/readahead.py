"""A socket proxy that turns paho's many small reads into one large read, and frames packets.

paho reads a packet in pieces: ``recv(1)`` for the command byte, ``recv(1)`` for each byte of
the remaining length (three for a 100 KB update), then ``recv(rest)`` until the packet is
complete, appending each piece to a ``bytearray``. Every ``recv`` is a system call that also
releases the GIL, and taking the GIL back while the engine or a verification thread holds it
can take up to the interpreter's switch interval. :class:`ReadAhead` answers those reads from
one ``recv_into`` of up to :data:`CHUNK` bytes, so a burst of packets costs one system call
instead of five or more each.

It can also frame whole packets (:meth:`ReadAhead.peek_packet`, :meth:`ReadAhead.view`):
the aggregator's reader decodes PUBLISH packets straight from this buffer (one copy of the
payload) and leaves every other packet to paho, which then reads it through :meth:`recv`
(:meth:`aggregator.paho_internals.FastPath.packet_reader`, the one module that installs it as
paho's socket).

Only ``recv`` and ``pending`` are changed; everything else (``send``, ``fileno``, ``close``,
TLS methods) goes to the wrapped socket. ``pending()`` counts the bytes held here (plus the TLS
layer's own, for an ``SSLSocket``): they are no longer visible to ``poll``/``epoll``, so a reader
must keep reading while ``pending()`` is non-zero.
"""

from __future__ import annotations

import ssl
from typing import Any, Final

# The buffer, and so the most one read takes from the kernel; a packet larger than it grows the
# buffer (see _make_room). Its size is chosen by measurement: bench/link.py --read-chunks and
# docs/benchmarks.md.
CHUNK: Final = 1024 * 1024
# What peek_packet() found when no whole packet is buffered (else its fixed-header byte).
WOULD_BLOCK: Final = -1  # a partial packet (or nothing) is buffered and the kernel has no more
UNFRAMED: Final = -2  # end of stream or a malformed length: paho's own read must report it


class ReadAhead:
    """Wraps a connected non-blocking socket (plain or TLS); see the module docstring."""

    __slots__ = ("_buf", "_end", "_eof", "_inner", "_start")

    def __init__(self, sock: Any) -> None:
        self._inner = sock
        self._buf = bytearray(CHUNK)
        self._start = 0  # buffered bytes are _buf[_start:_end]
        self._end = 0
        self._eof = False

    def recv(self, n: int) -> bytes:
        """Up to ``n`` bytes: from the read-ahead buffer, else from one large read.

        Raises what the socket raises when nothing is buffered (``BlockingIOError``,
        ``ssl.SSLWantReadError``, ``OSError``); returns ``b""`` at end of stream, as ``recv`` does.
        """
        start = self._start
        avail = self._end - start
        if avail == 0:
            if self._eof:
                return b""
            if n >= CHUNK:
                data: bytes = self._inner.recv(n)  # large: straight from the socket
                return data
            got = self._inner.recv_into(self._buf, CHUNK)
            if got == 0:
                self._eof = True
                return b""
            start, avail = 0, got
            self._end = got
        take = min(n, avail)
        self._start = start + take
        if take == avail:
            self._start = self._end = 0
        with memoryview(self._buf) as view:
            return bytes(view[start : start + take])

    def peek_packet(self) -> tuple[int, int, int]:
        """``(fixed-header byte, offset of the variable header, total length)`` of the next
        packet once it is all buffered, reading from the socket as far as it needs and the
        kernel has data; else ``(WOULD_BLOCK, 0, 0)`` or ``(UNFRAMED, 0, 0)``. Nothing is
        consumed: look at the packet with :meth:`view` and take it with :meth:`consume`, or
        let paho read it through :meth:`recv`.

        Raises what the socket raises, except "would block"."""
        while True:
            buf, start, end = self._buf, self._start, self._end
            if end - start >= 2:
                remaining = 0
                for i in range(4):
                    if start + 1 + i >= end:
                        break
                    byte = buf[start + 1 + i]
                    remaining |= (byte & 0x7F) << (7 * i)
                    if not byte & 0x80:
                        total = 2 + i + remaining
                        if end - start >= total:
                            return buf[start], 2 + i, total
                        self._make_room(total)
                        break
                else:
                    return UNFRAMED, 0, 0  # a fifth length byte: paho reports the error
            if self._eof:
                return UNFRAMED, 0, 0
            if not self._fill():
                return WOULD_BLOCK, 0, 0

    def view(self, offset: int, total: int) -> memoryview:
        """Bytes ``offset:total`` of the packet :meth:`peek_packet` found, without consuming
        it. Release the view before the next call on this object."""
        start = self._start
        return memoryview(self._buf)[start + offset : start + total]

    def consume(self, total: int) -> None:
        """Drop the ``total``-byte packet :meth:`peek_packet` found."""
        self._start += total
        if self._start == self._end:
            self._start = self._end = 0

    def _make_room(self, total: int) -> None:
        """Make the buffer able to hold a ``total``-byte packet from ``_start``.

        A packet larger than the buffer grows it, and it keeps that size: the next large
        update reuses it instead of faulting in fresh pages. It is bounded by the largest
        packet the broker accepts (``max_packet_size``), one buffer per connection."""
        buf, start, end = self._buf, self._start, self._end
        if start + total <= len(buf):
            return
        if total > len(buf):
            bigger = bytearray(total + CHUNK)
            bigger[: end - start] = buf[start:end]
            self._buf = bigger
        else:
            buf[: end - start] = buf[start:end]  # same length: an in-place move
        self._start, self._end = 0, end - start

    def _fill(self) -> bool:
        """Read what the kernel has into the free end of the buffer; False if nothing."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            self._make_room(len(self._buf) - self._start + 1)
        with memoryview(self._buf) as view:
            try:
                got = self._inner.recv_into(view[self._end :])
            except (BlockingIOError, ssl.SSLWantReadError):
                return False
        if got == 0:
            self._eof = True
            return True  # the caller sees _eof
        self._end += got
        return True

    def pending(self) -> int:
        """Bytes readable without touching the kernel: ours, plus the TLS layer's."""
        inner = getattr(self._inner, "pending", None)
        return self._end - self._start + (inner() if callable(inner) else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return f"ReadAhead({self._inner!r}, buffered={self._end - self._start})"
