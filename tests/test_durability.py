"""Durability under power loss, not only ``kill -9``.

``kill -9`` keeps the page cache: a test that kills a process proves that the state files are
whole, not that they reached the disk. Whether they did is decided by the order of system
calls: a state file survives a power cut once its bytes were fsynced under a temporary name,
renamed over the old file, and the directory holding the name fsynced; a removal once the
directory was fsynced after the unlink. Here the test process records ``os.fsync``,
``os.replace`` and ``os.unlink`` in the order they return, and asserts that

* every state file the agent, the aggregator and ``fedmqtt-admin`` write follows
  fsync(file) -> rename -> fsync(directory), and every removal unlink -> fsync(directory);
* the aggregator sends the PUBACK of an update only after a checkpoint containing it has
  completed that sequence (its delivery guarantee under a power cut, not just a crash).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_agent_helpers import AgentThread, FakeAggregator, make_device
from test_aggregator_support import (
    FED,
    Federation,
    publish_all,
    unit_vector_strategy,
    wait_until,
)

from aggregator.checkpoint import decode_state, f32
from aggregator.mqtt import Incoming, MqttLink
from aggregator.service import CHECKPOINT_DIR
from edge_agent import state as agent_state
from edge_agent.agent import EdgeAgent
from fedmqtt import topics, wire
from fedmqtt.admin.cli import main as admin
from fedmqtt.fsutil import atomic_write_bytes, remove_durably
from fedmqtt.models.spec import ModelSpec
from simulator.aggregator_thread import AggregatorThread
from simulator.broker import Mosquitto

pytestmark = pytest.mark.timeout(120)


def real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(path))


@dataclass(frozen=True)
class Call:
    op: str  # "fsync", "replace", "unlink" or "ack" (a PUBACK of the aggregator)
    path: Path = Path()  # fsync: the file or directory; replace: the new name; unlink: the name
    src: Path = Path()  # replace: the temporary name
    data: bytes = b""  # replace of a checkpoint: the bytes it made durable
    acked: tuple[int, ...] = ()  # ack: the updates acknowledged


class Journal:
    """The calls that decide durability, in the order they returned, from every thread."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        fsync, replace, unlink = os.fsync, os.replace, os.unlink

        def traced_fsync(fd: int) -> None:
            path = real(os.readlink(f"/proc/self/fd/{fd}"))
            fsync(fd)
            self.add(Call("fsync", path))

        def traced_replace(src: Any, dst: Any, **kw: Any) -> None:
            data = Path(src).read_bytes() if str(dst).endswith(".ckpt") else b""
            replace(src, dst, **kw)
            self.add(Call("replace", real(dst), real(src), data))

        def traced_unlink(path: Any, **kw: Any) -> None:
            unlink(path, **kw)
            self.add(Call("unlink", real(path)))

        monkeypatch.setattr(os, "fsync", traced_fsync)
        monkeypatch.setattr(os, "replace", traced_replace)
        monkeypatch.setattr(os, "unlink", traced_unlink)

    def add(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)

    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def durable_writes(
        self, under: Path, skip: Callable[[Path], bool] = lambda p: False
    ) -> set[Path]:
        """Assert that every file renamed into place and every file removed under ``under``
        was made durable; return the paths written."""
        under = real(under)
        calls = self.snapshot()
        written: set[Path] = set()
        for i, c in enumerate(calls):
            if c.op not in ("replace", "unlink") or not c.path.is_relative_to(under):
                continue
            if skip(c.path):
                continue
            after = calls[i + 1 :]
            assert Call("fsync", c.path.parent) in after, f"{c.op} {c.path}: directory not fsynced"
            if c.op == "replace":
                assert Call("fsync", c.src) in calls[:i], f"{c.path}: renamed before its fsync"
                written.add(c.path)
        return written


@pytest.fixture
def journal(monkeypatch: pytest.MonkeyPatch) -> Journal:
    return Journal(monkeypatch)


# --------------------------------------------------------------------------- fedmqtt.fsutil


