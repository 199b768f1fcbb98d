"""A device that trains on every version listens to its keyframe's delta topic in place of the
announcements: each new version arrives as its delta, pushed once, with no announcement and
no fetch; a forged pushed delta, a refused one and a dropped keyframe send it back to the
announcements (and, as before, to the full model or the newest keyframe); a device that
skips versions keeps the announcements."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from test_agent_helpers import (
    SPEC,
    AgentThread,
    Device,
    make_device,
    spec_payload,
    wait_until,
)
from test_aggregator_support import Federation
from test_delta_support import DeltaSite, walk

from aggregator.engine import Snapshot
from aggregator.keyframes import KeyframeStore, delta_payload, prepare
from edge_agent.agent import EdgeAgent
from edge_agent.relisten import Relisten
from fedmqtt import topics, wire
from fedmqtt.models import init_params
from fedmqtt.signing import Ed25519Signer
from simulator.broker import Mosquitto
from simulator.runner import SimConfig, run_simulation

pytestmark = pytest.mark.timeout(90)
LAYOUT = SPEC.layout()


def _watching(site: DeltaSite, device: Device, broker: Mosquitto) -> tuple[EdgeAgent, AgentThread]:
    """Start ``device`` on keyframe v1 (fetched in full, announcements listened to) and bring
    it to watch delta/1: v1 then v2 is one version per round, so v2 is fetched by watching."""
    site.agg.publish_spec()
    site.release(1)
    agent = EdgeAgent(device.config(broker))
    runner = AgentThread(agent)
    try:
        assert site.agg.wait_updates(1)[0].base_version == 1
        assert agent._delta_watch is None
        site.release(2)
        assert site.agg.wait_updates(2)[1].base_version == 2
        assert agent._delta_watch == topics.delta(site.fed, 1)
    except BaseException:
        runner.stop()
        raise
    return agent, runner


def _params(agent: EdgeAgent) -> bytes:
    assert agent.model is not None
    return LAYOUT.flatten(agent.model.params).tobytes()


def test_a_device_training_on_every_version_gets_each_as_one_pushed_delta(
    broker: Mosquitto, tmp_path: Path
) -> None:
    device = make_device(tmp_path / "dev-1")
    site = DeltaSite(tmp_path, broker, device)
    agg, fed = site.agg, site.fed
    try:
        agent, runner = _watching(site, device, broker)
        try:
            announces, fetches = agent.received["announce"], agent.fetches
            deltas = agent.received["delta"]
            for v in (3, 4, 5, 6):
                sent = site.release(v)
                assert agg.wait_updates(v)[v - 1].base_version == v
                assert _params(agent) == sent  # trained on what the aggregator sent
            # four versions: four deltas pushed, no announcement, no fetch
            assert agent.received["announce"] == announces
            assert agent.fetches == fetches
            assert agent.received["delta"] == deltas + 4
            assert agent.rejected == {}

            # A forged delta pushed: refused (counted), the watch ends; the announcement
            # leads to a fetch of the same delta (refused again), then the full model.
            forged, _ = delta_payload(
                site.cfg(), Ed25519Signer.generate(), site.snaps[6], site.store.frames[1]
            )
            site.release(7, delta=forged)
            assert agg.wait_updates(7)[6].base_version == 7
            assert agent.rejected["delta/signature"] == 2
            assert agent.received["model"] == 2  # keyframe v1 and the full v7
            # the next version is fetched by watching delta/1 again, the one after is pushed
            for v in (8, 9):
                sent = site.release(v)
                assert agg.wait_updates(v)[v - 1].base_version == v
                assert _params(agent) == sent
            assert agent._delta_watch == topics.delta(fed, 1)
            announces = agent.received["announce"]

            # Keyframe v1 dropped (its delta topic cleared) while watched: back to the
            # announcements (not a refusal); v10, a keyframe listed alone, is fetched in full.
            agg.publish(topics.delta(fed, 1), b"")
            wait_until(lambda: agent._keyframe_dropped == 1 and agent._delta_watch is None)
            assert agent.rejected == {"delta/signature": 2}
            site.release(10, keyframe_every=1, keyframes=(10,))
            assert agg.wait_updates(10)[9].base_version == 10
            assert agent.keyframe is not None and agent.keyframe.version == 10
            assert agent.received["announce"] > announces
            assert agent.received["model"] == 3
        finally:
            runner.stop()
    finally:
        agg.close()


def test_a_watching_device_that_was_away_gets_no_delta_queued_for_it(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """The session is persistent: a delta topic watched at QoS 1 would have the broker queue
    every delta published while the device is away. At QoS 0 (as the announcements) it
    finds, when it is back, only what it asks for: the newest version, once."""
    device = make_device(tmp_path / "dev-1")
    site = DeltaSite(tmp_path, broker, device)
    agg = site.agg
    try:
        _, runner = _watching(site, device, broker)
        runner.stop()
        for v in (3, 4, 5, 6):  # published while the device is away
            sent = site.release(v)
        agent = EdgeAgent(device.config(broker))  # the same client id: the session resumes
        runner = AgentThread(agent)
        try:
            assert agg.wait_updates(3)[2].base_version == 6
            assert _params(agent) == sent
            assert agent.received["delta"] == 1, agent.received
        finally:
            runner.stop()
    finally:
        agg.close()


def test_the_delta_topic_is_watched_only_while_the_device_trains_on_every_version(
    tmp_path: Path,
) -> None:
    device = make_device(tmp_path / "dev-1")
    site_cfg = Federation(tmp_path / "agg", SPEC).config(
        "127.0.0.1", 1, downlink={"delta": "topk:0.1+zlib"}
    )
    store = KeyframeStore(tmp_path / "kf", keep=3)
    signer = device.aggregator
    params = LAYOUT.flatten(init_params(SPEC, np.random.default_rng(0)))
    snap = Snapshot(1, 1, b"", params, {"loss": 0.5}, 1000.0)
    rel = prepare(site_cfg, signer, store, snap)
    assert rel.keyframe is not None
    agent = EdgeAgent(device.config(None))  # never connected
    agent._accept_spec(spec_payload(signer))
    agent._accept_model(rel.keyframe)
    agent.announced, agent.announced_keyframes = 1, (1,)
    agent._last_round_s = 0.01  # ready again at once: listens throughout
    delta1 = topics.delta(agent.federation, 1)
    assert agent._delta_watch_topic() is None  # no round yet
    agent._relisten.round_on(0)
    assert agent._delta_watch_topic() == delta1  # its next round, on v1, advances by one
    agent.announced = 2
    assert agent._delta_watch_topic() is None  # ... by two
    agent.announced = 1
    for v in (1, 2, 3):
        agent._relisten.round_on(v)
    assert agent._delta_watch_topic() == delta1
    agent.announced_keyframes = (5,)  # the newest announcement no longer lists keyframe 1
    assert agent._delta_watch_topic() is None
    agent.announced_keyframes = (1,)
    agent._delta_failed = 1  # the delta to the version announced failed: the full model
    assert agent._delta_watch_topic() is None
    agent._delta_failed = None
    agent._keyframe_dropped = 1
    assert agent._delta_watch_topic() is None
    agent._keyframe_dropped = None
    for v in (5, 7, 9):  # two versions per round: announcements cost less
        agent._relisten.round_on(v)
    assert agent._delta_watch_topic() is None


def test_the_announcement_before_a_pushed_version_is_heard_not_refused(tmp_path: Path) -> None:
    """A delta is published before its announcement: a device that ends its watch right after
    a pushed version hears the retained announcement of the version before it. That is not a
    replay (nothing is refused); an announcement older than one heard still is."""
    device = make_device(tmp_path / "dev-1")
    cfg = Federation(tmp_path / "agg", SPEC).config(
        "127.0.0.1", 1, downlink={"delta": "topk:0.1+zlib"}
    )
    signer = device.aggregator
    store = KeyframeStore(tmp_path / "kf", keep=3)
    releases = [prepare(cfg, signer, store, snap) for snap in walk(3)]
    assert releases[0].keyframe is not None
    agent = EdgeAgent(device.config(None))  # never connected
    fed = agent.federation
    agent._accept_spec(spec_payload(signer))
    agent._accept_model(releases[0].keyframe)

    def announce(v: int) -> bytes:
        return wire.encode(wire.Announce(fed, "aggregator", v, "", 1.0, (1,)), signer)

    agent._accept_announce(announce(2))
    agent._delta_watch = topics.delta(fed, 1)  # watching it, as from a fetch of it on
    agent._accept_pushed_delta(topics.delta(fed, 1), 1, releases[2].deltas[1])
    assert agent.current_version == 3 and agent.announced == 3
    agent._accept_announce(announce(2))
    assert agent.rejected == {}
    agent._accept_announce(announce(1))
    assert agent.rejected == {"announce/old_version": 1}


def test_one_version_per_round_is_the_median_advance() -> None:
    r = Relisten()
    assert not r.one_per_round() and not r.one_per_round(1)
    r.round_on(1)
    assert not r.one_per_round()
    assert r.one_per_round(2) and not r.one_per_round(3)  # the round on the version announced
    for v in (2, 3, 5):
        r.round_on(v)
    assert r.one_per_round()  # advances 1, 1, 2
    assert r.one_per_round(5)  # not newer than the last round's: not an advance
    r.round_on(7)
    assert not r.one_per_round()  # 1, 1, 2, 2: median 1.5
    assert r.one_per_round(8)  # 1, 1, 2, 2, 1


def test_a_buffer_of_every_device_sends_each_version_once_without_announcements(
    tmp_path: Path,
) -> None:
    """The real aggregator, broker and agents with a buffer of every device: after their
    first rounds the devices get each version as one delta and no announcement."""
    cfg = SimConfig(
        clients=4,
        buffer_size=4,
        duration=120.0,  # a cap only: the run ends at version 16
        versions=16,
        compute_time=0.05,
        quiet=True,
        workdir=tmp_path,
        codec="int4+zlib",
        downlink_codec="int8",
        downlink_delta="int4+zlib",
    )
    s = run_simulation(cfg, out=io.StringIO())
    assert s["error"] is None and s["versions"] >= 16, s
    assert s["updates_lost"] == [] and s["updates_accepted_twice"] == []
    assert s["rejected_by_agents"] == {}, s["rejected_by_agents"]
    # 4 devices x 16 versions: a fetch (and the announcement before it) only for the first
    # rounds of each device, until it has measured one version per round; every later
    # version is pushed to it as its delta. An announcement is ~1/4 of a delta here.
    assert s["rounds_by_agents"] >= 4 * 15, s["rounds_by_agents"]
    assert s["model_fetches_by_agents"] <= 4 * 4, s["model_fetches_by_agents"]
    down = s["bytes_downloaded_by_kind"]
    assert down["announce"] < 0.1 * down["delta"], down
