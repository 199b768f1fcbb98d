"""Two federations on one broker, kept apart by the ACL that fedmqtt-admin renders.

One site as an operator builds it (``ca init``, ``broker-cert``, ``broker-config``, then
``aggregator-setup`` for federations alpha and beta and ``enroll --federation``), served by a
real Mosquitto with the production config (password identity, and client certificates), over
TLS with MQTT 5. Each federation's aggregator has published a retained model, ONNX export and
plan. One behaviour per test; the reason codes are paho's, asserted exactly.

Subscriptions: Mosquitto 2.0 (2.0.11 here; still so in 2.0.20, src/security_default.c, "FIXME
- implement ACL subscription strings") does not check a SUBSCRIBE against ``acl_file``. It
answers every subscription *Granted QoS 1* and applies the ACL to each message it would
deliver, retained ones included. So a SUBACK 0x87 cannot be had from an ACL file; what the tests
assert is that SUBACK and that not one message of the other federation is delivered: after the
forbidden subscription (and any forbidden publish), a message of the client's own federation
is published afresh; Mosquitto delivers to one client in order, so anything forbidden would
have arrived before that barrier.

Because subscriptions are granted, a device that joins the aggregator's shared-subscription
group takes a share of its updates, which the ACL then drops: the group ``aggregator-setup``
writes is secret, and a positive control shows the loss with the public default group.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from test_broker_security import (
    AGGREGATOR_TOML,
    Client,
    Site,
    aggregator_credentials,
    broker_steps,
    start_site,
)

from aggregator.config import AggregatorConfig
from fedmqtt import topics
from fedmqtt.admin.registry import Registry
from simulator.broker import free_port

ALPHA, BETA = "alpha", "beta"
DEVICES = {ALPHA: ("a1", "a2", "a-mover", "a-rotated"), BETA: ("b1",)}
HOME = {"a1": ALPHA, "b1": BETA}  # the devices the tests connect as, by federation
OTHER = {ALPHA: BETA, BETA: ALPHA}

GRANTED_QOS_1 = ReasonCode(PacketTypes.SUBACK, "Granted QoS 1")
SUCCESS = ReasonCode(PacketTypes.PUBACK, "Success")
NO_MATCHING_SUBSCRIBERS = ReasonCode(PacketTypes.PUBACK, "No matching subscribers")
NOT_AUTHORIZED = ReasonCode(PacketTypes.PUBACK, "Not authorized")
CONNACK_NOT_AUTHORIZED = ReasonCode(PacketTypes.CONNACK, "Not authorized")


def retained(fed: str) -> dict[str, bytes]:
    """What the federation's aggregator left retained when the site was built."""
    return {
        topics.model(fed): f"MODEL-{fed}".encode(),
        topics.model_onnx(fed): f"ONNX-{fed}".encode(),
        topics.keyframe(fed): f"KEYFRAME-{fed}".encode(),
        topics.delta(fed, 3): f"DELTA-3-{fed}".encode(),
        topics.plan(fed): f"PLAN-{fed}".encode(),
    }


def agg_user(fed: str) -> str:
    return f"agg-{fed}"


def aggregator(site: Site, fed: str) -> Client:
    d = site.base / agg_user(fed)
    if site.identity == "password":
        pw = (d / "broker.password").read_text().strip()
        return site.client(ca=d / "ca.crt", username=agg_user(fed), password=pw)
    return site.client(ca=d / "ca.crt", cert=d / "client.crt", key=d / "client.key")


def connected(client: Client) -> Client:
    assert client.connect() == 0
    return client


def scaleout_group(site: Site, fed: str) -> str:
    """The shared-subscription group the federation's aggregator would run its workers with:
    its aggregator.toml as ``aggregator-setup`` left it, read by the aggregator's own loader."""
    d = site.base / agg_user(fed)
    raw = tomllib.loads((d / "aggregator.toml").read_text())
    raw["model"] = {"kind": "softmax", "n_features": 4, "n_outputs": 2}
    raw["scaleout"]["workers"] = 1
    return AggregatorConfig.from_dict(raw, base_dir=d).scaleout.group


def listening(site: Site, fed: str, group: str | None = None) -> Client:
    """The federation's aggregator, subscribed to its updates as its workers do."""
    agg = connected(aggregator(site, fed))
    shared = topics.shared_updates_filter(group or scaleout_group(site, fed), fed)
    assert agg.subscribe(shared) == GRANTED_QOS_1
    return agg


