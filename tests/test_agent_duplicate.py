"""The agent killed between the broker's PUBACK and removing the update from its outbox.

The outbox writes first and deletes after the PUBACK (edge_agent/outbox.py), so a crash in
between leaves one update too many, never one too few: the restarted agent sends it again, and
the aggregator must recognise the copy as a replay and apply the update once.

The agent is a real process; its ``Outbox.acked`` is wrapped so that on the PUBACK of an update
whose file still exists it signals the test and holds, and the test kills it there with
SIGKILL. The aggregator is the real one (in process), FedBuff with K = 2 and one device: if the
copy were applied, the buffer would reach two updates and make version 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from test_agent_helpers import SPEC, make_device
from test_aggregator_support import FED, Federation, client, wait_until

from edge_agent.state import OUTBOX_DIR
from fedmqtt import topics
from simulator.aggregator_thread import AggregatorThread
from simulator.broker import Mosquitto

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parent.parent

# The agent, with Outbox.acked holding (until SIGKILL) on the PUBACK of an update still on disk.
# The marker is renamed into place so that the test, polling for it, never reads it half-written.
HELD_AGENT = """
import os, sys, threading
from pathlib import Path
from edge_agent.cli import main
from edge_agent.outbox import Outbox

marker, config = sys.argv[1], sys.argv[2]
acked = Outbox.acked

def held(self, name):
    if (self.directory / name).exists():
        Path(marker + ".tmp").write_text(name)
        os.replace(marker + ".tmp", marker)
        threading.Event().wait()
    return acked(self, name)

Outbox.acked = held
sys.exit(main(["run", "--config", config]))
"""


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(k, None)
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env
        )


def test_killed_after_the_puback_before_the_outbox_delete_the_copy_is_refused_as_a_replay(
    broker: Mosquitto, tmp_path: Path
) -> None:
    fed = Federation(tmp_path / "agg", SPEC, devices=())
    device = make_device(tmp_path / "dev", "dev-1", aggregator=fed.signer)
    device.key.save(fed.root / "devices" / "dev-1.chacha")
    cfg = fed.config(broker.host, broker.port, strategy={"buffer_size": 2, "max_staleness": 10})
    config = device.write_toml(broker)
    outbox = device.state_dir / OUTBOX_DIR
    marker = tmp_path / "held"
    log = tmp_path / "agent.log"

    sent: list[bytes] = []  # every update of dev-1 the broker routes, as a second subscriber
    lock = threading.Condition()

    def on_message(c: Any, u: Any, msg: Any) -> None:
        with lock:
            sent.append(bytes(msg.payload))
            lock.notify_all()

    subscribed = threading.Event()

    def on_connect(c: Any, *a: Any) -> None:
        c.on_message = on_message
        c.on_subscribe = lambda *a: subscribed.set()
        c.subscribe(topics.updates(FED, "dev-1"), 1)

    sniffer = client(broker.port, on_connect=on_connect)
    agg = AggregatorThread(cfg).start()
    first = spawn(["-c", HELD_AGENT, str(marker), str(config)], log)
    try:
        assert subscribed.wait(10)
        wait_until(marker.exists, 60, "the PUBACK of the agent's update")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        held = marker.read_text()
        assert [p.name for p in outbox.glob("*.upd")] == [held]  # the premise: still queued
        assert agg.wait_for(lambda s: s["accepted"] == 1, 20), agg.snapshot()

        second = spawn(["-m", "edge_agent", "run", "--config", str(config)], log)
        try:
            with lock:
                assert lock.wait_for(lambda: len(sent) >= 2, 30), "the copy was not sent"
            assert sent[0] == sent[1]  # the same update, sent again after the restart
            assert agg.wait_for(lambda s: s["rejected"] == {"replay": 1}, 20), agg.snapshot()
            wait_until(lambda: not list(outbox.glob("*.upd")), 20, "the outbox emptied")
            second.send_signal(signal.SIGTERM)
            assert second.wait(20) == 0, log.read_text()
        finally:
            if second.poll() is None:
                second.kill()
    finally:
        if first.poll() is None:
            first.kill()
        sniffer.disconnect()
        sniffer.loop_stop()
        agg.stop()
    assert agg.error is None
    snap = agg.snapshot()
    # Applied once: one update accepted, its copy refused, and no version from the two.
    assert snap["accepted"] == 1 and snap["rejected"] == {"replay": 1}, snap
    assert snap["version"] == 0, snap
    assert len(sent) == 2, "the agent sent something else too"
    assert "Traceback" not in log.read_text(), log.read_text()
