"""Cohorts and participation (fedmqtt.cohort): the draw, the selectors, the plan's wire field,
``[plan.selection]``, the aggregator's ``not_selected`` refusal and enrolment tags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_aggregator_support import FED, Federation

from aggregator.cohort import DeviceTags
from aggregator.engine import Engine
from aggregator.metrics import Metrics
from aggregator.publish import plan_digest
from edge_agent.config import AgentConfig
from fedmqtt import topics, wire
from fedmqtt.cohort import (
    EVERYONE,
    TAGS_SUFFIX,
    Selection,
    draw,
    read_tags_file,
    tag_map,
    tags_file_bytes,
)
from fedmqtt.errors import NOT_SELECTED, REASONS, ConfigError, DecodeError
from fedmqtt.models.spec import ModelSpec
from fedmqtt.signing import Ed25519Signer
from fedmqtt.wire import PLAN_DEFAULTS
from simulator.broker import Mosquitto

SPEC = ModelSpec("softmax", 6, 3)


def test_draw_is_deterministic_uniform_and_changes_with_the_window() -> None:
    assert draw("f", "dev1", 3) == draw("f", "dev1", 3)
    assert draw("f", "dev1", 3) != draw("f", "dev1", 4)
    assert draw("f", "dev1", 3) != draw("g", "dev1", 3)
    values = np.array([draw("f", f"dev{i}", 7) for i in range(4000)])
    assert values.min() >= 0.0 and values.max() < 1.0
    assert abs(float((values < 0.3).mean()) - 0.3) < 0.03  # the fraction that trains


def test_participation_selects_about_the_fraction_per_window_and_is_fixed_within_it() -> None:
    sel = Selection(participation=0.3, window=5)
    devices = [f"d{i:03d}" for i in range(1000)]
    chosen = {v: {d for d in devices if sel.trains(FED, d, {}, v)} for v in (0, 4, 5, 9, 10, 50)}
    for v, who in chosen.items():
        assert 0.25 * len(devices) < len(who) < 0.35 * len(devices), v
    assert chosen[0] == chosen[4] and chosen[5] == chosen[9]  # one window, one cohort
    assert chosen[0] != chosen[5] and chosen[5] != chosen[10]
    # Over many windows every device trains about the fraction of the time.
    share = np.mean([sel.trains(FED, "d007", {}, v * 5) for v in range(2000)])
    assert abs(share - 0.3) < 0.04
    assert all(Selection(participation=1.0).trains(FED, d, {}, 3) for d in devices)
    assert not any(Selection(participation=0.0).trains(FED, d, {}, 3) for d in devices)


def test_tag_selectors_and_device_lists() -> None:
    sel = Selection(tags=("site=north", "site=south", "hw=pi4"), devices=("special",))
    assert sel.eligible("a", {"site": "north", "hw": "pi4"})
    assert sel.eligible("a", {"site": "south", "hw": "pi4", "extra": "x"})
    assert not sel.eligible("a", {"site": "east", "hw": "pi4"})  # same key: alternatives
    assert not sel.eligible("a", {"site": "north"})  # different keys: all must match
    assert not sel.eligible("a", {})
    assert sel.eligible("special", {})  # listed devices whatever their tags
    only_listed = Selection(devices=("x", "y"))
    assert only_listed.eligible("x", {"site": "north"}) and not only_listed.eligible("z", {})
    assert Selection().everyone and not sel.everyone
    assert "cohort" in (sel.why_not(FED, "a", {}, 0) or "")
    assert sel.why_not(FED, "special", {}, 0) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"participation": 1.5},
        {"participation": -0.1},
        {"window": 0},
        {"tags": ("site",)},
        {"tags": ("si te=north",)},
        {"tags": ("site=no rth",)},
    ],
)
def test_bad_selections_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Selection(**kwargs)


def test_tags_parse_and_files_round_trip(tmp_path: Path) -> None:
    assert tag_map(["site=north", "hw=pi4"]) == {"site": "north", "hw": "pi4"}
    for bad in (["site"], ["site=north", "site=south"], ["=x"], ["a.b=x"]):
        with pytest.raises(ConfigError):
            tag_map(bad)
    path = tmp_path / f"dev{TAGS_SUFFIX}"
    path.write_bytes(tags_file_bytes({"site": "north"}))
    assert read_tags_file(path) == {"site": "north"}
    assert read_tags_file(tmp_path / "missing.tags") == {}
    path.write_text(json.dumps({"site": 3}))
    with pytest.raises(ConfigError):
        read_tags_file(path)


def test_plan_carries_the_selection_signed_and_old_plans_select_everyone() -> None:
    signer = Ed25519Signer.generate()
    sel = Selection(tags=("site=north",), devices=("d1",), participation=0.25, window=3)
    plan = wire.Plan(FED, "aggregator", 4, selection=sel)
    back = wire.decode(wire.encode(plan, signer), wire.Plan, signer.verifier())
    assert back.selection == sel
    plain = wire.Plan(FED, "aggregator", 4)
    assert "selection" not in plain.to_body()  # as before: an older device reads it as ever
    assert wire.decode(wire.encode(plain, signer), wire.Plan, signer.verifier()).selection == (
        EVERYONE
    )
    for bad in (
        {"tags": "site=north", "devices": [], "participation": 0.5, "window": 1},
        {"tags": [], "devices": [], "participation": 2.0, "window": 1},
        {"tags": [], "devices": [], "participation": 0.5, "window": True},
        {"tags": [], "devices": [], "participation": 0.5},
        "everyone",
    ):
        body = {**plain.to_body(), "selection": bad}
        with pytest.raises(DecodeError) as e:
            wire.decode(wire.seal(body, signer), wire.Plan, signer.verifier())
        assert e.value.reason == "schema"


def test_plan_selection_config_and_digest(tmp_path: Path) -> None:
    fed = Federation(tmp_path, SPEC)
    cfg = fed.config(
        "127.0.0.1",
        1883,
        plan={"selection": {"tags": ["site=north"], "participation": 0.3, "window": 4}},
    )
    assert cfg.plan.selection == Selection(("site=north",), (), 0.3, 4)
    default = fed.config("127.0.0.1", 1883)
    assert default.plan.selection.everyone
    assert plan_digest(default.plan) != plan_digest(cfg.plan)
    # A plan without a selection keeps the digest (and so the revision) it had before.
    assert plan_digest(PLAN_DEFAULTS) == "a30b0108c39d8e22"
    for bad in (
        {"participation": 1.2},
        {"window": 0},
        {"tags": ["site"]},
        {"devices": ["bad id/+"]},
        {"particpation": 0.3},
    ):
        with pytest.raises(ConfigError, match="selection"):
            fed.config("127.0.0.1", 1883, plan={"selection": bad})


def selected_engine(fed: Federation, **selection: Any) -> Engine:
    cfg = fed.config(
        "127.0.0.1",
        1883,
        strategy={"buffer_size": 100, "max_staleness": 50},
        plan={"selection": selection},
    )
    return Engine(cfg, Metrics(FED), keys=None)


def test_engine_refuses_updates_of_devices_not_selected_by_their_base_version(
    tmp_path: Path,
) -> None:
    devices = [f"dev{i}" for i in range(12)]
    fed = Federation(tmp_path, SPEC, devices=devices)
    (tmp_path / "devices" / f"dev0{TAGS_SUFFIX}").write_bytes(tags_file_bytes({"site": "north"}))
    e = selected_engine(fed, participation=0.5, window=2)
    sel = e.cfg.plan.selection
    delta = np.full(SPEC.layout().size, 0.001, np.float32)
    expected = {d: sel.trains(FED, d, {}, 0) for d in devices}
    assert 0 < sum(expected.values()) < len(devices)
    items = [(topics.updates(FED, d), fed.update(d, delta, base_version=0)) for d in devices]
    e.process(items, now=0.0)
    snap = e.metrics.snapshot()
    assert snap["accepted"] == sum(expected.values())
    assert snap["rejected"] == {NOT_SELECTED: len(devices) - sum(expected.values())}
    assert NOT_SELECTED in REASONS

    # Tag selectors read <devices_dir>/<id>.tags.
    e2 = selected_engine(fed, tags=["site=north"])
    items = [(topics.updates(FED, d), fed.update(d, delta)) for d in ("dev0", "dev1")]
    e2.process(items, now=0.0)
    assert e2.metrics.snapshot()["accepted"] == 1
    assert e2.metrics.snapshot()["rejected"] == {NOT_SELECTED: 1}


def test_a_buffer_bigger_than_the_draw_is_applied_once_every_selected_device_is_in(
    tmp_path: Path,
) -> None:
    """A FedBuff buffer of 100 under a selection that lets about half of 12 devices train on
    version 0: waiting for 100 rows would wait for ever, so the buffer is applied when the
    last selected device's update enters it, not before."""
    devices = [f"dev{i}" for i in range(12)]
    fed = Federation(tmp_path, SPEC, devices=devices)
    e = selected_engine(fed, participation=0.5, window=1)
    chosen = [d for d in devices if e.cfg.plan.selection.trains(FED, d, {}, 0)]
    assert 1 < len(chosen) < len(devices)
    delta = np.full(SPEC.layout().size, 0.001, np.float32)
    for i, d in enumerate(chosen):
        assert e.version == 0, f"applied after {i} of {len(chosen)} selected devices"
        e.process([(topics.updates(FED, d), fed.update(d, delta, base_version=0))], now=0.0)
    assert e.version == 1
    assert e.metrics.snapshot()["accepted"] == len(chosen)