def barrier(site: Site, reader: Client, fed: str) -> list[tuple[str, bytes]]:
    """Everything device ``reader`` of ``fed`` receives before a fresh message that ``fed``'s
    aggregator publishes on its plan topic now. Mosquitto delivers to one client in order, so
    whatever it queued for ``reader`` earlier (retained messages of its subscriptions, messages
    published before) is in the list, which ends with the retained plan (subscribing to the
    plan again delivers it)."""
    plan = topics.plan(fed)
    assert reader.subscribe(plan) == GRANTED_QOS_1
    marker = f"barrier-{uuid.uuid4().hex}".encode()
    assert connected(aggregator(site, fed)).publish(plan, marker) == SUCCESS
    return reader.wait_for(plan, marker)[:-1]


def update_barrier(site: Site, reader: Client, fed: str) -> list[tuple[str, bytes]]:
    """:func:`barrier` for an aggregator ``reader`` (a second connection of its account would
    take its session over): the fresh message is an update of one of ``fed``'s devices."""
    device = DEVICES[fed][0]
    topic = topics.updates(fed, device)
    assert reader.subscribe(topic) == GRANTED_QOS_1
    marker = f"barrier-{uuid.uuid4().hex}".encode()
    assert connected(site.device(device)).publish(topic, marker) == SUCCESS
    return reader.wait_for(topic, marker)[:-1]


def own_plan(fed: str) -> tuple[str, bytes]:
    return topics.plan(fed), retained(fed)[topics.plan(fed)]


def wait_connect(site: Site, device_id: str, timeout: float = 5.0) -> Client:
    """A connected client with the device's current bundle, once the broker has applied the
    reload that fedmqtt-admin sent (SIGHUP is asynchronous): retried until CONNACK 0."""
    deadline = time.monotonic() + timeout
    while True:
        c = site.device(device_id)
        rc = c.connect()
        if rc == 0:
            return c
        c.close()
        assert time.monotonic() < deadline, f"{device_id}: CONNACK {rc} after the reload"
        time.sleep(0.05)


def build(identity: str) -> Site:
    base = Path(tempfile.mkdtemp(prefix=f"fedmqtt-feds-{identity}-"))
    port = free_port()
    for fed in (ALPHA, BETA):
        d = base / agg_user(fed)
        d.mkdir()
        (d / "aggregator.toml").write_text(
            AGGREGATOR_TOML.format(
                fed=fed,
                port=port,
                user=agg_user(fed),
                credentials=aggregator_credentials(identity),
                keys="",
            )
        )
    steps = [
        *broker_steps(identity, base, port),
        *(
            [
                "aggregator-setup",
                "--aggregator-config",
                str(base / agg_user(fed) / "aggregator.toml"),
                "--no-reload",
            ]
            for fed in (ALPHA, BETA)
        ),
        *(
            ["enroll", d, "--federation", fed, "--out", str(base / "bundles" / d), "--no-reload"]
            for fed, ids in DEVICES.items()
            for d in ids
        ),
    ]
    site = start_site(identity, base, port, steps)
    for fed in (ALPHA, BETA):
        agg = connected(aggregator(site, fed))
        for topic, payload in retained(fed).items():
            assert agg.publish(topic, payload, retain=True) == NO_MATCHING_SUBSCRIBERS
    site.close_clients()
    return site


@contextlib.contextmanager
def running(identity: str) -> Iterator[Site]:
    site = build(identity)
    try:
        yield site
    finally:
        site.close()


@pytest.fixture(scope="module", params=["password", "certificate"])
def site_of(request: pytest.FixtureRequest) -> Iterator[Site]:
    with running(request.param) as site:
        yield site


@pytest.fixture
def site(site_of: Site) -> Iterator[Site]:
    yield site_of
    site_of.close_clients()


# --------------------------------------------------------------------------- the rendered ACL


def test_acl_grants_nothing_to_every_client(site: Site) -> None:
    """No ``pattern`` line (it would apply to the devices of every federation): each right
    belongs to one user, and each device's rights name only its own federation's topics."""
    registry = Registry.load(site.admin_dir)
    fed_of = {a.user: a.federation for a in registry.aggregators}
    fed_of |= {k: d.federation for k, d in registry.active_devices().items()}
    acl = (site.base / "broker" / "acl").read_text()
    rules = [ln for ln in acl.splitlines() if ln and not ln.startswith("#")]
    assert not [ln for ln in rules if not ln.startswith(("user ", "topic "))]
    user = ""
    for ln in rules:
        if ln.startswith("user "):
            user = ln.removeprefix("user ")
        elif user in registry.revoked_devices():
            assert ln == "topic deny #"
        else:
            assert ln.split()[-1].startswith(f"fl/{fed_of[user]}/"), (user, ln)
    assert {ln.removeprefix("user ") for ln in rules if ln.startswith("user ")} == set(
        fed_of
    ) | set(registry.revoked_devices())


