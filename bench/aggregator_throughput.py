"""Aggregator ingestion throughput against the broker's delivery ceiling, and Flower's FedAvg.

Part 1 -- ingestion. For each model size d and codec: several publisher processes send N
pre-encoded, valid updates (unique update ids, authenticated with the device MAC chosen by
``--auth``, by default the product's default) at QoS 1 through a real Mosquitto started with
the project's broker config. Two subscribers take turns on the same stream, each
on a fresh broker:

* ``bare``: a bare paho subscriber (MQTT 3.1.1 and MQTT 5, QoS 1, auto-ack) that only counts
  messages -- the broker's delivery ceiling on this machine;
* ``aggregator``: the real aggregator (``aggregator.service.Aggregator`` in a thread of this
  process, FedBuff K=10, every validation step, checkpoints and PUBACK-after-checkpoint), with
  0 or more scale-out worker processes.

A rate is N / (time of the last message handled - time of the first message received); for
the aggregator "handled" means accepted or refused with a reason (all are accepted here).
``agg_w<W>_cpu_us`` is the CPU time of this process (the aggregator's threads; not the worker
processes) per update: less disturbed by the shared machine than a rate, so the better measure
of a change to the aggregator's own cost.

Every run also records where the machine's CPU went per message (``*_budget``, see
:func:`budget`): the publishers' (while publishing), the broker's, and the subscriber's -- the
bare one's, or all of the aggregator's processes -- with the cores their sum kept busy at the
run's rate; and, for the aggregator, its threads' shares (``*_threads``: event loop
``aggregator``, engine, checkpoint writer, publisher, and each worker's reader thread).

Part 2 -- the aggregation step alone, decode included, against Flower's FedAvg path
(``flwr.server.strategy.aggregate.aggregate_inplace``, which decodes ``.npy`` tensors) on the
same tensors: ours decodes wire updates (msgpack + codec) into the buffer and runs FedBuff's
aggregate + server step. Flower runs in its own venv (``--flwr-python``), never in ours.

``--tls-compare`` (instead of part 1): the publishers (devices) send over TLS, as on a site,
and the aggregator (one process) takes the stream either over TLS too or through the broker's
plain loopback listener (``fedmqtt-admin broker-config --local-port``), interleaved on fresh
brokers. It measures what the loopback listener saves end to end.

``--read-chunks A,B,...`` (instead of part 1): one process with the event loop's read-ahead
buffer (``aggregator.readahead.CHUNK``, the most one read takes from the kernel) at each size,
interleaved, with the bare MQTT 3.1.1 subscriber in every round. ``--checkpoint-intervals
A,B,...`` likewise at each ``[checkpoint] min_interval_s``, and ``--pin-compare`` with the
service's threads free against kept on one CPU per process (``[scaleout] pin_cpu``).

``--broker-malloc-compare`` (instead of part 1): the broker with the production malloc
settings (``simulator.broker.MALLOC_TUNABLES``, the same as the systemd drop-in's; every other
mode runs with them) against glibc's defaults, each round the bare 3.1.1 subscriber and one
aggregator process under both.

``--warm-broker`` (instead of part 1; a diagnostic, not the goals' measurement): the bare 3.1.1
subscriber and one aggregator process on one broker per round whose memory is already warm --
it keeps freed memory (a glibc trim threshold above the stream's size) and has queued and
drained the whole stream before the measured runs. It separates this virtual machine's cost
of fresh memory, which a fresh broker pays for every update it queues, from the subscribers'
own cost.

Usage::

    .venv/bin/python bench/aggregator_throughput.py --json /tmp/agg-bench.json
    .venv/bin/python bench/aggregator_throughput.py --dims 650 --codecs raw --workers 0,2
    .venv/bin/python bench/aggregator_throughput.py --tls-compare --dims 650,100000 --codecs int8
    .venv/bin/python bench/aggregator_throughput.py --read-chunks 262144,1048576 --dims 100000 \
        --codecs int8 --n 12000 --repeat 4 --skip-flower
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# One BLAS thread, as in the service (see aggregator/__init__.py): the aggregator runs in this
# process, so this must happen before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aggregator import readahead  # noqa: E402
from aggregator.config import AggregatorConfig  # noqa: E402
from bench.tlsbroker import add_tls_listener  # noqa: E402
from fedmqtt import codecs, topics, wire  # noqa: E402
from fedmqtt.admin.sizing import max_packet_size  # noqa: E402
from fedmqtt.models.spec import ModelSpec  # noqa: E402
from fedmqtt.signing import (  # noqa: E402
    CHACHA20_POLY1305,
    DEFAULT_UPDATE_AUTH,
    DEVICE_KEY_SUFFIX,
    HMAC_SHA256,
    ChaChaPolyKey,
    Ed25519Signer,
    HmacKey,
)
from simulator.aggregator_thread import AggregatorThread  # noqa: E402
from simulator.broker import MALLOC_TUNABLES, Mosquitto  # noqa: E402

FED = "bench"
DEFAULT_N = {650: 20_000, 100_000: 3_000, 1_000_000: 400}
MAC_KEYS: dict[str, type[ChaChaPolyKey] | type[HmacKey]] = {
    CHACHA20_POLY1305: ChaChaPolyKey,
    HMAC_SHA256: HmacKey,
}


def spec_for(d: int) -> ModelSpec:
    """A softmax model with exactly d parameters: (d/10 - 1) features x 10 classes + 10 biases."""
    if d % 10:
        raise ValueError("d must be a multiple of 10")
    return ModelSpec("softmax", d // 10 - 1, 10)


# ------------------------------------------------------------------ payloads
def make_payloads(
    spec: ModelSpec, *, codec: str, device: str, key_hex: str, n: int, seed: int, auth: str
) -> list[bytes]:
    """n valid updates of one device: a few distinct deltas, every update_id unique."""
    key = MAC_KEYS[auth](bytes.fromhex(key_hex))
    rng = np.random.default_rng(seed)
    layout = spec.layout()
    c = codecs.Codec.parse(codec)
    deltas = [
        codecs.encode_params(
            layout.unflatten(rng.normal(0, 0.01, layout.size).astype(np.float32)), c, rng=rng
        )
        for _ in range(min(n, 4))
    ]
    out = []
    fp = spec.fingerprint()
    for i in range(n):
        u = wire.Update(FED, device, uuid.uuid4().hex, i, 0, 32, fp, deltas[i % len(deltas)])
        out.append(wire.encode(u, key))
    return out


@dataclass(frozen=True)
class PubJob:
    port: int
    spec: ModelSpec
    codec: str
    device: str
    key_hex: str
    n: int
    seed: int
    auth: str
    ca: str | None = None  # publish over TLS, checking the broker against this CA


def publisher(job: PubJob, ready: Any, go: Any, cpu: Any) -> None:
    """One publisher process: pre-encode, report ready, wait for go, publish at QoS 1; puts
    the CPU seconds it spent from go to the end (all its threads) on ``cpu``."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    device, port = job.device, job.port
    payloads = make_payloads(
        job.spec,
        codec=job.codec,
        device=device,
        key_hex=job.key_hex,
        n=job.n,
        seed=job.seed,
        auth=job.auth,
    )
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{device}", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(200)
    c.max_queued_messages_set(0)
    if job.ca is not None:
        c.tls_set(ca_certs=job.ca)
    c.connect("127.0.0.1", port)
    c.loop_start()
    ready.set()
    go.wait()
    cpu0 = time.process_time()
    topic = topics.updates(FED, device)
    infos = [c.publish(topic, p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(600)
    c.disconnect()
    c.loop_stop()
    cpu.put(time.process_time() - cpu0)


def bare_subscriber(port: int, total: int, proto: str, ready: Any, result: Any) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    if proto == "5":
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bare5", protocol=mqtt.MQTTv5)
    else:
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id="bare311",
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
    state = {"n": 0, "t0": 0.0, "t1": 0.0, "cpu0": 0.0, "cpu1": 0.0}

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        if state["n"] == 0:
            state["t0"] = time.perf_counter()
            state["cpu0"] = time.process_time()
        state["n"] += 1
        if state["n"] >= total:
            state["t1"] = time.perf_counter()
            state["cpu1"] = time.process_time()
            client.disconnect()

    def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe(topics.updates_filter(FED), 1)

    def on_subscribe(*a: Any) -> None:
        ready.set()

    c.on_message = on_message
    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.connect("127.0.0.1", port)
    c.loop_forever()
    cpu_us = 1e6 * (state["cpu1"] - state["cpu0"]) / total
    result.put((total / (state["t1"] - state["t0"]), cpu_us))


def _wait_until(done: Callable[[], bool], timeout_s: float, failure: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(failure)
        time.sleep(0.01)


def drop_session(port: int, client_id: str) -> None:
    """End ``client_id``'s persistent session on the broker at ``port``: connect with a clean
    start and a Session Expiry Interval of 0, then disconnect."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    c.connect("127.0.0.1", port, clean_start=True, properties=props)
    c.loop_start()
    try:
        _wait_until(c.is_connected, 10, f"could not connect as {client_id} to drop its session")
    finally:
        c.disconnect()
        c.loop_stop()


def grow_broker_heap(case: Case, ctx: Any, m: Mosquitto) -> float:
    """Make broker ``m`` queue the case's whole stream at once, then drain it; the seconds the
    drain took. An offline persistent session subscribes, the publishers send everything, and
    a subscriber on that session takes it all. Afterwards the broker's heap has held the
    largest backlog any run of the case can leave it, and with a trim threshold above that it
    keeps the memory for the next runs."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    total = case.total
    got = [0]
    subscribed = threading.Event()

    def client() -> mqtt.Client:
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id="grow-heap",
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        c.on_message = lambda *a: got.__setitem__(0, got[0] + 1)
        c.on_subscribe = lambda *a: subscribed.set()
        c.connect("127.0.0.1", m.port)
        c.loop_start()
        return c

    c = client()
    c.subscribe(topics.updates_filter(FED), 1)
    if not subscribed.wait(30):
        raise RuntimeError("the heap-growing subscriber could not subscribe")
    c.disconnect()
    c.loop_stop()
    case.publish(ctx, m.port)
    case.join_publishers()
    t0 = time.perf_counter()
    c = client()
    try:
        _wait_until(lambda: got[0] >= total, 600, "the queued stream did not drain")
    finally:
        c.disconnect()
        c.loop_stop()
    drained = time.perf_counter() - t0
    drop_session(m.port, "grow-heap")
    return drained


# ------------------------------------------------------------------ runs
def broker_counters(m: Mosquitto) -> tuple[float, int]:
    """The broker's CPU seconds and minor page faults over its life so far."""
    assert m.proc is not None
    fields = _stat(f"/proc/{m.proc.pid}/stat")
    return _cpu_s(fields), int(fields[7])  # minflt (field 10)


def broker_usage(
    m: Mosquitto, messages: int, since: tuple[float, int] = (0.0, 0)
) -> dict[str, float]:
    """The broker's CPU per message (µs) and minor page faults per message since ``since``
    (:func:`broker_counters` at the start of the run), and its peak RSS (MB) over its life.
    Read before it stops.

    The broker's cost per message is not a constant: the slower the subscriber, the more of
    the stream it queues, and every queued update is fresh memory (docs/benchmarks.md). With
    huge pages for its heap (the default, ``MALLOC_TUNABLES``) one fault can clear 2 MiB, so
    the fault count no longer says how much fresh memory it touched; the peak RSS does."""
    assert m.proc is not None
    cpu_s, faults = broker_counters(m)
    hwm_kb = next(
        int(line.split()[1])
        for line in Path(f"/proc/{m.proc.pid}/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )
    return {
        "cpu_us": round(1e6 * (cpu_s - since[0]) / messages, 1),
        "faults": round((faults - since[1]) / messages, 2),
        "peak_mb": round(hwm_kb / 1024),
    }


def _stat(path: str) -> list[str]:
    """The fields of a ``/proc/.../stat`` file after the command name (proc(5) field 3 on)."""
    return Path(path).read_text().rsplit(")", 1)[1].split()


def _cpu_s(fields: list[str]) -> float:
    """utime + stime (proc(5) fields 14 and 15) in seconds."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each live thread of this process, by thread name: where the
    aggregator's time goes between its event loop, engine, checkpoint and publishing
    threads."""
    out: dict[str, float] = {}
    for t in threading.enumerate():
        try:
            spent = _cpu_s(_stat(f"/proc/self/task/{t.native_id}/stat"))
        except OSError:
            continue  # ended meanwhile
        out[t.name] = out.get(t.name, 0.0) + spent
    return out


def workers_cpu_s(agg: AggregatorThread) -> float:
    """CPU seconds of the service's scale-out worker processes over their lives so far (a
    worker that restarted meanwhile would count from its restart)."""
    pool = agg.service._pool
    spent = 0.0
    for w in pool._workers if pool is not None else []:
        if w.proc is not None and w.proc.pid is not None:
            with contextlib.suppress(OSError):
                spent += _cpu_s(_stat(f"/proc/{w.proc.pid}/stat"))
    return spent


class Case:
    def __init__(
        self, d: int, codec: str, n: int, publishers: int, work: Path, *, auth: str
    ) -> None:
        self.d, self.codec, self.n, self.publishers = d, codec, n, publishers
        self.per_publisher = n // publishers  # each publisher sends this many ...
        self.total = self.per_publisher * publishers  # ... so the stream is this long
        self.auth = auth
        self.spec = spec_for(d)
        self.work = work
        self.devices = [f"dev{i}" for i in range(publishers)]
        self.broker_tunables = MALLOC_TUNABLES  # the brokers' glibc malloc settings
        # If set, every run uses this broker (started and stopped by the caller) instead of a
        # fresh one: see warm_broker_compare.
        self.kept_broker: Mosquitto | None = None
        self.keys = {dev: secrets.token_hex(32) for dev in self.devices}
        (work / "devices").mkdir(parents=True, exist_ok=True)
        for dev, k in self.keys.items():
            MAC_KEYS[auth](bytes.fromhex(k)).save(
                work / "devices" / f"{dev}{DEVICE_KEY_SUFFIX[auth]}"
            )
        Ed25519Signer.generate().save(work / "aggregator.key")

    def config(
        self,
        state: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        client_id: str = "agg-bench",
        tls_ca: Path | None = None,
        **tables: dict[str, Any],
    ) -> AggregatorConfig:
        """The aggregator's config for this case: FedBuff K = 10, this case's keys and model;
        over TLS checked against ``tls_ca`` if given."""
        broker: dict[str, Any] = {"host": host, "port": port, "client_id": client_id}
        if tls_ca is not None:
            broker.update(tls=True, ca_file=str(tls_ca))
        raw: dict[str, Any] = {
            "federation": {"id": FED, "state_dir": str(state)},
            "broker": broker,
            "security": {
                "signing_key": str(self.work / "aggregator.key"),
                "devices_dir": str(self.work / "devices"),
            },
            "model": {"kind": "softmax", "n_features": self.spec.n_features, "n_outputs": 10},
            # A few publishers stand for many devices: no per-device bounds.
            "strategy": {
                "name": "fedbuff",
                "buffer_size": 10,
                "max_staleness": 1_000_000,
                "max_per_device": 0,
            },
            **tables,
        }
        raw["limits"] = {"device_rate": 0.0, **raw.get("limits", {})}
        return AggregatorConfig.from_dict(raw, base_dir=self.work)

    def _new_broker(self, tag: str) -> Mosquitto:
        size = max(max_packet_size(self.d, self.spec.n_features), 16 * 1024 * 1024)
        return Mosquitto(
            data_dir=self.work / f"broker-{tag}",
            max_packet_size=size,
            malloc_tunables=self.broker_tunables,
        )

    def broker(self, tag: str) -> Mosquitto:
        if self.kept_broker is not None:
            return self.kept_broker
        return self._new_broker(tag).start()

    def _release(self, m: Mosquitto) -> None:
        """Stop a run's broker, unless it is the kept one."""
        if m is not self.kept_broker:
            m.close()

    def broker_with_tls(self, tag: str) -> tuple[Mosquitto, int, Path]:
        """A broker with a loopback TLS listener too: (broker, TLS port, CA file)."""
        m = self._new_broker(tag)
        port, ca = add_tls_listener(m, self.work / f"tls-{tag}")
        return m.start(), port, ca

    def publish(self, ctx: Any, port: int, ca: Path | None = None) -> None:
        ready = [ctx.Event() for _ in self.devices]
        go = ctx.Event()
        self._pub_cpu = ctx.Queue()
        per = self.per_publisher
        cafile = None if ca is None else str(ca)
        procs = [
            ctx.Process(
                target=publisher,
                args=(
                    PubJob(
                        port, self.spec, self.codec, dev, self.keys[dev], per, i, self.auth, cafile
                    ),
                    ready[i],
                    go,
                    self._pub_cpu,
                ),
            )
            for i, dev in enumerate(self.devices)
        ]
        for p in procs:
            p.start()
        self._procs = procs
        deadline = time.monotonic() + 600
        for r in ready:
            while not r.wait(0.5):
                self.check_publishers()
                if time.monotonic() > deadline:
                    raise RuntimeError("a publisher did not get ready")
        go.set()

    def check_publishers(self) -> None:
        """Fail fast (instead of waiting out a timeout) when a publisher process died."""
        for p in self._procs:
            if p.exitcode not in (None, 0):
                raise RuntimeError(f"publisher {p.name} exited with code {p.exitcode}")

    def join_publishers(self) -> float:
        """Wait for the publishers; their CPU per message while publishing (µs, all three)."""
        spent = sum(float(self._pub_cpu.get(timeout=900)) for _ in self._procs)
        for p in self._procs:
            p.join(900)
        return 1e6 * spent / self.total

    def run_bare(self, ctx: Any, proto: str) -> dict[str, Any]:
        """One run of the bare subscriber: its rate and the broker's usage."""
        m = self.broker(f"bare{proto}-{uuid.uuid4().hex[:8]}")
        since = broker_counters(m)
        try:
            ready, result = ctx.Event(), ctx.Queue()
            total = self.total
            sub = ctx.Process(target=bare_subscriber, args=(m.port, total, proto, ready, result))
            sub.start()
            ready.wait(30)
            self.publish(ctx, m.port)
            deadline = time.monotonic() + 900
            while True:
                try:
                    rate, sub_cpu = result.get(timeout=0.5)
                    break
                except queue.Empty:
                    self.check_publishers()
                    if not sub.is_alive():  # its result may still be on its way
                        try:
                            rate, sub_cpu = result.get(timeout=5)
                        except queue.Empty:
                            raise RuntimeError("the bare subscriber died") from None
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError("the bare subscriber did not finish") from None
            sub.join(30)
            pub_cpu = self.join_publishers()
            return {
                "rate": float(rate),
                "cpu_us": float(sub_cpu),
                "broker": broker_usage(m, total, since),
                "publishers_cpu_us": pub_cpu,
            }
        finally:
            self._release(m)

    def run_aggregator(
        self,
        ctx: Any,
        workers: int,
        tls: str = "",
        checkpoint: dict[str, Any] | None = None,
        pin_cpu: bool = True,
    ) -> dict[str, Any]:
        """One aggregator run. ``tls``: "" (everything plain), "devices" (the publishers over
        TLS, the aggregator on the plain loopback listener, as a site with the local listener
        runs) or "both" (the aggregator over TLS too, as sites ran before it). ``checkpoint``:
        the config's ``[checkpoint]`` table (the service's defaults if None); ``pin_cpu``:
        ``[scaleout] pin_cpu``."""
        tag = f"agg{workers}-{uuid.uuid4().hex[:8]}"
        if tls:
            m, tls_port, ca = self.broker_with_tls(tag)
        else:
            m, tls_port, ca = self.broker(tag), 0, None
        pub_port, pub_ca = (tls_port, ca) if tls else (m.port, None)
        agg_port, agg_ca = (tls_port, ca) if tls == "both" else (m.port, None)
        state = self.work / f"state-w{workers}"
        shutil.rmtree(state, ignore_errors=True)
        cfg = self.config(
            state,
            host=m.host,
            port=agg_port,
            tls_ca=agg_ca,
            client_id=f"agg-bench-{workers}",
            metrics={"prometheus_port": 0, "publish_interval_s": 60},
            logging={"level": "WARNING"},
            scaleout={"workers": workers, "pin_cpu": pin_cpu},
            checkpoint=checkpoint or {},
        )
        total = self.total
        since = broker_counters(m)
        agg = AggregatorThread(cfg).start()
        try:
            cpu0 = time.process_time()  # this process: the aggregator's threads, not workers
            threads0 = thread_cpu()
            workers0 = workers_cpu_s(agg)
            self.publish(ctx, pub_port, ca=pub_ca)
            t0 = t1 = None
            deadline = time.monotonic() + 900
            # Poll the counters themselves, not snapshot(): this loop shares the aggregator's
            # GIL, and building a snapshot 100 times a second took measurable time from it.
            counters = agg.service.metrics
            while time.monotonic() < deadline:
                now = time.perf_counter()
                if t0 is None and counters.received > 0:
                    t0 = now
                if counters.accepted + sum(counters.rejected.values()) >= total:
                    t1 = now
                    cpu1 = time.process_time()
                    threads1 = thread_cpu()
                    workers1 = workers_cpu_s(agg)
                    break
                time.sleep(0.01)
                self.check_publishers()
            pub_cpu = self.join_publishers()
            s = agg.snapshot()
            broker = broker_usage(m, total, since)
        finally:
            agg.stop()
            if m is self.kept_broker:
                # Its persistent session would keep the updates it had not acknowledged yet
                # (buffered, or awaiting a checkpoint) for the next run with this client id.
                drop_session(m.port, str(cfg.broker.client_id))
            self._release(m)
        if t0 is None or t1 is None or s["accepted"] != total:
            raise RuntimeError(f"the aggregator did not accept exactly the {total} updates: {s}")
        return {
            "rate": total / (t1 - t0),
            "cpu_us": 1e6 * (cpu1 - cpu0) / total,
            "workers_cpu_us": 1e6 * (workers1 - workers0) / total,
            "accepted": s["accepted"],
            "rejected": s["rejected"],
            "version": s["version"],
            "broker": broker,
            "publishers_cpu_us": pub_cpu,
            "threads_cpu_us": {
                name: round(1e6 * (spent - threads0.get(name, 0.0)) / total, 1)
                for name, spent in threads1.items()
                if spent - threads0.get(name, 0.0) > 0
            },
            "checkpoints": s["checkpoints"],
        }


def cases(args: argparse.Namespace) -> Iterator[tuple[int, str, int, Case]]:
    """(d, codec, N, its Case in a fresh directory) for every case of the command line."""
    for d in args.dims:
        for codec in args.codecs:
            n = args.n or DEFAULT_N.get(d, 2000)
            with tempfile.TemporaryDirectory(prefix="fedmqtt-aggbench-") as tmp:
                yield d, codec, n, Case(d, codec, n, args.publishers, Path(tmp), auth=args.auth)


def budget(r: dict[str, Any]) -> dict[str, float]:
    """Where the machine's CPU went per message in one run: the publishers, the broker and the
    subscriber (µs each), their total, and ``cores``, the cores that total kept busy at the
    run's rate. Everything shares the two cores, so a subscriber's rate is bounded by the sum,
    not only by its own cost: ``cores`` near 2 means the run was CPU-bound."""
    parts = {
        "publishers": r["publishers_cpu_us"],
        "broker": r["broker"]["cpu_us"],
        "subscriber": r["cpu_us"] + r.get("workers_cpu_us", 0.0),  # the aggregator: all processes
    }
    total = sum(parts.values())
    out = {k: round(v, 1) for k, v in parts.items()}
    out.update(total=round(total, 1), cores=round(r["rate"] * total / 1e6, 2))
    return out


def _round_pcts(runs: list[int], ceilings: list[int]) -> list[float]:
    """Each aggregator run as a percentage of the bare ceiling of its own round."""
    return [round(100.0 * a / b, 1) for a, b in zip(runs, ceilings, strict=True)]


def _versus_bare(agg: list[int], bare: list[int]) -> dict[str, Any]:
    """Aggregator runs against the bare runs of the same rounds: each round's percentage, and
    the two means."""
    return {
        "round_pct": _round_pcts(agg, bare),
        "mean": {"bare": round(np.mean(bare)), "agg": round(np.mean(agg))},
    }


def _record(row: dict[str, Any], name: str, r: dict[str, Any]) -> None:
    """Append one aggregator run to ``row``: updates/s, CPU per update, checkpoints, broker,
    the CPU budget of the run and the aggregator's threads' share of it."""
    row.setdefault(f"{name}_runs", []).append(round(r["rate"]))
    row.setdefault(f"{name}_cpu_us", []).append(round(r["cpu_us"]))
    row.setdefault(f"{name}_checkpoints", []).append(r["checkpoints"])
    row.setdefault(f"{name}_broker", []).append(r["broker"])
    row.setdefault(f"{name}_budget", []).append(budget(r))
    row.setdefault(f"{name}_threads", []).append(r["threads_cpu_us"])


def _record_bare(row: dict[str, Any], proto: str, r: dict[str, Any]) -> None:
    row.setdefault(f"bare_v{proto}_runs", []).append(round(r["rate"]))
    row.setdefault(f"bare_v{proto}_broker", []).append(r["broker"])
    row.setdefault(f"bare_v{proto}_budget", []).append(budget(r))


def ingestion(args: argparse.Namespace) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    rows = []
    for d, codec, n, case in cases(args):
        row: dict[str, Any] = {
            "d": d,
            "codec": codec,
            "auth": args.auth,
            "n": n,
            "publishers": args.publishers,
        }
        # Interleaved repetitions, best of each: the machine is shared (broker and
        # publishers run on the same two cores), so the best run is the least disturbed.
        for _ in range(args.repeat):
            for proto in args.ceilings:
                _record_bare(row, proto, case.run_bare(ctx, proto))
            for w in args.workers:
                r = case.run_aggregator(ctx, w)
                _record(row, f"agg_w{w}", r)
                row[f"agg_w{w}_detail"] = r
        for proto in args.ceilings:
            row[f"bare_v{proto}"] = max(row[f"bare_v{proto}_runs"])
        for w in args.workers:
            row[f"agg_w{w}"] = max(row[f"agg_w{w}_runs"])
        best = max(row[f"bare_v{p}"] for p in args.ceilings)
        # Round by round too: each run against the fastest bare subscriber of its own round
        # (the best-to-best figure above is what the tables report; this shows the spread).
        bare_runs = [row[f"bare_v{p}_runs"] for p in args.ceilings]
        round_best = [max(rates) for rates in zip(*bare_runs, strict=True)]
        for w in args.workers:
            row[f"agg_w{w}_pct"] = round(100.0 * row[f"agg_w{w}"] / best, 1)
            runs = row[f"agg_w{w}_runs"]
            row[f"agg_w{w}_round_pct"] = _round_pcts(runs, round_best)
        print(
            json.dumps({k: v for k, v in row.items() if not k.endswith("detail")}),
            flush=True,
        )
        rows.append(row)
    return rows


# ------------------------------------------------------------------ part 2: vs Flower
def ours_aggregation(d: int, codec: str, k: int, rounds: int) -> float:
    """Updates/s of our aggregation step, decode included: for each of K updates, open the
    wire message, parse it (:mod:`aggregator.updatebody`, as the engine does), decode its
    delta straight into the strategy's buffer row (codec, finite check, norm), then FedBuff's
    aggregate and server step -- the code the engine runs, minus the signature check
    (Flower's path has none)."""
    from aggregator.config import StrategyConfig
    from aggregator.strategies import FedBuff
    from aggregator.updatebody import parse_update
    from aggregator.validate import UpdateMeta, decode_delta, limits_for, scale_segments

    spec = spec_for(d)
    layout = spec.layout()
    payloads = make_payloads(
        spec,
        codec=codec,
        device="dev0",
        key_hex=secrets.token_hex(32),
        n=k,
        seed=0,
        auth=DEFAULT_UPDATE_AUTH,
    )
    limits = limits_for(layout, 1 << 31)
    # As the engine builds it: int8 scales of a large model are left to the strategy.
    strategy = FedBuff(StrategyConfig(buffer_size=k), layout.size, scale_segments(layout))
    w = np.zeros(layout.size, dtype=np.float32)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for p in payloads:
            upd = parse_update(wire.open_envelope(p), max_bytes=wire.DEFAULT_MAX_MESSAGE_BYTES)
            norm = decode_delta(upd.delta, layout, limits, strategy.slot(), strategy.slot_scales())
            meta = UpdateMeta(
                upd.sender,
                upd.update_id,
                upd.seq,
                upd.base_version,
                upd.num_samples,
                upd.created_at,
                len(p),
            )
            strategy.add(meta, 0, norm)
        w = strategy.aggregate(w, None)
        strategy.clear()
        best = min(best, time.perf_counter() - t)
    return k / best


FLOWER_SNIPPET = textwrap.dedent("""
    import sys, time, numpy as np
    from flwr.common import ndarrays_to_parameters, FitRes, Status, Code
    from flwr.server.strategy.aggregate import aggregate_inplace
    d, k, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(0)
    f = d // 10 - 1
    def arrays():
        return [rng.normal(0, 0.01, (f, 10)).astype(np.float32),
                rng.normal(0, 0.01, (10,)).astype(np.float32)]
    results = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays()), 32, {}))
               for _ in range(k)]
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        aggregate_inplace(results)
        best = min(best, time.perf_counter() - t)
    print(k / best)
""")


def flower_aggregation(python: str, d: int, k: int, rounds: int) -> float | None:
    try:
        out = subprocess.run(
            [python, "-c", FLOWER_SNIPPET, str(d), str(k), str(rounds)],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as e:
        print(f"flower run failed: {e}", file=sys.stderr)
        return None
    return float(out.stdout.strip().splitlines()[-1])


def flower_version(python: str) -> str | None:
    try:
        out = subprocess.run(
            [python, "-c", "import flwr; print(flwr.__version__)"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def versus_flower(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for d in args.flower_dims:
        k = args.flower_k
        rounds = max(3, min(50, int(2e8 // (k * d))))
        flower: list[float] = []
        ours: dict[str, list[float]] = {"raw": [], "int8": []}
        for _ in range(args.repeat + 1):  # interleaved, best of each
            if args.flwr_python:
                f = flower_aggregation(args.flwr_python, d, k, rounds)
                if f is not None:
                    flower.append(f)
            for codec, rates in ours.items():
                rates.append(ours_aggregation(d, codec, k, rounds))
        best_flower = max(flower) if flower else None
        row: dict[str, Any] = {
            "d": d,
            "k": k,
            "flower": None if best_flower is None else round(best_flower),
        }
        for codec, rates in ours.items():
            row[f"ours_{codec}"] = round(max(rates))
            if best_flower:
                row[f"ours_{codec}_x"] = round(max(rates) / best_flower, 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


Variant = Callable[[Case, Any], dict[str, Any]]  # one aggregator run of a Case


def compare(
    args: argparse.Namespace, variants: dict[str, Variant], *, bare: bool = True
) -> list[dict[str, Any]]:
    """Each variant of the aggregator once per round, interleaved on fresh brokers, with the
    bare MQTT 3.1.1 subscriber first in every round if ``bare``: updates/s and CPU per update
    of every run (and the broker's usage), per case of the command line."""
    ctx = mp.get_context("spawn")
    rows = []
    for d, codec, n, case in cases(args):
        row: dict[str, Any] = {"d": d, "codec": codec, "n": n}
        for _ in range(args.repeat):
            if bare:
                _record_bare(row, "311", case.run_bare(ctx, "311"))
            for name, run in variants.items():
                _record(row, name, run(case, ctx))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def tls_compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The aggregator beside the broker, devices over TLS: its connection over TLS (as sites
    ran before the loopback listener) against the plain loopback listener."""
    return compare(
        args,
        {
            "agg_tls": lambda case, ctx: case.run_aggregator(ctx, 0, tls="both"),
            "agg_local": lambda case, ctx: case.run_aggregator(ctx, 0, tls="devices"),
        },
        bare=False,
    )


def read_chunk_compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One process at each read-ahead buffer size (the aggregator runs in this process, so
    setting the module's constant before each run is all it takes)."""

    def at(chunk: int) -> Variant:
        def run(case: Case, ctx: Any) -> dict[str, Any]:
            setattr(readahead, "CHUNK", chunk)  # noqa: B010
            try:
                return case.run_aggregator(ctx, 0)
            finally:
                setattr(readahead, "CHUNK", default)  # noqa: B010

        return run

    default = readahead.CHUNK
    return compare(args, {f"agg_chunk{c}": at(c) for c in args.read_chunks})


def pin_compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The service's threads on one CPU (``[scaleout] pin_cpu``, the default) or free."""

    def at(workers: int, pin: bool) -> Variant:
        return lambda case, ctx: case.run_aggregator(ctx, workers, pin_cpu=pin)

    return compare(
        args,
        {
            f"agg_w{w}_{name}": at(w, pin)
            for w in args.workers
            for name, pin in (("free", False), ("pinned", True))
        },
    )


def checkpoint_compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One process at each ``[checkpoint] min_interval_s``."""

    def at(interval: float) -> Variant:
        table = {"min_interval_s": interval}
        return lambda case, ctx: case.run_aggregator(ctx, 0, checkpoint=table)

    return compare(args, {f"agg_ckpt{i:g}s": at(i) for i in args.checkpoint_intervals})


def broker_malloc_compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The broker with the production malloc settings (``simulator.broker.MALLOC_TUNABLES``,
    huge pages for its heap) against glibc's defaults. The setting changes the ceiling too, so
    each round runs the bare MQTT 3.1.1 subscriber and one aggregator process under each, on
    fresh brokers, the two settings taking turns to go first."""
    ctx = mp.get_context("spawn")
    settings = [("thp", MALLOC_TUNABLES), ("glibc", "")]
    rows = []
    for d, codec, n, case in cases(args):
        row: dict[str, Any] = {"d": d, "codec": codec, "n": n, "tunables": MALLOC_TUNABLES}
        for i in range(args.repeat):
            for name, tunables in settings if i % 2 == 0 else settings[::-1]:
                case.broker_tunables = tunables
                _record_bare(row, f"311_{name}", case.run_bare(ctx, "311"))
                _record(row, f"agg_{name}", case.run_aggregator(ctx, 0))
        for name, _ in settings:
            vs = _versus_bare(row[f"agg_{name}_runs"], row[f"bare_v311_{name}_runs"])
            row[f"{name}_round_pct"], row[f"{name}_mean"] = vs["round_pct"], vs["mean"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def warm_broker_compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """A diagnostic, not the goal's measurement: the bare 3.1.1 subscriber and one aggregator
    process on one long-lived broker per round whose memory is already warm, their order
    alternating.

    On this virtual machine memory a process touches for the first time costs 30-60 times
    memory it rewrites (``bench/first_touch.py``), and a fresh broker pays that for every
    update it queues; a slower subscriber makes it queue more. Here each round's broker runs
    with a glibc trim threshold above the stream's size (so freed memory stays mapped) and
    has first queued and drained the whole stream (:func:`grow_broker_heap`). What is left of
    the gap to the bare subscriber is then the subscribers' own cost, not first touches."""
    ctx = mp.get_context("spawn")
    rows = []
    for d, codec, n, case in cases(args):
        one = make_payloads(
            case.spec,
            codec=codec,
            device="dev0",
            key_hex=case.keys["dev0"],
            n=1,
            seed=0,
            auth=case.auth,
        )[0]
        keep = max(256 << 20, 2 * n * len(one))  # heap the broker may keep mapped, bytes
        # Setting the trim threshold turns glibc's adaptive mmap threshold off: pin that too
        # (to its largest value), or every update above 128 KiB would be a fresh mmap.
        tunables = (
            f"{MALLOC_TUNABLES}:glibc.malloc.trim_threshold={keep}"
            f":glibc.malloc.mmap_threshold={32 << 20}"
        )
        row: dict[str, Any] = {"d": d, "codec": codec, "n": n, "tunables": tunables}
        for i in range(args.repeat):
            case.broker_tunables = tunables
            m = case.broker(f"warm-{uuid.uuid4().hex[:8]}")
            case.kept_broker = m
            try:
                row.setdefault("drain_s", []).append(round(grow_broker_heap(case, ctx, m), 2))
                for kind in ("bare", "agg") if i % 2 == 0 else ("agg", "bare"):
                    if kind == "bare":
                        _record_bare(row, "311", case.run_bare(ctx, "311"))
                    else:
                        _record(row, "agg_w0", case.run_aggregator(ctx, 0))
            finally:
                case.kept_broker = None
                case.broker_tunables = MALLOC_TUNABLES
                m.close()
        row.update(_versus_bare(row["agg_w0_runs"], row["bare_v311_runs"]))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--dims", default="650,100000,1000000", type=lambda s: [int(float(x)) for x in s.split(",")]
    )
    ap.add_argument("--codecs", default="raw,int8", type=lambda s: s.split(","))
    ap.add_argument(
        "--auth",
        default=DEFAULT_UPDATE_AUTH,
        choices=sorted(MAC_KEYS),
        help="the devices' update MAC (default: the product default, %(default)s)",
    )
    ap.add_argument("--n", type=int, default=0, help="updates per case (default by d)")
    ap.add_argument("--publishers", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2, help="runs per case (best is reported)")
    ap.add_argument("--workers", default="0", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--ceilings", default="311,5", type=lambda s: s.split(","))
    ap.add_argument(
        "--flwr-python",
        default="/tmp/flwr-venv/bin/python",
        help="python of a venv with flwr installed ('' to skip)",
    )
    ap.add_argument(
        "--flower-dims",
        default="650,100000,1000000",
        type=lambda s: [int(float(x)) for x in s.split(",")],
    )
    ap.add_argument("--flower-k", type=int, default=10)
    ap.add_argument(
        "--tls-compare",
        action="store_true",
        help="instead of the ingestion table: devices over TLS, the aggregator over TLS "
        "against the plain loopback listener (one process), interleaved",
    )
    ap.add_argument(
        "--read-chunks",
        type=lambda s: [int(x) for x in s.split(",") if x],
        help="instead of the ingestion table: one process at each of these read-ahead "
        "buffer sizes (bytes), interleaved",
    )
    ap.add_argument(
        "--checkpoint-intervals",
        type=lambda s: [float(x) for x in s.split(",") if x],
        help="instead of the ingestion table: one process at each of these [checkpoint] "
        "min_interval_s values (seconds), interleaved",
    )
    ap.add_argument(
        "--pin-compare",
        action="store_true",
        help="instead of the ingestion table: the aggregator's threads free against kept on "
        "one CPU per process ([scaleout] pin_cpu), for each --workers count, interleaved",
    )
    ap.add_argument(
        "--broker-malloc-compare",
        action="store_true",
        help="instead of the ingestion table: the broker with the production malloc settings "
        "(huge pages) against glibc's defaults, the bare 3.1.1 subscriber and one aggregator "
        "process under each, interleaved",
    )
    ap.add_argument(
        "--warm-broker",
        action="store_true",
        help="instead of the ingestion table (a diagnostic): the bare 3.1.1 subscriber and one "
        "aggregator process on one broker per round whose memory is already warm (it keeps "
        "freed memory and has queued and drained the whole stream first), interleaved",
    )
    ap.add_argument("--skip-ingestion", action="store_true")
    ap.add_argument("--skip-flower", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.flwr_python and not Path(args.flwr_python).exists():
        args.flwr_python = ""
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "flwr": flower_version(args.flwr_python) if args.flwr_python else None,
    }
    if args.tls_compare:
        report["tls_compare"] = tls_compare(args)
    elif args.read_chunks:
        report["read_chunks"] = read_chunk_compare(args)
    elif args.checkpoint_intervals:
        report["checkpoint_intervals"] = checkpoint_compare(args)
    elif args.pin_compare:
        report["pin_compare"] = pin_compare(args)
    elif args.broker_malloc_compare:
        report["broker_malloc_compare"] = broker_malloc_compare(args)
    elif args.warm_broker:
        report["warm_broker"] = warm_broker_compare(args)
    elif not args.skip_ingestion:
        report["ingestion"] = ingestion(args)
    if not args.skip_flower:
        report["aggregation_vs_flower"] = versus_flower(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
