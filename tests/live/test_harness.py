"""The live-systemd harness itself: a machine boots, runs commands, and leaves nothing behind,
even when the test process that made it is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import harness
import pytest
from conftest import require

pytestmark = pytest.mark.timeout(600)

KILLED_RUN = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[1])
    import harness
    net = harness.Network()
    m = harness.Machine(harness.rootfs(), "killed", network=net)
    m.boot()
    print(m.name, m.leader, net.proc.pid, flush=True)
    time.sleep(600)
    """
)


def test_a_killed_run_is_swept_and_a_machine_runs_systemd() -> None:
    missing = harness.missing_prerequisites()
    require(not missing, "live systemd tests need: " + ", ".join(missing))
    harness.rootfs()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        name, leader, holder = proc.stdout.readline().split()
        run_dir = harness.RUNS / name
        assert os.path.ismount(run_dir / "merged")
        # The container's init is systemd, and the network is its own.
        comm = Path(f"/proc/{leader}/comm").read_text().strip()
        assert comm == "systemd"
        assert os.readlink(f"/proc/{leader}/ns/net") != os.readlink("/proc/self/ns/net")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    swept = harness.sweep_stale()
    assert name in swept and f"network-{holder}.json" in swept, swept
    assert not run_dir.exists()
    assert not any(str(run_dir) in line for line in Path("/proc/self/mounts").read_text().split())
    for pid in (int(leader), int(holder)):  # SIGKILL is delivered asynchronously
        harness.wait_for(f"pid {pid} to end", lambda pid=pid: _ended(pid), 10, 0.05)


def _ended(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except (OSError, IndexError):
        return True


def test_the_wheelhouse_has_the_extras_an_extra_names() -> None:
    """The machines install offline from the wheelhouse: an extra that names another of the
    project's extras (``aggregator`` names ``fedmqtt[privacy]``) needs that one's wheels too."""
    optional = tomllib.loads((harness.ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    reqs = harness._requirements(("agent", "aggregator", "onnx"))
    assert "fedmqtt[privacy]" in optional["aggregator"]
    assert set(optional["privacy"]) <= set(reqs)
    assert set(optional["onnx"]) | set(optional["agent"]) <= set(reqs)
    assert not [r for r in reqs if r.startswith("fedmqtt")]
    assert not set(optional["privacy"]) & set(harness._requirements(("agent",)))
