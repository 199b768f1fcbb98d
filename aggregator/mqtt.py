"""The ONE module that talks to aiomqtt: a persistent MQTT 5 session with manual PUBACKs.

Why these choices (numbers in docs/benchmarks.md and docs/aggregator.md):

* **Manual acknowledgements.** paho (under aiomqtt) normally PUBACKs an update as soon as it is
  read, before the aggregator has it on disk: a ``kill -9`` at that moment loses an update the
  broker considers delivered. paho >= 2.0 can leave the PUBACK to the application
  (``manual_ack_set(True)`` / ``ack(mid, qos)``); aiomqtt 2.5 does not expose it, so this adapter
  sets it on aiomqtt's paho client (``aiomqtt.Client._client``, checked at import). The service
  acknowledges a message only once the checkpoint covering it is durable.
* **MQTT 5, Receive Maximum.** The broker never has more than ``receive_maximum`` unacknowledged
  messages in flight to us, so the backlog held in this process is bounded (messages beyond it
  stay queued in the broker, whose config lifts ``max_queued_messages``) and nothing is ever
  dropped client-side: there is no client-side queue limit at all. MQTT 5 also returns PUBACK
  reason codes (a publish refused by the ACL is visible, on 3.1.1 it looks like a success) and
  carries the session expiry and the shared subscription used by scale-out workers.
* **Persistent session.** Fixed client id, ``clean_start=False`` and a Session Expiry Interval:
  the broker keeps our subscription and queues updates while we are away, and redelivers every
  unacknowledged one when we come back (with ``dup`` set).
* **A fast receive path.** Messages go from the PUBLISH handler straight into a deque that the
  service drains in batches; aiomqtt's per-message queue and iterator task are bypassed. Our
  socket reader (``MqttLink._install_reader``) replaces aiomqtt's one-packet-per-wake-up
  reader, the socket is read through :class:`~aggregator.readahead.ReadAhead` (one ``recv``
  for many packets instead of five or more calls per packet), and whole QoS 0/1 PUBLISH
  packets are decoded from its buffer by :mod:`aggregator.publishpacket` (one copy of the
  payload instead of paho's four; :meth:`MqttLink._framed_reader`). The first three took
  one process at d = 650 int8 from 45.7 % to 70.7 % of a bare paho MQTT 5 subscriber's rate
  in the same run; decoding from the buffer then cut the event-loop thread's CPU per message
  by half at 650 bytes (``bench/link.py``, docs/benchmarks.md). This module is where the
  coupling to aiomqtt's and paho's internals (``Client._client``, ``_sock``, ``_in_packet``,
  ``_msgtime_mutex``, ``_last_bytes_received``, ``_handle_publish``, and ``_packet_queue`` for
  batched PUBACKs, see :meth:`MqttLink.ack`) lives; both are pinned, each piece falls back to
  paho's own path if a release lacks what it needs, and the receive path is tested against a
  real Mosquitto.

Reconnects wait ``uniform(min, min(max, min * 2**attempt))`` seconds ("full jitter" with a
floor); the attempt count resets once a connection stayed up for :data:`STABLE_S`. Every
connection gets a new *generation* number: a message may only be acknowledged on the connection
it arrived on (packet ids are per connection), so messages of an older generation are never
acknowledged -- the broker redelivers them and the replay window recognises them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import select
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Final

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from aggregator.config import BrokerConfig
from aggregator.publishpacket import MalformedPublishError, decode_publish
from aggregator.readahead import WOULD_BLOCK, ReadAhead
from fedmqtt.mqttconf import backoff_delay, broker_password

log = logging.getLogger(__name__)

STABLE_S: Final = 30.0
READ_BURST: Final = 64  # packets read per wake-up of the event loop, at most ...
READ_BURST_BYTES: Final = 1 << 20  # ... and payload bytes: large updates leave the loop sooner
INBOX_HIGH_BYTES: Final = 8 << 20  # stop reading the socket while the inbox holds this much ...
INBOX_LOW_BYTES: Final = 4 << 20  # ... until the consumer has taken it below this
SUBSCRIBE_TIMEOUT_S: Final = 30.0

# The fast receive path replaces these paho internals; if a paho release renames them, the
# service falls back to paho's own (slower) path instead of failing.
FAST_RECEIVE: Final = all(
    hasattr(paho.Client, name) for name in ("_handle_publish", "_packet_read", "_sock_recv")
)
# The framed reader (MqttLink._framed_reader) also keeps paho's keepalive clock.
FRAMED_RECEIVE: Final = FAST_RECEIVE and hasattr(paho, "time_func")
_FRAMED_STATE: Final = ("_in_packet", "_msgtime_mutex", "_last_bytes_received")  # per client
# Likewise for acknowledging a batch with one queued write (see MqttLink.ack).
FAST_ACK: Final = hasattr(paho.Client, "_packet_queue")
_PUBACK: Final = struct.Struct("!BBH")  # fixed header, remaining length 2, packet id


class Incoming:
    """One received message and what is needed to acknowledge it later."""

    __slots__ = ("generation", "mid", "payload", "qos", "received", "topic")

    def __init__(self, topic: str, payload: bytes, mid: int, qos: int, generation: int) -> None:
        self.topic = topic
        self.payload = payload
        self.mid = mid
        self.qos = qos
        self.generation = generation
        self.received = time.monotonic()


class MqttLink:
    """A reconnecting MQTT 5 client: ``run()`` owns the connection, the rest is used from the
    same event loop."""

    def __init__(
        self,
        cfg: BrokerConfig,
        *,
        subscriptions: Sequence[str],
        receive_maximum: int,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        on_state: Callable[[bool], None] | None = None,
        name: str = "aggregator",
    ) -> None:
        self.cfg = cfg
        self.subscriptions = list(subscriptions)
        self.receive_maximum = receive_maximum
        self.on_connect = on_connect
        self.on_state = on_state
        self.name = name
        self.inbox: deque[Incoming] = deque()
        self.generation = 0
        self.connected = asyncio.Event()
        self._arrived = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._paho: paho.Client | None = None
        self._acker: paho.Client | None = None  # the current connection's, from socket open
        self._lost: asyncio.Event | None = None
        self._pub_waiters: dict[int, asyncio.Future[int]] = {}
        self._rng = random.Random()
        self._burst_bytes = 0
        self._inbox_bytes = 0
        self._resume: Callable[[], None] | None = None
        self.connects = 0

    # ------------------------------------------------------------------ receiving
    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
        self._deliver(msg.topic, payload, msg.mid, msg.qos)

    def _deliver(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        self._burst_bytes += len(payload)
        self._inbox_bytes += len(payload)
        self.inbox.append(Incoming(topic, payload, mid, qos, self.generation))
        self._arrived.set()

    def _fast_publish_handler(self, pc: paho.Client) -> Callable[[], MQTTErrorCode]:
        """paho's ``_handle_publish`` for QoS 0 and 1, decoded by :mod:`aggregator.publishpacket`.

        With manual acknowledgements paho does nothing else for these QoS levels than decode
        the packet and call ``on_message`` (no state, no PUBACK); QoS 2, which our QoS 1
        subscriptions never receive, stays with paho.
        """
        paho_handler = pc._handle_publish

        def handle_publish() -> MQTTErrorCode:
            inpacket = pc._in_packet  # paho replaces this dict on reconnect
            header = inpacket["command"]
            if header & 0x06 == 0x04:
                return paho_handler()
            try:
                p = decode_publish(header, inpacket["packet"])
            except MalformedPublishError as e:
                log.error("%s: malformed PUBLISH from the broker: %s", self.name, e)
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
            self._deliver(p.topic, p.payload, p.mid, p.qos)
            return MQTTErrorCode.MQTT_ERR_SUCCESS

        return handle_publish

    async def wait(self, timeout: float) -> bool:
        """Wait until a message is waiting (True) or ``timeout`` passed (False)."""
        if self.inbox:
            return True
        self._arrived.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), timeout)
        return bool(self.inbox)

    def take(self, n: int) -> list[Incoming]:
        out: list[Incoming] = []
        inbox = self.inbox
        taken = 0
        while inbox and len(out) < n:
            m = inbox.popleft()
            taken += len(m.payload)
            out.append(m)
        self._inbox_bytes -= taken
        if self._resume is not None and self._inbox_bytes < INBOX_LOW_BYTES:
            resume, self._resume = self._resume, None
            resume()
        return out

    def ack(self, msgs: Iterable[Incoming]) -> int:
        """PUBACK the messages of the current connection; older ones are skipped (the broker
        redelivers them). Returns how many were acknowledged.

        paho queues every PUBACK as its own packet: a wake-up of the loop's writer, a
        re-registration with the selector and a ``send`` per message. The PUBACKs of a batch
        are instead queued as one write (MQTT 5.0, 3.4.2.1: reason code and properties may be
        omitted when the code is Success), so the broker gets them in one segment too.
        """
        # Not gated on ``connected``: that waits for the SUBACKs, and a resumed session's
        # backlog arrives ahead of them (up to Receive Maximum messages). Left unacknowledged,
        # those would hold the receive window shut for the whole connection.
        pc = self._acker
        if pc is None:
            return 0
        gen = self.generation
        mids: list[int] = []
        n = 0
        for m in msgs:
            if m.generation != gen or not m.qos:
                continue
            n += 1
            if m.qos == 1 and FAST_ACK:
                mids.append(m.mid)
            else:
                pc.ack(m.mid, m.qos)
        if mids:
            pack = _PUBACK.pack
            blob = b"".join([pack(paho.PUBACK, 2, mid) for mid in mids])
            pc._packet_queue(paho.PUBACK, blob, 0, 1)
        return n

    # ------------------------------------------------------------------ publishing
    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, rc: Any, props: Any
    ) -> None:
        fut = self._pub_waiters.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(int(getattr(rc, "value", rc) or 0))

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 60.0
    ) -> bool:
        """Publish at QoS 1 and wait for the PUBACK; False if not connected, timed out or
        refused by the broker (reason code >= 0x80, logged)."""
        pc = self._paho
        if pc is None or not self.connected.is_set():
            return False
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        info = pc.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            log.warning(
                "%s: publish to %s failed: %s", self.name, topic, paho.error_string(info.rc)
            )
            return False
        self._pub_waiters[info.mid] = fut
        try:
            rc = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            self._pub_waiters.pop(info.mid, None)
            log.warning("%s: no PUBACK for %s within %.0fs", self.name, topic, timeout)
            return False
        if rc < 0:
            return False  # the connection went away before the PUBACK
        if rc >= 0x80:
            log.error(
                "%s: the broker refused our publish to %s (reason 0x%02x); check the "
                "ACL of our account",
                self.name,
                topic,
                rc,
            )
            return False
        return True

    # ------------------------------------------------------------------ connection
    def _new_client(self) -> aiomqtt.Client:
        cfg = self.cfg
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = cfg.session_expiry_s
        props.ReceiveMaximum = self.receive_maximum
        tls = None
        if cfg.tls:
            tls = aiomqtt.TLSParameters(
                ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
                certfile=str(cfg.cert_file) if cfg.cert_file else None,
                keyfile=str(cfg.key_file) if cfg.key_file else None,
            )
        client = aiomqtt.Client(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=broker_password(cfg),
            identifier=cfg.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=props,
            keepalive=cfg.keepalive,
            timeout=cfg.connect_timeout_s,
            tls_params=tls,
        )
        pc = client._client  # the paho client aiomqtt drives; see the module docstring
        pc.manual_ack_set(True)
        if not logging.getLogger("mqtt").isEnabledFor(logging.DEBUG):
            # paho logs every packet at DEBUG; even filtered out, that is a few microseconds
            # per message on the event loop thread.
            pc.disable_logger()
        pc.on_message = self._on_message
        fast = FAST_RECEIVE and isinstance(getattr(pc, "_in_packet", None), dict)
        if fast:
            pc._handle_publish = self._fast_publish_handler(pc)  # type: ignore[method-assign]
        aio_on_publish: Any = pc.on_publish
        aio_on_disconnect: Any = pc.on_disconnect
        loop = asyncio.get_running_loop()

        def on_publish(c: paho.Client, u: Any, mid: int, rc: Any, p: Any) -> None:
            self._on_publish(c, u, mid, rc, p)
            if aio_on_publish is not None:
                aio_on_publish(c, u, mid, rc, p)

        def on_disconnect(*args: Any) -> None:
            if aio_on_disconnect is not None:
                aio_on_disconnect(*args)
            lost = self._lost
            if lost is not None:
                loop.call_soon_threadsafe(lost.set)

        pc.on_publish = on_publish
        pc.on_disconnect = on_disconnect
        aio_on_socket_open: Any = pc.on_socket_open

        def on_socket_open(c: paho.Client, u: Any, sock: Any) -> None:
            # paho calls this on the thread that connects; aiomqtt registers its one-packet
            # reader from it, and ours replaces that reader right after (same loop queue).
            if aio_on_socket_open is not None:
                aio_on_socket_open(c, u, sock)
            # paho reads through ``_sock`` only; connecting has not read anything yet.
            if fast:
                sock = ReadAhead(sock)
                c._sock = sock
            loop.call_soon_threadsafe(self._socket_opened, c, sock)

        pc.on_socket_open = on_socket_open
        return client

    def _socket_opened(self, pc: paho.Client, sock: Any) -> None:
        """A new connection: its generation starts before anything can arrive on it (the
        broker sends a resumed session's backlog right after CONNACK, possibly in the same
        read as the CONNACK itself), and its messages can be acknowledged from then on."""
        if pc.socket() is not sock:
            return  # already closed or replaced
        self.generation += 1
        self._acker = pc
        self._install_reader(pc, sock)

    def _install_reader(self, pc: paho.Client, sock: Any) -> None:
        """Read every packet already received per wake-up, not one.

        aiomqtt's reader calls ``loop_read()`` once per readable event, and paho reads at most
        one packet per call: under a stream of updates every packet costs a trip through the
        event loop (an epoll round and the loop's bookkeeping), and a 100 KB message that
        arrives in pieces costs several. This reader keeps calling ``loop_read()`` while bytes
        are waiting -- in the read-ahead buffer or the TLS layer (``sock.pending()``), or in
        the kernel (a zero-timeout ``poll``) -- up to :data:`READ_BURST` packets or
        :data:`READ_BURST_BYTES` of payload, so that the loop's other work (and the engine
        thread, which needs the GIL) still gets its turn: without the byte bound, 400 KB
        updates were taken ~20 % slower than one per wake-up. Bytes already taken from the
        kernel never wake ``epoll`` again, so when a burst ends with some buffered, the reader
        schedules itself to go on.

        Backpressure: once the inbox holds :data:`INBOX_HIGH_BYTES` of payload the reader stops
        watching the socket until :meth:`take` brings it below :data:`INBOX_LOW_BYTES`. The rest
        waits in the kernel's socket buffer and in the broker (bounded by Receive Maximum, so
        nothing is lost). Reading far ahead of a slower engine gains nothing and costs memory:
        at d = 1e5 int8 the inbox held 700 updates (70 MB) on average, and up to Receive Maximum
        times the update size; with the bound it holds ~85, and the CPU per update is unchanged
        (docs/benchmarks.md).
        """
        loop = asyncio.get_running_loop()
        try:
            fd = sock.fileno()
        except OSError:
            return
        if fd < 0 or pc.socket() is not sock:
            return  # already closed or replaced
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        pending = getattr(sock, "pending", None)
        if not callable(pending):
            pending = _nothing_pending
        self._resume = None  # a paused reader of an earlier connection stays paused

        def resume() -> None:
            if pc.socket() is sock:
                loop.add_reader(fd, reader)
                loop.call_soon(reader)  # bytes may wait in the read-ahead buffer

        read_one: Callable[[], MQTTErrorCode] = pc.loop_read
        if (
            FRAMED_RECEIVE
            and isinstance(sock, ReadAhead)
            and all(hasattr(pc, name) for name in _FRAMED_STATE)
        ):
            read_one = self._framed_reader(pc, sock)

        def reader() -> None:
            if pc.socket() is not sock:
                return  # a later connection has its own reader
            self._burst_bytes = 0
            try:
                for _ in range(READ_BURST):
                    if read_one() != paho.MQTT_ERR_SUCCESS or pc.socket() is not sock:
                        return  # also MQTT_ERR_AGAIN: only part of a packet is here yet
                    if self._inbox_bytes >= INBOX_HIGH_BYTES:
                        if self._resume is None:
                            loop.remove_reader(fd)
                            self._resume = resume
                        return
                    if self._burst_bytes >= READ_BURST_BYTES:
                        break
                    if not pending() and not poller.poll(0):
                        return
                if pending():
                    loop.call_soon(reader)
            except Exception as e:  # a broken connection: reconnect, as aiomqtt would
                log.debug("%s: read failed: %r", self.name, e)
                with contextlib.suppress(Exception):
                    loop.remove_reader(fd)
                if self._lost is not None:
                    self._lost.set()

        loop.remove_reader(fd)
        loop.add_reader(fd, reader)

    def _framed_reader(self, pc: paho.Client, sock: ReadAhead) -> Callable[[], MQTTErrorCode]:
        """Read one packet: a QoS 0/1 PUBLISH straight from the read-ahead buffer, anything
        else through paho's ``loop_read``.

        paho assembles every packet from several reads into a ``bytearray`` before its
        handler sees it: two more copies of each payload and a dozen Python-level steps. Whole
        PUBLISH packets already in the buffer are decoded in place instead, copying the payload
        once. paho stays the reader of everything else (CONNACK, SUBACK, PUBACKs of our own
        publishes, PINGRESP, DISCONNECT, QoS 2) and of anything it has started to read; a
        malformed PUBLISH is left in the buffer for paho too, whose read then reaches
        :meth:`_fast_publish_handler` and reports the protocol error as before. The one piece
        of paho's reading state kept up to date here is the time bytes last arrived, which its
        keepalive check reads.
        """
        msgtime = pc._msgtime_mutex
        deliver = self._deliver
        loop_read = pc.loop_read
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
                pc._last_bytes_received = paho.time_func()
            deliver(p.topic, p.payload, p.mid, p.qos)
            return success

        return read_one

    @contextlib.asynccontextmanager
    async def running(self, *, wait_connected: bool = True) -> AsyncIterator[MqttLink]:
        """:meth:`run` for the duration of a ``with`` block, stopped cleanly on exit -- for a
        consumer that owns the link for one piece of work (tests, ``bench/link.py``). Entered
        once connected (SUBACKs in) unless ``wait_connected`` is false."""
        stop = asyncio.Event()
        task = asyncio.create_task(self.run(stop))
        try:
            if wait_connected:
                await asyncio.wait_for(self.connected.wait(), 10)
            yield self
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, subscribe, stay connected until ``stop``; reconnect with backoff."""
        attempt = 0
        cfg = self.cfg
        while not stop.is_set():
            started = time.monotonic()
            try:
                client = self._new_client()
                self._lost = asyncio.Event()
                async with client:
                    await self._connected(client)
                    try:
                        await _first(stop.wait(), self._lost.wait())
                    finally:
                        self._down(expected=stop.is_set())
            except aiomqtt.MqttError as e:
                self._down()
                log.warning("%s: broker %s:%d: %s", self.name, cfg.host, cfg.port, e)
            if stop.is_set():
                break
            if time.monotonic() - started >= STABLE_S:
                attempt = 0
            delay = backoff_delay(attempt, cfg.reconnect_min_s, cfg.reconnect_max_s, self._rng)
            attempt += 1
            log.info("%s: reconnecting in %.1fs", self.name, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def _connected(self, client: aiomqtt.Client) -> None:
        self.connects += 1
        self._client = client
        self._paho = client._client
        for topic in self.subscriptions:
            granted = await client.subscribe(topic, qos=1, timeout=SUBSCRIBE_TIMEOUT_S)
            codes = [g if isinstance(g, int) else int(g.value) for g in granted]
            if any(c >= 0x80 for c in codes):
                log.error(
                    "%s: subscription to %s refused (reason %s); check the ACL",
                    self.name,
                    topic,
                    codes,
                )
        self.connected.set()
        log.info(
            "%s: connected to %s:%d as %s (persistent session, connection %d)",
            self.name,
            self.cfg.host,
            self.cfg.port,
            self.cfg.client_id,
            self.generation,
        )
        if self.on_state is not None:
            self.on_state(True)
        if self.on_connect is not None:
            await self.on_connect()

    def _down(self, *, expected: bool = False) -> None:
        was_up = self.connected.is_set()
        self.connected.clear()
        self._paho = None
        self._acker = None
        self._client = None
        for fut in self._pub_waiters.values():
            if not fut.done():
                fut.set_result(-1)
        self._pub_waiters.clear()
        if was_up:
            log.log(
                logging.INFO if expected else logging.WARNING,
                "%s: disconnected from the broker",
                self.name,
            )
            if self.on_state is not None:
                self.on_state(False)


def _nothing_pending() -> int:
    return 0


async def _first(*aws: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