def test_atomic_write_is_fsync_rename_fsync_dir_and_removal_unlink_fsync_dir(
    tmp_path: Path, journal: Journal
) -> None:
    target = tmp_path / "state.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    remove_durably(target)
    calls = journal.snapshot()
    directory = real(tmp_path)
    tmp1, tmp2 = calls[0].path, calls[3].path
    assert calls == [
        Call("fsync", tmp1),
        Call("replace", real(target), tmp1),
        Call("fsync", directory),
        Call("fsync", tmp2),
        Call("replace", real(target), tmp2),
        Call("fsync", directory),
        Call("unlink", real(target)),
        Call("fsync", directory),
    ]
    assert tmp1.parent == directory and tmp1.name.startswith(".state.bin.")


# --------------------------------------------------------------------------- the agent


def test_every_agent_state_file_is_written_and_removed_durably(
    broker: Mosquitto, tmp_path: Path, journal: Journal
) -> None:
    device = make_device(tmp_path / "dev-1")
    fake = FakeAggregator(broker, device.aggregator, {device.device_id: device.key})
    try:
        fake.publish_plan(codec="topk:0.05", epochs=1)  # top-k keeps an error-feedback file
        fake.publish_model(1)
        onnx = wire.OnnxModel(federation=FED, sender="aggregator", version=1, onnx=b"onnx")
        fake.publish(topics.model_onnx(FED), wire.encode(onnx, device.aggregator))
        agent = EdgeAgent(device.config(broker))
        runner = AgentThread(agent)
        try:
            fake.wait_updates(1)
            outbox = device.state_dir / agent_state.OUTBOX_DIR
            wait_until(
                lambda: agent.updates_sent == 1 and not list(outbox.glob("*.upd")),
                20,
                "the update acknowledged and its outbox file removed",
            )
        finally:
            runner.stop()
    finally:
        fake.close()
    written = journal.durable_writes(device.state_dir)
    state = real(device.state_dir)
    names = {p.relative_to(state).as_posix() for p in written}
    assert {
        agent_state.STATE_FILE,
        agent_state.GLOBAL_MODEL_FILE,
        agent_state.PLAN_FILE,
        agent_state.ONNX_MODEL_FILE,
        agent_state.FEEDBACK_FILE,
    } <= names, names
    [upd] = [n for n in names if n.startswith(f"{agent_state.OUTBOX_DIR}/")]
    # The outbox file left after the PUBACK, durably (checked by durable_writes).
    assert Call("unlink", state / upd) in journal.snapshot()


# --------------------------------------------------------------------------- fedmqtt-admin


def test_every_file_fedmqtt_admin_writes_is_durable(tmp_path: Path, journal: Journal) -> None:
    adm = ["--dir", str(tmp_path / "admin")]
    agg = tmp_path / "agg"
    agg.mkdir()
    (agg / "aggregator.toml").write_text(
        f'[federation]\nid = "{FED}"\nstate_dir = "state"\n'
        '[broker]\nhost = "127.0.0.1"\nport = 1\nusername = "aggregator"\n'
        'password_file = "broker.password"\n'
        '[security]\nsigning_key = "signing.key"\ndevices_dir = "devices"\n'
    )
    for step in (
        ["ca", "init"],
        [
            "broker-cert",
            "--host",
            "broker.test",
            "--broker-dir",
            str(tmp_path / "broker"),
            "--no-reload",
        ],
        ["aggregator-setup", "--aggregator-config", str(agg / "aggregator.toml"), "--no-reload"],
        ["enroll", "dev-a", "--out", str(tmp_path / "bundle"), "--no-reload"],
        ["revoke", "dev-a", "--no-reload"],
    ):
        assert admin([*adm, *step]) == 0, step
    written = journal.durable_writes(tmp_path)
    names = {p.name for p in written}
    # the CA, the broker's certificate, the aggregator's keys, the device's key and bundle
    assert {"ca.key", "ca.crt", "broker.key", "signing.key", "dev-a.chacha"} <= names, names


