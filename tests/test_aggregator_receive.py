"""The aggregator's receive path: read-ahead socket, PUBLISH decoder, and both through Mosquitto."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_aggregator_support import client

import aggregator.mqtt
from aggregator.config import BrokerConfig
from aggregator.mqtt import Incoming, MqttLink
from aggregator.paho_internals import _framed_reader
from aggregator.publishpacket import MalformedPublishError, decode_publish
from aggregator.readahead import CHUNK, UNFRAMED, WOULD_BLOCK, ReadAhead
from fedmqtt import topics
from simulator.broker import Mosquitto
from simulator.linkrun import running


# ------------------------------------------------------------------ PUBLISH decoder
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _publish(topic: bytes, payload: bytes, *, qos: int, mid: int, props: bytes = b"\x00") -> bytes:
    """Variable header + payload of a PUBLISH, laid out as MQTT 5.0 section 3.3 says."""
    return (
        struct.pack("!H", len(topic))
        + topic
        + (struct.pack("!H", mid) if qos else b"")
        + props
        + payload
    )


def _props_obj(**values: object) -> Properties:
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for k, v in values.items():
        setattr(p, k, v)
    return p


def _props(**values: object) -> bytes:
    return bytes(_props_obj(**values).pack())  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("qos", [0, 1])
def test_decode_publish_reads_topic_mid_and_payload_past_the_properties(qos: int) -> None:
    props = _props(
        UserProperty=[("a", "b"), ("c", "d" * 300)],
        ContentType="application/x-msgpack",
        MessageExpiryInterval=60,
        CorrelationData=b"\x80" * 200,  # long enough for a two-byte property length
    )
    assert props[0] & 0x80  # the property length is a multi-byte variable integer
    payload = bytes(range(256)) * 40
    header = 0x30 | (qos << 1) | 0x08 | 0x01
    p = decode_publish(
        header,
        bytearray(_publish("fl/f/updates/dé".encode(), payload, qos=qos, mid=513, props=props)),
    )
    assert (p.topic, p.payload, p.mid, p.qos, p.dup, p.retain) == (
        "fl/f/updates/dé",
        payload,
        513 if qos else 0,
        qos,
        True,
        True,
    )
    assert type(p.payload) is bytes


def _paho_decoded(header: int, packet: bytes) -> tuple[bytes, bytes, int, int]:
    """What paho's own PUBLISH handler (the one the fast path replaces) makes of a packet.

    Drives ``Client._handle_publish`` directly -- the private entry point that
    :class:`aggregator.paho_internals.FastPath` replaces, checked by
    tests/test_transport_internals.py -- with manual acknowledgements, so nothing is sent."""
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.manual_ack_set(True)
    got: list[paho.MQTTMessage] = []
    c.on_message = lambda _c, _u, m: got.append(m)
    c._in_packet = {  # type: ignore[typeddict-item]
        "command": header,
        "have_remaining": 1,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": len(packet),
        "packet": bytearray(packet),
        "to_process": 0,
        "pos": 0,
    }
    assert c._handle_publish() == 0
    (m,) = got
    return m._topic, bytes(m.payload), m.mid, m.qos


def test_decode_publish_agrees_with_paho_on_random_packets() -> None:
    rng = random.Random(7)
    for _ in range(300):
        qos = rng.choice([0, 1])
        topic = "".join(rng.choice("ab/+é_") for _ in range(rng.randint(1, 40))).encode()
        props = (
            _props(UserProperty=[("k", "v" * rng.randint(0, 200))])
            if rng.random() < 0.5
            else b"\x00"
        )
        payload = rng.randbytes(rng.randint(0, 3000))
        header = 0x30 | (qos << 1)
        packet = _publish(topic, payload, qos=qos, mid=rng.randint(1, 65535), props=props)
        ours = decode_publish(header, packet)
        assert (ours.topic.encode(), ours.payload, ours.mid, ours.qos) == _paho_decoded(
            header, packet
        )


@pytest.mark.parametrize(
    ("header", "packet", "needle"),
    [
        (0x32, b"", "no topic length"),
        (0x32, b"\x00", "no topic length"),
        (0x32, b"\x00\x00\x00\x01\x00", "empty topic"),
        (0x32, b"\x00\x09abc", "past the packet"),
        (0x32, b"\x00\x02\xff\xfe\x00\x01\x00", "not UTF-8"),
        (0x32, b"\x00\x01a\x00", "no packet identifier"),
        (0x32, b"\x00\x01a\x00\x00\x00", "identifier 0"),
        (0x32, b"\x00\x01a\x00\x01", "property length runs past"),
        (0x32, b"\x00\x01a\x00\x01\x80", "property length runs past"),
        (0x32, b"\x00\x01a\x00\x01\x80\x80\x80\x80\x01", "longer than four bytes"),
        (0x32, b"\x00\x01a\x00\x01\x05abc", "properties run past"),
        (0x36, b"\x00\x01a\x00\x01\x00", "QoS 3"),
    ],
)
def test_decode_publish_refuses_malformed_packets(header: int, packet: bytes, needle: str) -> None:
    with pytest.raises(MalformedPublishError, match=needle):
        decode_publish(header, packet)


# ------------------------------------------------------------------ read-ahead socket
Pair = tuple[socket.socket, socket.socket]


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A connected socket pair: (sending end, non-blocking receiving end)."""
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        yield a, b


