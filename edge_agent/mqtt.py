"""The agent's MQTT link: paho-mqtt 2.x over MQTT 5, driven by one thread of our own.

Why not ``loop_start()``: paho's own reconnect loop backs off without jitter, so a fleet that
lost its broker reconnects in lock-step waves; and a thread we own lets us flush the durable
outbox at the right moments. The thread uses paho's external-loop API (``socket()``,
``loop_read/loop_write/loop_misc``) with a wake-up socket, so a new update is published at
once without polling. Every paho call happens on this thread, which also rules out the
lock-order deadlock between paho's internal mutexes and ours.

Connection: client id = device id, ``clean_start=False`` with a ``SessionExpiryInterval`` (the
broker keeps subscriptions and queued messages across short outages), TLS and username /
password from the config, a retained, signed ``offline`` status as last will, and a retained,
signed ``online`` status after each CONNACK. Reconnects wait ``uniform(min, min(max, min *
2**attempt))`` seconds ("full jitter" with a floor); the attempt count resets once a
connection stayed up for :data:`STABLE_S`.

Subscriptions: the persistent ones the agent names (plan, spec), subscribed again after every
CONNACK so the broker resends their retained messages, and on-demand ones: :meth:`Link.fetch`
subscribes and the first message that arrives unsubscribes (the model); :meth:`Link.watch`
subscribes until :meth:`Link.release` (the announcements, while the device is ready to
train). Open fetches and watches are subscribed again after every CONNACK; after a CONNACK
with a session present, the other on-demand topics are unsubscribed, since the persistent
session may still hold them.

Delivery: the link takes updates from the :class:`~edge_agent.outbox.Outbox` (at most
``max_in_flight`` at a time, and never more QoS 1 messages in flight than the broker's
``Receive Maximum`` from CONNACK: a clustered broker may allow only one), publishes them at
QoS 1 and settles each one on its PUBACK, whose MQTT 5 reason code says what the broker did
(on MQTT 3.1.1 a refused publish is acked as a success):

* success (``< 0x80``): delete from the outbox; ``0x10`` *no matching subscribers* means
  nobody (not even a persistent aggregator session) received it, so it is retried after
  ``retry_s`` unless ``retry_no_subscribers`` is off;
* any refusal (``ReasonCode.is_failure``, ``>= 0x80``: *not authorized*, *quota exceeded*,
  *unspecified error*, ...): keep it and retry after ``retry_s``. Brokers differ in what they
  refuse and why (an ACL not yet reloaded, a cluster node that has not seen the newest
  permissions); once fixed, the update goes through. Supersede and the outbox caps bound what
  waits meanwhile;
* no PUBACK because the broker disconnected: the update stays in flight and paho sends it again
  after the reconnection.

paho keeps unacknowledged messages in memory and retransmits them itself after a reconnect,
so an update is handed to paho once per process: re-publishing it from the outbox as well
would deliver it twice. After a restart paho's memory is gone and the outbox sends it again.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import edge_agent.lazyimport  # noqa: F401  # before paho, which imports urllib.request

# isort: split
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_agent.config import BrokerConfig
from edge_agent.logs import DeviceLog
from edge_agent.outbox import Outbox, OutboxEntry
from fedmqtt.mqttconf import backoff_delay

log = logging.getLogger(__name__)

NO_MATCHING_SUBSCRIBERS: Final = ReasonCode(PacketTypes.PUBACK, "No matching subscribers")
STABLE_S: Final = 30.0
_SELECT_MAX_S: Final = 1.0
MAX_SENDS: Final = 16  # one-off messages (send()) that wait for a connection
_OFFLINE_ACK_WAIT_S: Final = 2.0


def make_client(
    cfg: BrokerConfig, client_id: str, password: str | None, *, max_inflight: int = 20
) -> paho.Client:
    """A paho MQTT 5 client configured from ``[broker]`` (not connected)."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5,
        reconnect_on_failure=False,
    )
    client.connect_timeout = cfg.connect_timeout_s
    client.max_inflight_messages_set(max_inflight)
    if cfg.username is not None:
        client.username_pw_set(cfg.username, password)
    if cfg.tls:
        ctx = ssl.create_default_context(
            cafile=str(cfg.ca_file) if cfg.ca_file is not None else None
        )
        if cfg.cert_file is not None and cfg.key_file is not None:
            ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
        client.tls_set_context(ctx)
    return client