# --------------------------------------------------------------------------- the aggregator

K = 4
N = 12 * K
ROUND = K + K // 2  # per round: each leaves a half-full buffer, acknowledged a round later
SPEC = ModelSpec("softmax", 5, 10)  # 60 parameters: one coordinate per update
DEVICES = ("dev0", "dev1")


def applied(checkpoint: bytes) -> set[int]:
    """The updates a unit-vector checkpoint contains (update i is e_i, 1/K per application)."""
    params = f32(decode_state(checkpoint)["params"], "params")
    return {int(i) for i in np.flatnonzero(np.round(params * K) == 1)}


def trace_acks(
    journal: Journal, monkeypatch: pytest.MonkeyPatch, index_of: dict[bytes, int]
) -> None:
    """Record each PUBACK the in-process aggregator sends (before it is queued), naming the
    updates by their payloads, which the service drops once a message is processed."""
    take, ack = MqttLink.take, MqttLink.ack
    names: dict[int, tuple[Incoming, int]] = {}  # id -> (message kept alive, update)

    def traced_take(link: MqttLink, n: int) -> list[Incoming]:
        out = take(link, n)
        for m in out:
            if bytes(m.payload) in index_of:
                names[id(m)] = (m, index_of[bytes(m.payload)])
        return out

    def traced_ack(link: MqttLink, msgs: Iterable[Incoming]) -> int:
        msgs = list(msgs)
        journal.add(Call("ack", acked=tuple(names[id(m)][1] for m in msgs if id(m) in names)))
        return ack(link, msgs)

    monkeypatch.setattr(MqttLink, "take", traced_take)
    monkeypatch.setattr(MqttLink, "ack", traced_ack)


def test_aggregator_state_is_durable_before_the_puback_of_any_update_it_contains(
    broker: Mosquitto, tmp_path: Path, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = Federation(tmp_path, SPEC, DEVICES)
    cfg = fed.config(broker.host, broker.port, strategy=unit_vector_strategy(K))
    messages = []
    for i in range(N):
        delta = np.zeros(SPEC.layout().size, dtype=np.float32)
        delta[i] = 1.0
        dev = DEVICES[i % len(DEVICES)]
        messages.append((topics.updates(FED, dev), fed.update(dev, delta, num_samples=1, seq=i)))
    trace_acks(journal, monkeypatch, {p: i for i, (_, p) in enumerate(messages)})
    agg = AggregatorThread(cfg).start()
    try:
        for n in range(ROUND, N + 1, ROUND):  # several checkpoints, PUBACKs in between
            publish_all(broker.port, messages[n - ROUND : n])
            assert agg.wait_for(lambda s, n=n: s["accepted"] == n, 30), agg.snapshot()
        assert agg.snapshot()["version"] == N // K
    finally:
        agg.stop()
    assert agg.error is None

    checkpoints = real(cfg.state_dir / CHECKPOINT_DIR)
    # status.json is informational and replaced without fsync (aggregator/statusfile.py).
    written = journal.durable_writes(cfg.state_dir, skip=lambda p: p.name == "status.json")
    assert any(p.parent == checkpoints for p in written)
    assert real(cfg.state_dir / "plan.json") in written

    # Walk the calls in order: a checkpoint is durable once its file was fsynced before the
    # rename and its directory after; every PUBACK must name only updates one contains.
    synced: set[Path] = set()
    staged: set[int] = set()
    durable: set[int] = set()
    acked: list[int] = []
    for c in journal.snapshot():
        if c.op == "fsync":
            synced.add(c.path)
            if c.path == checkpoints:
                durable |= staged
        elif c.op == "replace" and c.path.parent == checkpoints and c.src in synced:
            staged = applied(c.data)
        elif c.op == "ack":
            early = sorted(set(c.acked) - durable)
            assert not early, f"PUBACK of updates {early} before a durable checkpoint held them"
            acked += c.acked
    assert sorted(acked) == list(range(N)), "not every update was acknowledged exactly once"
