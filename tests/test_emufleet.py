"""The light fleet emulator (simulator.emufleet) against the real Mosquitto and aggregator.

The emulator is what bench/fleet_scale.py measures 10,000 devices with; this keeps it honest at
200: its devices must be connected and online in the aggregator's presence view, every update
the broker acknowledged to one of them must reach the aggregator and be accepted exactly once
(their keys, MACs, spec fingerprints and base versions are the real thing), and they must
download models only by fetching them.
"""

from __future__ import annotations

import resource
from pathlib import Path

from simulator.broker import Mosquitto
from simulator.emufleet import FleetConfig, processes_for, run_fleet


def test_emulated_devices_are_accepted_by_the_aggregator_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    n = 200
    r = run_fleet(
        FleetConfig(
            devices=n,
            processes=2,
            duration_s=8.0,
            round_interval_s=2.0,
            compute_s=0.2,
            buffer_size=10,
            workdir=tmp_path,
        )
    )
    assert r["connected_at_end"] == n
    assert r["online_at_end"] == n  # presence: the aggregator saw each device's status
    assert r["disconnects"] == 0
    assert r["acked"] >= n  # every device sent at least one update (round interval 2 s)
    assert r["lost"] == []  # acknowledged by the broker, never received by the aggregator
    assert r["rejected_acked"] == {}  # received but refused (bad MAC, spec, staleness ...)
    assert r["accepted_twice"] == []
    assert r["unacked_at_end"] == 0
    assert r["received"] == r["accepted"] == r["acked"]  # the books balance, id for id
    assert r["refused_by_broker"] == {}
    assert r["downlink_rejected"] == {}  # every announcement, model, spec and plan verified
    assert r["versions"] >= 10
    # Fetch on ready: one model download per round (plus none for a fetch that timed out),
    # announcements only while ready (about one per round: the retained one when the round
    # interval has passed, where staying subscribed would bring every version to every
    # device), the spec and the plan once per connection.
    assert r["fetch_timeouts"] == 0
    assert r["rounds"] <= r["fetches"] <= r["rounds"] + n
    heard = f"{r['announcements']} announcements, {r['rounds']} rounds, {r['versions']} versions"
    assert 0 < r["announcements"] <= 2 * r["rounds"] + n, heard
    assert r["announcements"] < n * r["versions"] / 2, heard
    down = r["bytes_down"]
    assert {"model", "announce", "spec", "plan"} <= set(down)
    assert r["bytes_up"]["update"] > 0 and r["bytes_up"]["status"] > 0
    assert r["up_bytes_per_device_hour"] > 0 and r["down_bytes_per_device_hour"] > 0
    assert r["broker_cpu_pct"] is not None and r["aggregator_rss_mb"] > 0


def test_broker_gets_the_hard_open_file_limit(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Start it from a process with the usual soft limit, which the broker would inherit.
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        with Mosquitto(data_dir=tmp_path / "broker") as m:
            assert m.proc is not None
            limits = Path(f"/proc/{m.proc.pid}/limits").read_text().splitlines()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    line = next(x for x in limits if x.startswith("Max open files"))
    soft_s, hard_s = line.split()[3:5]
    expect = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    assert (soft_s, hard_s) == (expect, expect)


def test_host_processes_fit_the_open_file_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    n = processes_for(10_000)
    assert n >= 1
    assert -(-10_000 // n) + 200 <= hard or hard == resource.RLIM_INFINITY
    assert processes_for(10_000, 3) == 3
    assert processes_for(2, 5) == 2
