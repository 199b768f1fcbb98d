"""Shared fixtures: a real Mosquitto per test, rendered from the project's broker_config/."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmqtt.broker import Mosquitto

#: scripts/test installs every prerequisite (Mosquitto, systemd-analyze, libseccomp) and
#: .ci/run sets CI=1, so there a missing one is a broken set-up, not a reason to skip.
STRICT = os.environ.get("CI", "").lower() not in ("", "0", "false")


def require(ok: object, reason: str) -> None:
    """Skip the calling test when a machine prerequisite is missing -- except under CI, where
    it fails: a test skipped in CI proves nothing, and would hide a set-up that broke."""
    if ok:
        return
    if STRICT:
        pytest.fail(f"prerequisite missing under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires(ok, reason): machine prerequisite, see conftest.require"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires"):
        require(*mark.args)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running development broker on a free loopback port; killed after the test."""
    m = Mosquitto(data_dir=tmp_path / "broker")
    m.start()
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[type[Mosquitto]]:
    """For tests that need a broker with another template or settings; all are closed after."""
    started: list[Mosquitto] = []

    class _Factory(Mosquitto):
        def __init__(self, **kw: object) -> None:
            kw.setdefault("data_dir", tmp_path / f"broker{len(started)}")
            super().__init__(**kw)  # type: ignore[arg-type]
            started.append(self)

    try:
        yield _Factory
    finally:
        for m in started:
            m.close()