# --------------------------------------------------------------------------- positive controls


@pytest.mark.parametrize("device", ["a1", "b1"])
def test_device_reads_its_own_federations_model_onnx_and_plan(site: Site, device: str) -> None:
    fed = HOME[device]
    dev = connected(site.device(device))
    for topic in (topics.model(fed), topics.model_onnx(fed), topics.keyframe(fed)):
        assert dev.subscribe(topic) == GRANTED_QOS_1
    assert dev.subscribe(topics.delta_filter(fed)) == GRANTED_QOS_1
    assert sorted(barrier(site, dev, fed)) == sorted(retained(fed).items())


@pytest.mark.parametrize("device", ["a1", "b1"])
def test_device_publishes_its_own_update_to_its_own_aggregator(site: Site, device: str) -> None:
    fed = HOME[device]
    agg = listening(site, fed)
    dev = connected(site.device(device))
    payload = f"update-{uuid.uuid4().hex}".encode()
    assert dev.publish(topics.updates(fed, device), payload) == SUCCESS
    assert agg.wait_for(topics.updates(fed, device), payload) == [
        (topics.updates(fed, device), payload)
    ]


@pytest.mark.parametrize("device", ["a1", "b1"])
def test_device_reports_its_own_evaluation_and_no_other_devices(site: Site, device: str) -> None:
    """A device publishes on its own eval topic, which its aggregator reads; the topic of
    another device of the same federation is refused (NOT_AUTHORIZED) and not delivered."""
    fed = HOME[device]
    peer = next((d for d in DEVICES[fed] if d != device), f"{device}-peer")
    agg = connected(aggregator(site, fed))
    assert agg.subscribe(topics.eval_filter(fed)) == GRANTED_QOS_1
    attacker = connected(site.device(device))
    forged = f"forged-{uuid.uuid4().hex}".encode()
    assert attacker.publish(topics.eval_report(fed, peer), forged) == NOT_AUTHORIZED
    attacker.close()
    payload = f"eval-{uuid.uuid4().hex}".encode()
    dev = connected(site.device(device))
    assert dev.publish(topics.eval_report(fed, device), payload) == SUCCESS
    # Delivered in order: the forged report would have arrived before this one.
    assert agg.wait_for(topics.eval_report(fed, device), payload) == [
        (topics.eval_report(fed, device), payload)
    ]


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("kind", ["model", "model/onnx", "delta/3", "plan"])
@pytest.mark.parametrize("device", ["a1", "b1"])
def test_device_receives_no_retained_message_of_the_other_federation(
    site: Site, device: str, kind: str
) -> None:
    fed = HOME[device]
    dev = connected(site.device(device))
    assert dev.subscribe(f"fl/{OTHER[fed]}/{kind}") == GRANTED_QOS_1  # Mosquitto 2.0: unchecked
    assert barrier(site, dev, fed) == [own_plan(fed)]


@pytest.mark.parametrize("device", ["a1", "b1"])
def test_device_wildcard_subscription_stops_at_its_own_federation(site: Site, device: str) -> None:
    """``#`` and ``fl/+/...`` match both federations' topics; the device gets its own only."""
    fed = HOME[device]
    dev = connected(site.device(device))
    assert dev.subscribe("fl/+/model/#") == GRANTED_QOS_1
    assert dev.subscribe("#") == GRANTED_QOS_1
    assert set(barrier(site, dev, fed)) == set(retained(fed).items())


@pytest.mark.parametrize("device", ["a1", "b1"])
def test_device_receives_no_live_message_of_the_other_federation(site: Site, device: str) -> None:
    fed, other = HOME[device], OTHER[HOME[device]]
    dev = connected(site.device(device))
    assert dev.subscribe(f"fl/{other}/#") == GRANTED_QOS_1
    assert barrier(site, dev, fed) == [own_plan(fed)]  # the retained ones are out of the way
    # The other federation's aggregator publishes; its PUBACK comes after the broker queued
    # the message for every subscriber allowed to read it, so before the next barrier.
    foreign = connected(aggregator(site, other))
    for topic in (*retained(other), topics.metrics(other)):
        assert foreign.publish(topic, b"live-" + topic.encode()) == SUCCESS
    assert barrier(site, dev, fed) == [own_plan(fed)]


