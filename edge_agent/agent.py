"""EdgeAgent: fetch the global model when ready, train on local data, send a signed update.

One agent is two threads: the caller's thread runs :meth:`EdgeAgent.run` (decisions and
training, with the training itself in a short-lived worker so a stop request is never stuck
behind it) and :class:`edge_agent.mqtt.Link` owns the MQTT connection. They share only the
thread-safe inbox (messages in) and the durable outbox (updates out). Several agents can run
in one process (the simulator does), each with its own state directory.

**When the device trains** (the trigger rule):

1. It needs a verified global model (received, or reloaded from ``global_model.bin`` after a
   reboot, so a device that restarts offline still trains and queues its update).
2. A model version it has not trained on yet triggers a round at once, as FedBuff-style
   asynchronous FL wants: the fresher the base, the less stale the update.
3. The same version is trained again only if ``[training] max_updates_per_version`` allows it
   (default 1, i.e. at most one update per global version; 0 = unlimited), and then no more
   often than the interval below. A device therefore never spams updates for one version.
4. Rounds start at least ``max([training] interval_s, plan.min_interval_s)`` seconds apart.
5. A failed round (no data yet, a shape mismatch, divergence) is retried after
   ``[training] retry_s``.

**Fetch on ready** (docs/agent.md, *Downlink*): the agent stays subscribed to the plan and
the model spec only. While it is *ready* (no round or fetch under way, no model fetched and
not yet trained on, and rules 4 and 5 allow a round now) it is subscribed to the version
announcements too: the broker sends the retained, newest one at once and each new one while
the device stays ready. When a version newer than its model is announced it unsubscribes from
the announcements, fetches the retained model (subscribe, take one message, unsubscribe) and
trains on it. A device that is offline, training or throttled receives no announcement and
no model; one that is ready again soon after each round subscribes shortly before it can
start the next one (edge_agent.relisten). A device that trains on every version listens to its
keyframe's delta topic in place of the announcements, so each version arrives as its delta,
pushed once (:meth:`EdgeAgent._delta_watch_topic`). A model names its spec by fingerprint; the
agent keeps the verified specs (``spec-<fp>.bin``) and refuses a model whose spec it does not
hold (``unknown_spec``) until that spec has arrived.

**What a model must pass** before it is used: the aggregator's Ed25519 signature (pinned key),
the wire schema, our federation, and a version not older than the current one (an old signed
model replayed on the retained topic is refused, not rolled back to). Announcements pass the
same checks (a forged or older one changes nothing). Anything else is ignored with a log line,
counted in :attr:`EdgeAgent.rejected` by reason, and the previous model stays.

**Simulation hooks** (used by the simulator to emulate attacks and slow devices; a real device
leaves them ``None``): ``data_transform(X, y) -> (X, y)`` is applied to the loaded data before
training, ``delta_transform(delta) -> delta`` to the parameter delta before it is encoded.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

from edge_agent import keyframe as kfm
from edge_agent import state as st
from edge_agent.config import AgentConfig
from edge_agent.data import DataError, load_data
from edge_agent.evaluation import Evaluator
from edge_agent.ldp import LocalPrivacy
from edge_agent.logs import DeviceLog
from edge_agent.mqtt import Link
from edge_agent.outbox import Outbox
from edge_agent.relisten import Relisten
from edge_agent.trainer import (
    DataTransform,
    DeltaResult,
    DeltaTransform,
    Hyper,
    build_update,
    compute_delta,
    resolve_hyper,
)
from fedmqtt import topics, wire
from fedmqtt.codecs import ErrorFeedback
from fedmqtt.cohort import EVERYONE, Selection
from fedmqtt.errors import FEDERATION, UNKNOWN_SPEC, DecodeError, FedMQTTError
from fedmqtt.fsutil import atomic_write_bytes, clean_temp_files, remove_durably
from fedmqtt.models.spec import ModelSpec
from fedmqtt.mqttconf import read_password
from fedmqtt.rand import LightRandom, RandomSource, seed_of
from fedmqtt.sdnotify import Notifier
from fedmqtt.signing import Ed25519Verifier, Signer, Verifier, load_update_signer

if TYPE_CHECKING:
    from edge_agent.personal import Personaliser, PersonalModel

log = logging.getLogger(__name__)

OLD_VERSION: Final = "old_version"  # rejection reason: older than the model we have
_TICK_S: Final = 0.5  # how often run() looks at the stop event when idle
_STATUS_EVERY_S: Final = 30.0
_INBOX_MAX: Final = 64
_FETCH_TIMEOUT_S: Final = 15.0  # a fetch that brought no model by then is given up
# ... and a fetch of a delta or keyframe by then (it is retained and listed in the
# announcement, so it arrives right after the SUBACK unless its topic was just cleared)
_DELTA_TIMEOUT_S: Final = 3.0
_FETCH_RETRY_S: Final = 5.0  # first wait after a fetch that brought nothing newer ...
_FETCH_RETRY_MAX_S: Final = 300.0  # ... doubling up to this, until a newer announcement
# Announcements, watched deltas (and the ONNX export) are received at QoS 0, which nothing
# retransmits: a ready device asks for the retained announcement again this often (the watched
# delta: this long after the last one heard), which bounds how long a lost one goes unnoticed by
# a device that stays ready (one that trains subscribes afresh each round).
_ANNOUNCE_REFRESH_S: Final = 600.0
_LISTEN_TICK_S: Final = 0.02  # how often a round listening again checks the announcements


class _Inbox:
    """Messages from the MQTT thread to the agent thread, bounded, oldest dropped first."""

    def __init__(self) -> None:
        self._items: collections.deque[tuple[str, bytes]] = collections.deque()
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, topic: str, payload: bytes) -> None:
        with self._cond:
            if len(self._items) >= _INBOX_MAX:
                self._items.popleft()
                self.dropped += 1
            self._items.append((topic, payload))
            self._cond.notify_all()

    def take(self, topic: str) -> list[bytes]:
        """The payloads of ``topic`` waiting, taken out; the other messages stay, in order."""
        with self._cond:
            taken = [p for t, p in self._items if t == topic]
            if taken:
                kept = [(t, p) for t, p in self._items if t != topic]
                self._items.clear()
                self._items.extend(kept)
            return taken

    def take_all(self) -> list[tuple[str, bytes]]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            return items

    def wait(self, timeout: float) -> None:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)


@dataclass
class _Worker:
    """One round's training, run off the agent thread so that stop() is never blocked."""

    result: DeltaResult | None = None
    error: BaseException | None = None
    personal: PersonalModel | None = None  # built after the round if [personalise] is on
    report: bytes | None = None  # the evaluation of the round's model, made before training


