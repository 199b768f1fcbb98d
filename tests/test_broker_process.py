"""The broker process that the tests, the demo and the benchmarks start (``simulator.broker``).

It runs with the production drop-in's glibc malloc settings (``MALLOC_TUNABLES``), and those
settings take effect: a backlog of queued updates sits on transparent huge pages.
"""

from __future__ import annotations

import os
import platform
import re
import threading
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from conftest import require
from paho.mqtt.enums import CallbackAPIVersion

from simulator.broker import MALLOC_TUNABLES, Mosquitto, broker_environ

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def anon_huge_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    m = re.search(r"^AnonHugePages:\s+(\d+) kB", text, re.MULTILINE)
    assert m, text
    return int(m.group(1))


def thp_mode() -> str:
    """``always``, ``madvise`` or ``never`` (the bracketed word), "" if the kernel has no THP."""
    if not THP_MODE.exists():
        return ""
    m = re.search(r"\[(\w+)\]", THP_MODE.read_text())
    return m.group(1) if m else ""


def test_broker_runs_with_the_production_malloc_tunables(broker: Mosquitto) -> None:
    assert broker.proc is not None
    expected = os.environ.get("GLIBC_TUNABLES", MALLOC_TUNABLES)
    assert environ_of(broker.proc.pid)["GLIBC_TUNABLES"] == expected


def test_broker_environ_keeps_a_callers_tunables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=1")
    assert broker_environ()["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=1"
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert broker_environ()["GLIBC_TUNABLES"] == MALLOC_TUNABLES
    assert "GLIBC_TUNABLES" not in broker_environ("")


def queue_backlog(m: Mosquitto, messages: int, size: int) -> None:
    """Leave ``messages`` QoS-1 messages of ``size`` bytes queued for an offline subscriber."""
    subscribed = threading.Event()
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="offline", clean_session=False)
    sub.on_subscribe = lambda *args: subscribed.set()
    sub.connect(m.host, m.port)
    sub.loop_start()
    sub.subscribe("backlog/#", qos=1)
    assert subscribed.wait(10)
    sub.disconnect()
    sub.loop_stop()
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="publisher")
    pub.connect(m.host, m.port)
    pub.loop_start()
    try:
        payload = os.urandom(size)
        infos = [pub.publish(f"backlog/{i}", payload, qos=1) for i in range(messages)]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        pub.disconnect()
        pub.loop_stop()


def test_a_backlog_sits_on_huge_pages_with_the_tunables(
    broker_factory: type[Mosquitto], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the setting the broker takes a 16 MB backlog, and where the host can give huge
    pages (THP on, glibc >= 2.35) the backlog sits on them. Elsewhere glibc ignores the setting
    by design; the broker must still take the backlog with it."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)  # a caller's own would win
    libc, version = platform.libc_ver()
    mode = thp_mode()
    supported = (
        mode in ("always", "madvise")
        and libc == "glibc"
        and tuple(map(int, version.split("."))) >= (2, 35)
    )
    huge = {}
    for tunables in (MALLOC_TUNABLES, ""):
        m = broker_factory(malloc_tunables=tunables).start()
        assert m.proc is not None
        queue_backlog(m, messages=160, size=100_000)  # 16 MB, as 160 updates of d = 1e5 int8
        huge[tunables] = anon_huge_kib(m.proc.pid)
        m.close()
    require(supported, f"no huge pages to check on this host (THP {mode!r}, {libc} {version})")
    assert huge[MALLOC_TUNABLES] >= 2048, huge  # at least one 2 MiB page (14 MiB here)
    if mode == "madvise":  # only what malloc asked for gets huge pages
        assert huge[""] == 0, huge