@pytest.mark.parametrize(
    "topic",
    [
        "fl/{other}/updates/{device}",  # its own id in the other federation
        "fl/{other}/status/{device}",
        "fl/{other}/eval/{device}",
        "fl/{other}/model",
        "fl/{other}/model/onnx",
        "fl/{other}/delta/3",
        "fl/{other}/plan",
        "fl/{other}/metrics",
    ],
)
@pytest.mark.parametrize("device", ["a1", "b1"])
def test_device_cannot_publish_on_the_other_federations_topics(
    site: Site, device: str, topic: str
) -> None:
    other = OTHER[HOME[device]]
    victim = connected(aggregator(site, other))
    assert victim.subscribe(f"fl/{other}/#") == GRANTED_QOS_1
    forged = f"forged-{uuid.uuid4().hex}".encode()
    attacker = connected(site.device(device))
    target = topic.format(other=other, device=device)
    assert attacker.publish(target, forged, retain=True) == NOT_AUTHORIZED
    # Not delivered to the other federation's aggregator, which reads all of its topics ...
    assert forged not in {p for _, p in update_barrier(site, victim, other)}
    # ... nor retained: a new subscriber gets the original model, ONNX and plan.
    probe = connected(aggregator(site, other))
    assert probe.subscribe(f"fl/{other}/#") == GRANTED_QOS_1
    got = update_barrier(site, probe, other)
    assert forged not in {p for _, p in got}
    assert set(retained(other).items()) <= set(got)


# --------------------------------------------------------------------------- aggregators


@pytest.mark.parametrize("fed", [ALPHA, BETA])
def test_aggregator_receives_no_update_of_the_other_federation(site: Site, fed: str) -> None:
    other = OTHER[fed]
    agg = listening(site, fed)
    # A group of its own: joining the other aggregator's group would take a share of its
    # updates, which Mosquitto then drops at the ACL check (docs/security.md, ACL).
    for snoop in (
        topics.updates_filter(other),
        topics.shared_updates_filter("snoop", other),
        topics.status_filter(other),
    ):
        assert agg.subscribe(snoop) == GRANTED_QOS_1  # Mosquitto 2.0: unchecked
    theirs = listening(site, other)  # control: the update is delivered where it belongs
    device = DEVICES[other][0]
    secret = f"secret-{uuid.uuid4().hex}".encode()
    dev = connected(site.device(device))
    assert dev.publish(topics.status(other, device), b"online", retain=True) == SUCCESS
    assert dev.publish(topics.updates(other, device), secret) == SUCCESS
    theirs.wait_for(topics.updates(other, device), secret)
    # Barrier: an update of the aggregator's own federation, and nothing before it.
    mine = DEVICES[fed][0]
    marker = f"own-{uuid.uuid4().hex}".encode()
    assert connected(site.device(mine)).publish(topics.updates(fed, mine), marker) == SUCCESS
    assert agg.wait_for(topics.updates(fed, mine), marker) == [(topics.updates(fed, mine), marker)]


# --------------------------------------------------------------------------- shared subscription

N_UPDATES = 20
THIEVES = pytest.mark.parametrize(
    "thief", ["a2", "b1"], ids=["device-of-the-same-federation", "device-of-another-federation"]
)


def steal(site: Site, group: str, thief: str) -> tuple[list[bytes], list[bytes]]:
    """Alpha's aggregator listens with ``group``; device ``thief`` joins the public default
    group on alpha's updates (Mosquitto 2.0 grants it); device a1 publishes N_UPDATES updates,
    each acknowledged. Returns the updates sent and those the aggregator received."""
    agg = listening(site, ALPHA, group)
    stealer = connected(site.device(thief))
    public = topics.shared_updates_filter(topics.PUBLIC_SHARED_GROUP, ALPHA)
    assert stealer.subscribe(public) == GRANTED_QOS_1  # Mosquitto 2.0: unchecked
    presence = topics.status(ALPHA, "a1")
    assert agg.subscribe(presence) == GRANTED_QOS_1
    dev = connected(site.device("a1"))
    sent = [f"update-{i}-{uuid.uuid4().hex}".encode() for i in range(N_UPDATES)]
    for payload in sent:
        assert dev.publish(topics.updates(ALPHA, "a1"), payload) == SUCCESS
    # Barrier: each PUBACK came after the broker queued (or dropped) the update for every
    # subscription; a presence message published now reaches the aggregator after them all.
    marker = f"barrier-{uuid.uuid4().hex}".encode()
    assert dev.publish(presence, marker) == SUCCESS
    got = [p for t, p in agg.wait_for(presence, marker) if t == topics.updates(ALPHA, "a1")]
    # The thief may read no update: whatever share it was handed, the ACL dropped.
    theirs = barrier(site, stealer, HOME.get(thief, ALPHA))
    assert not [t for t, _ in theirs if t.startswith(f"fl/{ALPHA}/updates/")]
    return sent, got


