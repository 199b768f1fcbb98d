"""Decode an incoming MQTT 5 PUBLISH packet with one copy of its payload.

paho 2.x decodes a PUBLISH with a chain of ``struct.unpack("!H{n}s")`` calls, each of which
copies the whole rest of the packet (four copies of a 100 KB update before the application
sees it), and builds a ``Properties`` object the aggregator never reads. On the event-loop
thread, which must also hand the GIL back and forth with the engine, that was the largest cost
of receiving an update (docs/benchmarks.md). :func:`decode_publish` reads the variable header
in place and copies the payload out once.

What it needs from a PUBLISH (MQTT 5.0, section 3.3): the topic name (a length-prefixed UTF-8
string), the packet identifier (QoS 1 and 2), the property length (a variable byte integer) to
skip the properties, and the rest as payload. The aggregator never sets a Topic Alias Maximum,
so a broker must not send topic aliases (MQTT 5.0, 3.3.2.3.4): an empty topic name is a
protocol error here, as is any length that runs past the packet.
"""

from __future__ import annotations

from typing import NamedTuple


class MalformedPublishError(ValueError):
    """The packet is not a well-formed PUBLISH for this client."""


class Publish(NamedTuple):
    topic: str
    payload: bytes
    mid: int
    qos: int
    dup: bool
    retain: bool


def decode_publish(header: int, packet: bytes | bytearray | memoryview) -> Publish:
    """Decode the PUBLISH whose fixed-header byte is ``header`` and whose variable header and
    payload are ``packet`` (everything after the remaining length)."""
    qos = (header >> 1) & 0x03
    if qos == 3:
        raise MalformedPublishError("QoS 3")
    end = len(packet)
    if end < 2:
        raise MalformedPublishError("no topic length")
    pos = 2 + ((packet[0] << 8) | packet[1])
    if pos == 2:
        raise MalformedPublishError("empty topic name (topic aliases are not enabled)")
    if pos > end:
        raise MalformedPublishError("topic runs past the packet")
    try:
        topic = str(packet[2:pos], "utf-8")
    except UnicodeDecodeError:
        raise MalformedPublishError("topic is not UTF-8") from None
    mid = 0
    if qos:
        if pos + 2 > end:
            raise MalformedPublishError("no packet identifier")
        mid = (packet[pos] << 8) | packet[pos + 1]
        if mid == 0:
            raise MalformedPublishError("packet identifier 0")
        pos += 2
    length = 0
    for shift in (0, 7, 14, 21):
        if pos >= end:
            raise MalformedPublishError("property length runs past the packet")
        byte = packet[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        raise MalformedPublishError("property length longer than four bytes")
    pos += length
    if pos > end:
        raise MalformedPublishError("properties run past the packet")
    payload = bytes(memoryview(packet)[pos:])  # the one copy, whatever type ``packet`` is
    return Publish(topic, payload, mid, qos, dup=bool(header & 0x08), retain=bool(header & 0x01))
