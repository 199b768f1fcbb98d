"""Shared helpers of the simulation benchmarks: run one configuration, describe the machine."""

from __future__ import annotations

import io
import os
import platform
import time
from typing import Any

from simulator.runner import SimConfig, run_simulation


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"
    )


def run(cfg: SimConfig) -> dict[str, Any]:
    t = time.monotonic()
    s = run_simulation(cfg, out=io.StringIO())
    s["wall_s"] = round(time.monotonic() - t, 1)
    return s


def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "not reached"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)
