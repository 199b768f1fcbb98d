"""``fedmqtt simulate --server-opt ... --personalise ...`` over a real broker: the aggregator runs
the adaptive optimizer (its state is in the checkpoint) and every agent keeps a personal model."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from aggregator.checkpoint import CheckpointStore
from edge_agent.personal import PersonalStore
from simulator.cli import build_parser
from simulator.runner import FEDERATION, SimConfig, run_simulation


@pytest.mark.requires(
    shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists(), "needs mosquitto"
)
def test_simulate_with_a_server_optimizer_and_personal_models(tmp_path: Path) -> None:
    argv = ["simulate", "--server-opt", "yogi", "--server-lr", "0.02", "--personalise", "finetune"]
    argv += ["--clients", "2", "--dataset", "synthetic", "--versions", "3", "--duration", "30"]
    argv += ["--compute-time", "0.05", "--quiet", "--workdir", str(tmp_path)]
    cfg = SimConfig.from_args(build_parser().parse_args(argv))
    assert (cfg.server_opt, cfg.server_lr, cfg.personalise) == ("yogi", 0.02, "finetune")
    summary = run_simulation(cfg, out=io.StringIO())
    assert summary["error"] is None and summary["versions"] >= 3, summary
    loaded = CheckpointStore(tmp_path / "aggregator" / "checkpoints").load_latest()
    assert loaded is not None
    opt = loaded.state["strategy"]["optimizer"]
    assert opt["optimizer"] == "yogi" and opt["lr"] == 0.02 and opt["steps"] >= 3
    for dev in ("dev0000", "dev0001"):
        pm = PersonalStore(tmp_path / "agents" / dev / "state").load(dev, FEDERATION)
        # Built after the device's last round, whichever version that was (on a loaded
        # machine a device may have trained on version 0 only before the run ended).
        assert pm is not None and pm.mode == "finetune"
        assert 0 <= pm.version <= summary["versions"], pm.version
