"""``kill -9`` of the aggregator process in the middle of a stream of updates.

Every update i is the unit vector e_i (FedBuff, K = 32, constant staleness, server lr 1, model
starting at zero), so the final parameters say exactly which updates were applied and how many
times: coordinate i is 1/32 per application. N is a multiple of K, so once all N are accounted
for the buffer is empty and each of the N updates the broker acknowledged to the publisher must
be in the parameters exactly once. With K = 32, at any instant dozens of accepted updates exist
only in memory: acknowledging any of them before the version applying it is on disk would lose
it at the kill (checked by making the service acknowledge on receipt: this test then fails).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from test_aggregator_support import (
    FED,
    Federation,
    ModelWatcher,
    applications,
    client,
    service_status,
    start_service,
    unit_vector_service,
    unit_vector_strategy,
    wait_service_ready,
    wait_until,
)

from fedmqtt import topics
from fedmqtt.models.spec import ModelSpec
from simulator.broker import Mosquitto

K = 32
N = 48 * K  # 1536 updates
SPEC = ModelSpec("softmax", 153, 10)  # 1540 parameters: one coordinate per update
DEVICES = ("dev0", "dev1", "dev2")
GATES = (400, 900)  # the publisher waits there for the kill and restart ...
KILL_AT = (200, 700)  # ... made once the service has accepted this many


def accepted_at_least(state: Path, n: int) -> bool:
    return int(str(service_status(state).get("accepted", 0))) >= n


def assert_each_applied_once(state: Path, n: int) -> int:
    """Updates 0..n-1 are each in the newest checkpoint exactly once, nothing else is, and the
    only refusals were replays (redeliveries); returns the checkpoint's version."""
    count, version = applications(state, K, n)
    assert count.sum() == n and version == n // K
    assert int(str(service_status(state)["accepted"])) == n
    rejected = service_status(state)["rejected"]
    assert isinstance(rejected, dict) and set(rejected) <= {"replay"}
    return version


