"""``fedmqtt simulate --model autoencoder``: the autoencoder federation from the console
command, over a real Mosquitto, with its JSON report next to the central references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulator.cli import main


def test_simulate_autoencoder_reports_federated_and_central_quality(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ae.json"
    argv = ["simulate", "--model", "autoencoder", "--dataset", "breast_cancer"]
    argv += ["--clients", "3", "--partition", "iid", "--versions", "8", "--duration", "60"]
    argv += ["--epochs", "5", "--lr", "0.03", "--hidden", "16", "--bottleneck", "4"]
    argv += ["--quantile", "0.95", "--codec", "raw", "--json", str(out), "--seed", "1"]
    assert main(argv) == 0
    row = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == row
    assert row["dataset"] == "breast_cancer" and row["split"] == "iid"
    assert row["versions"] >= 8 and sum(row["shard_sizes"]) > 200
    assert row["model"] == {"kind": "autoencoder", "hidden": 16, "bottleneck": 4, "quantile": 0.95}
    assert row["plan"]["epochs"] == 5 and row["plan"]["codec"] == "raw"
    # 8 versions x 5 epochs / 3 devices: the central reference's sequential SGD steps.
    assert row["central_epochs"] == round(row["versions"] * 5 / 3)
    for model in ("federated", "federated_at_final_quantile", "central_ae", "isolation_forest"):
        m = row[model]
        assert set(m) == {"auroc", "f1", "false_alarms", "recall"}
        # Malignant tumours are far from benign ones: every model separates them.
        assert m["auroc"] > 0.75, (model, row)
    # The federated threshold is the devices' pooled 0.95 quantile: near that false-alarm rate
    # on held-out normal samples, and it catches anomalies.
    fed = row["federated"]
    assert 0.0 < fed["false_alarms"] < 0.2 and fed["recall"] > 0.3, row
    assert row["thresholds"]["federated"] > 0 and row["thresholds"]["final_quantile"] > 0
    assert len(row["report_versions"]) == 3 and max(row["report_versions"]) < row["versions"]
    assert row["auroc_gap"] == pytest.approx(row["central_ae"]["auroc"] - fed["auroc"], abs=1e-3)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dataset", "wine"], "needs --dataset breast_cancer | digits | sensors"),
        (["--dataset", "digits", "--attackers", "0.2"], "--attackers is not supported"),
        (["--dataset", "digits", "--strategy", "fedavg"], "fedbuff or fedasync"),
    ],
)
def test_simulate_autoencoder_refuses_what_it_does_not_do(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--model", "autoencoder", *extra]) == 2
    assert message in capsys.readouterr().err


def test_sensors_data_set_needs_the_autoencoder(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--dataset", "sensors"]) == 2
    assert "--dataset sensors needs --model autoencoder" in capsys.readouterr().err
