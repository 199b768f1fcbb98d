"""``fl-aggregator`` init / run / status / export-onnx, as an operator runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_aggregator_support import FED, Federation, publish_all, wait_until

from aggregator.cli import main
from fedmqtt import topics
from fedmqtt.models.spec import ModelSpec
from fedmqtt.signing import Ed25519Signer
from simulator.broker import Mosquitto

ROOT = Path(__file__).resolve().parent.parent
SPEC = ModelSpec("softmax", 4, 3)


def federation(tmp_path: Path) -> Federation:
    return Federation(tmp_path, SPEC, signing_key=False)


def write_config(tmp_path: Path, port: int = 1883, **extra: dict[str, object]) -> Path:
    return federation(tmp_path).write_toml(tmp_path / "aggregator.toml", "127.0.0.1", port, **extra)


def test_init_creates_key_state_and_is_idempotent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path)
    assert main(["init", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    key = tmp_path / "aggregator.key"
    assert key.exists() and (key.stat().st_mode & 0o777) == 0o600
    pub = Ed25519Signer.load(key).verifier().public_hex()
    assert pub in out and (tmp_path / "aggregator.pub").read_text().strip() == pub
    assert (tmp_path / "state" / "checkpoints" / "state-000000000000.ckpt").exists()
    assert main(["init", "--config", str(cfg)]) == 0
    assert "(kept)" in capsys.readouterr().out
    assert Ed25519Signer.load(key).verifier().public_hex() == pub
    # status before the service ever ran: a clear error, not a traceback
    assert main(["status", "--config", str(cfg)]) == 1
    assert "has not run yet" in capsys.readouterr().err


def test_config_errors_exit_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, strategy={"name": "fedsgd"})
    assert main(["run", "--config", str(cfg)]) == 78
    assert "[strategy] name" in capsys.readouterr().err
    assert main(["status", "--config", str(tmp_path / "missing.toml")]) == 78


@pytest.mark.parametrize("mode", [0o640, 0o604])
def test_run_refuses_a_password_file_group_or_others_can_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int
) -> None:
    pw = tmp_path / "broker.password"
    pw.write_text("s3cret\n")
    pw.chmod(mode)
    cfg = write_config(tmp_path, broker={"username": "aggregator", "password_file": str(pw)})
    assert main(["init", "--config", str(cfg)]) == 0
    cpus = os.sched_getaffinity(0)
    assert main(["run", "--config", str(cfg)]) == 78
    err = capsys.readouterr().err
    assert f"{pw} is readable by group/others (mode {mode:o}); run: chmod 600 {pw}" in err
    # The service pinned this thread to one CPU while it ran ([scaleout] pin_cpu) and gave the
    # caller its CPUs back when it ended.
    assert os.sched_getaffinity(0) == cpus


def test_init_and_run_refuse_a_changed_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path)
    assert main(["init", "--config", str(cfg)]) == 0
    text = cfg.read_text().replace("n_features = 4", "n_features = 5")
    cfg.write_text(text)
    assert main(["init", "--config", str(cfg)]) == 78
    assert "differs from the checkpointed model" in capsys.readouterr().err
    # The service opens its state the same way, before it connects to any broker.
    assert main(["run", "--config", str(cfg)]) == 78
    assert "differs from the checkpointed model" in capsys.readouterr().err


def test_run_status_and_export_onnx(
    broker: Mosquitto, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnx

    fed = federation(tmp_path)
    cfg = fed.write_toml(
        tmp_path / "aggregator.toml", "127.0.0.1", broker.port, strategy={"buffer_size": 2}
    )
    assert main(["init", "--config", str(cfg)]) == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "aggregator", "run", "--config", str(cfg)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    state = tmp_path / "state"
    try:
        wait_until(
            lambda: (
                (state / "status.json").exists()
                and json.loads((state / "status.json").read_text())["connected"]
            ),
            20,
            "run",
        )
        import numpy as np

        publish_all(
            broker.port,
            [
                (
                    topics.updates(FED, "dev0"),
                    fed.update("dev0", np.full(SPEC.layout().size, 0.01, np.float32), seq=i),
                )
                for i in range(2)
            ],
        )
        wait_until(
            lambda: json.loads((state / "status.json").read_text())["version"] == 1, 10, "version 1"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    capsys.readouterr()
    assert main(["status", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "model version   1" in out and "state           stopped" in out
    assert "accepted 2" in out
    assert main(["status", "--config", str(cfg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accepted"] == 2
    out_file = tmp_path / "model.onnx"
    assert main(["export-onnx", "--config", str(cfg), "--out", str(out_file)]) == 0
    model = onnx.load(str(out_file))
    meta = {p.key: p.value for p in model.metadata_props}
    assert any(v == "1" for k, v in meta.items() if "version" in k), meta


def test_an_aggregator_without_plan_publishes_what_a_device_without_plan_uses(
    tmp_path: Path,
) -> None:
    """The plan's defaults are wire.PLAN_DEFAULTS for both sides: the [plan] the aggregator
    reads from a config without it, the plan it publishes, and a device's settings before any
    plan arrived."""
    from dataclasses import asdict, fields

    from aggregator.publish import plan_payload
    from edge_agent.config import TrainingConfig
    from edge_agent.trainer import resolve_hyper
    from fedmqtt import wire

    cfg = federation(tmp_path).config("127.0.0.1", 1883)
    assert "plan" not in federation(tmp_path).raw_config("127.0.0.1", 1883)
    assert asdict(cfg.plan) == asdict(wire.PLAN_DEFAULTS)
    signer = Ed25519Signer.generate()
    sent = wire.decode(plan_payload(cfg, signer, 1), wire.Plan, signer.verifier())
    names = [f.name for f in fields(wire.PlanSettings)]
    assert {n: getattr(sent, n) for n in names} == {
        n: getattr(wire.PLAN_DEFAULTS, n) for n in names
    }
    device = resolve_hyper(None, TrainingConfig())
    assert str(device.codec) == wire.PLAN_DEFAULTS.codec
    trained = ("epochs", "lr", "batch_size", "momentum", "mu")
    assert {n: getattr(device.train, n) for n in trained} == {
        n: getattr(wire.PLAN_DEFAULTS, n) for n in trained
    }