class EdgeAgent:
    """A federated-learning device. ``run(stop)`` blocks until ``stop`` is set."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        delta_transform: DeltaTransform | None = None,
        data_transform: DataTransform | None = None,
        notifier: Notifier | None = None,
        on_delivered: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.device_id = config.device.id
        self.log = DeviceLog(log, self.device_id)
        self.federation = config.device.federation
        self.state_dir = config.device.state_dir
        self.delta_transform = delta_transform
        self.data_transform = data_transform
        self.on_delivered = on_delivered
        self.notifier = notifier if notifier is not None else Notifier(None)
        # Keys are loaded now so that a bad key fails at construction, not mid-run.
        self._verifier: Verifier = Ed25519Verifier.load(config.security.aggregator_public_key)
        self._signer: Signer = load_update_signer(
            config.security.update_auth, config.security.update_key
        )
        self._password = (
            read_password(config.broker.password_file)
            if config.broker.password_file is not None
            else None
        )
        fed = self.federation
        self.topic_model = topics.model(fed)
        self.topic_plan = topics.plan(fed)
        self.topic_onnx = topics.model_onnx(fed)
        self.topic_spec = topics.spec(fed)
        self.topic_announce = topics.announce(fed)
        self.topic_keyframe = topics.keyframe(fed)
        self.topic_updates = topics.updates(fed, self.device_id)
        self.topic_status = topics.status(fed, self.device_id)
        self.topic_eval = topics.eval_report(fed, self.device_id)
        self.evaluator = Evaluator(config.evaluation, self.device_id, fed, self._signer)
        self.eval_bytes = 0  # evaluation reports handed to the link

        self.rounds_completed = 0
        self.rounds_failed = 0
        # Versions the plan's selection did not let this device train on: announced while it
        # was ready for a round (not fetched, unless to evaluate them) or held.
        self.rounds_skipped = 0
        self._skipped_version = -1
        self.rejected: collections.Counter[str] = collections.Counter()
        # Payload bytes this device's MQTT client received, by kind of message (model, plan,
        # onnx, ...), and bytes this agent wrote to its state directory (flash wear).
        self.downloaded: collections.Counter[str] = collections.Counter()
        self.received: collections.Counter[str] = collections.Counter()  # messages, by kind
        self.bytes_written = 0
        self.model: wire.GlobalModel | None = None
        # Verified model specs by fingerprint (a model names its spec by fingerprint): the
        # stored model's and the newest published one.
        self.specs: dict[str, ModelSpec] = {}
        self._newest_spec: str | None = None
        self._unresolved: bytes | None = None  # a signed model whose spec had not arrived yet
        # Fetch on ready: the newest version announced, and the fetch of the retained model.
        self.announced: int | None = None  # announced, or pushed on the delta topic watched
        self._newest_announcement = -1  # the newest version of an announcement verified
        self.fetches = 0
        self._fetching_since: float | None = None  # monotonic
        self._fetch_not_before = 0.0  # monotonic
        self._fetch_backoff = _FETCH_RETRY_S
        self._fetched_untrained = False  # the model came from the broker and has no round yet
        self.listening_since: float | None = None  # monotonic; subscribed to announcements
        self._heard = False  # an announcement arrived since subscribing to them
        self._last_round_s: float | None = None  # how long the last finished round took
        self._relisten = Relisten()  # when a fast-repeat device listens again during a round
        # The delta downlink (edge_agent.keyframe): the keyframe held, the keyframes with a
        # delta to the newest announced version, the version whose delta failed last, the
        # held keyframe found dropped (its delta topic cleared), and the topic of the fetch
        # under way.
        self.keyframe: kfm.Held | None = None
        self.announced_keyframes: tuple[int, ...] = ()
        self._delta_failed: int | None = None
        self._keyframe_dropped: int | None = None
        self._fetch_topic = self.topic_model
        # The delta topic listened to in place of the announcements (_delta_watch_topic), or
        # None: subscribed to from a fetch of it on, while that rule holds.
        self._delta_watch: str | None = None
        # Version 0 built here (kfm.built_version_zero): the newest signed spec message that
        # says how, and the digest of a build that failed (not tried again).
        self._genesis: wire.SpecMessage | None = None
        self._genesis_failed: str | None = None
        self.plan: wire.Plan | None = None
        self.onnx_version: int | None = None
        # The wire form of the aggregator's last verified message: updates, statuses and
        # evaluation reports are written in it, so an aggregator of an earlier release (long
        # form only) still reads this device (fedmqtt.wire).
        self._compact = False
        self.state = st.AgentState()
        self.outbox: Outbox | None = None
        self.link: Link | None = None
        self._store = st.StateStore(self.state_dir)
        self._feedback = ErrorFeedback()
        self._inbox = _Inbox()
        self._retry_at = 0.0  # monotonic
        self._last_status = 0.0
        self._shown = ""  # the last status line of _status_text sent to systemd
        self._last_refresh = time.monotonic()
        self._next_watchdog = 0.0
        self.personaliser: Personaliser | None = None  # imported only if used
        if config.personalise.mode != "off":
            from edge_agent.personal import Personaliser

            p = config.personalise
            self.personaliser = Personaliser(
                p.mode,
                p.head_epochs,
                onnx=p.onnx,
                state_dir=self.state_dir,
                device=self.device_id,
                federation=self.federation,
            )
        # Local differential privacy ([privacy] mode = "local"): clip, noise, count, budget.
        self.ldp = LocalPrivacy(config.privacy, self.state_dir) if config.privacy.enabled else None

    # ---- counters --------------------------------------------------------------------------
    @property
    def updates_sent(self) -> int:
        """Updates the broker acknowledged (PUBACK success) during this run."""
        return self.link.counters.delivered if self.link is not None else 0

    @property
    def rejected_models(self) -> dict[str, int]:
        """Rejected global-model messages by reason (signature, schema, federation, ...)."""
        return {k.split("/", 1)[1]: v for k, v in self.rejected.items() if k.startswith("model/")}

    @property
    def current_version(self) -> int | None:
        return self.model.version if self.model is not None else None

    # ---- life cycle ------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set; leaves the state directory consistent on return."""
        lock = st.StateDirLock(self.state_dir)
        lock.acquire()
        try:
            self._open()
            self.link = Link(
                self.config.broker,
                client_id=self.device_id,
                outbox=self._require_outbox(),
                updates_topic=self.topic_updates,
                status_topic=self.topic_status,
                status_payload=self._status_payload,
                subscriptions=self._subscriptions(),
                on_demand=self._on_demand(),
                on_message=self._on_link_message,
                password=self._password,
                retry_s=self.config.outbox.retry_s,
                retry_no_subscribers=self.config.outbox.retry_no_subscribers,
                max_in_flight=self.config.outbox.max_in_flight,
                on_delivered=self.on_delivered,
            )
            self.link.start()
            self.notifier.ready(self._status_text())
            self.log.info(
                "edge agent %s started (federation %s, state %s)",
                self.device_id,
                self.federation,
                self.state_dir,
            )
            try:
                self._loop(stop)
            finally:
                self.notifier.stopping(f"stopping; {self._status_text()}")
                self.link.stop()
                self.log.info(
                    "edge agent %s stopped: %d round(s), %d update(s) delivered, %d in the outbox",
                    self.device_id,
                    self.rounds_completed,
                    self.updates_sent,
                    len(self._require_outbox()),
                )
        finally:
            lock.release()

    def _open(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        clean_temp_files(self.state_dir)
        ocfg = self.config.outbox
        self.outbox = Outbox(
            self.state_dir / st.OUTBOX_DIR,
            label=self.device_id,
            max_updates=ocfg.max_updates,
            max_bytes=ocfg.max_bytes,
            supersede=ocfg.supersede,
        )
        self.state = self._store.load()
        if self.personaliser is not None:
            self.personaliser.load()
        self.evaluator.evaluated = self.state.last_evaluated_version
        if self.state.reconcile(self.outbox.max_seq(), self.outbox.max_base_version()):
            self.log.info(
                "state caught up with the outbox: next seq %d, last trained v%d",
                self.state.next_seq,
                self.state.last_trained_version,
            )
            self.bytes_written += self._store.save(self.state)
        if len(self.outbox):
            self.log.info("outbox holds %d update(s) from a previous run", len(self.outbox))
        for path in st.spec_files(self.state_dir):  # before the model, which names its spec
            with contextlib.suppress(OSError):
                self._accept_spec(path.read_bytes(), from_disk=True)
        self._build_version_zero(from_disk=True)  # the base of a stored delta from it
        for name, handler in (
            (st.PLAN_FILE, self._accept_plan),
            (st.KEYFRAME_FILE, self._accept_model),  # the newest of these three is used
            (st.GLOBAL_MODEL_FILE, self._accept_model),
            (st.DELTA_FILE, self._accept_delta),
            (st.ONNX_MODEL_FILE, self._accept_onnx),
        ):
            path = self.state_dir / name
            try:
                payload = path.read_bytes()
            except FileNotFoundError:
                continue
            handler(payload, from_disk=True)
        self._load_feedback()

    def _on_demand(self) -> list[str]:
        """The topics subscribed only to fetch or watch (dropped from a persistent session
        after each connection otherwise): the delta topic of the keyframe held at start."""
        held = [topics.delta(self.federation, self.keyframe.version)] if self.keyframe else []
        return [self.topic_model, self.topic_announce, self.topic_keyframe, *held]

    def _subscriptions(self) -> list[tuple[str, int]]:
        # The plan and the spec first: on (re)subscribe the broker sends retained messages in
        # this order, so a device knows the hyperparameters and the spec before it fetches a
        # model. ONNX exports at QoS 0: the broker queues none for a device that is away (it
        # gets the retained, newest one when it subscribes again on reconnecting). Neither the
        # announcements nor the model are subscribed to here: the device watches the
        # announcements while it is ready (_listen) and fetches the model it will train on.
        subs = [(self.topic_plan, 1), (self.topic_spec, 1)]
        if self.config.inference.onnx:
            subs.append((self.topic_onnx, 0))
        return subs

    def _ping_watchdog(self) -> None:
        """``WATCHDOG=1`` at most every half ``WatchdogSec``, only from the agent's own thread
        (never the MQTT or training thread): a hung agent loop is what the watchdog catches."""
        interval = self.notifier.watchdog_interval_s
        now = time.monotonic()
        if interval is not None and now >= self._next_watchdog:
            self.notifier.watchdog()
            self._next_watchdog = now + interval

    def _loop(self, stop: threading.Event) -> None:
        watchdog = self.notifier.watchdog_interval_s
        while not stop.is_set():
            now = time.monotonic()
            self._ping_watchdog()
            self._drain_inbox()
            self._fetch_if_ready()
            wait = self._round_wait()
            if wait == 0.0:
                self._listen(self._listens_throughout())
                self._round(stop)
                continue
            if self.evaluator.due(self.model):  # a version it does not train on now
                assert self.model is not None
                self._send_report(
                    self.evaluator.load_and_report(
                        self.model, self.config.data, self.data_transform
                    )
                )
            self._listen(self._ready())
            if (
                self.listening_since is not None
                and now - self._last_refresh >= _ANNOUNCE_REFRESH_S
                and self.link is not None
            ):
                self._last_refresh = now
                self.link.refresh(self._delta_watch or self.topic_announce)
            if now - self._last_status >= _STATUS_EVERY_S or self._status_text() != self._shown:
                self._update_status()  # at once when a delivery or the link changed it
            timeout = _TICK_S if wait is None else min(wait, _TICK_S)
            lead = self._relisten.lead()
            if lead is not None and self.listening_since is None and self._fast_repeat():
                early = self._due_in() - lead  # listens from a lead before its next round
                timeout = min(timeout, early) if early > 0 else timeout
            if watchdog is not None:
                timeout = min(timeout, watchdog)
            self._inbox.wait(timeout)

    # ---- messages --------------------------------------------------------------------------
    def _on_link_message(self, topic: str, payload: bytes) -> None:
        """Runs on the MQTT thread: count what the client received, hand it to the inbox."""
        kind = self._kind_of(topic)
        self.downloaded[kind] += len(payload)
        self.received[kind] += 1
        if kind == "announce":
            self._relisten.heard(time.monotonic())
        self._inbox.put(topic, payload)

    def _kind_of(self, topic: str) -> str:
        if topic == self.topic_model:
            return "model"
        if topic == self.topic_plan:
            return "plan"
        if topic == self.topic_onnx:
            return "onnx"
        if topic == self.topic_spec:
            return "spec"
        if topic == self.topic_announce:
            return "announce"
        if topic == self.topic_keyframe:
            return "keyframe"
        if topics.delta_base(topic, self.federation) is not None:
            return "delta"
        return "other"

    @property
    def bytes_downloaded(self) -> int:
        """Payload bytes of every message this device received (all kinds)."""
        return sum(self.downloaded.values())

    def _drain_inbox(self) -> None:
        # The full model is subscribed to only to fetch it. One published as the fetch ended
        # can arrive in a later batch, before the broker took the unsubscription: it is not
        # trained on (the device would train on it when next due instead of fetching the
        # newest), only held if it is a keyframe, as the base of later deltas.
        fetching_model = self._fetch_topic == self.topic_model and self._fetching_since is not None
        for topic, payload in self._inbox.take_all():
            fetched = topic == self._fetch_topic and self._fetching_since is not None
            if topic == self.topic_model:
                self._accept_model(payload, late=not fetching_model)
                if fetched:
                    self._fetch_done()
            elif topic == self.topic_keyframe:
                held = self._accept_keyframe(payload)
                if fetched:
                    if not held:  # refused (counted): the full model instead
                        self._delta_failed = self.announced
                    self._fetch_done(progress=True)
            elif (base := topics.delta_base(topic, self.federation)) is not None:
                if not fetched:
                    if topic == self._delta_watch:
                        self._accept_pushed_delta(topic, base, payload)
                    else:  # a late delivery of an earlier fetch: not for this keyframe
                        self.log.debug("ignoring a delta on %s (not being fetched)", topic)
                    continue
                if self.keyframe is not None and self.keyframe.version != base:
                    # A newer keyframe was taken while this delta was on its way (the fetch is
                    # always from the keyframe held): it no longer applies, nor is it refused.
                    self.log.debug(
                        "passing over a delta from v%d: keyframe now v%d",
                        base,
                        self.keyframe.version,
                    )
                elif not payload:  # cleared
                    self._keyframe_gone(topic, base)
                elif not self._accept_delta(payload):
                    self._delta_failed = self.announced  # fetch the full model instead
                self._fetch_done(progress=True)
            elif topic == self.topic_announce:
                self._accept_announce(payload)
            elif topic == self.topic_plan:
                self._accept_plan(payload)
            elif topic == self.topic_onnx:
                self._accept_onnx(payload)
            elif topic == self.topic_spec:
                self._accept_spec(payload)
            else:
                self.log.debug("ignoring message on %s", topic)
        if self._inbox.dropped:
            self.log.warning("inbox overflow: %d older message(s) dropped", self._inbox.dropped)
            self._inbox.dropped = 0

    def _verified(self, kind: str, payload: bytes, cls: type[Any], from_disk: bool) -> Any:
        """Verify and parse, or count and log the rejection and return None."""
        where = "state directory" if from_disk else "broker"
        try:
            msg = wire.decode(payload, cls, self._verifier, specs=self.specs)
        except DecodeError as e:
            if e.reason == UNKNOWN_SPEC and not from_disk and kind == "model":
                # Signed by the aggregator, so the spec exists: ask the broker for it again and
                # try this model once it has arrived.
                self._unresolved = payload
                if self.link is not None:
                    self.link.refresh(self.topic_spec)
            return self._reject(kind, e.reason, f"{e.detail} (from the {where})")
        if msg.federation != self.federation:
            return self._reject(kind, FEDERATION, f"for federation {msg.federation!r}")
        self._compact = self.evaluator.compact = wire.is_compact(payload)
        return msg

    def _reject(self, kind: str, reason: str, detail: str) -> None:
        self.rejected[f"{kind}/{reason}"] += 1
        keep = ""
        if kind == "model":
            keep = f"; keeping v{self.model.version}" if self.model else "; no model yet"
        self.log.warning("ignored %s message: %s: %s%s", kind, reason, detail, keep)

    def _accept_model(self, payload: bytes, *, from_disk: bool = False, late: bool = False) -> None:
        """Verify and install a full model (``late``: delivered after its fetch ended: not
        installed, only held if it is a keyframe)."""
        msg: wire.GlobalModel | None = self._verified("model", payload, wire.GlobalModel, from_disk)
        if msg is None:
            return
        if msg.keyframe:  # stored as the keyframe, which is also the model until a newer one
            self._hold_keyframe(msg, payload, from_disk)
        if late:
            self.log.debug("not training on v%d, delivered after its fetch ended", msg.version)
            return
        self._install(msg, None if msg.keyframe else (st.GLOBAL_MODEL_FILE, payload), from_disk)

    def _hold_keyframe(self, msg: wire.GlobalModel, payload: bytes, from_disk: bool) -> None:
        if self.keyframe is not None and msg.version <= self.keyframe.version:
            return
        self.keyframe = kfm.Held.of(msg)
        if not from_disk:
            self._store_payload(st.KEYFRAME_FILE, payload)

    def _accept_keyframe(self, payload: bytes) -> bool:
        """A keyframe fetched to rebuild deltas from; whether it is held now."""
        msg: wire.GlobalModel | None = self._verified("keyframe", payload, wire.GlobalModel, False)
        if msg is None:
            return False
        if not msg.keyframe:
            self._reject("keyframe", "schema", f"v{msg.version} is not flagged as a keyframe")
            return False
        self._hold_keyframe(msg, payload, False)
        if self.announced is None or msg.version >= self.announced:
            self._install(msg, None, False)  # the announced version itself: train on it
        return self.keyframe is not None and self.keyframe.version == msg.version

    def _keyframe_gone(self, topic: str, base: int) -> None:
        """Keyframe ``base``'s delta topic is empty: it was dropped (edge_agent.keyframe)."""
        self._reject("delta", kfm.MISSING, f"nothing on {topic}: keyframe v{base} dropped")
        self._keyframe_dropped = base

    def _accept_delta(self, payload: bytes, *, from_disk: bool = False) -> bool:
        """A delta from the keyframe held: install the model it rebuilds; whether it did
        (from the state directory, a delta that no longer applies is passed over quietly)."""
        msg: wire.ModelDelta | None = self._verified("delta", payload, wire.ModelDelta, from_disk)
        if msg is None:
            return False
        try:
            if self.keyframe is None:
                raise kfm.DeltaMismatchError(kfm.BASE, f"delta from v{msg.base}, no keyframe held")
            model = kfm.rebuild(self.keyframe, msg)
        except kfm.DeltaMismatchError as e:
            if not from_disk:
                self._reject("delta", e.reason, e.detail)
            return False
        return self._install(model, (st.DELTA_FILE, payload), from_disk)

    def _accept_pushed_delta(self, topic: str, base: int, payload: bytes) -> None:
        """A delta that arrived on the delta topic watched in place of the announcements: a
        newer version is installed (as if announced and fetched) and trained on when due; the
        version held again (the retained delta, sent again on reconnecting) changes nothing;
        an empty message means the keyframe was dropped (not counted: the topic is cleared so
        that watching devices learn it), and a refused delta (counted) ends the watch: the
        device listens to the announcements again, and the fetch they lead to decides between
        the delta and the full model."""
        # Each delta is from the keyframe to the newest version: one lost before this one no
        # longer matters, so the refresh for lost messages counts from here.
        self._last_refresh = time.monotonic()
        kf = self.keyframe
        if kf is None or kf.version != base:
            self.log.debug("passing over a delta from v%d: keyframe not held", base)
            return
        if not payload:  # not a refusal: how a watching device learns of the drop
            self.log.info("keyframe v%d dropped: listening to the announcements again", base)
            self._keyframe_dropped = base
            return
        msg: wire.ModelDelta | None = self._verified("delta", payload, wire.ModelDelta, False)
        if msg is not None and self.model is not None and msg.version <= self.model.version:
            return
        try:
            model = None if msg is None else kfm.rebuild(kf, msg)
        except kfm.DeltaMismatchError as e:
            self._reject("delta", e.reason, e.detail)
            model = None
        if model is None:
            self._end_delta_watch()
        elif self._install(model, (st.DELTA_FILE, payload), False):
            self._heard_version(model.version)

    def _install(
        self, msg: wire.GlobalModel, store: tuple[str, bytes] | None, from_disk: bool
    ) -> bool:
        """Train on ``msg`` from now on if it is newer than the model held (storing
        ``store``, a file name and payload, unless read from the state directory)."""
        cur = self.model
        if cur is not None and msg.version <= cur.version:
            if msg.version < cur.version and not from_disk:
                self._reject("model", OLD_VERSION, f"v{msg.version} is older than v{cur.version}")
            return False
        if cur is not None and cur.spec != msg.spec:
            self.log.info("model architecture changed with v%d", msg.version)
        self.model = msg
        self._retry_at = 0.0  # a new version deserves a round now, even after a failure
        self._fetched_untrained = not from_disk
        if not from_disk:
            if store is not None:
                self._store_payload(*store)
            self._prune_specs()
        if self.log.isEnabledFor(logging.INFO):  # the parameter count costs a layout
            self.log.info(
                "global model v%d accepted (%s, %d parameters)%s",
                msg.version,
                msg.spec.kind,
                msg.spec.layout().size,
                " from the state directory" if from_disk else "",
            )
        self._update_status()
        return True

    def _accept_announce(self, payload: bytes) -> None:
        msg: wire.Announce | None = self._verified("announce", payload, wire.Announce, False)
        if msg is None:
            return
        known = max(
            self.announced if self.announced is not None else -1, self.current_version or -1
        )
        if msg.version < known:
            if 0 <= self._newest_announcement <= msg.version:
                # Older than the model held, not than any announcement heard: the retained
                # announcement of the version before the one fetched or pushed (a model and
                # its deltas are published before its announcement). Heard, nothing newer,
                # and no replay.
                self._newest_announcement = msg.version
                self._heard = True
                return
            self._reject("announce", OLD_VERSION, f"v{msg.version} is older than v{known}")
            return
        if self.announced is None or msg.version >= self.announced:
            self.announced_keyframes = msg.keyframes
        self._newest_announcement = msg.version
        self._heard_version(msg.version)

    def _heard_version(self, version: int) -> None:
        """``version`` exists (announced, or its delta pushed on the delta topic watched)."""
        self._heard = True
        if self.announced is None or version > self.announced:
            self.announced = version
            # A newer version: the retained model has changed, so an earlier fetch that brought
            # nothing newer says nothing about the next one.
            self._fetch_not_before = 0.0
            self._fetch_backoff = _FETCH_RETRY_S
            self.log.debug("version %d announced", version)

    # ---- fetch on ready --------------------------------------------------------------------
    def _ready(self) -> bool:
        """Whether to be subscribed to the announcements: a newer version would be fetched and
        trained on now (no fetch or round under way, no fetched model waiting for its round,
        the intervals allow a round), or the device is always ready again soon."""
        if self._listens_throughout():
            return True
        if self._fetching_since is not None or self._fetched_untrained:
            return False
        if self.model is None:
            return True
        if self._fast_repeat():  # from a lead before its next round (edge_agent.relisten)
            return not self._knows_newer() and self._due_in() <= (self._relisten.lead() or 0.0)
        return self._due_in() == 0.0

    def _fast_repeat(self) -> bool:
        """Whether the device is ready again so soon after each round that it stays subscribed
        to the announcements throughout (``[training] fast_repeat_s``, fedmqtt.readiness): it
        retrains one version with an interval at most that, or its last round plus the
        interval took at most that."""
        t = self.config.training
        if t.max_updates_per_version != 1:
            return self._interval() <= t.fast_repeat_s
        last = self._last_round_s
        return last is not None and self._interval() + last <= t.fast_repeat_s

    def _listens_throughout(self) -> bool:
        """Whether the device stays subscribed to the announcements through fetches and
        rounds: it is ready again soon after each round (:meth:`_fast_repeat`) and does not
        listen only from a lead before its next round (edge_agent.relisten: nothing measured
        yet, or rounds too short)."""
        return self._fast_repeat() and not self._relisten.active(self._interval())

    def _knows_newer(self) -> bool:
        """Whether a version newer than the model held is announced, and the device needs it
        and will fetch it when due (no retry delay): whatever is announced meanwhile, the
        fetch brings the retained, newest model."""
        current, announced = self.current_version, self.announced
        return (
            announced is not None
            and current is not None
            and announced > current
            and time.monotonic() >= self._fetch_not_before
            and self._needs(announced)
        )

    def _heard_newer(self) -> bool:
        """Listening again during a round: take the announcements heard so far, and stop
        listening once one of a newer version the device will fetch is verified."""
        for payload in self._inbox.take(self.topic_announce):
            self._accept_announce(payload)
        if not self._knows_newer():
            return False
        self._listen(False)
        return True

    def _listen(self, on: bool) -> None:
        """Be subscribed to the announcements exactly while ``on`` (the device is ready), or
        in their place to the delta topic watched while :meth:`_delta_watch_topic` names it."""
        link = self.link
        watch = self._delta_watch
        if watch is not None:
            if on and self._delta_watch_topic() == watch:
                return
            if self._fetching_since is not None and self._fetch_topic == watch:
                return  # the fetch under way ends first (_fetch_done keeps the subscription)
            self._end_delta_watch()
        if link is None or on == (self.listening_since is not None):
            return
        if on:
            self.listening_since = self._last_refresh = time.monotonic()
            self._heard = False
            self._relisten.subscribed(self.listening_since)
            link.watch(self.topic_announce, 0)
        else:
            self.listening_since = None
            self._relisten.unsubscribed()
            link.release(self.topic_announce)

    def _delta_watch_topic(self) -> str | None:
        """The delta topic to listen to in place of the announcements: that of the keyframe
        held, while the device trains on every version (one per round, counting the round on
        the version announced; one round per version) and listens throughout
        (:meth:`_listens_throughout`), the newest announcement heard lists that keyframe, it
        was not found dropped and no delta to the version announced failed. Each version then
        arrives as its delta, pushed once, instead of an announcement followed by a fetch of
        that delta. Otherwise None: the announcements (fewer bytes whenever versions are
        published faster than the device trains)."""
        kf = self.keyframe
        if (
            kf is None
            or self.config.training.max_updates_per_version != 1
            or kf.version not in self.announced_keyframes
            or kf.version == self._keyframe_dropped
            or (self._delta_failed is not None and self._delta_failed == self.announced)
            or not self._relisten.one_per_round(self.announced)
            or not self._listens_throughout()
        ):
            return None
        return topics.delta(self.federation, kf.version)

    def _watch_delta(self, topic: str) -> None:
        """Fetch ``topic`` by watching it (stay subscribed after the retained delta arrives)
        and listen to it in place of the announcements."""
        link = self.link
        assert link is not None
        if self._delta_watch == topic:
            link.refresh(topic)  # the broker sends the retained delta again
            return
        self._listen(False)
        self._delta_watch = topic
        self.listening_since = self._last_refresh = time.monotonic()
        # QoS 0, as the announcements: the session is persistent, and at QoS 1 the broker
        # would queue every delta published while the device is away.
        link.watch(topic, 0)

    def _end_delta_watch(self) -> None:
        topic, self._delta_watch = self._delta_watch, None
        if topic is None:
            return
        self.listening_since = None
        if self.link is not None:
            self.link.release(topic)

    def _fetch_wanted(self) -> bool:
        """Whether to fetch the retained model now: a newer version is announced (or there is
        no model at all) and a round could start now, i.e. the device is ready to train."""
        if self.link is None or not self.link.connected:
            return False
        if time.monotonic() < self._fetch_not_before:
            return False
        current = self.current_version
        if self.announced is None or (current is not None and self.announced <= current):
            # A device without a model asks, announced or not (after waiting a little for the
            # announcement, which says whether it may build version 0 instead).
            return current is None and not self._awaiting_announce()
        if self._fetched_untrained:
            return False  # train on the model just fetched rather than chase newer versions
        # A device without a model fetches one whatever the selection (it is the start
        # of every later round, evaluation and delta).
        return self._due_in() == 0.0 and (current is None or self._needs(self.announced))

    def _needs(self, version: int) -> bool:
        """Whether the device needs ``version``, decided from its announcement: it trains on
        it, or (federated evaluation on) it evaluates it without training
        (:meth:`fedmqtt.cohort.Selection.evaluates`: a device outside the cohort, one version
        per participation window its draw selects). A version it trains on is never skipped
        for lack of a download, and one it neither trains on nor evaluates is not fetched."""
        sel = self.plan.selection if self.plan is not None else EVERYONE
        tags = self.config.device.tags
        if sel.trains(self.federation, self.device_id, tags, version):
            return True
        self._skip(sel, version)
        if not self.config.evaluation.enabled:
            return False
        done = self.evaluator.evaluated
        return sel.evaluates(self.federation, self.device_id, tags, version) and (
            done < 0 or sel.window_of(done) < sel.window_of(version)
        )

    def _awaiting_announce(self) -> bool:
        """Whether a device without a model still waits for the (retained) announcement, which
        says whether it may build version 0 instead of fetching it: until one arrives, at most
        ``[training] announce_wait_s`` after subscribing to them."""
        if self.announced is not None:
            return False
        since = self.listening_since
        wait = self.config.training.announce_wait_s
        return since is None or time.monotonic() - since < wait

    def _build_version_zero(self, *, from_disk: bool = False) -> bool:
        """Build version 0 from the signed genesis and hold it as keyframe 0 when it is needed:
        announced (then it is also the model: whether it was installed) or listed as a
        keyframe, or (``from_disk``) as the base of what the state directory holds."""
        g = self._genesis
        if g is None or g.genesis is None or self.keyframe is not None:
            return False
        if g.genesis.digest == self._genesis_failed:
            return False
        if not from_disk and (
            self.announced is None or (self.announced != 0 and 0 not in self.announced_keyframes)
        ):
            return False
        try:
            held = kfm.built_version_zero(g)
        except kfm.DeltaMismatchError as e:
            self._genesis_failed = g.genesis.digest
            self._reject("genesis", e.reason, f"{e.detail}; fetching it instead")
            return False
        self.keyframe = held
        self.log.info("version 0 built from the model seed (digest %s)", held.digest)
        if from_disk or self.announced == 0:
            return self._install(held.msg, None, from_disk)
        return False  # a newer version is announced: its delta from keyframe 0 is fetched

    def _fetch_if_ready(self) -> None:
        link = self.link
        if self._fetching_since is not None:
            limit = _FETCH_TIMEOUT_S if self._fetch_topic == self.topic_model else _DELTA_TIMEOUT_S
            timed_out = time.monotonic() - self._fetching_since > limit
            if timed_out or link is None or not link.connected:
                self.log.info("model fetch %s", "timed out" if timed_out else "cut short")
                self._fetch_done()
            return
        if link is not None and self._fetch_wanted():
            if self._build_version_zero():
                return  # version 0 is the one announced: nothing to fetch
            if self._install_held_keyframe():
                return  # the keyframe held (delivered late) is the one announced
            # A dropped keyframe may still be listed by an announcement published before it
            # was dropped: then the newest keyframe (held from then on) rather than the model.
            dropped = self._keyframe_dropped
            topic = kfm.choose(
                self.federation,
                announced=self.announced,
                keyframes=tuple(k for k in self.announced_keyframes if k != dropped),
                held=self.keyframe,
                failed=self._delta_failed,
            )
            self._fetching_since = time.monotonic()
            self.fetches += 1
            self._fetch_topic = topic
            if topic == self._delta_watch_topic():
                self._watch_delta(topic)
            else:
                self._listen(self._listens_throughout())
                link.fetch(topic)

    def _install_held_keyframe(self) -> bool:
        """Train on the keyframe held if it is the version announced and newer than the model
        (a keyframe delivered after its fetch ended is held, not installed): no download."""
        kf, current = self.keyframe, self.current_version
        if kf is None or kf.version != self.announced:
            return False
        # Checked here, not left to _install, which counts an older version as refused.
        return (current is None or kf.version > current) and self._install(kf.msg, None, False)

    def _fetch_done(self, *, progress: bool = False) -> None:
        """The fetch ended (a message arrived, or it timed out): unsubscribe; if it brought
        nothing as new as announced and no step towards it (``progress``: a keyframe or a
        delta arrived, usable or refused; after a refusal, or none within the timeout, the
        full model is fetched at once), wait before asking again (doubling the wait)."""
        if self._fetching_since is None:
            return
        self._fetching_since = None
        topic = self._fetch_topic
        if self.link is not None and topic != self._delta_watch:
            self.link.release(topic)
        current = self.current_version
        if topic != self.topic_model and not progress:
            base = topics.delta_base(topic, self.federation)
            if base is not None:  # no retained delta
                self._keyframe_gone(topic, base)
            else:
                self._reject("keyframe", kfm.MISSING, f"nothing on {topic}; fetching the model")
                self._delta_failed = self.announced  # the full model next
            progress = True
        if progress:
            self._fetch_backoff = _FETCH_RETRY_S
        elif current is None or (self.announced is not None and current < self.announced):
            self._fetch_not_before = time.monotonic() + self._fetch_backoff
            self._fetch_backoff = min(self._fetch_backoff * 2, _FETCH_RETRY_MAX_S)
        else:
            self._fetch_backoff = _FETCH_RETRY_S

    def _accept_spec(self, payload: bytes, *, from_disk: bool = False) -> None:
        msg: wire.SpecMessage | None = self._verified("spec", payload, wire.SpecMessage, from_disk)
        if msg is None:
            return
        fp = msg.fingerprint
        self._newest_spec = fp
        new_genesis = msg.genesis is not None and (
            self._genesis is None or self._genesis.genesis != msg.genesis
        )
        if new_genesis:
            self._genesis = msg
        if fp not in self.specs or (new_genesis and not from_disk):
            self.specs[fp] = msg.spec
            if not from_disk:
                self._store_payload(st.spec_file(fp), payload)
                self.log.info("model spec %s accepted (%s)", fp, msg.spec.kind)
        if self._unresolved is not None and not from_disk:
            pending, self._unresolved = self._unresolved, None
            self._accept_model(pending)

    def _prune_specs(self) -> None:
        """Keep only the specs of the current model and the newest published one."""
        keep = {self._newest_spec, self.model.spec.fingerprint() if self.model else None}
        for fp in [fp for fp in self.specs if fp not in keep]:
            del self.specs[fp]
        for path in st.spec_files(self.state_dir):
            if path.name not in {st.spec_file(fp) for fp in self.specs}:
                try:
                    remove_durably(path)
                except OSError as e:
                    self.log.warning("cannot remove %s: %s", path, e)

    def _accept_plan(self, payload: bytes, *, from_disk: bool = False) -> None:
        msg: wire.Plan | None = self._verified("plan", payload, wire.Plan, from_disk)
        if msg is None:
            return
        if self.plan is not None and msg.revision <= self.plan.revision:
            if msg.revision < self.plan.revision:
                self._reject(
                    "plan",
                    OLD_VERSION,
                    f"revision {msg.revision} is older than {self.plan.revision}",
                )
            return
        try:
            resolve_hyper(msg, self.config.training)
        except FedMQTTError as e:
            self._reject("plan", "schema", str(e))
            return
        self.plan = msg
        if not from_disk:
            self._store_payload(st.PLAN_FILE, payload)
        self.log.info(
            "plan revision %d accepted: epochs=%d lr=%g batch=%d codec=%s min_interval=%gs",
            msg.revision,
            msg.epochs,
            msg.lr,
            msg.batch_size,
            msg.codec,
            msg.min_interval_s,
        )

    def _accept_onnx(self, payload: bytes, *, from_disk: bool = False) -> None:
        msg: wire.OnnxModel | None = self._verified("onnx", payload, wire.OnnxModel, from_disk)
        if msg is None:
            return
        if self.onnx_version is not None and msg.version <= self.onnx_version:
            if msg.version < self.onnx_version:
                self._reject(
                    "onnx", OLD_VERSION, f"v{msg.version} is older than v{self.onnx_version}"
                )
            return
        self.onnx_version = msg.version
        if not from_disk:
            self._store_payload(st.ONNX_MODEL_FILE, payload)
            self.log.info(
                "ONNX model v%d stored for inference (%d bytes)", msg.version, len(msg.onnx)
            )

    def _store_payload(self, name: str, payload: bytes) -> None:
        """Keep a verified message for restarts; a failed write costs only that."""
        try:
            atomic_write_bytes(self.state_dir / name, payload, mode=0o600)
            self.bytes_written += len(payload)
        except OSError as e:
            self.log.error("cannot store %s in %s: %s", name, self.state_dir, e)

    # ---- rounds ----------------------------------------------------------------------------
    def _round_wait(self) -> float | None:
        """Seconds until the next round is due (0.0: now), None if there is nothing to do."""
        model = self.model
        if model is None or self._fetching_since is not None:
            return None  # nothing to train on yet, or a newer model is on its way
        if not self._selected(model.version):
            return None
        tcfg = self.config.training
        s = self.state
        if model.version <= s.last_trained_version:
            per_version = tcfg.max_updates_per_version
            if model.version < s.last_trained_version or per_version == 1:
                return None
            if per_version > 1 and s.updates_for_version >= per_version:
                return None
            newer = self.announced
            if newer is not None and newer > model.version and not self._needs(newer):
                return None  # not selected for the newest version: no more rounds on this one
            # A repeated round: first hear the retained announcement (when there is a broker
            # to hear it from), so that a newer version wins.
            online = self.link is not None and self.link.connected
            if online and (
                self.listening_since is None
                or (
                    not self._heard
                    and time.monotonic() - self.listening_since < tcfg.announce_wait_s
                )
            ):
                return None if self._due_in() == 0.0 else self._due_in()
        if self._fetch_wanted():
            return None  # fetch the announced newer version first (next pass of the loop)
        return self._due_in()

    def _selected(self, version: int) -> bool:
        """Whether the plan's selection lets this device train on ``version``: a device that
        is not selected neither trains nor uploads (the aggregator would refuse the update,
        ``not_selected``) and is free to fetch the next version."""
        sel = self.plan.selection if self.plan is not None else EVERYONE
        if sel.trains(self.federation, self.device_id, self.config.device.tags, version):
            return True
        self._skip(sel, version)
        self._fetched_untrained = False  # no round for it: ready for the next version
        return False

    def _skip(self, sel: Selection, version: int) -> None:
        """Count and log (once per version) a version the selection does not let this device
        train on, whether it holds it or only heard it announced."""
        if version <= self._skipped_version:
            return  # counted already (versions only grow: held and announced, one count)
        self._skipped_version = version
        self.rounds_skipped += 1
        why = sel.why_not(self.federation, self.device_id, self.config.device.tags, version)
        self.log.info("not training on v%d: %s", version, why)

    def _interval(self) -> float:
        """The minimum time between two rounds: ``max(interval_s, plan.min_interval_s)``."""
        return max(self.config.training.interval_s, self.plan.min_interval_s if self.plan else 0.0)

    def _due_in(self) -> float:
        """Seconds until the minimum interval and any retry delay have passed (0.0: now)."""
        interval = self._interval()
        now = time.time()
        last = self.state.last_round_at
        last = last if last <= now + 60 else 0.0  # clock went back
        return max(last + interval - now, self._retry_at - time.monotonic(), 0.0)

    def _round(self, stop: threading.Event) -> None:
        model = self.model
        assert model is not None
        if self.ldp is not None and self.ldp.spent():
            self._retry_at = time.monotonic() + self.config.training.retry_s
            self.notifier.status("local privacy budget spent: no more updates")
            return
        started = time.monotonic()
        self._relisten.round_on(model.version)
        self.state.last_round_at = time.time()
        self._fetched_untrained = False
        try:
            hyper = resolve_hyper(self.plan, self.config.training)
        except FedMQTTError as e:
            self._round_failed(e)
            return
        seq = self.state.next_seq
        seed = self.config.training.seed
        rng = LightRandom(seed_of(seed, seq) if seed is not None else None)
        self.notifier.status(f"training from v{model.version}")
        worker = _Worker()

        def work() -> None:
            try:
                X, y = load_data(self.config.data)
                if self.data_transform is not None:
                    X, y = self.data_transform(X, y)
                (X, y), val = self.evaluator.split(X, y)
                if self.evaluator.due(model):  # evaluated before it is trained on
                    worker.report = self.evaluator.report(model, val, self.data_transform)
                if X.shape[0] < self.config.data.min_samples:
                    raise DataError(
                        f"{X.shape[0]} samples, [data] min_samples is "
                        f"{self.config.data.min_samples}"
                    )
                worker.result = compute_delta(
                    model,
                    X,
                    y,
                    hyper,
                    rng,
                    delta_transform=self.delta_transform,
                    keep_trained=self.personaliser is not None,
                )
                if self.personaliser is not None and worker.result.trained is not None:
                    prng = LightRandom(seed_of(seed, seq, 1) if seed is not None else None)
                    worker.personal = self.personaliser.build(
                        model, worker.result.trained, (X, y), hyper.train, prng
                    )
            except BaseException as e:
                worker.error = e

        thread = threading.Thread(target=work, name=f"train-{self.device_id}", daemon=True)
        # A device ready again soon after each round listens again from a lead before it can
        # start the next one, until it hears of a newer version (edge_agent.relisten).
        relisten = self._relisten.at(started, self._interval()) if self._fast_repeat() else None
        listening = False
        thread.start()
        while thread.is_alive():
            tick = _LISTEN_TICK_S if listening else 0.1
            if relisten is not None:
                tick = min(tick, max(relisten - time.monotonic(), 0.0))
            thread.join(tick)
            if relisten is not None and time.monotonic() >= relisten:
                relisten, listening = None, True
                self._listen(True)
            if listening:
                listening = not self._heard_newer()
            if stop.is_set() and thread.is_alive():
                # A requested stop, not a fault: the round is simply not finished.
                self.log.info(
                    "stop requested: abandoning the round in progress (nothing of it was written)"
                )
                return
            self._ping_watchdog()
        self._relisten.trained(time.monotonic() - started)
        self._send_report(worker.report)
        if worker.error is not None or worker.result is None:
            self._round_failed(worker.error or RuntimeError("training produced nothing"))
            return
        self._commit(model, worker.result, hyper, seq, rng)
        if self.personaliser is not None and worker.personal is not None:
            # Kept in the state directory only: never sent.
            self.bytes_written += self.personaliser.save(worker.personal)
        self._last_round_s = time.monotonic() - started

    def _commit(
        self,
        model: wire.GlobalModel,
        result: DeltaResult,
        hyper: Hyper,
        seq: int,
        rng: RandomSource,
    ) -> None:
        """Encode, sign, queue durably, then record the round (order matters on a crash)."""
        fp = model.spec.fingerprint()
        if self.state.feedback_spec != fp:
            self._feedback = ErrorFeedback()
        use_feedback = hyper.uses_feedback or bool(self._feedback.residual)
        feedback = ErrorFeedback(dict(self._feedback.residual)) if use_feedback else None
        try:
            if self.ldp is not None:  # noise first, then encode (edge_agent.ldp)
                result = replace(result, delta=self.ldp.privatize(result.delta))
            update, payload = build_update(
                model,
                result,
                hyper,
                device_id=self.device_id,
                federation=self.federation,
                seq=seq,
                signer=self._signer,
                rng=rng,
                feedback=feedback,
                compact=self._compact,
            )
        except (ValueError, TypeError) as e:  # e.g. the delta hook returned NaN
            self._round_failed(e)
            return
        except OSError as e:  # the privacy count could not be written: nothing is sent
            self._round_failed(FedMQTTError(f"cannot write the privacy count: {e}"))
            return
        outbox = self._require_outbox()
        try:
            put = outbox.put(
                payload, seq=seq, base_version=model.version, update_id=update.update_id
            )
        except OSError as e:  # disk full, read-only file system: nothing was queued
            self._round_failed(FedMQTTError(f"cannot write the outbox: {e}"))
            return
        self.bytes_written += len(payload)
        if feedback is not None and not hyper.uses_feedback:
            feedback = ErrorFeedback()  # the pending residual went out with this update
        self._feedback = feedback if feedback is not None else ErrorFeedback()
        s = self.state
        s.next_seq = seq + 1
        if model.version == s.last_trained_version:
            s.updates_for_version += 1
        else:
            s.last_trained_version = model.version
            s.updates_for_version = 1
        try:
            self._save_feedback(fp, persist=hyper.persists_feedback)
            self.bytes_written += self._store.save(s)
        except OSError as e:
            # The update is queued; at the next start the outbox restores seq and version.
            self.log.error("cannot save the agent state in %s: %s", self.state_dir, e)
        self.rounds_completed += 1
        if self.link is not None:
            self.link.wake()
        if put.entry is not None:
            self.log.info(
                "round %d: update seq=%d from v%d queued (%d samples, loss %.4f, %s, "
                "%d bytes, %.3fs CPU)",
                self.rounds_completed,
                seq,
                model.version,
                result.stats.num_samples,
                result.stats.loss,
                hyper.codec,
                len(payload),
                result.seconds,
            )
        self._update_status()

    def _send_report(self, payload: bytes | None) -> None:
        """Publish an evaluation report (if any) and record the version as evaluated."""
        if self.state.last_evaluated_version != self.evaluator.evaluated:
            self.state.last_evaluated_version = self.evaluator.evaluated
            try:
                self.bytes_written += self._store.save(self.state)
            except OSError as e:
                self.log.error("cannot save the agent state in %s: %s", self.state_dir, e)
        if payload is None or self.link is None:
            return
        self.eval_bytes += len(payload)
        self.link.send(self.topic_eval, payload)

    def _round_failed(self, error: BaseException) -> None:
        self.rounds_failed += 1
        retry = self.config.training.retry_s
        self._retry_at = time.monotonic() + retry
        if isinstance(error, FedMQTTError | ValueError):
            self.log.error("round failed: %s; retrying in %.0fs", error, retry)
        else:
            self.log.error(
                "round failed; retrying in %.0fs",
                retry,
                exc_info=(type(error), error, error.__traceback__),
            )
        self.notifier.status(f"round failed: {error}")

    # ---- error feedback --------------------------------------------------------------------
    def _load_feedback(self) -> None:
        path = self.state_dir / st.FEEDBACK_FILE
        try:
            self._feedback = ErrorFeedback.from_bytes(path.read_bytes())
        except FileNotFoundError:
            return
        except DecodeError as e:
            self.log.warning("ignoring unreadable %s: %s", path, e)
            self._feedback = ErrorFeedback()

    def _save_feedback(self, fingerprint: str, *, persist: bool) -> None:
        """Keep the residual in the state directory (``persist``), or in memory only: then a
        residual stored earlier has gone out with this update and its file is removed.
        ``feedback_spec`` names the model of the residual wherever it is kept."""
        path = self.state_dir / st.FEEDBACK_FILE
        if self._feedback.residual and persist:
            data = self._feedback.to_bytes()
            atomic_write_bytes(path, data, mode=0o600)
            self.bytes_written += len(data)
        elif path.exists():
            remove_durably(path)
        self.state.feedback_spec = fingerprint if self._feedback.residual else ""

    # ---- status ----------------------------------------------------------------------------
    def _status_payload(self, state: str) -> bytes:
        status = wire.Status(self.federation, self.device_id, state)
        return wire.encode(status, self._signer, compact=self._compact)

    def _status_text(self) -> str:
        link = "connected" if self.link is not None and self.link.connected else "offline"
        version = f"v{self.model.version}" if self.model else "no model"
        queued = len(self.outbox) if self.outbox is not None else 0
        return (
            f"{link}; {version}; {self.rounds_completed} round(s), "
            f"{self.updates_sent} delivered, {queued} queued"
        )

    def _update_status(self) -> None:
        self._last_status = time.monotonic()
        self._shown = self._status_text()
        self.notifier.status(self._shown)

    def _require_outbox(self) -> Outbox:
        if self.outbox is None:
            raise RuntimeError("agent not opened")
        return self.outbox
