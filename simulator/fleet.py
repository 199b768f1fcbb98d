"""Where the simulated devices run: agent threads in this process, or spread over processes.

Every simulated device is a real :class:`edge_agent.agent.EdgeAgent` (its own MQTT client,
state directory and data shard) running in a thread. A handful of devices fit in the
simulator's own process; hundreds do not: each agent is three threads (its loop, its MQTT
client, its training), and hundreds of agents under one GIL starve each other until some never
come online (docs/architecture.md, "The simulator"). So large fleets are split over *agent
host* processes, each hosting a slice of the devices with its own interpreter and GIL.

The split changes nothing a device sees: its configuration, shard, speed, outage windows and
attack come from the same seeded schedule whichever process hosts it, and the outage windows
are timed against one ``time.monotonic()`` start (CLOCK_MONOTONIC is system-wide on Linux).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from fedmqtt.params import Params
from simulator import behaviour

log = logging.getLogger("fedmqtt.simulate")

#: Above this many devices the simulator hosts agents in separate processes by default.
IN_PROCESS_MAX = 50
#: Devices per agent host process when the count is chosen automatically.
DEVICES_PER_HOST = 100
_READY_TIMEOUT_S = 300.0
_STOP_TIMEOUT_S = 120.0
_REPORT_S = 1.0  # how often an agent host process sends its devices' counts


@dataclass(frozen=True)
class DeviceSpec:
    """Everything needed to run one simulated device, in a form that pickles."""

    id: str
    behaviour: behaviour.DeviceBehaviour
    config: dict[str, Any]  # the agent's TOML tables, as edge_agent.config reads them
    home: Path


@dataclass(frozen=True)
class Attacks:
    """The federation-wide attack settings; each attacker gets its own seeded transform."""

    attack: str
    seed: int
    n_classes: int
    active_from: float = 0.0  # wall-clock time (time.time()) from which attackers attack


def host_count(requested: int, n_devices: int) -> int:
    """Agent host processes to use: ``requested`` if positive, else one per
    :data:`DEVICES_PER_HOST` devices above :data:`IN_PROCESS_MAX` (0 = all in this process)."""
    if requested > 0:
        return min(requested, n_devices)
    if n_devices <= IN_PROCESS_MAX:
        return 0
    return -(-n_devices // DEVICES_PER_HOST)


@dataclass
class DeviceCounts:
    """What one device did, summed over its agent instances (an outage restarts the agent).

    ``delivered``: updates the broker acknowledged; ``downloaded``: payload bytes the device's
    MQTT client received, by kind of message; ``written``: bytes written to its state
    directory; ``rounds``: training rounds completed; ``fetches``: model fetches started;
    ``rejected``: messages the agent refused, by ``kind/reason``; ``failed``: rounds that
    failed (the agent logs each and retries after ``[training] retry_s``).
    """

    delivered: int = 0
    downloaded: dict[str, int] = field(default_factory=dict)
    written: int = 0
    rounds: int = 0
    fetches: int = 0
    acked: list[str] = field(default_factory=list)  # delivered update ids; filled at stop
    rejected: dict[str, int] = field(default_factory=dict)
    failed: int = 0

    @property
    def bytes_downloaded(self) -> int:
        return sum(self.downloaded.values())

    def plus(self, other: DeviceCounts) -> DeviceCounts:
        down = dict(self.downloaded)
        for k, v in other.downloaded.items():
            down[k] = down.get(k, 0) + v
        rejected = dict(self.rejected)
        for k, v in other.rejected.items():
            rejected[k] = rejected.get(k, 0) + v
        return DeviceCounts(
            self.delivered + other.delivered,
            down,
            self.written + other.written,
            self.rounds + other.rounds,
            self.fetches + other.fetches,
            self.acked + other.acked,
            rejected,
            self.failed + other.failed,
        )


def _counts_of(agent: Any) -> DeviceCounts:
    if agent is None:
        return DeviceCounts()
    return DeviceCounts(
        agent.updates_sent,
        dict(agent.downloaded),
        agent.bytes_written,
        agent.rounds_completed,
        agent.fetches,
        rejected=dict(agent.rejected),
        failed=agent.rounds_failed,
    )


@dataclass
class _Running:
    spec: DeviceSpec
    thread: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    agent: Any = None
    before: DeviceCounts = field(default_factory=DeviceCounts)  # earlier agent instances
    # update_id of every update the broker acknowledged, over all instances of the agent
    # (it is restarted after each outage); appended on the agents' MQTT threads.
    delivered: list[str] = field(default_factory=list)

    @property
    def counts(self) -> DeviceCounts:
        return self.before.plus(_counts_of(self.agent))


class AgentHost:
    """Runs a set of devices as agent threads and applies their outage windows."""

    def __init__(self, specs: list[DeviceSpec], attacks: Attacks) -> None:
        self.attacks = attacks
        self.devices = [_Running(s) for s in specs]
        self._configs: dict[str, Any] = {}
        self.connected_at_stop = 0

    def prepare(self) -> None:
        """Parse every device's configuration (fails early, before anything starts)."""
        from edge_agent.config import AgentConfig

        for d in self.devices:
            self._configs[d.spec.id] = AgentConfig.from_dict(d.spec.config, base_dir=d.spec.home)

    def start(self) -> None:
        """Start every device that is not in an outage at time 0, all at once.

        Each agent thread waits at a gate until every thread exists: ``Thread.start`` blocks
        until the new thread has run, so once the first agents are busy (hundreds of threads
        wanting the GIL) every further start waits its turn, and a host's last agents would
        start long after its first.
        """
        gate = threading.Event()
        for d in self.devices:
            if not _offline(d.spec.behaviour, 0.0):
                self._start(d, gate)
        gate.set()

    def tick(self, now: float) -> None:
        """Stop devices entering an outage and restart those leaving one (``now``: seconds
        since the simulation started)."""
        for d in self.devices:
            if not d.spec.behaviour.offline:
                continue
            offline = _offline(d.spec.behaviour, now)
            running = d.thread is not None and d.thread.is_alive()
            if offline and running:
                self._stop([d])
            elif not offline and not running:
                self._start(d)

    def stop(self) -> dict[str, DeviceCounts]:
        """Stop every agent; returns each device's counts (updates acknowledged by the broker,
        with their ids, bytes received and written). ``connected_at_stop`` counts the agents
        that had a live MQTT connection just before."""
        self.connected_at_stop = self.connected()
        self._stop(self.devices)
        return {d.spec.id: replace(d.counts, acked=list(d.delivered)) for d in self.devices}

    def connected(self) -> int:
        """Agents whose MQTT connection is up (their own view, not the aggregator's)."""
        return sum(
            1
            for d in self.devices
            if d.agent is not None and d.agent.link is not None and d.agent.link.connected
        )

    def counts(self) -> dict[str, DeviceCounts]:
        return {d.spec.id: d.counts for d in self.devices}

    def _start(self, d: _Running, gate: threading.Event | None = None) -> None:
        from edge_agent.agent import EdgeAgent

        b = d.spec.behaviour
        attack: Callable[[Params], Params] | None = None
        data_tf = None
        if b.attacker:
            if self.attacks.attack == "labelflip":
                data_tf = behaviour.from_time(
                    behaviour.label_flip(self.attacks.n_classes), self.attacks.active_from
                )
            else:
                seed = self.attacks.seed + b.index
                attack = behaviour.delta_attack(self.attacks.attack, seed=seed)
                attack = behaviour.from_time(attack, self.attacks.active_from)
        compute_s = b.compute_s
        d.stop = threading.Event()

        def delta_tf(delta: Params, stop: threading.Event = d.stop) -> Params:
            # Emulated slow hardware: the update leaves compute_s after the model arrived,
            # so its staleness is what a device of this speed would produce.
            stop.wait(compute_s)
            return attack(delta) if attack is not None else delta

        agent = EdgeAgent(
            self._configs[d.spec.id],
            delta_transform=delta_tf,
            data_transform=data_tf,
            on_delivered=d.delivered.append,
        )

        def run(stop: threading.Event = d.stop) -> None:
            if gate is not None:
                gate.wait()
            agent.run(stop)

        d.agent = agent
        d.thread = threading.Thread(target=run, name=d.spec.id, daemon=True)
        d.thread.start()

    @staticmethod
    def _stop(devices: list[_Running]) -> None:
        for d in devices:  # signal all first: they wind down in parallel
            d.stop.set()
        for d in devices:
            if d.thread is not None:
                d.thread.join(15)
                if d.thread.is_alive():
                    log.warning("agent %s did not stop within 15 s", d.spec.id)
                d.thread = None
            d.before = d.counts
            d.agent = None


