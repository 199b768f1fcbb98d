"""The ``fedmqtt`` console command (``simulator/cli.py``): installed, parsed, run for real.

The command lives with the simulator it drives; the core must not import it (the layer contracts
in pyproject.toml, checked by scripts/check). These tests run the installed console script as a
user would, against the Mosquitto it starts itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import simulator.cli
from simulator.cli import main

FEDMQTT = Path(sys.executable).parent / "fedmqtt"
needs_mosquitto = pytest.mark.requires(
    shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists(), "needs mosquitto"
)


def test_console_command_points_at_the_simulator_cli() -> None:
    (ep,) = entry_points(group="console_scripts", name="fedmqtt")
    assert ep.value == "simulator.cli:main"
    assert ep.load() is simulator.cli.main
    assert FEDMQTT.exists(), "the console script is not installed: run scripts/setup dev"


def test_help_lists_simulate_and_demo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "simulate" in out
    assert "demo" in out


def test_a_fraction_outside_0_1_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["simulate", "--stragglers", "1.5"])
    assert e.value.code == 2
    assert "must be a fraction between 0 and 1" in capsys.readouterr().err


@needs_mosquitto
def test_simulate_runs_a_federation_through_the_console_command(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    args = ["simulate", "--clients", "2", "--dataset", "synthetic", "--model", "linear"]
    args += ["--duration", "4", "--compute-time", "0.05", "--quiet"]
    args += ["--workdir", str(tmp_path / "work"), "--json", str(out)]
    r = subprocess.run(
        [str(FEDMQTT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    s = json.loads(out.read_text())
    assert s["error"] is None
    assert s["agents"] == 2
    assert s["updates_accepted"] >= 2, s
    assert s["versions"] >= 1, s
    assert s["updates_rejected"] == {}, s


@needs_mosquitto
def test_demo_ends_with_onnx_predictions_on_a_device(tmp_path: Path) -> None:
    r = subprocess.run(
        [str(FEDMQTT), "demo", "--duration", "5", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "onnxruntime runs global version" in r.stdout
    assert "accuracy on all 359 held-out digits" in r.stdout
