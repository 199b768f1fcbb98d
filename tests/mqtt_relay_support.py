"""TCP relays on loopback, one of which reads the MQTT packets it passes (no tests here).

It stands between MQTT clients and a real Mosquitto and observes, per client id, how many QoS 1
PUBLISH packets are in flight (sent, not yet PUBACKed) in each direction, which is what a
broker that keeps one message in flight per session (``Receive Maximum = 1``) enforces. It can
also be armed to drop a connection instead of passing a client's PUBLISH on a topic, the way
a broker that refuses by disconnecting behaves (no PUBACK ever comes).
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from simulator.broker import free_port

CONNECT, PUBLISH, PUBACK, SUBSCRIBE = 1, 3, 4, 8


def split_packet(buf: bytearray) -> tuple[int, int, bytes] | None:
    """Take one whole MQTT packet off the front of ``buf``: (type, flags, whole packet)."""
    if len(buf) < 2:
        return None
    length, mult, i = 0, 1, 1
    while True:
        if i >= len(buf):
            return None
        b = buf[i]
        length += (b & 0x7F) * mult
        mult *= 128
        i += 1
        if not b & 0x80:
            break
    end = i + length
    if len(buf) < end:
        return None
    packet = bytes(buf[:end])
    del buf[:end]
    return packet[0] >> 4, packet[0] & 0x0F, packet


def _body(packet: bytes) -> bytes:
    i = 1
    while packet[i] & 0x80:
        i += 1
    return packet[i + 1 :]


def _varint(b: bytes, i: int) -> tuple[int, int]:
    n, mult = 0, 1
    while True:
        n += (b[i] & 0x7F) * mult
        mult *= 128
        i += 1
        if not b[i - 1] & 0x80:
            return n, i


def connect_client_id(packet: bytes) -> str:
    """The client id of an MQTT 5 (or 3.1.1) CONNECT packet."""
    b = _body(packet)
    i = 2 + int.from_bytes(b[0:2], "big")  # protocol name
    level = b[i]
    i += 1 + 1 + 2  # level, flags, keep-alive
    if level == 5:
        n, i = _varint(b, i)
        i += n
    n = int.from_bytes(b[i : i + 2], "big")
    return b[i + 2 : i + 2 + n].decode()


def publish_topic_and_id(packet: bytes, flags: int) -> tuple[str, int | None]:
    b = _body(packet)
    n = int.from_bytes(b[0:2], "big")
    topic = b[2 : 2 + n].decode()
    qos = (flags >> 1) & 3
    pid = int.from_bytes(b[2 + n : 4 + n], "big") if qos else None
    return topic, pid


def subscribe_filters(packet: bytes) -> list[str]:
    """The topic filters of an MQTT 5 SUBSCRIBE packet."""
    b = _body(packet)
    n, i = _varint(b, 2)  # after the packet id: the properties
    i += n
    filters = []
    while i < len(b):
        n = int.from_bytes(b[i : i + 2], "big")
        filters.append(b[i + 2 : i + 2 + n].decode())
        i += 2 + n + 1  # the filter and its options byte
    return filters


@dataclass
class Session:
    """What the relay saw of one client id, over all its connections."""

    up_in_flight: set[int] = field(default_factory=set)  # client -> broker, awaiting PUBACK
    down_in_flight: set[int] = field(default_factory=set)  # broker -> client
    max_up: int = 0
    max_down: int = 0
    published_up: int = 0
    published_down: int = 0
    # topic filter -> how many SUBSCRIBE packets named it
    subscribed: collections.Counter[str] = field(default_factory=collections.Counter)


class TcpRelay:
    """A TCP relay from 127.0.0.1:``port`` to ``target_port`` on loopback. ``cut()`` closes
    every relayed connection and stops listening (a dial is refused, as with a link or host
    that is down); ``restore()`` listens again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._srv: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        with self._lock:
            if self._srv is None:
                self._srv = socket.create_server(("127.0.0.1", self.port))
                threading.Thread(target=self._accept, args=(self._srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                conn.close()
                continue
            up.settimeout(None)
            with self._lock:
                self._socks += [conn, up]
            state: dict[str, str] = {}  # shared by both directions of one connection
            threading.Thread(target=self._pump, args=(conn, up, True, state), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, conn, False, state), daemon=True).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, upward: bool, state: dict[str, str]
    ) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            srv, self._srv = self._srv, None
            socks, self._socks = self._socks, []
        if srv is not None:
            # shutdown() stops the listening (and wakes the blocked accept) on Linux;
            # close() alone would leave the socket listening until accept returns.
            with contextlib.suppress(OSError):
                srv.shutdown(socket.SHUT_RDWR)
            srv.close()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.cut()


class MqttRelay(TcpRelay):
    """A :class:`TcpRelay` that reads the MQTT packets it passes; see the module docstring."""

    def __init__(self, target_port: int) -> None:
        self.sessions: dict[str, Session] = {}
        self.cuts: list[str] = []  # topics of PUBLISH packets answered with a dropped connection
        self._cut_when: Callable[[str, str], bool] | None = None
        super().__init__(target_port)

    def cut_on_publish(self, when: Callable[[str, str], bool]) -> None:
        """Drop the connection, without passing it on, at the next client PUBLISH for which
        ``when(client_id, topic)`` is true (once)."""
        with self._lock:
            self._cut_when = when

    def session(self, client_id: str) -> Session:
        with self._lock:
            return self.sessions.setdefault(client_id, Session())

    def _pump(
        self, src: socket.socket, dst: socket.socket, upward: bool, state: dict[str, str]
    ) -> None:
        buf = bytearray()
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                buf += data
                out = bytearray()
                while (p := split_packet(buf)) is not None:
                    kind, flags, packet = p
                    if not self._observe(kind, flags, packet, upward, state):
                        dst.sendall(out)
                        raise OSError("cut")
                    out += packet
                dst.sendall(out)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _observe(
        self, kind: int, flags: int, packet: bytes, upward: bool, state: dict[str, str]
    ) -> bool:
        """Account for one packet; False to drop the connection instead of passing it."""
        if kind == CONNECT and upward:
            state["id"] = connect_client_id(packet)
            s = self.session(state["id"])
            with self._lock:  # a new connection: nothing of the old one is in flight on it
                s.up_in_flight.clear()
                s.down_in_flight.clear()
            return True
        cid = state.get("id")
        if cid is None:
            return True
        s = self.session(cid)
        with self._lock:
            if kind == PUBLISH:
                topic, pid = publish_topic_and_id(packet, flags)
                if upward and self._cut_when is not None and self._cut_when(cid, topic):
                    self._cut_when = None
                    self.cuts.append(topic)
                    return False
                if pid is not None:
                    inflight = s.up_in_flight if upward else s.down_in_flight
                    inflight.add(pid)
                    if upward:
                        s.published_up += 1
                        s.max_up = max(s.max_up, len(inflight))
                    else:
                        s.published_down += 1
                        s.max_down = max(s.max_down, len(inflight))
            elif kind == SUBSCRIBE and upward:
                s.subscribed.update(subscribe_filters(packet))
            elif kind == PUBACK:
                pid = int.from_bytes(_body(packet)[0:2], "big")
                # A PUBACK going down settles an upward PUBLISH, and the other way round.
                (s.down_in_flight if upward else s.up_in_flight).discard(pid)
        return True
