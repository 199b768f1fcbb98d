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

import signal
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from test_aggregator_support import (
    FED,
    ModelWatcher,
    applications,
    client,
    service_status,
    start_service,
    unit_vector_service,
    wait_service_ready,
    wait_until,
)

from fedmqtt import topics
from fedmqtt.broker import Mosquitto
from fedmqtt.models.spec import ModelSpec

K = 32
N = 48 * K  # 1536 updates
SPEC = ModelSpec("softmax", 153, 10)  # 1540 parameters: one coordinate per update
DEVICES = ("dev0", "dev1", "dev2")
GATES = (400, 900)  # the publisher waits there for the kill and restart ...
KILL_AT = (200, 700)  # ... made once the service has accepted this many


def accepted_at_least(state: Path, n: int) -> bool:
    return int(str(service_status(state).get("accepted", 0))) >= n


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

    assert int(str(service_status(state)["accepted"])) == N
    rejected = service_status(state)["rejected"]
    assert isinstance(rejected, dict) and set(rejected) <= {"replay"}
    _, version = applications(state, K, N)
    assert version == N // K
    # The global version never went backwards, across both crashes.
    assert watcher.versions == sorted(watcher.versions)
    assert watcher.versions[-1] == version