def test_read_ahead_returns_the_stream_unchanged(pair: Pair) -> None:
    a, b = pair
    data = random.Random(3).randbytes(CHUNK * 3 + 17)
    a.sendall(data[:4096])
    sock = ReadAhead(b)
    got = bytearray()
    rng = random.Random(4)
    sent = 4096
    while len(got) < len(data):
        try:
            piece = sock.recv(rng.choice([1, 1, 2, 100, 5000, CHUNK + 1]))
        except BlockingIOError:
            assert sock.pending() == 0  # only ever raised when nothing is buffered
            a.sendall(data[sent : sent + 4096])  # fits the drained socket buffer
            sent += 4096
            continue
        assert piece
        got += piece
    assert bytes(got) == data
    assert sock.pending() == 0
    a.shutdown(socket.SHUT_WR)
    assert sock.recv(10) == b""  # end of stream, as a socket reports it
    assert sock.fileno() == b.fileno()  # everything else is the socket's


class _CountingSocket:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.recvs = 0

    def recv(self, n: int) -> bytes:
        self.recvs += 1
        return self.sock.recv(n)

    def recv_into(self, buf: bytearray | memoryview, n: int = 0) -> int:
        self.recvs += 1
        return self.sock.recv_into(buf, n)


def test_read_ahead_takes_many_small_reads_from_one_recv(
    pair: Pair,
) -> None:
    a, b = pair
    a.sendall(bytes(range(200)) * 50)
    inner = _CountingSocket(b)
    sock = ReadAhead(inner)
    got = b"".join(sock.recv(1) for _ in range(10_000))
    assert got == bytes(range(200)) * 50
    assert inner.recvs == 1


def test_read_ahead_pending_counts_what_it_holds(pair: Pair) -> None:
    a, b = pair
    a.sendall(b"0123456789")
    sock = ReadAhead(b)
    assert sock.recv(1) == b"0"
    assert sock.pending() == 9  # the kernel has nothing left; epoll would not wake a reader
    assert sock.recv(100) == b"123456789"
    assert sock.pending() == 0
    with pytest.raises(BlockingIOError):
        sock.recv(1)


def _mqtt_packet(header: int, body: bytes) -> bytes:
    """A packet with MQTT's fixed header: the byte, then the remaining length (varint)."""
    n, length = len(body), bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            return bytes([header]) + bytes(length) + body


def test_read_ahead_frames_packets_of_any_size_and_mixes_with_plain_reads(
    pair: Pair,
) -> None:
    """Packets from empty to several chunks long, whose lengths take one to four bytes, arrive
    in arbitrary pieces: peek_packet() reports each one once it is all buffered (never a part
    of one), view() shows exactly its variable header and payload, and a packet left to
    recv() instead (as paho reads the packets the framer leaves it) comes out byte for byte."""
    rng = random.Random(21)
    sizes = [0, 1, 2, 126, 127, 128, 16_383, 16_384, 100_000, CHUNK - 3, CHUNK + 7, 3 * CHUNK]
    sizes += [rng.randrange(0, 3_000) for _ in range(200)]
    rng.shuffle(sizes)
    packets = [(0x30 | (i % 4 << 1), rng.randbytes(n)) for i, n in enumerate(sizes)]
    stream = b"".join(_mqtt_packet(h, body) for h, body in packets)
    a, b = pair
    sock = ReadAhead(b)
    sent = 0
    for i, (header, body) in enumerate(packets):
        while True:
            found, offset, total = sock.peek_packet()
            if found != WOULD_BLOCK:
                break
            piece = rng.choice([1, 2, 3, 700, 9_000, 60_000])  # fits the drained buffer
            a.sendall(stream[sent : sent + piece])
            sent += piece
        assert found == header
        assert total == offset + len(body)
        if i % 3:
            with sock.view(offset, total) as view:
                assert bytes(view) == body
            sock.consume(total)
        else:
            got = bytearray()
            while len(got) < total:
                got += sock.recv(min(rng.choice([1, 4, total]), total - len(got)))
            assert bytes(got) == _mqtt_packet(header, body)
    assert sent >= len(stream)
    assert sock.peek_packet()[0] == WOULD_BLOCK
    assert sock.pending() == 0
    a.shutdown(socket.SHUT_WR)
    assert sock.peek_packet()[0] == UNFRAMED  # end of stream: paho's read reports it
    assert sock.recv(10) == b""


