"""Scale: how many agents one broker and one aggregator sustain on this machine, losing nothing.

For each fleet size, N real agents (each its own MQTT client, state directory and shard of
FedProx's Synthetic(1,1) data; threads spread over agent host processes, one per 100 agents by
default) run against one Mosquitto and one aggregator. A size is *sustained* when every agent
has a live connection at the end (its own view) and is online in the aggregator's presence
view, the aggregator received every update the broker acknowledged to an agent, and every
received update was accepted or rejected with a reason.

    .venv/bin/python -m bench.scale [--sizes 100,250,500] [--duration 60] [--tmpfs]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench._sim import machine, run
from simulator.runner import SimConfig

COLUMNS = (
    "agents",
    "agent processes",
    "set-up s",
    "all online after s",
    "connected at end (agents)",
    "online at end (aggregator)",
    "updates delivered",
    "received by aggregator",
    "accepted",
    "rejected",
    "lost",
    "versions",
    "updates/s",
    "sustained",
)


def judge(n: int, s: dict[str, Any]) -> dict[str, Any]:
    online = max((p["online"] for p in s["history"][-8:]), default=0)
    rejected = sum(s["updates_rejected"].values())
    lost = len(s["updates_lost"])  # acknowledged to an agent, never received (by id)
    accounted = s["updates_received"] == s["updates_accepted"] + rejected
    connected = s["agents_connected_at_end"]
    all_online = next((p["t"] for p in s["history"] if p["online"] >= n), None)
    ok = online == n and connected == n and lost == 0 and accounted and s["error"] is None
    return {
        "all_online": all_online,
        "online": online,
        "rejected": rejected,
        "lost": lost,
        "connected": connected,
        "ok": ok,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,250,500")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--compute-time", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--buffer-divisor",
        type=int,
        default=5,
        help="FedBuff K = agents / this (default 5): every version is broadcast "
        "to every agent, and here all agents share two cores",
    )
    ap.add_argument(
        "--tmpfs",
        action="store_true",
        help="keep the broker's and every agent's state in /dev/shm (RAM) instead "
        "of on the disk: one disk serialises every simulated device's fsyncs",
    )
    ap.add_argument(
        "--agent-processes",
        type=int,
        default=0,
        help="processes hosting the agents (default: one per 100 agents)",
    )
    args = ap.parse_args()
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        cfg = SimConfig(
            dataset="synthetic",
            model="softmax",
            clients=n,
            partition="iid",
            strategy="fedbuff",
            buffer_size=max(10, n // args.buffer_divisor),
            codec="int8",
            duration=args.duration,
            compute_time=args.compute_time,
            quiet=True,
            seed=args.seed,
            agent_processes=args.agent_processes,
        )
        if args.tmpfs:
            with tempfile.TemporaryDirectory(prefix="fedmqtt-scale-", dir="/dev/shm") as d:
                s = run(replace(cfg, workdir=Path(d)))
        else:
            s = run(cfg)
        j = judge(n, s)
        rows.append((n, s, j))
        print(
            f"{n}: connected {j['connected']}, online {j['online']}, received "
            f"{s['updates_received']}, lost {j['lost']}, sustained {j['ok']}; not online per "
            f"the aggregator: {dict(list(s['devices_not_online'].items())[:20])}",
            file=sys.stderr,
        )
    print(f"machine: {machine()}")
    print(
        f"setting: synthetic(1,1), softmax 60x10, FedBuff K = agents/{args.buffer_divisor}, "
        f"int8, {args.duration:.0f} s per "
        f"size, emulated compute {args.compute_time} s per round, state on "
        f"{'tmpfs (/dev/shm)' if args.tmpfs else 'disk'}\n"
    )
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---:|" * (len(COLUMNS) - 1) + "---|")
    for n, s, j in rows:
        rate = s["updates_received"] / max(s["config"]["duration"], 1e-9)
        cells = (
            n,
            s["agent_processes"],
            s["setup_s"],
            j["all_online"],
            j["connected"],
            j["online"],
            s["updates_delivered_by_agents"],
            s["updates_received"],
            s["updates_accepted"],
            j["rejected"],
            j["lost"],
            s["versions"],
            f"{rate:.0f}",
            "yes" if j["ok"] else "NO",
        )
        print("| " + " | ".join(str(c) for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