def _offline(b: behaviour.DeviceBehaviour, now: float) -> bool:
    return any(start <= now < end for start, end in b.offline)


class Fleet(Protocol):
    """The simulator's view of its devices, wherever they run."""

    failures: list[str]
    connected_at_stop: int  # agents with a live MQTT connection when stop() began

    def start(self) -> None: ...
    def tick(self, now: float) -> None:
        """Housekeeping every 0.25 s; raises RuntimeError if part of the fleet died."""

    def counts(self) -> dict[str, DeviceCounts]:
        """Each device's counts so far (from a host process: as of its last report)."""

    def stop(self) -> dict[str, DeviceCounts]:
        """Stop every agent; each device's final counts, with
        the ids of its acknowledged updates (``failures`` lists the parts of the
        fleet whose counts are missing)."""


class LocalFleet:
    """All devices as threads of this process (small fleets, and the tests)."""

    def __init__(self, specs: list[DeviceSpec], attacks: Attacks) -> None:
        self.host = AgentHost(specs, attacks)
        self.host.prepare()
        self.failures: list[str] = []
        self.connected_at_stop = 0

    def start(self) -> None:
        self.host.start()

    def tick(self, now: float) -> None:
        self.host.tick(now)

    def counts(self) -> dict[str, DeviceCounts]:
        return self.host.counts()

    def stop(self) -> dict[str, DeviceCounts]:
        counts = self.host.stop()
        self.connected_at_stop = self.host.connected_at_stop
        return counts


