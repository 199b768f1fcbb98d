"""Scale-out: worker processes authenticate and decode updates in parallel for one owner.

With ``[scaleout] workers = N``, the service (the *owner*) starts N processes. Each one opens
its own persistent MQTT 5 session and subscribes to the shared subscription
``$share/<group>/fl/<fed>/updates/+``, so the broker splits the update stream between them
(Mosquitto 2.0 round-robins a shared subscription). A worker runs the message-only part of the
validation pipeline -- size, envelope, device key, signature, body, federation, sender, spec,
decode, finite values, norm (:mod:`aggregator.validate`) -- and sends the result to the owner
over a pipe: a small msgpack header per update plus its delta. For large models
(:data:`ENCODED_MIN_ROW_BYTES`) and compact codecs (a message at most half the size of the
float32 row: int8, fp16, top-k, zlib) the delta goes as its already-checked wire encoding,
which the owner decodes straight into the buffer row; otherwise as the decoded float32 row.
Sending int8 updates of d = 1e5 as float32 rows cost the owner more CPU per update than one
process spends in total (docs/benchmarks.md). The owner runs the state-dependent checks
(staleness, replay, norm bound), the strategy and the checkpoints, exactly as in
single-process mode.

Acknowledgements stay with the owner's durability rule: a worker never PUBACKs on its own. It
keeps every message it forwarded, in order, and acknowledges them when the owner says
``ack <token>`` -- which the owner does only once the checkpoint covering them is on disk. If the
owner dies, its workers see the pipe close and exit without acknowledging anything more: the
broker redelivers their unacknowledged updates when they reconnect. A worker that dies is
restarted by the owner with the same client id, so its session (and its unacknowledged
messages) is picked up again.

Pipe frames (``Connection.send_bytes``, never pickle). Worker -> owner: ``{"ready": true}``
once subscribed; then per batch one msgpack list of items ``[token, device, nbytes,
reason|None, detail, meta|None, norm, encoded]`` followed by one frame per accepted item: the
msgpack wire encoding of its delta if ``encoded``, else the delta's raw float32 bytes.
Owner -> worker: msgpack ``{"ack": token}`` or ``{"stop": true}``.
Process start-up uses ``multiprocessing``'s spawn context, which does pickle the worker's
configuration object once -- local, between our own processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import astuple
from multiprocessing.connection import Connection
from typing import Any, cast

import msgpack
import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.cpu import cpu_for, pin_current_thread
from aggregator.devices import DeviceKeys
from aggregator.engine import Verified
from aggregator.memtune import tune_malloc
from aggregator.mqtt import Incoming, MqttLink
from aggregator.validate import (
    UpdateMeta,
    decode_delta,
    limits_for,
    open_update,
)
from fedmqtt import topics
from fedmqtt.errors import RejectedError

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0
# Forward a delta as its wire encoding only when the float32 row is at least this large: below
# it, unpacking and decoding again costs the owner more than the bytes it saves (measured: at
# d = 650 int8 the owner's CPU per update rose from ~55 to ~80-110 microseconds).
ENCODED_MIN_ROW_BYTES = 64 * 1024


def _pack(obj: Any) -> bytes:
    return cast(bytes, msgpack.packb(obj, use_bin_type=True))


class _Worker:
    """The owner's handle on one worker process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.incarnation = 0
        self.proc: Any = None
        self.conn: Connection | None = None
        self.alive = False
        self.ready = False
        self.send_lock = threading.Lock()


