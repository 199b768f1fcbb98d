"""The aggregator's engine alone, no broker: CPU and wall time per update, by MAC and threads.

``Engine.process`` runs steps 1-10 of the validation pipeline (envelope, MAC, schema, staleness,
replay, decode, norm gate) and FedBuff's aggregation on batches of raw messages, as the service
hands them over. Here it gets pre-encoded updates from three devices in batches of B, with no
broker, no event loop and no other process on the machine, so the numbers are far steadier than
an end-to-end run. It answers one question the end-to-end benchmark could not: whether checking
MACs on ``verify_threads`` threads pays, per device MAC. CPU is the process's (all threads);
wall is elapsed time. The configurations alternate; the best of the repeats is reported.

``--primitives`` instead times, per update of d values, the library calls an int8 update costs
at its size (the cast of the codes, the norm's dot product, the update's share of FedBuff's
matrix-vector product, msgpack's copy of the tensor bytes, the MAC), next to alternatives that
move less memory (the cast and dot in cache-sized chunks, an integer sum of squares), so the
floor under the engine's cost per update is on record.

Run from the repository root:

    .venv/bin/python bench/engine.py [--dims 650,100000] [--repeat 3]
    .venv/bin/python bench/engine.py --primitives [--dims 100000]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aggregator.config import AggregatorConfig
from aggregator.engine import Engine
from aggregator.memtune import tune_malloc
from aggregator.metrics import Metrics
from bench.aggregator_throughput import FED, Case, make_payloads
from fedmqtt import topics
from fedmqtt.params import F32
from fedmqtt.signing import DEFAULT_UPDATE_AUTH


def messages(case: Case) -> list[tuple[str, bytes]]:
    """The case's updates (its codec) from each of its devices, interleaved at random."""
    out: list[tuple[str, bytes]] = []
    for i, dev in enumerate(case.devices):
        for p in make_payloads(
            case.spec,
            codec=case.codec,
            device=dev,
            key_hex=case.keys[dev],
            n=case.per_publisher,
            seed=i,
            auth=case.auth,
        ):
            out.append((topics.updates(FED, dev), p))
    random.Random(0).shuffle(out)
    return out


def workload(d: int) -> tuple[int, int]:
    """(updates, batch size) for a run at d: enough updates for a steady figure without
    holding gigabytes of payloads, in the batch sizes the service used at that size."""
    n = 300 if d >= 1_000_000 else 3_000 if d > 10_000 else 15_000
    return n, 80 if d > 10_000 else 250


def run(cfg: AggregatorConfig, items: list[tuple[str, bytes]], batch: int) -> tuple[float, float]:
    """(CPU µs, wall µs) per update for one pass over ``items`` on a fresh engine."""
    engine = Engine(cfg, Metrics(FED), keys=None)
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(0, len(items), batch):
            engine.process(items[i : i + batch], time.monotonic())
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        accepted = engine.metrics.accepted
    finally:
        engine.close()
    if accepted != len(items):
        raise RuntimeError(f"accepted {accepted} of {len(items)} updates")
    return 1e6 * cpu / len(items), 1e6 * wall / len(items)


