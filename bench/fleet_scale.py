"""Fleet scale: 1,000-10,000 emulated devices on one Mosquitto and one aggregator, losing nothing.

Each size is one run of :func:`simulator.emufleet.run_fleet`: N emulated devices (real MQTT 5
connections, presence, enrolled ChaCha20-Poly1305 keys, fetch on ready; see the module
docstring), spread over host processes sized by the open-file limit, against a fresh
Mosquitto (dev config, loopback, its open-file limit raised to the hard limit) and the real
aggregator in this process (FedBuff, K = N / 20). A size is *sustained* when every device is
connected at the end and online in the aggregator's presence view, and every update the broker
acknowledged to a device reached the aggregator (by id) and was accepted exactly once.

CPU is measured from /proc over the steady window (from the moment every device is online to
the end of the run) as a percentage of one core; the aggregator's figure is this process's
(it hosts only the aggregator's threads and the sampling loop). Bytes are MQTT payload bytes
per device per hour of the run, in both directions, counted at the devices.

    .venv/bin/python -m bench.fleet_scale [--sizes 1000,5000,10000] [--duration 90]
        [--round-interval 60] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench._sim import machine
from simulator.emufleet import FleetConfig, run_fleet

COLUMNS = (
    "devices",
    "host processes",
    "all online after s",
    "steady s",
    "connected at end",
    "online at end (aggregator)",
    "updates acked",
    "received",
    "accepted",
    "lost",
    "accepted/s (steady)",
    "versions",
    "broker CPU %",
    "broker RSS MB",
    "aggregator CPU %",
    "aggregator RSS MB",
    "up B/device/h",
    "down B/device/h",
    "sustained",
)


def sustained(r: dict[str, Any]) -> bool:
    n = r["devices"]
    return (
        r["connected_at_end"] == n
        and r["online_at_end"] == n
        and not r["lost"]
        and not r["accepted_twice"]
        and not r["rejected_acked"]
        and r["unacked_at_end"] == 0
    )


def row(r: dict[str, Any]) -> str:
    cells = (
        r["devices"],
        r["processes"],
        r["all_online_s"] if r["all_online_s"] is not None else "—",
        r["steady_s"],
        r["connected_at_end"],
        r["online_at_end"],
        r["acked"],
        r["received"],
        r["accepted"],
        len(r["lost"]),
        r["accepted_per_s_steady"],
        r["versions"],
        r["broker_cpu_pct"],
        r["broker_rss_mb"],
        r["aggregator_cpu_pct"],
        r["aggregator_rss_mb"],
        f"{r['up_bytes_per_device_hour']:,}",
        f"{r['down_bytes_per_device_hour']:,}",
        "yes" if sustained(r) else "NO",
    )
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,5000,10000")
    ap.add_argument(
        "--duration",
        type=float,
        default=90.0,
        help="seconds of steady state per size, from the moment every device is online",
    )
    ap.add_argument(
        "--round-interval",
        type=float,
        default=60.0,
        help="seconds between a device's rounds (it also waits for a newer version)",
    )
    ap.add_argument("--compute-time", type=float, default=1.0)
    ap.add_argument("--processes", type=int, default=0, help="host processes (0: automatic)")
    ap.add_argument("--connect-rate", type=float, default=1000.0, help="new connections per s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write every run's full result here")
    args = ap.parse_args()
    results = []
    for n in (int(x) for x in args.sizes.split(",")):
        cfg = FleetConfig(
            devices=n,
            processes=args.processes,
            duration_s=args.duration,
            round_interval_s=args.round_interval,
            compute_s=args.compute_time,
            connect_per_s=args.connect_rate,
            seed=args.seed,
        )
        # Keys, broker persistence and aggregator state in RAM: the run measures MQTT and the
        # aggregator, not one disk's fsyncs of 10,000 key files.
        with tempfile.TemporaryDirectory(prefix="fedmqtt-fleet-", dir="/dev/shm") as d:
            r = run_fleet(
                replace(cfg, workdir=Path(d)), progress=lambda s: print(s, file=sys.stderr)
            )
        results.append(r)
        print(
            f"{n}: {row(r)}\n  rounds {r['rounds']}, fetches {r['fetches']} "
            f"(timeouts {r['fetch_timeouts']}), disconnects {r['disconnects']}, broker "
            f"refusals {r['refused_by_broker']}, downlink refused {r['downlink_rejected']}, "
            f"emulator CPU {r['emulator_cpu_s']} s, slow connects "
            f"{r['emulator_slow_connects']}, longest loop stall {r['emulator_max_stall_s']} s, "
            f"bytes up {r['bytes_up']}, down "
            f"{r['bytes_down']}",
            file=sys.stderr,
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"machine: {machine()}")
    print(
        f"setting: softmax 60x10 (int8 updates), FedBuff K = devices/20, {args.duration:.0f} s "
        f"per size once all are online, a round at most every {args.round_interval:.0f} s per "
        f"device (first one spread uniformly), emulated compute {args.compute_time} s, "
        "state on tmpfs\n"
    )
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---:|" * (len(COLUMNS) - 1) + "---|")
    for r in results:
        print(row(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
