"""Run each aggregator process's threads on one CPU of its own (``[scaleout] pin_cpu``).

The owner's event-loop thread and its engine thread hand work, and the GIL, to each other
for every batch. When the scheduler puts them on different cores, each hand-off wakes the
other core, and a 100 KB update decoded on one core is read again from the other's cache.
Keeping all of a process's threads on one CPU costs less CPU per update and leaves the other
cores to the broker (docs/benchmarks.md, "What the aggregator's settings are worth").

Pinning applies to the calling thread and to every thread it starts later (Linux
``sched_setaffinity`` on thread 0 = the caller), so the service pins its event-loop thread
before it creates its executors. The owner takes the last CPU it may use and worker ``i`` the
one ``i + 1`` places before it (round robin): processes of one aggregator never share a CPU
while there are enough. With a single usable CPU, or where the call is refused, nothing
changes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

log = logging.getLogger(__name__)


def usable_cpus() -> list[int]:
    """The CPUs the calling thread may run on, in order (empty where Linux affinity is
    unavailable)."""
    if not hasattr(os, "sched_getaffinity"):
        return []
    return sorted(os.sched_getaffinity(0))


def cpu_for(slot: int, cpus: Sequence[int]) -> int | None:
    """The CPU of process ``slot`` (0 = the owner, ``i + 1`` = worker ``i``), or None when
    there is nothing to choose (fewer than two CPUs)."""
    if len(cpus) < 2:
        return None
    return cpus[-1 - slot % len(cpus)]


def pin_current_thread(cpu: int | None, what: str) -> bool:
    """Pin the calling thread (and the threads it starts from now on) to ``cpu``; False, with
    one warning, if the system refuses."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as e:
        log.warning("%s: cannot keep its threads on CPU %d (%s); running unpinned", what, cpu, e)
        return False
    log.info("%s: threads on CPU %d", what, cpu)
    return True


def restore_affinity(cpus: Sequence[int]) -> None:
    """Let the calling thread run on ``cpus`` again (what :func:`usable_cpus` gave before
    :func:`pin_current_thread`)."""
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cpus))