def test_device_tags_follow_the_directory(tmp_path: Path) -> None:
    tags = DeviceTags(tmp_path, recheck_s=0.0)
    assert tags.get("a") == {}
    (tmp_path / "a.tags").write_bytes(tags_file_bytes({"hw": "pi4"}))
    (tmp_path / "b.tags").write_text("not json")
    assert tags.get("a") == {"hw": "pi4"}
    assert tags.get("b") == {}  # unusable: logged, treated as no tags


def test_agent_config_reads_tags(tmp_path: Path) -> None:
    raw: dict[str, Any] = {
        "device": {"id": "d1", "federation": FED, "state_dir": "s", "tags": {"site": "north"}},
        "security": {"aggregator_public_key": "a.pub", "update_key": "k"},
        "data": {"source": "npz", "path": "x.npz"},
    }
    assert AgentConfig.from_dict(raw, base_dir=tmp_path).device.tags == {"site": "north"}
    raw["device"]["tags"] = {"site": "no rth"}
    with pytest.raises(ConfigError, match=r"\[device\] tags"):
        AgentConfig.from_dict(raw, base_dir=tmp_path)


def test_enroll_with_tags_writes_agent_toml_registry_and_aggregator_tags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_admin import Env

    from edge_agent.config import load_config

    env = Env(tmp_path)
    out = tmp_path / "bundle"
    args = ("enroll", "dev-1", "--out", str(out), "--tag", "site=north", "--tag", "hw=pi4")
    assert env.run(*args, "--no-reload") == 0
    assert load_config(out / "agent.toml").device.tags == {"hw": "pi4", "site": "north"}
    site = env.site()
    assert site.registry.devices["dev-1"].tags == {"hw": "pi4", "site": "north"}
    devices_dir = Path(site.registry.aggregators_of("demo")[0].devices_dir)
    assert DeviceTags(devices_dir).get("dev-1") == {"hw": "pi4", "site": "north"}
    assert env.run("list") == 0
    assert "tags hw=pi4,site=north" in capsys.readouterr().out
    assert env.run("list", "--json") == 0
    assert json.loads(capsys.readouterr().out)[0]["tags"] == {"hw": "pi4", "site": "north"}
    # Rotation keeps the tags; revocation removes the aggregator's copy with the key.
    assert env.run("rotate", "dev-1", "--out", str(tmp_path / "b2"), "--no-reload") == 0
    assert load_config(tmp_path / "b2" / "agent.toml").device.tags == {
        "hw": "pi4",
        "site": "north",
    }
    assert env.run("revoke", "dev-1", "--no-reload") == 0
    assert not (devices_dir / f"dev-1{TAGS_SUFFIX}").exists()
    bad = ("enroll", "dev-2", "--out", str(tmp_path / "b3"), "--tag", "site", "--no-reload")
    assert env.run(*bad) == 1
    assert "dev-2" not in env.site().registry.devices


