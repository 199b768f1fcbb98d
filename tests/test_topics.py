"""The topic layout (:mod:`fedmqtt.topics`): for every federation and device id the validator
accepts, the built topics parse back to exactly that device, in exactly that kind of topic of
exactly that federation, and nothing else parses."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from fedmqtt import topics
from fedmqtt.errors import ConfigError

TOPIC_WORDS = ("fl", "updates", "model", "status", "plan", "metrics", "onnx")
_VALID = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
ids = st.one_of(
    st.sampled_from(TOPIC_WORDS),
    st.from_regex(_VALID, fullmatch=True),
    st.from_regex(r"[A-Za-z0-9]", fullmatch=True),  # the shortest
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{63}", fullmatch=True),  # the longest
)


def accepted(value: str) -> bool:
    try:
        topics.check_id("id", value)
    except ConfigError:
        return False
    return True


@settings(max_examples=200)
@given(fed=ids, other=ids, device=ids)
def test_built_topics_parse_back_exactly(fed: str, other: str, device: str) -> None:
    assert accepted(fed) and accepted(device)
    update, status = topics.updates(fed, device), topics.status(fed, device)
    assert topics.device_topic(update, fed) == (topics.UPDATES, device)
    assert topics.device_topic(status, fed) == (topics.STATUS, device)
    assert topics.update_device(update, fed) == device
    assert topics.status_device(status, fed) == device
    assert topics.update_device(status, fed) is None
    assert topics.status_device(update, fed) is None
    if other != fed:
        assert topics.device_topic(update, other) is None
        assert topics.device_topic(status, other) is None
    for t in (topics.model(fed), topics.model_onnx(fed), topics.plan(fed), topics.metrics(fed)):
        assert topics.device_topic(t, fed) is None
        assert not topic_matches_sub(topics.updates_filter(fed), t)
        assert not topic_matches_sub(topics.status_filter(fed), t)
    # What the subscriptions receive is exactly what the parser takes as that kind.
    assert topic_matches_sub(topics.updates_filter(fed), update)
    assert not topic_matches_sub(topics.updates_filter(fed), status)
    assert topic_matches_sub(topics.status_filter(fed), status)
    assert not topic_matches_sub(topics.status_filter(fed), update)


@settings(max_examples=200)
@given(value=st.one_of(st.text(max_size=70), ids.map(lambda s: s + "\n")))
@example("a" * 64)
@example("a" * 65)
@example("dev0\n")
@example("+")
@example("dev/0")
@example("")
def test_the_parser_takes_exactly_the_device_ids_the_validator_accepts(value: str) -> None:
    # (The federation id is the aggregator's own, validated with its config.)
    parsed = topics.device_topic(topics.updates("fed", value), "fed")
    assert (parsed is not None) == accepted(value)
    assert (parsed == (topics.UPDATES, value)) == accepted(value)


@pytest.mark.parametrize(
    "topic",
    [
        "fl/fed/updates/dev0/x",
        "fl/fed/updates",
        "fl/fed/updates/",
        "fl//updates/dev0",
        "x/fed/updates/dev0",
        "/fl/fed/updates/dev0",
        "fl/fed/update/dev0",
        "fl/fed/model/dev0",
        "fl/fed/updates/+",
        "fl/fed/status/#",
        "fl/fed/updates/dev0\n",
        "fl/fed/status/" + "d" * 65,
        "fl/Fed/updates/dev0",
        "$share/g/fl/fed/updates/dev0",
    ],
)
def test_other_topics_do_not_parse(topic: str) -> None:
    assert topics.device_topic(topic, "fed") is None