def primitives(d: int, repeat: int) -> list[tuple[str, float]]:
    """(what, best µs per update) for the library calls an int8 update of d values costs."""
    import msgpack
    import numpy as np

    from fedmqtt.signing import ChaChaPolyKey

    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, d, dtype=np.int8).tobytes()
    rows = np.empty((10, d), dtype=np.float32)  # a FedBuff buffer of K = 10 rows
    rows[:] = np.frombuffer(codes, dtype=np.int8)
    coef = np.full(10, 0.1, dtype=np.float32)
    packed = msgpack.packb({"d": codes, "q": 0.01}, use_bin_type=True)
    key = ChaChaPolyKey(bytes(32))
    tag = key.sign(codes)
    scratch16 = np.empty(d, dtype=np.int16)
    turn = [0]

    def row() -> F32:  # the next row of the buffer, as the engine takes them
        turn[0] += 1
        r: F32 = rows[turn[0] % 10]
        return r

    def cast_and_dot() -> float:
        r = row()
        np.copyto(r, np.frombuffer(codes, dtype=np.int8))
        return float(np.dot(r, r))

    def chunked(chunk: int) -> Callable[[], float]:
        def run() -> float:
            r, src, sq = row(), np.frombuffer(codes, dtype=np.int8), 0.0
            for a in range(0, d, chunk):
                v = r[a : a + chunk]
                np.copyto(v, src[a : a + chunk])
                sq += float(np.dot(v, v))
            return sq

        return run

    calls: list[tuple[str, Callable[[], object], int]] = [
        (
            "int8 -> float32 cast into a buffer row",
            lambda: np.copyto(row(), np.frombuffer(codes, dtype=np.int8)),
            1,
        ),
        ("float32 dot (sum of squares of a row)", lambda: float(np.dot(rows[0], rows[0])), 1),
        ("cast + dot, as the decoder does", cast_and_dot, 1),
        ("cast + dot in chunks of 16,384", chunked(16_384), 1),
        ("cast + dot in chunks of 65,536", chunked(65_536), 1),
        (
            "int16 sum of squares of the codes",
            lambda: int(
                np.square(np.frombuffer(codes, dtype=np.int8), out=scratch16, dtype=np.int16).sum(
                    dtype=np.int64
                )
            ),
            1,
        ),
        ("FedBuff mean of K = 10 rows, per update", lambda: coef @ rows, 10),
        ("msgpack unpack of the tensor bytes (a copy)", lambda: msgpack.unpackb(packed), 1),
        ("ChaCha20-Poly1305 MAC check", lambda: key.verify(codes, tag), 1),
    ]
    out = []
    for what, call, per in calls:
        n = max(20, 2_000_000 // d)
        best = min(timeit.repeat(call, number=n, repeat=repeat)) / n
        out.append((what, 1e6 * best / per))
    return out


def parsers(d: int, codec: str, repeat: int) -> dict[str, list[float]]:
    """CPU µs per update of the engine with each body parser, alternating, ``repeat`` times."""
    from aggregator import validate
    from aggregator.updatebody import parse_update
    from fedmqtt import wire

    def reference(env: wire.Envelope, *, max_bytes: int) -> wire.Update:
        return wire.parse(env, wire.Update, max_bytes=max_bytes)

    choices = {
        "reference (msgpack, copies)": reference,
        "updatebody (msgspec, views)": parse_update,
    }
    n, batch = workload(d)
    out: dict[str, list[float]] = {name: [] for name in choices}
    with tempfile.TemporaryDirectory(prefix="fedmqtt-enginebench-") as tmp:
        case = Case(d, codec, n, 3, Path(tmp), auth=DEFAULT_UPDATE_AUTH)
        items = messages(case)
        cfg = case.config(Path(tmp) / "state", limits={"verify_threads": 1})
        try:
            for _ in range(repeat):
                for name, parse in choices.items():
                    validate.parse_update = parse  # what open_update calls
                    out[name].append(run(cfg, items, batch)[0])
        finally:
            validate.parse_update = parse_update
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="650,100000", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--auths", default="chacha20-poly1305,hmac-sha256", type=lambda s: s.split(","))
    ap.add_argument("--threads", default="1,2", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--codecs", default="int8,raw", type=lambda s: s.split(","))
    ap.add_argument(
        "--primitives", action="store_true", help="time the library calls of one update instead"
    )
    ap.add_argument(
        "--parsers",
        action="store_true",
        help="the engine with the reference body parser against aggregator.updatebody instead",
    )
    args = ap.parse_args()
    tune_malloc()  # as the service does
    cpu_name = platform.processor() or platform.machine()
    print(f"machine: {cpu_name}, {os.cpu_count()} cores, python {platform.python_version()}")
    if args.parsers:
        print(f"\n| d | codec | body parser | CPU µs/update, {args.repeat} passes | best |")
        print("|---|---|---|---|---|")
        for d in args.dims:
            for codec in args.codecs:
                for name, cpu in parsers(d, codec, args.repeat).items():
                    runs = " / ".join(f"{x:.1f}" for x in cpu)
                    print(f"| {d} | {codec} | {name} | {runs} | {min(cpu):.1f} |", flush=True)
        return
    if args.primitives:
        for d in args.dims:
            print(f"\n| d = {d}: call | µs per update, best of {max(args.repeat, 5)} |\n|---|---|")
            for what, us in primitives(d, max(args.repeat, 5)):
                print(f"| {what} | {us:.1f} |")
        return
    print("\n| d | MAC | updates | batch | verify_threads | CPU µs/update | wall µs/update |")
    print("|---|---|---|---|---|---|---|")
    for d in args.dims:
        n, batch = workload(d)
        for auth in args.auths:
            with tempfile.TemporaryDirectory(prefix="fedmqtt-enginebench-") as tmp:
                case = Case(d, "int8", n, 3, Path(tmp), auth=auth)  # keys of three devices
                items = messages(case)
                best = {t: (float("inf"), float("inf")) for t in args.threads}
                for _ in range(args.repeat):
                    for t in args.threads:
                        cfg = case.config(Path(tmp) / "state", limits={"verify_threads": t})
                        cpu, wall = run(cfg, items, batch)
                        best[t] = (min(best[t][0], cpu), min(best[t][1], wall))
            for t in args.threads:
                cpu, wall = best[t]
                cells = f"{d} | {auth} | {len(items)} | {batch} | {t} | {cpu:.1f} | {wall:.1f}"
                print(f"| {cells} |")


if __name__ == "__main__":
    main()
