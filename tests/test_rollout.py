"""Rollout and rollback: the evaluation gate's rule, the engine's rollback, ``fl-aggregator
rollback`` and ``history`` on a stopped and on a running service, and the gate over the real
broker (a version that got worse never reaches the ONNX topic and is rolled back)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_aggregator_support import FED, Federation, ModelWatcher, client, publish_all, wait_until

from aggregator.checkpoint import CheckpointStore, decode_state, f32
from aggregator.cli import main
from aggregator.engine import Engine
from aggregator.metrics import Metrics
from aggregator.rollout import (
    Gate,
    History,
    Release,
    Rollback,
    RolloutConfig,
    StateLock,
    read_history,
)
from aggregator.service import Aggregator, checkpoint_store, open_state
from fedmqtt import topics, wire
from fedmqtt.errors import FedMQTTError
from fedmqtt.fedeval import EvalSummary
from fedmqtt.models.spec import ModelSpec
from simulator.aggregator_thread import AggregatorThread
from simulator.broker import Mosquitto

SPEC = ModelSpec("softmax", 4, 3)
D = SPEC.layout().size


def params(x: float) -> np.ndarray[Any, Any]:
    return np.full(D, x, np.float32)


# --------------------------------------------------------------------------- the gate's rule


def test_gate_releases_within_the_margin_and_rolls_back_to_the_best_recent() -> None:
    scores: dict[int, float] = {}
    gate = Gate(RolloutConfig(gate=True, margin=0.05, last_k=3), scores.get, "holdout")

    def publish(v: int, score: float | None, **stats: float) -> Any:
        gate.published(v, params(v), float(v), dict(stats))
        if score is not None:
            scores[v] = score
        return gate.poll()

    verdicts, action = publish(1, 0.50)
    assert (
        isinstance(action, Release) and action.version == 1 and verdicts == [(1, "released", 0.5)]
    )
    assert isinstance(publish(2, 0.80)[1], Release)
    assert isinstance(publish(3, 0.76)[1], Release)  # 0.04 below the best: within the margin
    verdicts, action = publish(4, 0.70)  # 0.10 below the best of the last 3 (0.80, version 2)
    assert isinstance(action, Rollback)
    assert (action.to_version, action.failed, action.best) == (2, 4, 0.80)
    assert np.array_equal(action.params, params(2))
    assert verdicts == [(4, "held: rolled back", 0.70)] and gate.released_version == 3
    # Versions made before the rollback's version fail without a second rollback.
    assert publish(5, 0.60) == ([(5, "held (rollback under way)", 0.6)], None)
    gate.rolling_back(6)
    verdicts, action = publish(6, 0.80, rollback_to=2.0)
    assert isinstance(action, Release) and action.version == 6 and gate.released_version == 6
    # A version not yet evaluated waits; a newer evaluated one supersedes it.
    assert publish(7, None) == ([], None)
    verdicts, action = publish(8, 0.81)
    assert verdicts == [(7, "superseded", None), (8, "released", 0.81)]
    # An operator's rollback is released whatever it scores, and becomes the baseline.
    verdicts, action = publish(9, 0.40, rollback_to=1.0, rollback_manual=1.0)
    assert isinstance(action, Release) and "operator" in verdicts[-1][1]
    assert isinstance(publish(10, 0.38)[1], Release)
    # The window forgets: only the last_k released versions are compared.
    assert isinstance(publish(11, 0.37)[1], Release)


def test_gate_without_evaluation_releases_unjudged() -> None:
    gate = Gate(RolloutConfig(gate=True), None, "none")
    gate.published(1, params(1), 1.0, {})
    gate.published(2, params(2), 2.0, {})
    verdicts, action = gate.poll()
    assert verdicts == [(1, "ungated", None), (2, "ungated", None)]
    assert isinstance(action, Release) and action.version == 2


# --------------------------------------------------------------------------- the engine


def engine_with_versions(fed: Federation, n: int, **tables: Any) -> Engine:
    cfg = fed.config("127.0.0.1", 1883, strategy={"buffer_size": 1}, **tables)
    e = Engine(cfg, Metrics(FED), keys=None)
    open_state(cfg, e)
    store = checkpoint_store(cfg)
    for i in range(n):
        upd = fed.update("dev0", params(0.01 * (i + 1)), base_version=e.version, seq=i)
        e.process([(topics.updates(FED, "dev0"), upd)], now=0.0)
        store.write(e.version, e.snapshot().data)
    return e


def test_engine_rollback_applies_the_buffer_first_and_keeps_the_replay_window(
    tmp_path: Path,
) -> None:
    fed = Federation(tmp_path, SPEC)
    cfg = fed.config("127.0.0.1", 1883, strategy={"buffer_size": 2})
    e = Engine(cfg, Metrics(FED), keys=None)
    v0 = e.params.copy()
    first = fed.update("dev0", params(0.01), update_id="first-update-0001")
    needs = e.process([(topics.updates(FED, "dev0"), first)], now=0.0)
    assert needs == [1] and len(e.strategy) == 1
    v = e.rollback(v0, None, 0, now=1.0, manual=True)
    # The buffered update went into a version (flush 1), then the rollback made flush 2.
    assert (v, e.version, e.flushes, len(e.strategy)) == (2, 2, 2, 0)
    assert np.array_equal(e.params, v0)
    assert e.stats == {"rollback_to": 0.0, "rollback_manual": 1.0}
    again = e.process([(topics.updates(FED, "dev0"), first)], now=2.0)
    assert e.metrics.snapshot()["rejected"] == {"replay": 1} and again == [2]
    with pytest.raises(ValueError):
        e.rollback(np.full(D, np.nan, np.float32), None, 0, now=3.0)


# --------------------------------------------------------------------------- the commands


def test_rollback_and_history_on_a_stopped_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fed = Federation(tmp_path, SPEC)
    path = fed.write_toml(tmp_path / "aggregator.toml", "127.0.0.1", 1883, checkpoint={"keep": 3})
    e = engine_with_versions(fed, 4, checkpoint={"keep": 3})
    store = CheckpointStore(tmp_path / "state" / "checkpoints", keep=3)
    assert store.versions() == [4, 3, 2]
    v2 = f32(decode_state(store.path_for(2).read_bytes())["params"], "params")
    assert main(["rollback", "--config", str(path), "--to-version", "2"]) == 0
    assert "version 5 = the parameters of version 2" in capsys.readouterr().out
    state = decode_state(store.path_for(5).read_bytes())
    assert np.array_equal(f32(state["params"], "params"), v2)
    assert state["stats"] == {"rollback_to": 2.0, "rollback_manual": 1.0}
    assert state["metrics"]["rollbacks"] == {"manual": 1}
    assert not np.array_equal(v2, e.params)
    # A version no longer kept is refused, naming those that are.
    assert main(["rollback", "--config", str(path), "--to-version", "1"]) == 1
    assert "not among the kept checkpoints (3, 4, 5)" in capsys.readouterr().err
    # Nothing happens while another process holds the state directory: the request waits for
    # the service, which is not there to answer.
    lock = StateLock(tmp_path / "state")
    assert lock.try_acquire()
    try:
        args = ["rollback", "--config", str(path), "--to-version", "4", "--timeout", "0.3"]
        assert main(args) == 1
        assert "did not answer" in capsys.readouterr().err
    finally:
        lock.release()
    assert not (tmp_path / "state" / "rollback.request").exists()
    history = History(tmp_path / "state")
    history.published(5, 1.0, {"rollback_to": 2.0})
    history.update(5, score=0.5, metric="accuracy", verdict="released")
    history.save()
    assert main(["history", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "rollback to 2" in out and "0.5000" in out and "(checkpoint kept)" in out


def test_rollback_against_the_running_service(broker: Mosquitto, tmp_path: Path) -> None:
    fed = Federation(tmp_path, SPEC)
    tables: dict[str, Any] = {
        "strategy": {"buffer_size": 1},
        "downlink": {"codec": "raw"},
        "checkpoint": {"keep": 10},
    }
    cfg = fed.config("127.0.0.1", broker.port, **tables)
    path = fed.write_toml(tmp_path / "aggregator.toml", "127.0.0.1", broker.port, **tables)
    watcher = ModelWatcher(broker.port, fed.verifier)
    agg = AggregatorThread(cfg).start()
    try:
        seen: dict[int, np.ndarray[Any, Any]] = {}
        for i in range(3):
            upd = fed.update("dev0", params(0.01 * (i + 1)), base_version=i, seq=i)
            publish_all(broker.port, [(topics.updates(FED, "dev0"), upd)])
            m = watcher.wait(lambda m, v=i + 1: m.version == v, 20)
            seen[m.version] = SPEC.layout().flatten(m.params)
        # The running service holds the lock: the command asks it through the state directory.
        assert not StateLock(tmp_path / "state").try_acquire()
        result: list[int] = []
        t = threading.Thread(
            target=lambda: result.append(
                main(["rollback", "--config", str(path), "--to-version", "1"])
            )
        )
        t.start()
        m = watcher.wait(lambda m: m.version == 4, 20)
        t.join(30)
        assert result == [0]
        assert np.array_equal(SPEC.layout().flatten(m.params), seen[1])
        assert m.stats == {"rollback_to": 1.0, "rollback_manual": 1.0}
        assert agg.snapshot()["rollbacks"] == {"manual": 1}
        # Devices go on from the new version: an update based on it makes version 5.
        upd = fed.update("dev0", params(0.02), base_version=4, seq=9)
        publish_all(broker.port, [(topics.updates(FED, "dev0"), upd)])
        watcher.wait(lambda m: m.version == 5, 20)
        wait_until(
            lambda: any(e.get("rollback_to") == 1 for e in read_history(tmp_path / "state")),
            10,
            "history entry of the rollback",
        )
    finally:
        agg.stop()
        watcher.close()


def test_a_second_service_on_the_state_directory_is_refused(tmp_path: Path) -> None:
    fed = Federation(tmp_path, SPEC)
    lock = StateLock(tmp_path / "state")
    assert lock.try_acquire()
    try:
        with pytest.raises(FedMQTTError, match="in use by another aggregator"):
            AggregatorThread(fed.config("127.0.0.1", 1)).start()
    finally:
        lock.release()


# --------------------------------------------------------------------------- the gate, live


def test_gate_keeps_a_worse_version_from_the_predictors_and_rolls_back(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """Holdout: class = argmax of the first three features. Version 1 learns it (accuracy 1),
    version 2 unlearns it (accuracy 0): version 2 never reaches the ONNX topic, version 3
    has version 1's parameters and does."""
    rng = np.random.default_rng(0)
    X = rng.normal(0, 1, (300, 4)).astype(np.float32)
    y = X[:, :3].argmax(axis=1)
    np.savez(tmp_path / "holdout.npz", X=X, y=y)
    good = {"W0": np.zeros((4, 3), np.float32), "b0": np.zeros(3, np.float32)}
    good["W0"][:3] = 5 * np.eye(3, dtype=np.float32)
    bad = {"W0": -3 * good["W0"], "b0": good["b0"]}
    fed = Federation(tmp_path, SPEC)
    cfg = fed.config(
        "127.0.0.1",
        broker.port,
        strategy={"buffer_size": 1},
        downlink={"codec": "raw"},
        evaluation={"holdout": "holdout.npz"},
        onnx={"every": 1},
        rollout={"gate": True, "margin": 0.05, "last_k": 2},
    )
    onnx_versions: list[int] = []
    got = threading.Condition()

    def on_connect(c: Any, *a: Any) -> None:
        def on_message(c: Any, u: Any, msg: Any) -> None:
            m = wire.decode(msg.payload, wire.OnnxModel, fed.verifier)
            with got:
                onnx_versions.append(m.version)
                got.notify_all()

        c.on_message = on_message
        c.subscribe(topics.model_onnx(FED), 1)

    sub = client(broker.port, on_connect=on_connect)
    watcher = ModelWatcher(broker.port, fed.verifier)
    agg = AggregatorThread(cfg).start()

    def wait_onnx(v: int) -> None:
        with got:
            assert got.wait_for(lambda: v in onnx_versions, 30), onnx_versions

    try:
        wait_onnx(0)  # the first version judged is the baseline
        publish_all(broker.port, [(topics.updates(FED, "dev0"), fed.update("dev0", good))])
        wait_onnx(1)
        upd = fed.update("dev0", bad, base_version=1, seq=1)
        publish_all(broker.port, [(topics.updates(FED, "dev0"), upd)])
        m = watcher.wait(lambda m: m.version == 3, 30)
        wait_onnx(3)
        assert 2 not in onnx_versions
        assert m.stats == {"rollback_to": 1.0}
        snap = agg.snapshot()
        assert snap["rollbacks"] == {"gate": 1}
        assert snap["released_version"] == 3 and snap["released_score"] == 1.0
        wait_until(
            lambda: (
                [e.get("verdict") for e in read_history(tmp_path / "state")][-2:]
                == ["held: rolled back", "released"]
            ),
            10,
            "history of the gate's verdicts",
        )
    finally:
        agg.stop()
        watcher.close()
        sub.disconnect()
        sub.loop_stop()
    assert json.loads((tmp_path / "state" / "status.json").read_text())["rollbacks"] == {"gate": 1}
    from aggregator.statusfile import format_status, read_status

    text = format_status(read_status(tmp_path / "state"))
    assert "released        version 3 (score 1.0000)" in text and "rollbacks       gate 1" in text


