"""Shared fixtures: a real Mosquitto per test, rendered from the project's broker_config/."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from simulator.broker import Mosquitto

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


class Watched(Protocol):
    def problems(self) -> list[str]: ...


#: Watchers made during the running test (``test_aggregator_support.ModelWatcher`` registers
#: itself): :func:`_watchers_saw_no_problem` fails the test on anything they report.
WATCHED: list[Watched] = []


class _Tracebacks(logging.Handler):
    """Log records that carry a traceback, from any thread of the test process."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.stack_info:
            self.seen.append(f"{record.name}: {record.getMessage()}\n{self.format(record)}")


@pytest.fixture(autouse=True)
def _watchers_saw_no_problem() -> Iterator[None]:
    """A test that watches the model also asserts, without having to remember it, that no
    model it saw failed to verify or was not finite, and that nothing logged a traceback: not
    the in-process services (the root logger) nor the service logs its watchers were given."""
    WATCHED.clear()
    tracebacks = _Tracebacks()
    root = logging.getLogger()
    root.addHandler(tracebacks)
    try:
        yield
    finally:
        root.removeHandler(tracebacks)
    watchers = list(WATCHED)
    WATCHED.clear()
    if watchers:
        problems = [p for w in watchers for p in w.problems()] + tracebacks.seen
        assert not problems, "\n".join(problems)


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
