"""An adaptive server optimizer's state survives ``kill -9`` of the aggregator process.

FedBuff with K = 4 and FedAdam over a real broker: every update of version j carries the same
delta g_j, so the buffer's mean is g_j whatever the order of arrival, and the global model
after version j is fixed by the FedAdam steps on g_1..g_j from the initial model. The service
is killed with SIGKILL after version 2 and restarted; versions 3 and 4 then match that
reference only if the moments m and v came back from the checkpoint (fresh moments give a
different step, checked below).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
from test_aggregator_support import (
    FED,
    Federation,
    publish_all,
    start_service,
    wait_service_ready,
    wait_until,
)

from aggregator.checkpoint import CheckpointStore, f32
from fedmqtt import topics
from fedmqtt.aggregation.serveropt import FedAdam
from fedmqtt.models.spec import ModelSpec
from simulator.broker import Mosquitto

K = 4
SPEC = ModelSpec("softmax", 6, 3)
DEVICES = tuple(f"dev{i}" for i in range(K))
LR = 0.05


def newest(store: CheckpointStore) -> int:
    versions = store.versions()
    return versions[0] if versions else -1


def params_at(store: CheckpointStore, version: int) -> np.ndarray:
    wait_until(lambda: newest(store) >= version, 30, f"version {version} on disk")
    loaded = store.load_latest()
    assert loaded is not None and loaded.version == version
    return f32(loaded.state["params"], "params")


def test_fedadam_state_survives_kill_9(broker: Mosquitto, tmp_path: Path) -> None:
    fed = Federation(tmp_path, SPEC, DEVICES)
    strategy = {
        "buffer_size": K,
        "staleness": "constant",
        "max_staleness": 1000,
        "server_optimizer": "adam",
        "server_lr": LR,
    }
    cfg = fed.write_toml(tmp_path / "aggregator.toml", "127.0.0.1", broker.port, strategy=strategy)
    store = CheckpointStore(tmp_path / "state" / "checkpoints")
    log = tmp_path / "aggregator.log"
    rng = np.random.default_rng(11)
    d = SPEC.layout().size
    deltas = [rng.normal(0, 0.1, d).astype(np.float32) for _ in range(4)]
    seq = 0

    def version(j: int) -> None:
        nonlocal seq
        messages = []
        for dev in DEVICES:
            seq += 1
            payload = fed.update(dev, deltas[j], base_version=j, num_samples=5, seq=seq)
            messages.append((topics.updates(FED, dev), payload))
        publish_all(broker.port, messages)

    proc = start_service(cfg, log)
    try:
        wait_service_ready(tmp_path / "state", 0)
        w0 = params_at(store, 0)
        for j in range(2):
            version(j)
        before_kill = params_at(store, 2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        restarted = time.time()
        proc = start_service(cfg, log)
        wait_service_ready(tmp_path / "state", restarted)
        for j in range(2, 4):
            version(j)
        final = params_at(store, 4)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()

    reference, w = FedAdam(LR), w0
    for j, g in enumerate(deltas):
        w = reference.step(w, g)
        if j == 1:
            np.testing.assert_allclose(before_kill, w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(final, w, rtol=1e-5, atol=1e-7)
    # Moments lost at the restart would have given another model:
    lost = FedAdam(LR)
    w_lost = before_kill
    for g in deltas[2:]:
        w_lost = lost.step(w_lost, g)
    assert np.abs(w_lost - final).max() > 1e-3