@pytest.mark.parametrize("workers", [0, 2], ids=["single-process", "two-workers"])
def test_kill_9_loses_nothing_acknowledged_and_applies_nothing_twice(
    broker: Mosquitto, tmp_path: Path, workers: int
) -> None:
    """With workers, only the owner is killed: its workers must notice and exit without
    acknowledging anything, and the restarted owner's new workers resume their sessions."""
    fed, cfg = unit_vector_service(tmp_path, broker.port, SPEC, DEVICES, k=K, workers=workers)
    state = tmp_path / "state"
    log = tmp_path / "aggregator.log"
    watcher = ModelWatcher(broker.port, fed.verifier, log=log)
    proc = start_service(cfg, log)
    published = threading.Event()
    errors: list[BaseException] = []
    # The publisher holds after GATES[k] updates until the k-th kill and restart are done, so
    # both happen mid-stream whatever the machine's speed: the stream cannot end first.
    resume = [threading.Event() for _ in GATES]

    def publish() -> None:
        try:
            c = client(broker.port)
            infos = []
            for i in range(N):
                if i in GATES:
                    resume[GATES.index(i)].wait()
                dev = DEVICES[i % len(DEVICES)]
                delta = np.zeros(SPEC.layout().size, dtype=np.float32)
                delta[i] = 1.0
                payload = fed.update(dev, delta, update_id=f"crash-{i:06d}", num_samples=1, seq=i)
                infos.append(c.publish(topics.updates(FED, dev), payload, qos=1))
                if i % 50 == 49:
                    time.sleep(0.06)  # a stream, not one burst
            for info in infos:
                info.wait_for_publish(60)
                assert info.is_published()  # acknowledged by the broker
            c.disconnect()
            c.loop_stop()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            published.set()

    try:
        wait_service_ready(state, 0)
        sender = threading.Thread(target=publish, daemon=True)
        sender.start()
        for threshold, go_on in zip(KILL_AT, resume, strict=True):
            # Kill -9 while the service works through the updates published before the gate
            # (it has taken at least `threshold` of them), then start again at once.
            wait_until(partial(accepted_at_least, state, threshold), 30, f"{threshold} accepted")
            assert not published.is_set(), errors
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            restarted = time.time()
            proc = start_service(cfg, log)
            wait_service_ready(state, restarted)
            go_on.set()
        assert published.wait(60) and not errors, errors
        wait_until(
            partial(accepted_at_least, state, N),
            60,
            "every update accounted for",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        for go_on in resume:  # let the publisher end if the test failed before a gate
            go_on.set()
        if proc.poll() is None:
            proc.kill()
        watcher.close()

    version = assert_each_applied_once(state, N)
    # The global version never went backwards, across both crashes.
    assert watcher.versions == sorted(watcher.versions)
    assert watcher.versions[-1] == version


def worker_pids(owner: int) -> set[int]:
    """The scale-out worker processes of the service process ``owner`` (its children started
    by ``multiprocessing``'s spawn, not its resource tracker)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # exited meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == owner and b"spawn_main" in cmdline:
            pids.add(int(entry.name))
    return pids


def test_worker_kill_9_acknowledges_only_what_is_durable(broker: Mosquitto, tmp_path: Path) -> None:
    """``kill -9`` of one scale-out worker while the messages it forwarded wait behind a partly
    filled buffer; the owner restarts it, and the broker redelivers those messages to the new
    process. Tokens restart with each worker process: when the next checkpoint releases the old
    process's messages together with the new one's, only the new one's tokens may be
    acknowledged to it -- the old ones are larger and would PUBACK updates the new process
    forwarded after the checkpointed flush. Then the owner is killed while such updates sit in
    the buffer: any of them acknowledged early is lost for good. Every update the broker
    acknowledged to the publisher must end in the model exactly once."""
    fed, cfg = unit_vector_service(tmp_path, broker.port, SPEC, DEVICES, k=K, workers=2)
    state = tmp_path / "state"
    log = tmp_path / "aggregator.log"
    proc = start_service(cfg, log)
    c = client(broker.port)
    acknowledged: list[int] = []

    def publish(lo: int, hi: int) -> None:
        """Updates lo..hi-1 (update i is e_i), each acknowledged by the broker."""
        infos = []
        for i in range(lo, hi):
            dev = DEVICES[i % len(DEVICES)]
            delta = np.zeros(SPEC.layout().size, dtype=np.float32)
            delta[i] = 1.0
            payload = fed.update(dev, delta, update_id=f"wkill-{i:06d}", num_samples=1, seq=i)
            infos.append((i, c.publish(topics.updates(FED, dev), payload, qos=1)))
        for i, info in infos:
            info.wait_for_publish(60)
            assert info.is_published()
            acknowledged.append(i)

    def worker_connections() -> int:
        return sum("worker-" in line and ": connected to" in line for line in log.open())

    n1, n2, n = 4 * K + 7 * K // 8, 5 * K + 7 * K // 8, 6 * K
    try:
        wait_service_ready(state, 0)
        wait_until(lambda: len(worker_pids(proc.pid)) == 2, 20, "two workers")
        # Four flushes, and most of a buffer whose messages stay unacknowledged (both workers).
        publish(0, n1)
        wait_until(partial(accepted_at_least, state, n1), 30, f"{n1} accepted")
        before, connections = worker_pids(proc.pid), worker_connections()
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        # Restarted: its session resumed, the broker redelivers what the killed process held.
        wait_until(
            lambda: victim not in worker_pids(proc.pid) and worker_connections() > connections,
            30,
            "the worker restarted",
        )
        # Fill the buffer (one flush, one checkpoint releasing both processes' messages) and
        # most of the next one, which is not durable.
        publish(n1, n2)
        wait_until(partial(accepted_at_least, state, n2), 30, f"{n2} accepted")
        wait_until(
            lambda: int(str(service_status(state).get("durable_version", -1))) >= n1 // K + 1,
            30,
            "the flush checkpointed",
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        restarted = time.time()
        proc = start_service(cfg, log)
        wait_service_ready(state, restarted)
        publish(n2, n)
        # An update acknowledged early is never redelivered: then this times out, and the
        # checks below name the updates that were lost.
        with contextlib.suppress(TimeoutError):
            wait_until(partial(accepted_at_least, state, n), 30, "every update accounted for")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        c.disconnect()
        c.loop_stop()

    assert "exited (code -9); restarting it" in log.read_text()
    assert sorted(acknowledged) == list(range(n))
    assert_each_applied_once(state, n)


def test_kill_9_keeps_an_update_held_for_the_next_buffer(broker: Mosquitto, tmp_path: Path) -> None:
    """FedBuff K = 2, one row per device. dev0's second update waits for the next buffer and
    enters it when dev1's update makes version 1: it then exists only in memory, so its
    acknowledgement must wait for version 2 (with version 1's, it would be lost here). The
    service is killed after version 1 is durable; the broker redelivers the held update, and
    it is applied once."""
    fed = Federation(tmp_path, SPEC, ("dev0", "dev1"))
    cfg = fed.write_toml(
        tmp_path / "aggregator.toml",
        "127.0.0.1",
        broker.port,
        strategy={**unit_vector_strategy(2), "max_per_device": 1},
    )
    state, log = tmp_path / "state", tmp_path / "aggregator.log"
    proc = start_service(cfg, log)
    c = client(broker.port)
    try:
        wait_service_ready(state, 0)

        def send(i: int, dev: str, base: int) -> None:
            delta = np.zeros(SPEC.layout().size, dtype=np.float32)
            delta[i] = 1.0
            payload = fed.update(dev, delta, base_version=base, update_id=f"held-{i:06d}", seq=i)
            c.publish(topics.updates(FED, dev), payload, qos=1).wait_for_publish(10)

        def durable(version: int) -> bool:
            with contextlib.suppress(AssertionError):  # no checkpoint yet
                return applications(state, 2, 0)[1] >= version
            return False

        send(0, "dev0", 0)
        send(1, "dev0", 0)  # over dev0's row: held
        send(2, "dev1", 0)  # version 1; update 1 enters the next buffer
        wait_until(lambda: durable(1), 30, "version 1 durable")
        wait_until(lambda: service_status(state).get("held") == 0, 10, "released")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        restarted = time.time()
        proc = start_service(cfg, log)
        wait_service_ready(state, restarted)
        send(3, "dev1", 1)  # with the redelivered update 1: version 2
        wait_until(lambda: durable(2), 30, "version 2 durable")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        c.disconnect()
        c.loop_stop()
        if proc.poll() is None:
            proc.kill()
    count, version = applications(state, 2, 4)
    assert version == 2 and count.sum() == 4