def test_read_ahead_leaves_a_malformed_length_to_paho(
    pair: Pair,
) -> None:
    a, b = pair
    a.sendall(b"\x30\x80\x80\x80\x80\x01rest")
    sock = ReadAhead(b)
    assert sock.peek_packet()[0] == UNFRAMED
    assert sock.recv(1) == b"\x30"  # nothing consumed


class _PahoReadState:
    """The parts of a paho client the framed reader touches; loop_read() is recorded."""

    def __init__(self) -> None:
        self._in_packet = {"command": 0}
        self._msgtime_mutex = threading.Lock()
        self._last_bytes_received = 0.0
        self.loop_reads = 0

    def loop_read(self) -> int:
        self.loop_reads += 1
        return 0


def test_framed_reader_decodes_publish_in_place_and_leaves_the_rest_to_paho(
    pair: Pair,
) -> None:
    """A whole PUBLISH is delivered from the buffer and keeps paho's keepalive clock; a
    malformed PUBLISH, a PINGRESP and a packet paho has started are left in the buffer for
    paho's own read (which reports a malformed one as a protocol error); a partial packet
    waits for the socket."""
    pc = _PahoReadState()
    good = b"\x00\x03a/b\x00\x07\x00payload"  # topic a/b, packet id 7, no properties
    a, b = pair
    sock = ReadAhead(b)
    got: list[tuple[str, bytes, int, int]] = []
    read_one = _framed_reader(pc, sock, lambda *m: got.append(m))  # type: ignore[arg-type]
    a.sendall(_mqtt_packet(0x32, good))
    assert read_one() == 0
    assert got == [("a/b", b"payload", 7, 1)]
    assert pc._last_bytes_received > 0 and pc.loop_reads == 0 and sock.pending() == 0

    for packet in (_mqtt_packet(0x32, b"\x00\x09a"), _mqtt_packet(0xD0, b"")):
        a.sendall(packet)
        assert read_one() == 0
        assert pc.loop_reads == 1 and sock.pending() == len(packet)  # not consumed
        sock.recv(len(packet))  # what paho's read would have taken
        pc.loop_reads = 0

    a.sendall(_mqtt_packet(0x32, good)[:5])
    assert read_one() == paho.MQTT_ERR_AGAIN and pc.loop_reads == 0
    pc._in_packet = {"command": 0x32}  # paho is mid-packet: it goes on reading
    assert read_one() == 0 and pc.loop_reads == 1


# ------------------------------------------------------------------ through Mosquitto
def _publish_v5(
    broker: Mosquitto, messages: list[tuple[str, bytes, int, Properties | None]]
) -> None:
    """Publish (topic, payload, qos, properties) in order with a plain paho MQTT 5 client."""
    c = client(broker.port, "publisher")
    try:
        for topic, payload, qos, props in messages:
            c.publish(topic, payload, qos=qos, properties=props).wait_for_publish(10)
    finally:
        c.loop_stop()
        c.disconnect()


def _link(broker: Mosquitto, client_id: str, receive_maximum: int = 1000) -> MqttLink:
    """An MqttLink subscribed to fl/recv/updates/+ (run it with ``async with running(link)``)."""
    cfg = BrokerConfig(host=broker.host, port=broker.port, client_id=client_id)
    return MqttLink(cfg, subscriptions=["fl/recv/updates/+"], receive_maximum=receive_maximum)


