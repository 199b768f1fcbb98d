"""CPU cost of the aggregator's MQTT link per message: receiving, and acknowledging.

``aggregator/mqtt.py`` replaces parts of paho's receive and acknowledgement paths
(``aggregator/paho_internals.py``); this script measures the link through a real Mosquitto (the
project's dev config), timing the CPU of the thread (``time.thread_time``) that runs ``MqttLink``
-- the event-loop thread, which also has to leave the GIL to the engine.

* **receive**: N QoS 1 messages of S bytes wait in the broker for a persistent session; the
  link connects and takes them all (acknowledging each batch taken). ``paho`` is the same
  through paho's own receive path: a bare paho MQTT 5 client with manual acknowledgements, one
  PUBACK per message, on the measuring thread.
* **ack**: after receiving N small messages, the link acknowledges them in batches of B (one
  write per batch).
* **transport**: the link's receive measurement over plain TCP and over TLS, both on
  loopback: what a site's aggregator pays for reaching the broker on its own host through the
  devices' TLS listener, against a loopback-only listener without TLS
  (``fedmqtt-admin broker-config --local-port``). The broker gets a TLS listener with a
  certificate from a throw-away CA for this.
* **read size**: the link's receive measurement (plain TCP) with the read-ahead buffer
  (``aggregator.readahead.CHUNK``, the most one read takes from the kernel) at each of
  ``--read-chunks`` bytes.

Variants alternate on the same broker; the best of the repeats is reported (this machine is
shared). Run from the repository root:

    .venv/bin/python bench/link.py [--repeat 3] [--sizes 650,100000] [--batches 10,100]
        [--transport-sizes 100000] [--read-chunks 262144,1048576,4194304] [--read-sizes 650,100000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import aggregator.readahead
from aggregator.config import BrokerConfig
from aggregator.mqtt import Incoming, MqttLink
from bench.tlsbroker import add_tls_listener
from simulator.broker import Mosquitto
from simulator.linkrun import running

TOPIC = "fl/linkbench/updates/dev"
FILTER = "fl/linkbench/updates/+"
Measure = Callable[["Route", int, str], float]  # route, N, client id -> µs per message


@dataclass(frozen=True)
class Route:
    """How the link under test reaches the broker (the publisher always uses plain TCP)."""

    name: str
    port: int
    ca: Path | None = None  # TLS, checked against this CA


def tls_listener(broker: Mosquitto, directory: Path) -> Route:
    """Add a loopback TLS listener to ``broker`` (before it starts), with a throw-away CA."""
    port, ca = add_tls_listener(broker, directory)
    return Route("TLS", port, ca=ca)


def publish(port: int, n: int, size: int) -> None:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="linkbench-pub", protocol=paho.MQTTv5)
    c.max_inflight_messages_set(500)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        payload = os.urandom(size)
        infos = [c.publish(TOPIC, payload, qos=1) for _ in range(n)]
        for info in infos:
            info.wait_for_publish(120)
    finally:
        c.loop_stop()
        c.disconnect()


def _link(route: Route, client_id: str, receive_maximum: int) -> MqttLink:
    cfg = BrokerConfig(
        host="127.0.0.1",
        port=route.port,
        client_id=client_id,
        tls=route.ca is not None,
        ca_file=route.ca,
    )
    return MqttLink(cfg, subscriptions=[FILTER], receive_maximum=receive_maximum)


async def _take(link: MqttLink, n: int, *, ack: bool) -> list[Incoming]:
    got: list[Incoming] = []
    deadline = asyncio.get_running_loop().time() + 300
    while len(got) < n and asyncio.get_running_loop().time() < deadline:
        await link.wait(1.0)
        batch = link.take(n)
        if ack:
            link.ack(batch)
        got.extend(batch)
    if len(got) != n:
        raise RuntimeError(f"received {len(got)} of {n} messages")
    return got


async def _session(route: Route, client_id: str) -> None:
    """Create the persistent session (and its subscription), then leave."""
    async with running(_link(route, client_id, 1000)):
        await asyncio.sleep(0.2)


async def _receive(route: Route, n: int, client_id: str) -> float:
    cpu = time.thread_time()
    # Not waiting for `connected`: the backlog arrives ahead of the SUBACK.
    async with running(_link(route, client_id, 1000), wait_connected=False) as link:
        await _take(link, n, ack=True)
        return 1e6 * (time.thread_time() - cpu) / n


def receive_cpu_us(route: Route, n: int, client_id: str) -> float:
    """Loop-thread CPU microseconds per message taken from a backlog in the broker."""
    return asyncio.run(_receive(route, n, client_id))


def paho_receive_cpu_us(route: Route, n: int, client_id: str) -> float:
    """The same through paho's own receive path: a bare paho MQTT 5 client, manual
    acknowledgements (one PUBACK per message), its loop run on this thread."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    c.manual_ack_set(True)
    if route.ca is not None:
        c.tls_set(ca_certs=str(route.ca))
    got = 0

    def on_message(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        nonlocal got
        got += 1
        client.ack(msg.mid, msg.qos)

    c.on_message = on_message
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = BrokerConfig(host="", port=0).session_expiry_s
    props.ReceiveMaximum = 1000
    cpu = time.thread_time()
    c.connect("127.0.0.1", route.port, clean_start=False, properties=props)
    deadline = time.monotonic() + 300
    while got < n and time.monotonic() < deadline:
        c.loop(timeout=1.0)
    us = 1e6 * (time.thread_time() - cpu) / n
    c.disconnect()
    if got != n:
        raise RuntimeError(f"received {got} of {n} messages")
    return us


async def ack_cpu_us(port: int, n: int, batch: int, client_id: str) -> float:
    """Loop-thread CPU microseconds per acknowledged message."""
    async with running(_link(Route("TCP", port), client_id, n)) as link:
        await asyncio.get_running_loop().run_in_executor(None, publish, port, n, 100)
        got = await _take(link, n, ack=False)
        await asyncio.sleep(0.3)
        cpu = time.thread_time()
        for i in range(0, n, batch):
            link.ack(got[i : i + batch])
            await asyncio.sleep(0)  # the writer callback runs on the next loop iterations
            await asyncio.sleep(0)
        await asyncio.sleep(0.3)
        return 1e6 * (time.thread_time() - cpu) / n


def messages_for(size: int) -> int:
    """How many messages of ``size`` bytes one receive measurement takes (~200 MB at most)."""
    return min(20_000, max(200, 200_000_000 // size))


def best_receive_us(
    broker: Mosquitto,
    size: int,
    repeat: int,
    variants: dict[str, tuple[Route, Measure]],
    tag: str,
) -> dict[str, float]:
    """Best CPU per message of each variant (its route and its measurement), the variants
    alternating on ``broker``."""
    n = messages_for(size)
    best = dict.fromkeys(variants, float("inf"))
    for r in range(repeat):
        for name, (route, measure) in variants.items():
            cid = f"linkbench-{tag}-{size}-{r}-{name.split()[0]}"
            asyncio.run(_session(route, cid))
            publish(broker.port, n, size)
            best[name] = min(best[name], measure(route, n, cid))
    return best


def _at_read_chunk(chunk: int) -> Measure:
    def measure(route: Route, n: int, client_id: str) -> float:
        default = aggregator.readahead.CHUNK
        setattr(aggregator.readahead, "CHUNK", chunk)  # noqa: B010
        try:
            return receive_cpu_us(route, n, client_id)
        finally:
            setattr(aggregator.readahead, "CHUNK", default)  # noqa: B010

    return measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sizes", default="650,100000", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--batches", default="10,100", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument(
        "--transport-sizes", default="100000", type=lambda s: [int(x) for x in s.split(",") if x]
    )
    ap.add_argument(
        "--read-chunks",
        default="262144,1048576,4194304",
        type=lambda s: [int(x) for x in s.split(",") if x],
        help="read-ahead buffer sizes to compare (aggregator.readahead.CHUNK)",
    )
    ap.add_argument(
        "--read-sizes", default="650,100000", type=lambda s: [int(x) for x in s.split(",") if x]
    )
    args = ap.parse_args()
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores, python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="fedmqtt-linkbench-") as tmp:
        broker = Mosquitto(data_dir=Path(tmp) / "broker")
        tcp = Route("TCP", broker.port)
        routes = [tcp, tls_listener(broker, Path(tmp))]
        broker.start()
        try:
            print("\n| message bytes | N | link | paho | paho / link |")
            print("|---|---|---|---|---|")
            paths: dict[str, tuple[Route, Measure]] = {
                "link": (tcp, receive_cpu_us),
                "paho": (tcp, paho_receive_cpu_us),
            }
            for size in args.sizes:
                best = best_receive_us(broker, size, args.repeat, paths, "rx")
                ratio = best["paho"] / best["link"]
                print(
                    f"| {size} | {messages_for(size)} | {best['link']:.1f} | {best['paho']:.1f} "
                    f"| {ratio:.2f} |"
                )
            print("\n| PUBACKs per batch | µs per acknowledged message |")
            print("|---|---|")
            for batch in args.batches:
                us = min(
                    asyncio.run(ack_cpu_us(broker.port, 2000, batch, f"linkbench-ack-{batch}-{r}"))
                    for r in range(args.repeat)
                )
                print(f"| {batch} | {us:.2f} |")
            names = [r.name for r in routes]
            print("\n| message bytes | N | " + " | ".join(names) + " | TLS / TCP |")
            print("|---|---|" + "---|" * (len(routes) + 1))
            for size in args.transport_sizes:
                by_route = best_receive_us(
                    broker, size, args.repeat, {r.name: (r, receive_cpu_us) for r in routes}, "tx"
                )
                cells = " | ".join(f"{by_route[m]:.1f}" for m in names)
                ratio = by_route["TLS"] / by_route["TCP"]
                print(f"| {size} | {messages_for(size)} | {cells} | {ratio:.2f} |")
            chunks = {f"{c // 1024} KiB": (tcp, _at_read_chunk(c)) for c in args.read_chunks}
            print("\n| message bytes | N | " + " | ".join(chunks) + " |")
            print("|---|---|" + "---|" * len(chunks))
            for size in args.read_sizes:
                best = best_receive_us(broker, size, args.repeat, chunks, "chunk")
                cells = " | ".join(f"{best[c]:.1f}" for c in chunks)
                print(f"| {size} | {messages_for(size)} | {cells} |")
        finally:
            broker.close()


if __name__ == "__main__":
    main()