class ProcessFleet:
    """Devices spread round-robin over ``processes`` agent host processes.

    Each host is a fresh interpreter (``spawn``: forking a process that already runs the
    aggregator's threads is unsafe). Protocol on one pipe per host: the host parses its
    devices' configs and sends ``ready``; the parent sends ``("go", t0)`` with the shared start
    time; the host starts its agents, applies their outage windows itself and sends its
    devices' counts every :data:`_REPORT_S` until it receives ``stop``, then stops them and
    sends back the final counts with the delivered update ids. A host whose parent dies
    stops its agents and exits.
    """

    def __init__(self, specs: list[DeviceSpec], attacks: Attacks, processes: int) -> None:
        ctx = mp.get_context("spawn")
        self._procs: list[Any] = []
        self._pipes: list[mpc.Connection] = []
        self._counts: dict[str, DeviceCounts] = {}
        self.failures: list[str] = []
        self.connected_at_stop = 0
        level = logging.getLogger().getEffectiveLevel()
        for i in range(processes):
            mine = specs[i::processes]
            if not mine:
                continue
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_host_main,
                args=(child, mine, attacks, level, os.getpid()),
                name=f"fedmqtt-agents-{i}",
                daemon=True,
            )
            p.start()
            child.close()
            self._procs.append(p)
            self._pipes.append(parent)
        try:
            for i, pipe in enumerate(self._pipes):
                msg = _recv(pipe, _READY_TIMEOUT_S, f"agent host {i} to get ready")
                if msg != ("ready",):
                    raise RuntimeError(f"agent host {i} failed to start: {msg!r}")
        except BaseException:
            self.close()
            raise
        log.info("%d devices in %d agent host processes", len(specs), len(self._procs))

    def start(self) -> None:
        t0 = time.monotonic()
        for pipe in self._pipes:
            pipe.send(("go", t0))

    def tick(self, now: float) -> None:
        for i, p in enumerate(self._procs):
            if not p.is_alive():
                raise RuntimeError(f"agent host process {i} died (exit code {p.exitcode})")
        for pipe in self._pipes:
            with contextlib.suppress(OSError, EOFError):
                while pipe.poll(0):
                    msg = pipe.recv()
                    if isinstance(msg, tuple) and msg[0] == "counts":
                        self._counts.update(msg[1])

    def counts(self) -> dict[str, DeviceCounts]:
        return dict(self._counts)

    def stop(self) -> dict[str, DeviceCounts]:
        """Stop every host; a host that died or fails to answer is logged and left out of the
        counts (its devices' deliveries are unknown, so the run reports an error)."""
        counts: dict[str, DeviceCounts] = {}
        self.failures = []
        self.connected_at_stop = 0
        for pipe in self._pipes:
            with contextlib.suppress(OSError):  # a dead host is reported below
                pipe.send(("stop",))
        for i, pipe in enumerate(self._pipes):
            try:
                msg = _recv(pipe, _STOP_TIMEOUT_S, f"agent host {i} to stop")
                while isinstance(msg, tuple) and msg[0] == "counts":  # sent before our stop
                    msg = _recv(pipe, _STOP_TIMEOUT_S, f"agent host {i} to stop")
                if not (isinstance(msg, tuple) and msg[0] == "stopped"):
                    raise RuntimeError(f"agent host {i} failed while stopping: {msg!r}")
            except RuntimeError as e:
                log.error("%s", e)
                self.failures.append(str(e))
                continue
            counts.update(msg[1])
            self.connected_at_stop += int(msg[2])
        self.close()
        return counts

    def close(self) -> None:
        for pipe in self._pipes:
            pipe.close()
        for p in self._procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()


def _recv(pipe: mpc.Connection, timeout: float, what: str) -> Any:
    if not pipe.poll(timeout):
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
    try:
        return pipe.recv()
    except EOFError:
        raise RuntimeError(f"{what}: the process exited") from None


def _host_main(
    pipe: mpc.Connection, specs: list[DeviceSpec], attacks: Attacks, level: int, parent_pid: int
) -> None:
    """Entry point of an agent host process."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = AgentHost(specs, attacks)
    try:
        host.prepare()
    except Exception as e:  # report it to the parent instead of dying silently
        pipe.send(("error", f"{type(e).__name__}: {e}"))
        return
    pipe.send(("ready",))
    msg = pipe.recv()
    if msg[0] != "go":
        return
    t0 = float(msg[1])
    host.start()
    last_report = 0.0
    try:
        while os.getppid() == parent_pid:
            if pipe.poll(0.25):
                break  # "stop" (or the parent closed the pipe)
            host.tick(time.monotonic() - t0)
            if time.monotonic() - last_report >= _REPORT_S:
                last_report = time.monotonic()
                pipe.send(("counts", host.counts()))
    finally:
        counts = host.stop()
        with contextlib.suppress(OSError):  # the parent may be gone
            pipe.send(("stopped", counts, host.connected_at_stop))