def test_link_receives_exact_messages_with_properties_through_mosquitto(
    broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small and large (above the read-ahead chunk) messages, QoS 0 and 1, with properties:
    what the link delivers is byte for byte what was published, in order, and the PUBLISH
    packets were read past paho; after acking, a new connection of the same session gets
    nothing again, while the unacknowledged one comes back."""
    paho_reads = 0
    paho_packet_read = paho.Client._packet_read

    def counting_packet_read(self: paho.Client) -> MQTTErrorCode:
        nonlocal paho_reads
        paho_reads += 1
        return paho_packet_read(self)

    monkeypatch.setattr(paho.Client, "_packet_read", counting_packet_read)
    topic = "fl/recv/updates/dev-1"
    rng = random.Random(11)
    sizes = [0, 1, 100, 2_000, 100_000, CHUNK + 5_000, 3 * CHUNK, 50]
    payloads = [rng.randbytes(n) for n in sizes]

    def publish_all() -> None:
        props = [
            _props_obj(UserProperty=[("i", str(i))], ContentType="x/y") for i in range(len(sizes))
        ]
        _publish_v5(broker, [(topic, p, i % 2, props[i]) for i, p in enumerate(payloads)])

    async def receive(n: int, ack_all_but_last: bool) -> list[tuple[str, bytes, int]]:
        async with running(_link(broker, "recv-test", 100)) as link:
            if n:
                await asyncio.get_running_loop().run_in_executor(None, publish_all)
            got: list[Incoming] = []
            deadline = asyncio.get_running_loop().time() + 15
            while len(got) < n and asyncio.get_running_loop().time() < deadline:
                await link.wait(0.2)
                got.extend(link.take(100))
            if not n:
                await link.wait(1.0)
                got.extend(link.take(100))
            if ack_all_but_last:
                link.ack([m for m in got if m.qos][:-1])
                await asyncio.sleep(0.5)
            return [(m.topic, m.payload, m.qos) for m in got]

    got = asyncio.run(receive(len(payloads), ack_all_but_last=True))
    assert got == [(topic, p, i % 2) for i, p in enumerate(payloads)]
    # The framed reader takes the PUBLISH packets itself; paho reads CONNACK and SUBACK.
    assert paho_reads < len(payloads)
    # Same session again, publishing nothing: only the one QoS 1 message left unacknowledged.
    again = asyncio.run(receive(0, ack_all_but_last=False))
    last_qos1 = max(i for i in range(len(payloads)) if i % 2)
    assert again == [(topic, payloads[last_qos1], 1)]


def test_batched_pubacks_free_the_receive_window_and_end_redelivery(broker: Mosquitto) -> None:
    """The PUBACKs of a batch go out as one write: the broker must count every one of them.
    With Receive Maximum 20 it stops sending after 20 unacknowledged messages, so 300 arrive
    only if each batched acknowledgement frees its slot; the link is never disconnected for a
    malformed packet, and the same session afterwards gets nothing redelivered."""
    topic = "fl/recv/updates/dev-acks"
    payloads = [i.to_bytes(2, "big") for i in range(300)]

    def publish_all() -> None:
        _publish_v5(broker, [(topic, p, 1, None) for p in payloads])

    async def receive(expect: int) -> tuple[list[bytes], int, int]:
        async with running(_link(broker, "recv-acks", 20)) as link:
            loop = asyncio.get_running_loop()
            publishing = loop.run_in_executor(None, publish_all) if expect else None
            got: list[bytes] = []
            deadline = loop.time() + (20 if expect else 1.0)
            acked = 0
            while len(got) < max(expect, 1) and loop.time() < deadline:
                await link.wait(0.2)
                batch = link.take(1000)
                got.extend(m.payload for m in batch)
                acked += link.ack(batch)
            if publishing is not None:
                await publishing
            await asyncio.sleep(0.3)  # let the last PUBACKs reach the broker
            return got, acked, link.connects

    got, acked, connects = asyncio.run(receive(len(payloads)))
    assert got == payloads
    assert acked == len(payloads)
    assert connects == 1
    again, _, _ = asyncio.run(receive(0))
    assert again == []


def test_backlog_delivered_before_the_suback_is_acknowledged(broker: Mosquitto) -> None:
    """A resumed session with a backlog: the broker sends up to Receive Maximum queued
    messages right after CONNACK, ahead of the SUBACK of our (re-)subscription. A consumer
    that, like the service, takes and acknowledges messages as they come must get them
    acknowledged: unacknowledged, they would fill the receive window for the whole
    connection and nothing more would ever arrive."""
    topic = "fl/recv/updates/dev-backlog"
    payloads = [i.to_bytes(2, "big") * 50 for i in range(300)]

    async def consume(expect: int) -> list[bytes]:
        got: list[bytes] = []
        async with running(_link(broker, "recv-backlog", 50), wait_connected=False) as link:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + (15 if expect else 3)
            while (len(got) < expect or not link.connected.is_set()) and loop.time() < deadline:
                await link.wait(0.1)
                batch = link.take(20)  # not waiting for `connected`, as the service does not
                got.extend(m.payload for m in batch)
                link.ack(batch)
            await asyncio.sleep(0.3)
        return got

    assert asyncio.run(consume(0)) == []  # creates the session and its subscription
    _publish_v5(broker, [(topic, p, 1, None) for p in payloads])  # queued for the session
    assert asyncio.run(consume(len(payloads))) == payloads


def test_link_stops_reading_while_the_inbox_is_full_and_loses_nothing(
    broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backpressure: with nobody taking messages the inbox stops growing at the high-water
    mark (the rest waits in the socket and the broker); taking resumes reading, and every
    message arrives exactly once, in order."""
    monkeypatch.setattr(aggregator.mqtt, "INBOX_HIGH_BYTES", 50_000)
    monkeypatch.setattr(aggregator.mqtt, "INBOX_LOW_BYTES", 20_000)
    topic = "fl/recv/updates/dev-2"
    payloads = [i.to_bytes(4, "big") * 2_500 for i in range(60)]  # 10 KB each, 600 KB in all

    def publish_all() -> None:
        _publish_v5(broker, [(topic, p, 1, None) for p in payloads])

    async def main() -> tuple[int, list[bytes]]:
        async with running(_link(broker, "recv-bp")) as link:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, publish_all)
            await asyncio.sleep(1.0)  # plenty of time to read everything, were it not paused
            held = sum(len(m.payload) for m in link.inbox)
            got: list[bytes] = []
            deadline = loop.time() + 15
            while len(got) < len(payloads) and loop.time() < deadline:
                await link.wait(0.2)
                batch = link.take(3)
                got.extend(m.payload for m in batch)
                link.ack(batch)
            return held, got

    held, got = asyncio.run(main())
    assert 50_000 <= held < 50_000 + 10_000 + 100  # stopped right after crossing the mark
    assert got == payloads


