"""When a device that is ready again at once listens to the announcements again
(edge_agent.relisten): the arithmetic, without a broker (the live behaviour is in
tests/test_agent_readiness.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_agent_helpers import global_model, make_device

from edge_agent.agent import EdgeAgent
from edge_agent.relisten import Relisten
from fedmqtt.readiness import RELISTEN_LEAD_FACTOR, RELISTEN_MIN_LEAD_S


def measured(
    latencies: list[float], train_s: float | None, versions: tuple[int, ...] = (1, 3, 5)
) -> Relisten:
    """Subscriptions answered after ``latencies``, a round of ``train_s``, rounds on
    ``versions`` (two versions per round by default)."""
    r = Relisten()
    for v in versions:
        r.round_on(v)
    t = 100.0
    for lat in latencies:
        r.subscribed(t)
        r.heard(t + lat)
        r.heard(t + lat + 0.5)  # a later announcement measures nothing
        t += 10.0
    if train_s is not None:
        r.trained(train_s)
    return r


def test_nothing_measured_means_listening_throughout() -> None:
    assert not Relisten().active(1.0) and Relisten().at(5.0, 1.0) is None
    assert measured([0.01], None).at(5.0, 1.0) is None  # no round trained yet
    assert measured([], 0.5).at(5.0, 1.0) is None  # no subscription answered yet


def test_listens_again_the_lead_before_training_ends_or_the_interval_passes() -> None:
    r = measured([0.04, 0.05, 0.06], 0.5)
    lead = RELISTEN_LEAD_FACTOR * 0.05  # the median latency
    assert r.lead() == pytest.approx(lead)
    assert r.active(0.0)
    assert r.at(10.0, 0.0) == pytest.approx(10.0 + 0.5 - lead)  # training is the longer
    assert r.at(10.0, 2.0) == pytest.approx(10.0 + 2.0 - lead)  # the interval is


def test_the_lead_follows_the_median_not_one_slow_answer() -> None:
    r = measured([0.01, 0.01, 2.0], 0.5)
    assert r.lead() == pytest.approx(max(RELISTEN_MIN_LEAD_S, RELISTEN_LEAD_FACTOR * 0.01))


def test_a_floor_under_the_lead_and_rounds_under_twice_it_listen_throughout() -> None:
    r = measured([0.0001], RELISTEN_MIN_LEAD_S * 1.9)
    assert r.lead() == RELISTEN_MIN_LEAD_S
    assert not r.active(0.0) and r.at(1.0, 0.0) is None
    assert r.active(RELISTEN_MIN_LEAD_S * 2)  # a long enough interval makes up for it
    r.trained(RELISTEN_MIN_LEAD_S * 3)
    assert r.active(0.0) and r.at(1.0, 0.0) == pytest.approx(1.0 + 2 * RELISTEN_MIN_LEAD_S)


def test_one_version_per_round_listens_throughout() -> None:
    """Rounds on consecutive versions (a buffer of every device): listening throughout hears
    the one announcement per round the device needs; listening again would add the retained
    one of the version it holds."""
    assert not measured([0.04], 0.5, versions=(1, 2, 3, 4)).active(0.0)
    assert measured([0.04], 0.5, versions=(1, 2, 4, 6)).active(0.0)  # median advance 2
    assert not measured([0.04], 0.5, versions=(7,)).active(0.0)  # no advance measured yet
    assert not measured([0.04], 0.5, versions=()).at(1.0, 0.0)


def test_a_version_not_newer_measures_no_advance() -> None:
    r = measured([0.04], 0.5, versions=(1, 3))
    assert r.active(0.0)
    for v in (3, 3, 2):  # retraining the same version, then a rollback
        r.round_on(v)
    assert r.active(0.0)  # still the one advance of 2
    r.round_on(3)
    r.round_on(4)
    assert not r.active(0.0)  # advances 2, 1, 1: median 1


def test_only_the_first_announcement_after_a_subscription_measures() -> None:
    r = Relisten()
    r.heard(1.0)  # not subscribed: nothing measured
    r.subscribed(2.0)
    r.unsubscribed()
    r.heard(3.0)  # after unsubscribing: nothing measured
    assert r.lead() is None
    r.subscribed(4.0)
    r.heard(4.1)
    assert r.lead() == pytest.approx(max(RELISTEN_MIN_LEAD_S, RELISTEN_LEAD_FACTOR * 0.1))


def test_when_an_agent_paced_by_its_interval_listens(tmp_path: Path) -> None:
    """The agent's rule (no broker needed): from the lead before its next round, unless it
    already knows of a newer version it will fetch; throughout until it has measured."""
    device = make_device(tmp_path / "dev-1")
    training = {"interval_s": 5.0, "max_updates_per_version": 0, "fast_repeat_s": 10.0}
    agent = EdgeAgent(device.config(None, training=training))
    agent.model = global_model(3)
    agent.state.last_round_at = time.time()
    assert agent._listens_throughout() and agent._ready()  # nothing measured yet
    agent._relisten = measured([0.02], 0.01)  # lead max(2 x 0.02, floor) = 0.04 s
    assert not agent._listens_throughout()
    assert not agent._ready()  # due in ~5 s: not yet
    agent.state.last_round_at = time.time() - 4.98
    assert agent._ready()  # due within the lead
    agent.announced = 4
    assert not agent._ready()  # a newer version is known: the fetch brings the newest
    agent._fetch_not_before = time.monotonic() + 10.0
    assert agent._ready()  # ... unless no fetch is due (a retry delay): it keeps listening
