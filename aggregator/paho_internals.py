"""The one module that uses private attributes of paho-mqtt and aiomqtt: the aggregator's
receive and acknowledgement fast path, behind :class:`FastPath`.

:class:`aggregator.mqtt.MqttLink` drives aiomqtt (MQTT 5, manual PUBACKs) and reaches paho only
through :class:`FastPath` and paho's public API. A ``tests/`` check keeps every other module of
the project off these attributes.

The contract with the pinned libraries (``paho-mqtt >=2.1,<3``, ``aiomqtt >=2.5,<3``,
pyproject.toml), each item checked by :func:`missing`:

* ``aiomqtt.Client._client``: the ``paho.Client`` that aiomqtt drives. Needed for paho's manual
  acknowledgements (``manual_ack_set``/``ack``), which aiomqtt does not expose, and for all of
  the following.
* ``paho.Client._handle_publish``: paho calls it for every PUBLISH it has read itself. It is
  replaced per client by a handler that decodes QoS 0/1 packets with
  :mod:`aggregator.publishpacket` (one copy of the payload) and hands them to ``deliver``; QoS 2
  goes to paho's own handler. With manual acknowledgements paho's handler does nothing else for
  QoS 0/1 (no state, no PUBACK).
* ``paho.Client._sock`` (paho reads only through ``_sock.recv``, in ``_sock_recv``, called by
  ``_packet_read``): replaced right after the socket opens, before anything is read, by a
  :class:`~aggregator.readahead.ReadAhead` around it.
* ``paho.Client._in_packet`` (a dict whose ``"command"`` is 0 between packets): a packet that
  paho has started to read is left to paho.
* ``paho.Client._msgtime_mutex``, ``paho.Client._last_bytes_received`` and
  ``paho.mqtt.client.time_func``: paho's keepalive clock, advanced for every packet read past
  paho.
* ``paho.Client._packet_queue(command, packet, mid, qos)``: queues bytes as one outgoing packet,
  so that the PUBACKs of a batch go out as one write.
* ``aiomqtt.Client._disconnected``: the future aiomqtt completes when a connection ends. After
  an unexpected disconnection it holds an exception that aiomqtt's ``__aexit__`` never
  retrieves, so asyncio logs "Future exception was never retrieved" (an ERROR, with a
  traceback) whenever it is collected; :func:`retrieve_disconnect_error` retrieves it. Without
  the attribute it does nothing: the only cost is that log line.

There is no fallback: importing this module raises :class:`MissingInternalsError` (an
``ImportError``) naming what a paho release lacks, and :func:`paho_client` does the same for
aiomqtt, so the aggregator refuses to start instead of running a slower path.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import struct
from collections.abc import Callable, Iterable
from typing import Any, Final

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from aggregator.publishpacket import MalformedPublishError, decode_publish
from aggregator.readahead import WOULD_BLOCK, ReadAhead

log = logging.getLogger(__name__)

Deliver = Callable[[str, bytes, int, int], None]  # topic, payload, packet id, QoS
"""Where a received QoS 0/1 PUBLISH goes; called on the thread that reads the socket."""

# Methods of paho.Client the fast path calls or replaces, with the positional arguments each
# takes in that use.
_PAHO_METHODS: Final = {
    "_handle_publish": (),
    "_packet_read": (),
    "_sock_recv": (1,),
    "_packet_queue": (paho.PUBACK, b"", 0, 1),
}
# Attributes every paho.Client instance has from its construction on.
_PAHO_STATE: Final = ("_sock", "_in_packet", "_msgtime_mutex", "_last_bytes_received")
_PUBACK: Final = struct.Struct("!BBH")  # fixed header, remaining length 2, packet id


class MissingInternalsError(ImportError):
    """The installed paho-mqtt or aiomqtt lacks an internal the fast path needs."""


def missing() -> list[str]:
    """The internals of the installed paho-mqtt that the fast path needs and cannot find
    (``[]`` when all are there). aiomqtt's is checked per client by :func:`paho_client`."""
    out: list[str] = []
    for name, args in _PAHO_METHODS.items():
        method = getattr(paho.Client, name, None)
        try:
            inspect.signature(method).bind(None, *args)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            out.append(f"paho.Client.{name}() taking {len(args)} positional arguments")
    if not callable(getattr(paho, "time_func", None)):
        out.append("paho.mqtt.client.time_func")
    probe = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    out += [f"paho.Client().{name}" for name in _PAHO_STATE if not hasattr(probe, name)]
    in_packet = getattr(probe, "_in_packet", None)
    if hasattr(probe, "_in_packet") and not (
        isinstance(in_packet, dict) and in_packet.get("command") == 0
    ):
        out.append('paho.Client()._in_packet["command"] == 0 between packets')
    mutex = getattr(probe, "_msgtime_mutex", None)
    if hasattr(probe, "_msgtime_mutex") and not hasattr(mutex, "__enter__"):
        out.append("paho.Client()._msgtime_mutex as a lock")
    return out


def require() -> None:
    """Raise :class:`MissingInternalsError` if :func:`missing` finds anything."""
    gone = missing()
    if gone:
        raise MissingInternalsError(
            f"paho-mqtt {getattr(paho, '__version__', '?')} lacks what the aggregator's receive "
            f"path uses: {'; '.join(gone)}. Install a paho-mqtt within the pins of "
            "pyproject.toml."
        )