def connect_properties(cfg: BrokerConfig) -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = cfg.session_expiry_s
    return props


@dataclass
class LinkCounters:
    connect_attempts: int = 0
    connects: int = 0
    connect_refusals: int = 0
    delivered: int = 0
    refused_permanent: int = 0  # dropped before sending: bigger than the broker accepts
    refused: int = 0  # PUBACKs with a failure reason code (the update is kept and retried)
    no_subscribers: int = 0
    unsubscribed: int = 0  # UNSUBACKs: on-demand subscriptions the broker has dropped
    reports_sent: int = 0  # one-off messages of send() handed to the connection
    reports_acked: int = 0  # ... and acknowledged by the broker (PUBACK < 0x80)
    reports_dropped: int = 0  # ... dropped: the queue of send() was full


StatusFactory = Callable[[str], bytes]


class Link:
    """A device's connection to the broker, run by :meth:`start` on a background thread."""

    def __init__(
        self,
        cfg: BrokerConfig,
        *,
        client_id: str,
        outbox: Outbox,
        updates_topic: str,
        status_topic: str,
        status_payload: StatusFactory,
        subscriptions: Sequence[str | tuple[str, int]],
        on_message: Callable[[str, bytes], None],
        on_demand: Sequence[str] = (),
        password: str | None = None,
        retry_s: float = 30.0,
        retry_no_subscribers: bool = True,
        max_in_flight: int = 10,
        rng: random.Random | None = None,
        on_delivered: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.outbox = outbox
        self.updates_topic = updates_topic
        self.status_topic = status_topic
        self._status_payload = status_payload
        self._subscriptions = tuple((t, 1) if isinstance(t, str) else t for t in subscriptions)
        # Topics subscribed only while fetching (fetch()/release()); unsubscribed after every
        # connection otherwise, since a persistent session may still hold them.
        self._on_demand = tuple(on_demand)
        self._fetching: set[str] = set()
        self._watching: dict[str, int] = {}  # watched topic -> QoS
        self._commands: collections.deque[tuple[str, str]] = collections.deque()
        self._sub_mids: dict[int, list[str]] = {}
        self._on_message_cb = on_message
        self._retry_s = retry_s
        self._retry_no_subscribers = retry_no_subscribers
        self._max_in_flight = max_in_flight
        # The broker's Receive Maximum from CONNACK: QoS 1 messages (updates and status) we may
        # have awaiting PUBACK at once. paho does not enforce it, so the link does.
        self._receive_max: int | None = None
        self._status_due = False  # the ``online`` status waits for room in that window
        self._rng = rng or random.Random()
        self._on_delivered = on_delivered
        self.counters = LinkCounters()
        self.log = DeviceLog(log, client_id)
        self.last_error: str = ""
        self._client = make_client(cfg, client_id, password, max_inflight=max_in_flight + 4)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.on_unsubscribe = self._on_unsubscribe
        self._client.on_message = self._on_message
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._connected = False
        self._connack_seen = False  # a CONNACK success during the current connection
        self._connected_at = 0.0
        self._max_packet: int | None = None
        self._mids: dict[int, str] = {}  # paho message id -> outbox entry name
        self._status_mids: set[int] = set()
        self._report_mids: set[int] = set()
        # One-off messages (evaluation reports) waiting for a connection, oldest dropped first.
        self._sends: collections.deque[tuple[str, bytes]] = collections.deque()
        self._send_lock = threading.Lock()
        self._warned_no_subscribers = False

    # ---- public API (any thread) -----------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("link already started")
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-{self.client_id}", daemon=True
        )
        self._thread.start()

    def wake(self) -> None:
        """Ask the link thread to look at the outbox now."""
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def fetch(self, topic: str) -> None:
        """Take one message of an on-demand ``topic``: subscribe (the broker sends its retained
        message), and unsubscribe as soon as a message has arrived or :meth:`release` is
        called; a fetch still open is subscribed again after a reconnection."""
        self._commands.append(("fetch", topic))
        self.wake()

    def watch(self, topic: str, qos: int = 0) -> None:
        """Subscribe to an on-demand ``topic`` (the broker sends its retained message) and stay
        subscribed, across reconnections, until :meth:`release`."""
        self._commands.append((f"watch{qos}", topic))
        self.wake()

    def release(self, topic: str) -> None:
        """Unsubscribe from an on-demand ``topic`` (fetched or watched)."""
        self._commands.append(("release", topic))
        self.wake()

    def refresh(self, topic: str) -> None:
        """Subscribe again to a subscribed or watched ``topic``: the broker resends its retained
        message. A topic neither subscribed nor watched is left alone."""
        self._commands.append(("refresh", topic))
        self.wake()

    def send(self, topic: str, payload: bytes) -> None:
        """Publish a one-off message at QoS 1 (not retained) once connected. Not durable: at
        most :data:`MAX_SENDS` wait, the oldest is dropped first, and a stop loses them."""
        with self._send_lock:
            if len(self._sends) >= MAX_SENDS:
                self._sends.popleft()
                self.counters.reports_dropped += 1
            self._sends.append((topic, payload))
        self.wake()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``offline`` (if connected), disconnect, and join the thread."""
        self._stop.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.log.warning("MQTT thread did not stop within %.1fs", timeout)
        for s in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                s.close()

    # ---- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            self._connack_seen = False
            try:
                self._connect()
            except Exception as e:  # OSError, ssl.SSLError, ValueError from paho, ...
                self.last_error = f"{type(e).__name__}: {e}"
                delay = backoff_delay(
                    attempt, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s, self._rng
                )
                self.log.warning(
                    "cannot connect to %s:%d (%s); retrying in %.1fs",
                    self.cfg.host,
                    self.cfg.port,
                    self.last_error,
                    delay,
                )
                attempt += 1
                self._stop.wait(delay)
                continue
            try:
                self._serve()
            except Exception:
                self.log.exception("MQTT loop failed; reconnecting")
                self._close_socket()
            self._connected = False
            if self._stop.is_set():
                break
            if self._connack_seen and time.monotonic() - self._connected_at >= STABLE_S:
                attempt = 0
            delay = backoff_delay(
                attempt, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s, self._rng
            )
            attempt += 1
            self.log.info("reconnecting to %s:%d in %.1fs", self.cfg.host, self.cfg.port, delay)
            self._stop.wait(delay)
        self._shutdown()

    def _connect(self) -> None:
        self.counters.connect_attempts += 1
        self._client.will_set(
            self.status_topic, self._status_payload("offline"), qos=1, retain=True
        )
        self._client.connect(
            self.cfg.host,
            self.cfg.port,
            keepalive=self.cfg.keepalive,
            clean_start=False,
            properties=connect_properties(self.cfg),
        )

    def _serve(self) -> None:
        """Run one connection until it drops or the link is stopped."""
        client = self._client
        connack_deadline = time.monotonic() + self.cfg.connect_timeout_s
        while not self._stop.is_set():
            sock = client.socket()
            if sock is None:
                return
            self._run_commands()
            if self._connected:
                self._send_status()
                self._flush()
                self._send_pending()
            elif time.monotonic() > connack_deadline:
                self.last_error = "no CONNACK from the broker"
                self.log.warning(
                    "no CONNACK within %.1fs; dropping the connection", self.cfg.connect_timeout_s
                )
                self._close_socket()
                return
            timeout = _SELECT_MAX_S
            retry_at = self.outbox.next_retry_at()
            if retry_at is not None:
                timeout = min(timeout, max(0.01, retry_at - time.monotonic()))
            pending = getattr(sock, "pending", None)
            if callable(pending) and pending() > 0:
                timeout = 0.0
            try:
                sock_readable, woken, writable = _wait(
                    sock, self._wake_r, client.want_write(), timeout
                )
            except (OSError, ValueError):
                self._close_socket()
                return
            if woken:
                with contextlib.suppress(BlockingIOError, OSError):
                    self._wake_r.recv(4096)
            if sock_readable or (callable(pending) and pending() > 0):
                client.loop_read()
            if client.socket() is not None and (writable or client.want_write()):
                client.loop_write()
            if client.socket() is not None:
                client.loop_misc()

    def _close_socket(self) -> None:
        sock = self._client.socket()
        if isinstance(sock, socket.socket):  # ssl.SSLSocket is one too
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            # paho notices the closed socket on its next read and runs its disconnect path
            with contextlib.suppress(Exception):
                self._client.loop_read()

    def _shutdown(self) -> None:
        """Stop requested: say ``offline`` (retained) and disconnect cleanly if we can."""
        client = self._client
        if self._connected and client.socket() is not None:
            with contextlib.suppress(Exception):
                deadline = time.monotonic() + _OFFLINE_ACK_WAIT_S
                while (
                    self._room() <= 0
                    and client.socket() is not None
                    and time.monotonic() < deadline
                ):
                    self._pump(0.05)
                info = client.publish(
                    self.status_topic, self._status_payload("offline"), qos=1, retain=True
                )
                self._status_mids.add(info.mid)
                deadline = time.monotonic() + _OFFLINE_ACK_WAIT_S
                while (
                    info.mid in self._status_mids
                    and client.socket() is not None
                    and time.monotonic() < deadline
                ):
                    self._pump(0.05)
            with contextlib.suppress(Exception):
                client.disconnect()
                deadline = time.monotonic() + 1.0
                while client.socket() is not None and time.monotonic() < deadline:
                    self._pump(0.05)
        self._connected = False
        with contextlib.suppress(Exception):
            self._close_socket()

    def _pump(self, timeout: float) -> None:
        client = self._client
        sock = client.socket()
        if sock is None:
            return
        try:
            readable, woken, _ = _wait(sock, self._wake_r, client.want_write(), timeout)
        except (OSError, ValueError):
            self._close_socket()
            return
        if woken:  # stop() wakes the loop; drain it or every later wait returns at once
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_r.recv(4096)
        if readable:
            client.loop_read()
        if client.socket() is not None and client.want_write():
            client.loop_write()

    # ---- subscriptions ---------------------------------------------------------------------
    def _subscribe(self, subs: Sequence[tuple[str, int]]) -> None:
        if not subs:
            return
        _, mid = self._client.subscribe([(t, SubscribeOptions(qos=q)) for t, q in subs])
        if mid is not None:
            self._sub_mids[mid] = [t for t, _ in subs]

    def _run_commands(self) -> None:
        """fetch / release / refresh requests from other threads, in order. Before CONNACK
        only the set of fetched topics changes: ``_on_connect`` subscribes what it holds, and
        unsubscribes the other on-demand topics a persistent session may still have."""
        live = self._connected
        while self._commands:
            what, topic = self._commands.popleft()
            if what == "fetch":
                if topic not in self._fetching:
                    self._fetching.add(topic)
                    if live:
                        self._subscribe([(topic, 1)])
            elif what.startswith("watch"):
                if topic not in self._watching:
                    self._watching[topic] = int(what[5:])
                    if live:
                        self._subscribe([(topic, self._watching[topic])])
            elif what == "release":
                if topic in self._fetching or topic in self._watching:
                    self._fetching.discard(topic)
                    self._watching.pop(topic, None)
                    if live:
                        self._client.unsubscribe(topic)
            elif live:
                qos = {**dict(self._subscriptions), **self._watching}.get(topic)
                if qos is not None:
                    self._subscribe([(topic, qos)])

    def _send_pending(self) -> None:
        while self._room() > 0:
            with self._send_lock:
                if not self._sends:
                    return
                topic, payload = self._sends.popleft()
            try:
                info = self._client.publish(topic, payload, qos=1, retain=False)
            except ValueError as e:  # paho's own size/topic checks
                self.log.error("cannot publish on %s: %s; dropped", topic, e)
                continue
            self._report_mids.add(info.mid)
            self.counters.reports_sent += 1

    # ---- outbox ----------------------------------------------------------------------------
    def _flush(self) -> None:
        free = min(self._max_in_flight - self.outbox.in_flight_count(), self._room())
        if free <= 0:
            return
        for entry in self.outbox.take_unsent(free):
            payload = self.outbox.read(entry)
            if payload is None:  # superseded or dropped meanwhile
                self.outbox.acked(entry.name)
                continue
            if self._max_packet is not None and len(payload) + 256 > self._max_packet:
                self.log.error(
                    "update seq=%d is %d bytes, the broker accepts at most %d; dropped",
                    entry.seq,
                    len(payload),
                    self._max_packet,
                )
                self.counters.refused_permanent += 1
                self.outbox.drop(entry.name)
                continue
            try:
                info = self._client.publish(self.updates_topic, payload, qos=1, retain=False)
            except ValueError as e:  # paho's own size/topic checks
                self.log.error("cannot publish update seq=%d: %s; dropped", entry.seq, e)
                self.counters.refused_permanent += 1
                self.outbox.drop(entry.name)
                continue
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                # NO_CONN is fine: paho keeps the message and sends it after reconnecting
                self.log.warning(
                    "paho refused update seq=%d (%s); will retry",
                    entry.seq,
                    paho.error_string(info.rc),
                )
                self.outbox.release(entry.name, time.monotonic() + self._retry_s)
                continue
            self._mids[info.mid] = entry.name
            self.log.debug(
                "published update seq=%d (mid %d, %d bytes)", entry.seq, info.mid, len(payload)
            )

    # ---- paho callbacks (run on the link thread) -------------------------------------------
    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            if reason.is_failure:
                self.counters.connect_refusals += 1
                self.last_error = f"broker refused the connection: {reason} (0x{reason.value:02x})"
                self.log.error("%s", self.last_error)
                return
            self._connected = True
            self._connack_seen = True
            self._connected_at = time.monotonic()
            self.counters.connects += 1
            self.last_error = ""
            self._max_packet = getattr(properties, "MaximumPacketSize", None)
            # A broker that allows fewer QoS 1 messages in flight than we send may disconnect
            # us (0x93 Receive Maximum exceeded); paho does not hold back by itself.
            self._receive_max = getattr(properties, "ReceiveMaximum", None)
            self.log.info(
                "connected to %s:%d as %s (session present: %s)",
                self.cfg.host,
                self.cfg.port,
                self.client_id,
                bool(flags.session_present),
            )
            self._subscribe(
                [
                    *self._subscriptions,
                    *sorted(self._watching.items()),
                    *((t, 1) for t in sorted(self._fetching)),
                ]
            )
            idle = [t for t in self._on_demand if t not in self._fetching | set(self._watching)]
            if idle and flags.session_present:  # held over from a fetch cut short
                client.unsubscribe(idle)
            self._status_due = True
            self._send_status()
        except Exception:
            self.log.exception("error in on_connect")

    def _room(self) -> int:
        """How many more QoS 1 messages the broker's Receive Maximum lets us send now."""
        if self._receive_max is None:
            return 1 << 16
        return self._receive_max - len(self._mids) - len(self._status_mids) - len(self._report_mids)

    def _send_status(self) -> None:
        """Publish the signed, retained ``online`` status, once there is room for it."""
        if not self._status_due or self._room() <= 0:
            return
        self._status_due = False
        info = self._client.publish(
            self.status_topic, self._status_payload("online"), qos=1, retain=True
        )
        self._status_mids.add(info.mid)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._connected:
            self.log.warning("disconnected from %s:%d: %s", self.cfg.host, self.cfg.port, reason)
        self._connected = False

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        for topic, rc in zip(self._sub_mids.pop(mid, []), reasons, strict=False):
            if rc.is_failure:
                self.log.error(
                    "broker refused subscription to %s: %s (0x%02x)", topic, rc, rc.value
                )

    def _on_unsubscribe(self, client: paho.Client, userdata: Any, mid: int, *rest: Any) -> None:
        self.counters.unsubscribed += 1

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic in self._fetching:  # unsubscribe at once: newer versions are not wanted
            self._fetching.discard(msg.topic)
            client.unsubscribe(msg.topic)
        try:
            self._on_message_cb(msg.topic, bytes(msg.payload))
        except Exception:
            self.log.exception("error handling a message on %s", msg.topic)

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            self._settle(mid, reason)
        except Exception:
            self.log.exception("error handling PUBACK %d", mid)

    def _settle(self, mid: int, reason: ReasonCode) -> None:
        if mid in self._report_mids:
            self._report_mids.discard(mid)
            if reason.is_failure:
                self.log.warning("broker refused a report: %s (0x%02x)", reason, reason.value)
            else:
                self.counters.reports_acked += 1
            return
        if mid in self._status_mids:
            self._status_mids.discard(mid)
            if reason.is_failure:
                self.log.warning(
                    "broker refused our status message: %s (0x%02x)", reason, reason.value
                )
            return
        name = self._mids.pop(mid, None)
        if name is None:
            return
        if reason.is_failure:
            self.counters.refused += 1
            self.log.warning(
                "broker refused update %s: %s (0x%02x); keeping it, retrying in %.0fs",
                name,
                reason,
                reason.value,
                self._retry_s,
            )
            self.outbox.release(name, time.monotonic() + self._retry_s)
            return
        if reason == NO_MATCHING_SUBSCRIBERS and self._retry_no_subscribers:
            self.counters.no_subscribers += 1
            if not self._warned_no_subscribers:
                self.log.warning(
                    "no aggregator is subscribed to %s; keeping updates and retrying every %.0fs",
                    self.updates_topic,
                    self._retry_s,
                )
                self._warned_no_subscribers = True
            self.outbox.release(name, time.monotonic() + self._retry_s)
            return
        entry = self.outbox.acked(name)
        self.counters.delivered += 1
        if self._on_delivered is not None:
            update_id = entry.update_id if entry is not None else OutboxEntry.update_id_of(name)
            self._on_delivered(update_id or name)
        if self._warned_no_subscribers:
            self.log.info("updates are being received again")
            self._warned_no_subscribers = False
        if entry is not None:
            self.log.info("update seq=%d (base v%d) delivered", entry.seq, entry.base_version)


def _wait(
    sock: Any, wake: socket.socket, want_write: bool, timeout: float
) -> tuple[bool, bool, bool]:
    """Wait for the MQTT socket or the wake-up socket: (sock readable, woken, sock writable).

    ``poll`` rather than ``select``: select cannot watch descriptors numbered 1024 or more,
    which a process hosting many agents (the simulator) or many other files reaches.
    """
    poller = select.poll()
    mask = select.POLLIN | (select.POLLOUT if want_write else 0)
    poller.register(sock, mask)
    poller.register(wake, select.POLLIN)
    readable = woken = writable = False
    for fd, ev in poller.poll(max(0.0, timeout) * 1000.0):
        if fd == wake.fileno():
            woken = True
            continue
        if ev & (select.POLLIN | select.POLLERR | select.POLLHUP):
            readable = True
        if ev & select.POLLOUT:
            writable = True
    return readable, woken, writable
