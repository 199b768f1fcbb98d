"""The aggregator's MQTT link: a persistent MQTT 5 session with manual PUBACKs, over aiomqtt.

Why these choices (docs/aggregator.md, "MQTT client arrangement"):

* **Manual acknowledgements.** paho (under aiomqtt) normally PUBACKs an update as soon as it is
  read, before the aggregator has it on disk: a ``kill -9`` at that moment loses an update the
  broker considers delivered. paho >= 2.0 can leave the PUBACK to the application
  (``manual_ack_set(True)`` / ``ack(mid, qos)``); aiomqtt 2.5 does not expose it, so this adapter
  sets it on aiomqtt's paho client (:func:`aggregator.paho_internals.paho_client`). The service
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
* **A fast receive path.** Messages go from the socket straight into a deque that the
  service drains in batches; aiomqtt's per-message queue and iterator task are bypassed. Our
  socket reader (``MqttLink._install_reader``) takes every packet already received per wake-up
  of the event loop, within :data:`READ_BURST` and :data:`READ_BURST_BYTES`; the socket is read
  through a read-ahead buffer, whole QoS 0/1 PUBLISH packets are decoded from it with one copy
  of the payload, and the PUBACKs of a batch are written at once. The parts of that which need
  paho's and aiomqtt's private attributes are :class:`aggregator.paho_internals.FastPath`, the
  one module that uses them; it refuses to load on a paho release that lacks them, so there is
  no slower fallback path.

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
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from aggregator.config import BrokerConfig
from aggregator.paho_internals import FastPath, seen_disconnection
from aggregator.readahead import ReadAhead
from fedmqtt.mqttconf import backoff_delay, broker_password

log = logging.getLogger(__name__)

STABLE_S: Final = 30.0
READ_BURST: Final = 64  # packets read per wake-up of the event loop, at most ...
READ_BURST_BYTES: Final = 1 << 20  # ... and payload bytes: large updates leave the loop sooner
INBOX_HIGH_BYTES: Final = 8 << 20  # stop reading the socket while the inbox holds this much ...
INBOX_LOW_BYTES: Final = 4 << 20  # ... until the consumer has taken it below this
SUBSCRIBE_TIMEOUT_S: Final = 30.0
RECEIVE_MAXIMUM_DEFAULT: Final = 65535  # MQTT 5, when CONNACK does not say


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
        unsubscriptions: Sequence[str] = (),
        on_connect: Callable[[], Awaitable[None]] | None = None,
        on_state: Callable[[bool], None] | None = None,
        name: str = "aggregator",
    ) -> None:
        self.cfg = cfg
        self.subscriptions = list(subscriptions)
        # Filters the broker may still hold for this client id from an earlier configuration
        # (its MQTT session is persistent): each would deliver a second copy of every update,
        # so they are dropped on every connect. Unsubscribing a filter not held is harmless.
        self.unsubscriptions = [t for t in unsubscriptions if t not in self.subscriptions]
        self.receive_maximum = receive_maximum
        self.on_connect = on_connect
        self.on_state = on_state
        self.name = name
        self.inbox: deque[Incoming] = deque()
        self.generation = 0
        self.connected = asyncio.Event()
        self._arrived = asyncio.Event()
        self._paho: paho.Client | None = None  # the connected client's, for publishing
        self._acker: FastPath | None = None  # the current connection's, from socket open
        self._lost: asyncio.Event | None = None
        self._pub_waiters: dict[int, asyncio.Future[int]] = {}
        # QoS 1 publishes the broker lets us have awaiting PUBACK (its Receive Maximum): a
        # broker that allows fewer than we send may disconnect us (0x93); a cluster may allow 1.
        self._send_window = RECEIVE_MAXIMUM_DEFAULT
        self._window_open = asyncio.Event()
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
        redelivers them). Returns how many were acknowledged. The QoS 1 PUBACKs of one call
        go out as one write (:meth:`FastPath.ack_qos1`)."""
        # Not gated on ``connected``: that waits for the SUBACKs, and a resumed session's
        # backlog arrives ahead of them (up to Receive Maximum messages). Left unacknowledged,
        # those would hold the receive window shut for the whole connection.
        acker = self._acker
        if acker is None:
            return 0
        gen = self.generation
        mids: list[int] = []
        n = 0
        for m in msgs:
            if m.generation != gen or not m.qos:
                continue
            n += 1
            if m.qos == 1:
                mids.append(m.mid)
            else:
                acker.paho.ack(m.mid, m.qos)
        acker.ack_qos1(mids)
        return n

    # ------------------------------------------------------------------ publishing
    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, rc: Any, props: Any
    ) -> None:
        fut = self._pub_waiters.pop(mid, None)
        self._window_open.set()
        if fut is not None and not fut.done():
            fut.set_result(int(getattr(rc, "value", rc) or 0))

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 60.0
    ) -> bool:
        """Publish at QoS 1 and wait for the PUBACK; False if not connected, timed out or
        refused by the broker (reason code >= 0x80, logged)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self._pub_waiters) >= self._send_window and self.connected.is_set():
            self._window_open.clear()
            try:
                await asyncio.wait_for(self._window_open.wait(), deadline - loop.time())
            except TimeoutError:
                log.warning("%s: no room to publish %s within %.0fs", self.name, topic, timeout)
                return False
        pc = self._paho
        if pc is None or not self.connected.is_set():
            return False
        fut: asyncio.Future[int] = loop.create_future()
        info = pc.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            log.warning(
                "%s: publish to %s failed: %s", self.name, topic, paho.error_string(info.rc)
            )
            return False
        self._pub_waiters[info.mid] = fut
        try:
            rc = await asyncio.wait_for(asyncio.shield(fut), max(0.0, deadline - loop.time()))
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
    def _new_client(self) -> tuple[aiomqtt.Client, FastPath]:
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
        fast = FastPath(client, self._deliver, name=self.name)
        pc = fast.paho  # the paho client aiomqtt drives; only its public API from here on
        pc.manual_ack_set(True)
        if not logging.getLogger("mqtt").isEnabledFor(logging.DEBUG):
            # paho logs every packet at DEBUG; even filtered out, that is a few microseconds
            # per message on the event loop thread.
            pc.disable_logger()
        pc.on_message = self._on_message  # QoS 2, which our QoS 1 subscriptions never get
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

        aio_on_connect: Any = pc.on_connect

        def on_connect(c: paho.Client, u: Any, flags: Any, rc: Any, p: Any) -> None:
            # The broker's Receive Maximum (MQTT 5 default 65,535), which paho does not apply
            # to what it sends: :meth:`publish` keeps within it.
            self._send_window = getattr(p, "ReceiveMaximum", None) or RECEIVE_MAXIMUM_DEFAULT
            if aio_on_connect is not None:
                aio_on_connect(c, u, flags, rc, p)

        pc.on_connect = on_connect
        pc.on_publish = on_publish
        pc.on_disconnect = on_disconnect
        aio_on_socket_open: Any = pc.on_socket_open

        def on_socket_open(c: paho.Client, u: Any, sock: Any) -> None:
            # paho calls this on the thread that connects; aiomqtt registers its one-packet
            # reader from it, and ours replaces that reader right after (same loop queue).
            if aio_on_socket_open is not None:
                aio_on_socket_open(c, u, sock)
            # Connecting has not read anything yet.
            wrapped = fast.adopt_socket(sock)
            loop.call_soon_threadsafe(self._socket_opened, fast, wrapped)

        pc.on_socket_open = on_socket_open
        return client, fast

    def _socket_opened(self, fast: FastPath, sock: ReadAhead) -> None:
        """A new connection: its generation starts before anything can arrive on it (the
        broker sends a resumed session's backlog right after CONNACK, possibly in the same
        read as the CONNACK itself), and its messages can be acknowledged from then on."""
        if fast.paho.socket() is not sock:
            return  # already closed or replaced
        self.generation += 1
        self._acker = fast
        self._install_reader(fast, sock)

    def _install_reader(self, fast: FastPath, sock: ReadAhead) -> None:
        """Read every packet already received per wake-up, not one.

        aiomqtt's reader calls ``loop_read()`` once per readable event, and paho reads at most
        one packet per call: every packet would cost a trip through the event loop. This
        reader keeps reading packets (:meth:`FastPath.packet_reader`) while bytes are waiting
        -- in the read-ahead buffer or the TLS layer (``sock.pending()``), or in the kernel (a
        zero-timeout ``poll``) -- up to :data:`READ_BURST` packets or :data:`READ_BURST_BYTES`
        of payload, so that the loop's other work (and the engine thread, which needs the GIL)
        still gets its turn. Bytes already taken from the kernel never wake ``epoll`` again, so
        when a burst ends with some buffered, the reader schedules itself to go on.

        Backpressure: once the inbox holds :data:`INBOX_HIGH_BYTES` of payload the reader stops
        watching the socket until :meth:`take` brings it below :data:`INBOX_LOW_BYTES`. The rest
        waits in the kernel's socket buffer and in the broker (bounded by Receive Maximum, so
        nothing is lost), and the memory held for received updates stays bounded whatever the
        engine's pace.
        """
        pc = fast.paho
        loop = asyncio.get_running_loop()
        try:
            fd = sock.fileno()
        except OSError:
            return
        if fd < 0 or pc.socket() is not sock:
            return  # already closed or replaced
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        pending = sock.pending
        self._resume = None  # a paused reader of an earlier connection stays paused

        def resume() -> None:
            if pc.socket() is sock:
                loop.add_reader(fd, reader)
                loop.call_soon(reader)  # bytes may wait in the read-ahead buffer

        read_one = fast.packet_reader(sock)

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

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, subscribe, stay connected until ``stop``; reconnect with backoff."""
        attempt = 0
        cfg = self.cfg
        while not stop.is_set():
            started = time.monotonic()
            client, fast = self._new_client()
            try:
                self._lost = asyncio.Event()
                async with client:
                    await self._connected(client, fast)
                    try:
                        await _first(stop.wait(), self._lost.wait())
                    finally:
                        self._down(expected=stop.is_set())
            except aiomqtt.MqttError as e:
                self._down()
                log.warning("%s: broker %s:%d: %s", self.name, cfg.host, cfg.port, e)
            finally:
                seen_disconnection(client)  # handled here; asyncio need not log it
            if stop.is_set():
                break
            if time.monotonic() - started >= STABLE_S:
                attempt = 0
            delay = backoff_delay(attempt, cfg.reconnect_min_s, cfg.reconnect_max_s, self._rng)
            attempt += 1
            log.info("%s: reconnecting in %.1fs", self.name, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def _connected(self, client: aiomqtt.Client, fast: FastPath) -> None:
        self.connects += 1
        self._paho = fast.paho
        if self.unsubscriptions:
            await client.unsubscribe(self.unsubscriptions, timeout=SUBSCRIBE_TIMEOUT_S)
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
        for fut in self._pub_waiters.values():
            if not fut.done():
                fut.set_result(-1)
        self._pub_waiters.clear()
        self._window_open.set()
        if was_up:
            log.log(
                logging.INFO if expected else logging.WARNING,
                "%s: disconnected from the broker",
                self.name,
            )
            if self.on_state is not None:
                self.on_state(False)


async def _first(*aws: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