def paho_client(client: aiomqtt.Client) -> paho.Client:
    """The paho client that ``client`` drives (see the module docstring)."""
    pc = getattr(client, "_client", None)
    if not isinstance(pc, paho.Client):
        raise MissingInternalsError(
            f"aiomqtt {getattr(aiomqtt, '__version__', '?')}: Client._client is not a "
            "paho.Client. Install an aiomqtt within the pins of pyproject.toml."
        )
    return pc


def retrieve_disconnect_error(client: aiomqtt.Client) -> None:
    """Mark the exception of ``client``'s unexpected disconnection as retrieved (the link has
    handled the disconnection; see the module docstring)."""
    fut = getattr(client, "_disconnected", None)
    if isinstance(fut, asyncio.Future) and fut.done() and not fut.cancelled():
        fut.exception()


class FastPath:
    """The receive and acknowledgement fast path on one paho client (one per aiomqtt client,
    so one per connection attempt). Created before the client connects; :meth:`adopt_socket`
    is called from paho's ``on_socket_open`` (on the thread that connects), the others on the
    event loop thread that reads the client's socket.

    * :meth:`adopt_socket` from paho's ``on_socket_open``: paho reads through the returned
      :class:`ReadAhead` from then on;
    * :meth:`packet_reader`: reads one packet (``loop_read``'s contract), decoding a whole QoS
      0/1 PUBLISH straight from the read-ahead buffer;
    * :meth:`ack_qos1`: PUBACKs for packet ids received at QoS 1 on the current connection, as
      one write.
    """

    def __init__(self, client: aiomqtt.Client, deliver: Deliver, *, name: str) -> None:
        self.paho = pc = paho_client(client)
        self._deliver = deliver
        self._name = name
        paho_handler = pc._handle_publish

        def handle_publish() -> MQTTErrorCode:
            inpacket = pc._in_packet  # paho replaces this dict after every packet
            header = inpacket["command"]
            if header & 0x06 == 0x04:  # QoS 2
                return paho_handler()
            try:
                p = decode_publish(header, inpacket["packet"])
            except MalformedPublishError as e:
                log.error("%s: malformed PUBLISH from the broker: %s", name, e)
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
            deliver(p.topic, p.payload, p.mid, p.qos)
            return MQTTErrorCode.MQTT_ERR_SUCCESS

        pc._handle_publish = handle_publish  # type: ignore[method-assign]

    def adopt_socket(self, sock: Any) -> ReadAhead:
        """Make paho read ``sock`` (just opened, nothing read yet) through a read-ahead buffer,
        and return that buffer: the socket paho reports from now on."""
        wrapped = ReadAhead(sock)
        self.paho._sock = wrapped
        return wrapped

    def packet_reader(self, sock: ReadAhead) -> Callable[[], MQTTErrorCode]:
        """A function that reads one packet: a QoS 0/1 PUBLISH straight from ``sock``'s buffer,
        anything else through paho's ``loop_read``.

        paho assembles every packet from several reads into a ``bytearray`` before its handler
        sees it (two more copies of each payload). Whole PUBLISH packets already buffered are
        decoded in place instead, copying the payload once. paho stays the reader of every
        other packet (CONNACK, SUBACK, PUBACKs of our own publishes, PINGRESP, DISCONNECT, QoS
        2), of a packet it has started to read, and of a malformed PUBLISH, which its read
        then hands to the replaced ``_handle_publish`` to report the protocol error. Every
        packet taken here advances paho's keepalive clock, as paho's own read does.
        """
        return _framed_reader(self.paho, sock, self._deliver)

    def ack_qos1(self, mids: Iterable[int]) -> None:
        """Queue PUBACKs (reason Success, which MQTT 5.0 section 3.4.2.1 lets us omit) for
        ``mids`` as one write: paho would queue a packet, wake its writer and ``send`` each."""
        pack = _PUBACK.pack
        blob = b"".join([pack(paho.PUBACK, 2, mid) for mid in mids])
        if blob:
            self.paho._packet_queue(paho.PUBACK, blob, 0, 1)


def _framed_reader(
    pc: paho.Client, sock: ReadAhead, deliver: Deliver
) -> Callable[[], MQTTErrorCode]:
    """:meth:`FastPath.packet_reader`; ``pc`` needs only the attributes it reads here."""
    msgtime = pc._msgtime_mutex
    loop_read = pc.loop_read
    time_func = paho.time_func
    success = MQTTErrorCode.MQTT_ERR_SUCCESS
    again = MQTTErrorCode.MQTT_ERR_AGAIN

    def read_one() -> MQTTErrorCode:
        if pc._in_packet["command"]:  # paho is in the middle of a packet
            return loop_read()
        header, offset, total = sock.peek_packet()
        if header == WOULD_BLOCK:
            return again  # the kernel is drained: wait for the socket to be readable
        if header & 0xF0 != 0x30 or header & 0x06 == 0x04:  # not PUBLISH, or QoS 2
            return loop_read()  # also UNFRAMED: end of stream, malformed length
        with sock.view(offset, total) as body:
            try:
                p = decode_publish(header, body)
            except MalformedPublishError:
                p = None
        if p is None:
            return loop_read()
        sock.consume(total)
        with msgtime:
            pc._last_bytes_received = time_func()
        deliver(p.topic, p.payload, p.mid, p.qos)
        return success

    return read_one


require()
