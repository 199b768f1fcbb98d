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
from test_aggregator_support import wait_until
from test_broker_security import FED, Site, running_site

from aggregator.config import load_config as load_aggregator_config
from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from simulator import datasets
from simulator.aggregator_thread import AggregatorThread


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with running_site("password") as s:
        yield s


def test_enrolled_agent_update_is_applied_over_tls(site: Site, tmp_path: Path) -> None:
    ds = datasets.load("digits", seed=0)
    np.savez(tmp_path / "holdout.npz", X=ds.X_test, y=ds.y_test)
    agg_toml = site.add_model(tmp_path / "holdout.npz")
    agg = AggregatorThread(load_aggregator_config(agg_toml)).start()

    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "shard.npz", X=ds.X_train[:300], y=ds.y_train[:300])
    agent_toml = site.agent_config("dev-a", data, tmp_path / "state")
    agent = EdgeAgent(
        AgentConfig.from_dict(tomllib.loads(agent_toml.read_text()), base_dir=agent_toml.parent)
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
        # The broker's PUBACK reaches the agent once the version holding the update is
        # checkpointed, just after the aggregator counts it as accepted.
        wait_until(lambda: agent.updates_sent >= 1, 30, "the agent's PUBACK")
        assert agent.rejected_models == {}
    finally:
        stop.set()
        t.join(15)
        agg.stop()
