"""The full path over TLS with the production broker config: an enrolled agent's update is applied.

The site is built exactly as an operator builds it (``fedmqtt-admin`` CA, broker certificate,
password-identity broker config, aggregator set-up, device enrollment), then the real aggregator
and the real agent run with the files ``fedmqtt-admin`` produced: the agent's ``agent.toml``
from its enrollment bundle (only ``[data]`` and the state directory filled in, as the device's
owner would), the aggregator's ``aggregator.toml`` with a model added.
"""

from __future__ import annotations

import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_broker_security import FED, Site, running_site

from aggregator.config import load_config as load_aggregator_config
from aggregator.service import AggregatorThread
from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from fedmqtt.admin import tomlconf
from simulator import datasets

MODEL = """
[model]
kind = "softmax"
n_features = 64
n_outputs = 10
feature_scale = {scale}
seed = 0

[strategy]
name = "fedbuff"
buffer_size = 1

[evaluation]
holdout = "{holdout}"
"""


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with running_site("password") as s:
        yield s


def test_enrolled_agent_update_is_applied_over_tls(site: Site, tmp_path: Path) -> None:
    ds = datasets.load("digits", seed=0)
    np.savez(tmp_path / "holdout.npz", X=ds.X_test, y=ds.y_test)
    agg_toml = site.base / "agg" / "aggregator.toml"
    agg_toml.write_text(
        agg_toml.read_text() + MODEL.format(holdout=tmp_path / "holdout.npz", scale=[1 / 16] * 64)
    )
    agg = AggregatorThread(load_aggregator_config(agg_toml)).start()

    bundle = site.bundles / "dev-a"
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "shard.npz", X=ds.X_train[:300], y=ds.y_train[:300])
    raw = tomllib.loads((bundle / "agent.toml").read_text())
    assert raw["broker"]["tls"] is True and raw["broker"]["port"] == site.broker.port
    # The bundle's files go to /etc/fedmqtt-agent/ on a device; here they stay in the bundle.
    for table in raw.values():
        for key, value in table.items():
            if isinstance(value, str) and value.startswith("/etc/fedmqtt-agent/"):
                table[key] = str(bundle / value.removeprefix("/etc/fedmqtt-agent/"))
    raw["broker"]["host"] = "127.0.0.1"  # the broker certificate names broker.test and loopback
    raw["data"] = {"source": "npz", "path": str(data)}
    raw["device"]["state_dir"] = str(tmp_path / "state")
    (bundle / "agent.toml").write_text(tomlconf.dumps(raw, "# filled in by the test"))
    agent = EdgeAgent(
        AgentConfig.from_dict(tomllib.loads((bundle / "agent.toml").read_text()), base_dir=bundle)
    )
    stop = threading.Event()
    t = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    t.start()
    try:
        assert agg.wait_for(lambda s: s["accepted"] >= 1 and s["version"] >= 1, timeout=60), (
            agg.snapshot()
        )
        snap = agg.snapshot()
        assert snap["rejected"] == {}
        assert snap["federation"] == FED
        assert agent.updates_sent >= 1
        assert agent.rejected_models == {}
    finally:
        stop.set()
        t.join(15)
        agg.stop()
