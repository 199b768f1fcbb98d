"""The aggregator's engine alone, no broker: CPU and wall time per update, by MAC and threads.

``Engine.process`` runs steps 1-10 of the validation pipeline (envelope, MAC, schema, staleness,
replay, decode, norm gate) and FedBuff's aggregation on batches of raw messages, as the service
hands them over. Here it gets pre-encoded updates from three devices in batches of B, with no
broker, no event loop and no other process on the machine, so the numbers are far steadier than
an end-to-end run. It answers one question the end-to-end benchmark could not: whether checking
MACs on ``verify_threads`` threads pays, per device MAC. CPU is the process's (all threads);
wall is elapsed time. The configurations alternate; the best of the repeats is reported.

Run from the repository root:

    .venv/bin/python bench/engine.py [--dims 650,100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aggregator.config import AggregatorConfig
from aggregator.engine import Engine
from aggregator.memtune import tune_malloc
from aggregator.metrics import Metrics
from bench.aggregator_throughput import FED, Case, make_payloads
from fedmqtt import topics


def messages(case: Case) -> list[tuple[str, bytes]]:
    """The case's int8 updates from each of its devices, interleaved at random."""
    out: list[tuple[str, bytes]] = []
    for i, dev in enumerate(case.devices):
        for p in make_payloads(
            case.spec,
            codec="int8",
            device=dev,
            key_hex=case.keys[dev],
            n=case.n // case.publishers,
            seed=i,
            auth=case.auth,
        ):
            out.append((topics.updates(FED, dev), p))
    random.Random(0).shuffle(out)
    return out


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="650,100000", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--auths", default="chacha20-poly1305,hmac-sha256", type=lambda s: s.split(","))
    ap.add_argument("--threads", default="1,2", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tune_malloc()  # as the service does
    cpu_name = platform.processor() or platform.machine()
    print(f"machine: {cpu_name}, {os.cpu_count()} cores, python {platform.python_version()}")
    print("\n| d | MAC | updates | batch | verify_threads | CPU µs/update | wall µs/update |")
    print("|---|---|---|---|---|---|---|")
    for d in args.dims:
        n = 15_000 if d <= 10_000 else 3_000
        batch = 250 if d <= 10_000 else 80  # what the service's batches were at this size
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