class WorkerPool:
    """Owner side: start, feed from and acknowledge through N worker processes."""

    def __init__(self, cfg: AggregatorConfig, cpus: Sequence[int] = ()) -> None:
        self.cfg = cfg
        self._cpus = cpus  # the CPUs to spread the workers over ([scaleout] pin_cpu)
        self._ctx = mp.get_context("spawn")
        self._workers = [_Worker(i) for i in range(cfg.scaleout.workers)]
        self._items: deque[tuple[tuple[int, int, int], Verified]] = deque()
        self._lock = threading.Lock()
        self._arrived = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self.all_ready = asyncio.Event()

    def _check_ready(self) -> None:
        if all(w.ready for w in self._workers):
            self.all_ready.set()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for w in self._workers:
            self._spawn(w)
        self._supervisor = asyncio.create_task(self._supervise())

    def _spawn(self, w: _Worker) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        w.incarnation += 1
        w.proc = self._ctx.Process(
            target=worker_main,
            args=(self.cfg, w.index, child, cpu_for(w.index + 1, self._cpus)),
            name=f"fl-aggregator-worker-{w.index + 1}",
            daemon=True,
        )
        w.proc.start()
        child.close()
        w.conn = parent
        w.alive = True
        t = threading.Thread(
            target=self._reader,
            args=(w, w.incarnation, parent),
            name=f"agg-worker-{w.index + 1}-reader",
            daemon=True,
        )
        t.start()
        log.info("started worker %d (pid %d)", w.index + 1, w.proc.pid)

    def _reader(self, w: _Worker, incarnation: int, conn: Connection) -> None:
        loop = self._loop
        assert loop is not None
        try:
            while True:
                header = msgpack.unpackb(conn.recv_bytes(), raw=False)
                if isinstance(header, dict):  # {"ready": true}: subscribed to the stream
                    w.ready = True
                    loop.call_soon_threadsafe(self._check_ready)
                    continue
                batch: list[tuple[tuple[int, int, int], Verified]] = []
                for token, device, nbytes, reason, detail, meta, norm, encoded in header:
                    if reason is None:
                        delta = conn.recv_bytes()
                        item = Verified(
                            device, nbytes, UpdateMeta(*meta), norm, delta, encoded=encoded
                        )
                    else:
                        item = Verified(device, nbytes, None, 0.0, b"", reason, detail)
                    batch.append(((w.index, incarnation, token), item))
                with self._lock:
                    self._items.extend(batch)
                loop.call_soon_threadsafe(self._arrived.set)
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("worker %d sent a malformed frame", w.index + 1)
        w.alive = False
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._arrived.set)

    async def _supervise(self) -> None:
        while not self._stopping:
            await asyncio.sleep(RESTART_DELAY_S)
            for w in self._workers:
                if not self._stopping and not w.alive:
                    log.error(
                        "worker %d exited (code %s); restarting it",
                        w.index + 1,
                        w.proc.exitcode if w.proc is not None else None,
                    )
                    if w.proc is not None:
                        w.proc.join(1)
                    self._spawn(w)

    async def take(self, n: int, timeout: float) -> tuple[list[Any], list[Verified]]:
        if not self._items:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout)
        handles: list[Any] = []
        items: list[Verified] = []
        with self._lock:
            while self._items and len(items) < n:
                h, item = self._items.popleft()
                handles.append(h)
                items.append(item)
        return handles, items

    def ack(self, handles: Iterable[Any]) -> None:
        """Tell each running worker to PUBACK everything up to its highest released token.

        Tokens count from 1 in each incarnation of a worker, so only the released tokens of the
        running incarnation say anything about what it holds; those of a process that is gone
        are dropped (the broker redelivers its unacknowledged messages to the new one)."""
        upto: dict[int, int] = {}
        for index, incarnation, token in handles:
            if incarnation == self._workers[index].incarnation:
                upto[index] = max(token, upto.get(index, token))
        for index, token in upto.items():
            w = self._workers[index]
            if not w.alive or w.conn is None:
                continue
            with contextlib.suppress(OSError), w.send_lock:
                w.conn.send_bytes(_pack({"ack": token}))

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        for w in self._workers:
            if w.conn is not None and w.alive:
                with contextlib.suppress(OSError), w.send_lock:
                    w.conn.send_bytes(_pack({"stop": True}))
        loop = asyncio.get_running_loop()
        for w in self._workers:
            if w.proc is not None:
                await loop.run_in_executor(None, w.proc.join, 10)
                if w.proc.is_alive():
                    w.proc.kill()
            if w.conn is not None:
                w.conn.close()


# ---------------------------------------------------------------------------- worker process


def worker_main(
    cfg: AggregatorConfig, index: int, conn: Connection, cpu: int | None = None
) -> None:
    """Entry point of a worker process (its threads on ``cpu``, if given)."""
    logging.basicConfig(
        level=cfg.logging.level, format=f"%(levelname)s worker-{index + 1} %(name)s: %(message)s"
    )
    tune_malloc()
    pin_current_thread(cpu, f"worker {index + 1}")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_Runner(cfg, index, conn).run())
    os._exit(0)  # never run atexit handlers that could touch the parent's resources