def test_agent_trains_only_on_versions_its_plan_selects_it_for(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """A device tagged site=south under a plan that selects site=north receives v1 but does
    not train or upload; the next plan revision selects it and it trains on v1 at once."""
    from test_agent_helpers import AgentThread, FakeAggregator, make_device, wait_until

    from edge_agent.agent import EdgeAgent

    device = make_device(tmp_path / "dev-1")
    agg = FakeAggregator(broker, device.aggregator, {device.device_id: device.key})
    agent = EdgeAgent(device.config(broker, device={"tags": {"site": "south"}}))
    try:
        agg.publish_plan(1, selection=Selection(tags=("site=north",)))
        agg.publish_model(1)
        runner = AgentThread(agent)
        try:
            wait_until(lambda: agent.current_version == 1 and agent.rounds_skipped == 1)
            assert agg.received() == [] and agent.rounds_completed == 0
            agg.publish_plan(2, selection=Selection(tags=("site=south", "site=east")))
            [update] = agg.wait_updates(1)
            assert update.base_version == 1 and agent.rounds_skipped == 1
        finally:
            runner.stop()
    finally:
        agg.close()


def test_a_stale_update_is_judged_by_the_window_of_its_base_version(tmp_path: Path) -> None:
    devices = [f"dev{i}" for i in range(40)]
    fed = Federation(tmp_path, SPEC, devices=devices)
    cfg = fed.config(
        "127.0.0.1",
        1883,
        strategy={"buffer_size": 1, "max_staleness": 50},
        plan={"selection": {"participation": 0.5, "window": 1}},
    )
    e = Engine(cfg, Metrics(FED), keys=None)
    sel = cfg.plan.selection
    delta = np.full(SPEC.layout().size, 0.001, np.float32)
    # Make version 3 with devices selected for the windows of versions 0, 1, 2.
    for v in range(3):
        d = next(d for d in devices if sel.trains(FED, d, {}, v))
        e.process([(topics.updates(FED, d), fed.update(d, delta, base_version=v))], now=0.0)
    assert e.version == 3
    in_0_not_3 = next(
        d for d in devices if sel.trains(FED, d, {}, 0) and not sel.trains(FED, d, {}, 3)
    )
    in_3_not_0 = next(
        d for d in devices if sel.trains(FED, d, {}, 3) and not sel.trains(FED, d, {}, 0)
    )
    before = e.metrics.snapshot()["accepted"]
    e.process([(topics.updates(FED, in_0_not_3), fed.update(in_0_not_3, delta))], now=0.0)
    assert e.metrics.snapshot()["accepted"] == before + 1  # trained on v0, selected for it
    e.process([(topics.updates(FED, in_3_not_0), fed.update(in_3_not_0, delta))], now=0.0)
    assert e.metrics.snapshot()["rejected"] == {NOT_SELECTED: 1}  # selected now, not for v0
