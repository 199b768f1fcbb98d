"""Soak (slow: ``scripts/test -m slow``, a few minutes): one long stream of updates through
every failure the service must survive, over and over, and one exact ledger at the end.

Each update i is the unit vector e_i (FedBuff, K = 32, constant staleness, server lr 1, model
starting at zero), as in ``test_aggregator_crash``: the final parameters say which updates
were applied and how many times. While three devices' updates stream in, the test picks a
failure every few seconds, in a seeded random order:

* ``kill -9`` of the aggregator, restarted at once;
* SIGTERM of the aggregator (a clean stop), restarted;
* a graceful broker restart (Mosquitto saves its sessions and queues);
* the publisher cut off: its socket shut down under it, without DISCONNECT (paho reconnects
  and sends again whatever had no PUBACK);
* garbage on the update topics: random bytes, a truncated update, NaN values, a bad MAC, an
  unknown device, and a copy of an update already sent.

At the end every update the broker acknowledged must be in the parameters exactly once, the
versions seen on the model topic must never go backwards and must end at the last one, the
model must be finite, only the expected refusal reasons may have been counted, and the
service's log must hold no traceback.
Each default-suite test checks one of these failures once; this one checks that they compose.

``FEDMQTT_SOAK_S`` sets how long the stream lasts (default 90 s per case).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from test_aggregator_support import (
    FED,
    Federation,
    ModelWatcher,
    applications,
    client,
    raw_tensor,
    service_status,
    start_service,
    unit_vector_service,
    wait_service_ready,
    wait_until,
)

from fedmqtt import topics
from fedmqtt.models.spec import ModelSpec
from fedmqtt.signing import HmacKey
from simulator.broker import Mosquitto

pytestmark = pytest.mark.slow

K = 32
N = 128 * K  # 4096 updates
SPEC = ModelSpec("softmax", 410, 10)  # 4110 parameters: one coordinate per update
DEVICES = ("dev0", "dev1", "dev2")
SOAK_S = float(os.environ.get("FEDMQTT_SOAK_S", "90"))
# What the garbage and the failures may be refused for; anything else is a finding.
EXPECTED_REASONS = {"schema", "signature", "unknown_device", "nonfinite", "replay"}
FAILURES = ["kill9", "sigterm", "broker", "cut", "garbage"]


class Stream:
    """The three devices' N unit-vector updates, paced over ``SOAK_S``, on one connection that
    the chaos may cut: paho resends whatever had no PUBACK when it reconnects."""

    def __init__(self, port: int, fed: Federation) -> None:
        self.fed = fed
        self.c = client(port, "soak-devices")
        # Completion comes from on_publish: an info made while the link was down keeps
        # "not connected" as its result even after paho sent it on reconnecting.
        self.acked: set[int] = set()
        self.c.on_publish = self._on_publish
        self.infos: list[mqtt.MQTTMessageInfo] = []
        self.payloads: list[tuple[str, bytes]] = []
        self.done = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            pace = SOAK_S / N
            t0 = time.monotonic()
            for i in range(N):
                dev = DEVICES[i % len(DEVICES)]
                delta = np.zeros(SPEC.layout().size, dtype=np.float32)
                delta[i] = 1.0
                payload = self.fed.update(dev, delta, update_id=f"soak-{i:06d}", num_samples=1)
                topic = topics.updates(FED, dev)
                self.payloads.append((topic, payload))
                self.infos.append(self.c.publish(topic, payload, qos=1))
                ahead = t0 + (i + 1) * pace - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        except BaseException as e:  # pragma: no cover - reported by the test
            self.errors.append(e)
        finally:
            self.done.set()

    def cut(self) -> None:
        """Shut the socket down under paho, as a dropped link would (no DISCONNECT sent)."""
        sock = self.c.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _on_publish(self, c: Any, u: Any, mid: int, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            self.acked.add(mid)

    def all_acknowledged(self) -> bool:
        return self.done.is_set() and all(info.mid in self.acked for info in self.infos)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def garbage(fed: Federation, stream: Stream, rng: random.Random) -> list[tuple[str, bytes]]:
    """One of each kind of bad message, built from the stream so far."""
    t = topics.updates(FED, "dev0")
    layout = SPEC.layout()
    valid = fed.update("dev0", np.zeros(layout.size, np.float32), num_samples=1)
    nan = {
        name: raw_tensor(np.full(shape, np.nan, np.float32))
        for name, shape in zip(layout.names, layout.shapes, strict=True)
    }
    out = [
        (t, rng.randbytes(rng.randint(1, 4000))),
        (t, valid[: len(valid) // 2]),
        (t, fed.update_encoded("dev0", nan)),
        (t, fed.update("dev0", np.ones(layout.size, np.float32), key=HmacKey.generate())),
        (topics.updates(FED, "intruder"), valid),
    ]
    if stream.payloads:  # a device's own update, sent once more
        out.append(stream.payloads[rng.randrange(len(stream.payloads))])
    return out


@pytest.mark.parametrize("workers", [0, 2], ids=["single-process", "two-workers"])
def test_soak_every_failure_composes(tmp_path: Path, workers: int) -> None:
    rng = random.Random(20261129 + workers)
    broker = Mosquitto(data_dir=tmp_path / "broker").start()
    fed, cfg = unit_vector_service(tmp_path, broker.port, SPEC, DEVICES, k=K, workers=workers)
    state = tmp_path / "state"
    log = tmp_path / "aggregator.log"
    events: list[str] = []
    pending: list[str] = []
    proc = start_service(cfg, log)
    watcher = stream = None
    vandal = None
    try:
        wait_service_ready(state, 0, 30)
        watcher = ModelWatcher(broker.port, fed.verifier, log=log)  # conftest checks it
        stream = Stream(broker.port, fed)
        vandal = client(broker.port, "soak-vandal")
        stream.thread.start()
        while not stream.done.wait(rng.uniform(2.0, 5.0)):
            if not pending:  # every kind once per round, in a random order
                pending = rng.sample(FAILURES, len(FAILURES))
            event = pending.pop()
            events.append(event)
            since = time.time()
            if event in ("kill9", "sigterm"):
                proc.send_signal(signal.SIGKILL if event == "kill9" else signal.SIGTERM)
                code = proc.wait(30)
                if event == "sigterm":
                    assert code == 0, f"clean stop exited with {code}"
                proc = start_service(cfg, log)
                wait_service_ready(state, since, 30)
            elif event == "broker":
                broker.stop()
                broker.start()
                wait_until(
                    lambda: service_status(state).get("connected") is True, 30, "reconnection"
                )
            elif event == "cut":
                stream.cut()
            else:
                for t, p in garbage(fed, stream, rng):
                    vandal.publish(t, p, qos=1)
        assert not stream.errors, stream.errors
        wait_until(stream.all_acknowledged, 120, "every update acknowledged by the broker")
        wait_until(
            lambda: int(service_status(state).get("accepted", 0)) >= N,
            120,
            "every update accounted for",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        # The last version reaches the model topic (retained) once its checkpoint is durable.
        w = watcher
        wait_until(lambda: w.versions[-1:] == [N // K], 30, "the last version published")
    finally:
        for c in (stream, watcher):
            if c is not None:
                c.close()
        if vandal is not None:
            vandal.disconnect()
            vandal.loop_stop()
        if proc.poll() is None:
            proc.kill()
        broker.close()

    note = f"events: {events}"
    final = service_status(state)
    summary = {k: final.get(k) for k in ("accepted", "rejected", "durable_version", "checkpoints")}
    print(f"\nsoak, {workers} workers, {SOAK_S:g} s: {note}; {summary}")
    assert set(events) == set(FAILURES), f"the stream ended first, raise FEDMQTT_SOAK_S; {note}"
    assert int(final["accepted"]) == N, note
    rejected = final["rejected"]
    assert set(rejected) <= EXPECTED_REASONS, f"{rejected}; {note}"
    count, version = applications(state, K, N)
    assert not np.any(count[N:]), f"garbage reached the model; {note}"
    assert version == N // K
    assert watcher is not None
    assert watcher.versions == sorted(watcher.versions), f"a version went backwards; {note}"
