"""Shared fixtures: a real Mosquitto per test, rendered from the project's broker_config/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmqtt.broker import Mosquitto


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