# --------------------------------------------------------------------------- the simulator


def test_attackers_switch_on_at_the_attack_start() -> None:
    import time

    from simulator.behaviour import delta_attack, from_time, label_flip

    delta = {"W0": np.ones((2, 2), np.float32)}
    later = from_time(delta_attack("signflip", seed=0), time.time() + 3600)
    assert later(delta) is delta
    now = from_time(delta_attack("signflip", seed=0), time.time() - 1)
    assert np.array_equal(now(delta)["W0"], -10 * delta["W0"])
    X, y = np.zeros((3, 2), np.float32), np.array([0, 1, 2])
    assert from_time(label_flip(3), time.time() + 3600)(X, y)[1] is y
    assert list(from_time(label_flip(3), time.time() - 1)(X, y)[1]) == [2, 1, 0]


@pytest.mark.slow
def test_gate_keeps_the_released_model_within_3_points_of_the_clean_run(tmp_path: Path) -> None:
    """20 agents on digits IID, FedBuff with no robust aggregation; 30 % sign-flipping
    attackers switch on 12 s into a 30 s run. With the evaluation gate the released model's
    accuracy over the last quarter stays within 3 points of the clean run's; the global model
    itself is wrecked (the attack bites), and the rollbacks are in the JSON and the plot."""
    import io

    from simulator.runner import SimConfig, run_simulation

    base = SimConfig(
        clients=20, partition="iid", compute_time=0.05, duration=30.0, quiet=True, seed=0
    )
    clean = run_simulation(base, out=io.StringIO())
    attacked = run_simulation(
        SimConfig(
            **{
                **base.__dict__,
                "attackers": 0.3,
                "attack_start": 12.0,
                "gate": True,
                "json": tmp_path / "gate.json",
                "plot": tmp_path / "gate.png",
            }
        ),
        out=io.StringIO(),
    )
    assert clean["error"] is None and attacked["error"] is None
    assert 10.0 <= attacked["attack_started_at_s"] <= 14.0
    assert attacked["tail_accuracy"] < clean["tail_accuracy"] - 0.1, attacked["tail_accuracy"]
    assert attacked["tail_released_accuracy"] >= clean["tail_accuracy"] - 0.03, (
        attacked["tail_released_accuracy"],
        clean["tail_accuracy"],
    )
    assert attacked["rollbacks"].get("gate", 0) >= 1
    written = json.loads((tmp_path / "gate.json").read_text())
    after = [p for p in written["history"] if p["t"] > 14.0]
    # The history samples the count as it goes: it only grows, and the last sample may miss
    # a rollback made after it (the summary's count is the final one).
    counts = [p["rollbacks"] for p in written["history"]]
    assert counts == sorted(counts)
    assert after and 1 <= after[-1]["rollbacks"] <= sum(attacked["rollbacks"].values())
    assert all(p["released_accuracy"] is not None for p in after)
    assert (tmp_path / "gate.png").stat().st_size > 10_000
    print(
        "clean tail",
        clean["tail_accuracy"],
        "attacked: global tail",
        attacked["tail_accuracy"],
        "released tail",
        attacked["tail_released_accuracy"],
        "rollbacks",
        attacked["rollbacks"],
    )


def test_without_a_holdout_the_gate_judges_by_enough_device_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service's federated evaluation for the gate: a version's sample-weighted device
    metric once ``[rollout] min_reports`` devices reported on it, None before."""
    fed = Federation(tmp_path, SPEC)
    agg = Aggregator(fed.config("127.0.0.1", 1, rollout={"gate": True, "min_reports": 2}))
    summaries = {
        3: EvalSummary(3, "accuracy", 0.8, 0.5, 1, 40, 0.8, 0.8, {"accuracy": 0.8}),
        4: EvalSummary(4, "accuracy", 0.7, 0.6, 2, 90, 0.6, 0.8, {"accuracy": 0.7}),
    }
    monkeypatch.setattr(agg, "federated_eval", summaries.get)
    score = agg.federated_evaluation()
    assert score is not None
    assert [score(v) for v in (2, 3, 4)] == [None, None, 0.7]
    gate = Gate(agg.cfg.rollout, score, "federated")
    gate.published(3, params(0.3), 0.0, {})
    gate.published(4, params(0.4), 0.0, {})
    verdicts, action = gate.poll()
    assert [v[:2] for v in verdicts] == [(3, "superseded"), (4, "released")], verdicts
    assert isinstance(action, Release) and action.version == 4