class _Runner:
    def __init__(self, cfg: AggregatorConfig, index: int, conn: Connection) -> None:
        self.cfg = cfg
        self.index = index
        self.conn = conn
        self.held: deque[tuple[int, Incoming]] = deque()
        self.token = 0
        self.layout = cfg.spec.layout()
        self.limits = limits_for(self.layout, cfg.limits.max_update_bytes)
        self.keys = DeviceKeys(cfg.security.devices_dir)
        self.fingerprint = cfg.spec.fingerprint()
        self.send_lock = threading.Lock()

    async def run(self) -> None:
        cfg = self.cfg
        fed = cfg.federation.id
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        async def announce() -> None:
            with self.send_lock:
                self.conn.send_bytes(_pack({"ready": True}))

        self.link = MqttLink(
            cfg.scaleout.worker_brokers[self.index],
            subscriptions=[topics.shared_updates_filter(cfg.scaleout.group, fed)],
            receive_maximum=cfg.limits.inflight_window,
            unsubscriptions=topics.update_filters_of_other_configs(cfg.scaleout.group, fed),
            on_connect=announce,
            name=f"worker-{self.index + 1}",
        )

        def commands() -> None:
            try:
                while True:
                    cmd = msgpack.unpackb(self.conn.recv_bytes(), raw=False)
                    if "ack" in cmd:
                        loop.call_soon_threadsafe(self._ack, int(cmd["ack"]))
                    if cmd.get("stop"):
                        break
            except (EOFError, OSError):
                # The owner is gone (perhaps kill -9): stop at once, acknowledging nothing.
                os._exit(0)
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=commands, name="owner-commands", daemon=True).start()
        link_task = asyncio.create_task(self.link.run(stop))
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="worker-decode") as x:
            while not stop.is_set():
                if not await self.link.wait(0.2):
                    continue
                batch = self.link.take(cfg.limits.batch_max)
                for m in batch:
                    self.token += 1
                    self.held.append((self.token, m))
                first = self.token - len(batch) + 1
                await loop.run_in_executor(x, self._forward, batch, first)
        await link_task

    def _ack(self, upto: int) -> None:
        ready = []
        while self.held and self.held[0][0] <= upto:
            ready.append(self.held.popleft()[1])
        self.link.ack(ready)

    def _forward(self, batch: list[Incoming], first: int) -> None:
        fed = self.cfg.federation.id
        header: list[Any] = []
        frames: list[bytes | memoryview] = []
        row_bytes = 4 * self.layout.size
        scratch: np.ndarray[Any, Any] | None = None  # decoded rows that are not sent
        for i, m in enumerate(batch):
            token = first + i
            device = topics.update_device(m.topic, fed) or "?"
            encoded = row_bytes >= ENCODED_MIN_ROW_BYTES and 2 * len(m.payload) <= row_bytes
            try:
                meta, delta = open_update(
                    m.topic,
                    m.payload,
                    federation=fed,
                    fingerprint=self.fingerprint,
                    keys=self.keys,
                    max_bytes=self.cfg.limits.max_update_bytes,
                )
                if encoded:  # decoded only to check it: one buffer serves the whole batch
                    if scratch is None:
                        scratch = np.empty(self.layout.size, dtype=np.float32)
                    out = scratch
                else:  # sent as is: each needs its own
                    out = np.empty(self.layout.size, dtype=np.float32)
                norm = decode_delta(delta, self.layout, self.limits, out)
            except RejectedError as e:
                header.append(
                    [token, device, len(m.payload), e.reason, e.detail[:200], None, 0.0, False]
                )
                continue
            header.append(
                [token, device, len(m.payload), None, "", list(astuple(meta)), norm, encoded]
            )
            # The array's buffer needs no intermediate bytes copy.
            frames.append(_pack(delta) if encoded else out.data)
        with self.send_lock:
            self.conn.send_bytes(_pack(header))
            for f in frames:
                self.conn.send_bytes(f)