def test_packets_left_in_the_read_ahead_buffer_are_read_without_new_socket_data(
    broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst ends after READ_BURST packets; packets already taken from the kernel into the
    read-ahead buffer never wake epoll again, so the reader must schedule itself. With one
    packet per burst, a batch of small messages and then silence must still all arrive."""
    monkeypatch.setattr(aggregator.mqtt, "READ_BURST", 1)
    topic = "fl/recv/updates/dev-3"
    payloads = [bytes([i]) * 100 for i in range(50)]

    async def main() -> list[bytes]:
        async with running(_link(broker, "recv-burst")) as link:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                None, _publish_v5, broker, [(topic, p, 0, None) for p in payloads]
            )
            got: list[bytes] = []
            deadline = loop.time() + 5  # far below the keepalive that would otherwise bring data
            while len(got) < len(payloads) and loop.time() < deadline:
                await link.wait(0.1)
                got.extend(m.payload for m in link.take(100))
            return got

    assert asyncio.run(main()) == payloads


@pytest.mark.parametrize("old", ["plain", "public-group"])
def test_a_filter_left_in_the_session_by_another_configuration_is_dropped(
    broker: Mosquitto, old: str
) -> None:
    """An aggregator session that subscribed with another configuration (no workers, or the
    public shared group before a secret one was set) keeps that subscription on the broker:
    without the unsubscribe on connect every update would arrive twice."""
    fed, group = "recv", topics.new_shared_group()
    stale = (
        topics.updates_filter(fed)
        if old == "plain"
        else topics.shared_updates_filter(topics.PUBLIC_SHARED_GROUP, fed)
    )
    cid = f"recv-stale-{old}"
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    earlier = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=paho.MQTTv5)
    subscribed = threading.Event()
    earlier.on_subscribe = lambda *a: subscribed.set()
    earlier.connect(broker.host, broker.port, clean_start=False, properties=props)
    earlier.loop_start()
    earlier.subscribe(stale, qos=1)
    assert subscribed.wait(5)
    earlier.disconnect()
    earlier.loop_stop()

    payloads = [i.to_bytes(2, "big") for i in range(50)]
    cfg = BrokerConfig(host=broker.host, port=broker.port, client_id=cid)
    link = MqttLink(
        cfg,
        subscriptions=[topics.shared_updates_filter(group, fed)],
        receive_maximum=100,
        unsubscriptions=topics.update_filters_of_other_configs(group, fed),
    )

    async def receive() -> list[bytes]:
        got: list[bytes] = []
        async with running(link) as live:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                None,
                _publish_v5,
                broker,
                [(f"fl/{fed}/updates/dev1", p, 1, None) for p in payloads],
            )
            # Stop at the last payload's first copy: the broker queues each message's copies
            # for this session together and in order, so every earlier copy is in by then.
            deadline = loop.time() + 10
            while payloads[-1] not in got and loop.time() < deadline:
                await live.wait(0.2)
                batch = live.take(1000)
                got.extend(m.payload for m in batch)
                live.ack(batch)
        return got

    assert asyncio.run(receive()) == payloads