@THIEVES
def test_secret_group_gets_every_update_despite_a_device_in_the_public_group(
    site: Site, thief: str
) -> None:
    """The group aggregator-setup wrote: a device that joins the public default group on the
    federation's updates forms a group of its own and takes nothing from the aggregator."""
    group = scaleout_group(site, ALPHA)
    assert group != topics.PUBLIC_SHARED_GROUP
    sent, got = steal(site, group, thief)
    assert got == sent


@THIEVES
def test_public_group_loses_updates_to_a_device_that_joins_it(site: Site, thief: str) -> None:
    """Positive control, the broker limitation the secret group works around: with the public
    default, the device joins the aggregator's group and Mosquitto hands it its share of the
    acknowledged updates, then drops them at the ACL check. Delivered to nobody."""
    sent, got = steal(site, topics.PUBLIC_SHARED_GROUP, thief)
    assert set(got) < set(sent)
    assert 0 < len(got) <= N_UPDATES // 2 + 1  # Mosquitto 2.0 round-robins the two members


@pytest.mark.parametrize("kind", ["model", "model/onnx", "plan", "metrics"])
def test_aggregator_cannot_publish_for_the_other_federation(site: Site, kind: str) -> None:
    agg = connected(aggregator(site, ALPHA))
    forged = f"forged-{uuid.uuid4().hex}".encode()
    assert agg.publish(f"fl/{BETA}/{kind}", forged, retain=True) == NOT_AUTHORIZED
    probe = connected(aggregator(site, BETA))
    assert probe.subscribe(f"fl/{BETA}/#") == GRANTED_QOS_1
    got = update_barrier(site, probe, BETA)
    assert forged not in {p for _, p in got}
    assert set(retained(BETA).items()) <= set(got)


# --------------------------------------------------------------------------- enroll, revoke, rotate


def test_device_reenrolled_in_the_other_federation_gets_only_that_federation(site: Site) -> None:
    """Revoke a device of alpha and enroll its id again in beta: after the reloads it has
    beta's rights and none of alpha's, and its old credentials are refused."""
    bundle, old = site.bundles / "a-mover", site.base / "a-mover-in-alpha"
    assert site.admin("revoke", "a-mover") == 0
    bundle.rename(old)
    enroll = ["enroll", "a-mover", "--reenroll", "--federation", BETA, "--out", str(bundle)]
    assert site.admin(*enroll) == 0
    dev = wait_connect(site, "a-mover")
    assert dev.subscribe(f"fl/{ALPHA}/#") == GRANTED_QOS_1
    assert barrier(site, dev, BETA) == [own_plan(BETA)]
    assert dev.publish(topics.updates(BETA, "a-mover"), b"u") == NO_MATCHING_SUBSCRIBERS
    assert dev.publish(topics.updates(ALPHA, "a-mover"), b"u") == NOT_AUTHORIZED
    # The bundle it had in alpha no longer opens anything.
    stale = site.device("a-mover", **_credentials_in(site, old))
    if site.identity == "password":
        assert stale.connect() == CONNACK_NOT_AUTHORIZED
    else:
        assert stale.connect() is None  # its certificate is on the CRL: TLS handshake fails


def test_rotated_device_keeps_only_its_own_federation(site: Site) -> None:
    new = site.base / "a-rotated-new"
    assert site.admin("rotate", "a-rotated", "--out", str(new)) == 0
    shutil.rmtree(site.bundles / "a-rotated")
    new.rename(site.bundles / "a-rotated")
    dev = wait_connect(site, "a-rotated")
    assert dev.subscribe(f"fl/{BETA}/#") == GRANTED_QOS_1
    assert barrier(site, dev, ALPHA) == [own_plan(ALPHA)]
    assert dev.publish(topics.updates(ALPHA, "a-rotated"), b"u") == NO_MATCHING_SUBSCRIBERS
    assert dev.publish(topics.updates(BETA, "a-rotated"), b"u") == NOT_AUTHORIZED


def _credentials_in(site: Site, bundle: Path) -> dict[str, Any]:
    if site.identity == "password":
        return {"password": (bundle / "broker.password").read_text().strip()}
    return {"cert": bundle / "client.crt", "key": bundle / "client.key"}
