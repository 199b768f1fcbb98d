"""``fedmqtt simulate``: one federation on one machine, every part real.

A real Mosquitto (started here from ``broker_config/`` unless ``--broker`` is given), the real
aggregator service in its own thread and event loop, and N real :class:`EdgeAgent`s, each with
its own MQTT client, data shard on disk, keys and state directory. What the simulator adds is
only what a lab cannot have: a seeded schedule of slow devices, outages and attackers, applied
through the agent's documented simulation hooks (a delay before publishing stands for slow
hardware; attackers transform their delta or flip their labels).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from fedmqtt.codecs import Codec
from fedmqtt.errors import HELD, ConfigError
from fedmqtt.models.spec import ModelSpec
from fedmqtt.privacy.config import PrivacyConfig
from fedmqtt.signing import ChaChaPolyKey, Ed25519Signer
from simulator import behaviour, datasets, evalseries, fleet, report
from simulator import privacy as dp
from simulator.broker import Mosquitto
from simulator.central import centralized_accuracy
from simulator.partition import partition

log = logging.getLogger("fedmqtt.simulate")
FEDERATION = "sim"


def _downlink_table(cfg: SimConfig) -> dict[str, Any]:
    table: dict[str, Any] = {} if cfg.downlink_codec is None else {"codec": cfg.downlink_codec}
    if cfg.downlink_delta:
        table["delta"] = cfg.downlink_delta
    return {**table, **cfg.downlink_extra}


@dataclass(frozen=True)
class SimConfig:
    dataset: str = "digits"
    model: str = "softmax"
    clients: int = 10
    partition: str = "dirichlet:0.5"
    strategy: str = "fedbuff"
    codec: str = "int8"
    downlink_codec: str | None = None  # None: the aggregator's [downlink] default
    downlink_delta: str | None = None  # [downlink] delta codec (None: full models only)
    downlink_extra: dict[str, Any] = field(default_factory=dict)  # more [downlink] options
    hidden: tuple[int, ...] = (32,)  # hidden layer widths of the mlp model
    stragglers: float = 0.0
    dropout: float = 0.0
    attackers: float = 0.0
    attack: str = "signflip"
    attacker_rate: float = 1.0
    robust: str = "none"
    duration: float = 60.0
    versions: int | None = None  # stop once the global model reaches this version
    target_accuracy: float | None = None
    stop_at_target: bool = False
    buffer_size: int | None = None
    compute_time: float = 0.3
    sample_s: float = 0.25  # how often the progress history samples the aggregator and devices
    seed: int = 0
    broker: str | None = None
    workdir: Path | None = None
    json: Path | None = None
    plot: Path | None = None
    quiet: bool = False
    # Local training plan sent to the devices.
    epochs: int = 1
    lr: float = 0.1
    batch_size: int = 16
    onnx_every: int = 0  # publish an ONNX export every N versions (0: never)
    eval_fraction: float = 0.0  # devices' validation split for federated evaluation (0: off)
    # Processes hosting the agents (0: automatic, see simulator.fleet.host_count).
    agent_processes: int = 0
    # The plan's selection ([plan.selection]): the fraction of devices that train per window
    # of this many versions.
    participation: float = 1.0
    participation_window: int = 1
    attack_start: float = 0.0  # seconds into the run at which the attackers switch on
    gate: bool = False  # the aggregator's evaluation gate ([rollout] gate)
    gate_margin: float = 0.02
    extra_strategy: dict[str, Any] = field(default_factory=dict)
    server_opt: str | None = None  # [strategy] server_optimizer (None: the aggregator's)
    server_lr: float | None = None  # [strategy] server_lr (None: the optimizer's default)
    personalise: str | None = None  # the agents' [personalise] mode (None: the agent's default)
    # Differential privacy (simulator.privacy): off, central or local.
    dp: str = "off"
    dp_clip: float = 1.0
    dp_noise: float | None = None
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_releases: int | None = None

    @property
    def privacy(self) -> PrivacyConfig:
        return dp.resolve(
            self.dp,
            clip=self.dp_clip,
            noise=self.dp_noise,
            epsilon=self.dp_epsilon,
            delta=self.dp_delta,
            releases=self.dp_releases,
            versions=self.versions,
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SimConfig:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    def check(self) -> None:
        if self.clients < 1:
            raise ConfigError("--clients must be at least 1")
        if self.duration <= 0:
            raise ConfigError("--duration must be positive")
        if not self.sample_s > 0:
            raise ConfigError("sample_s must be positive")
        if not self.attacker_rate >= 1.0:
            raise ConfigError("--attacker-rate must be at least 1")
        if self.attack_start < 0:
            raise ConfigError("--attack-start must be >= 0 seconds")
        if self.versions is not None and self.versions < 1:
            raise ConfigError("--versions must be at least 1")
        if not 0.0 <= self.eval_fraction <= 0.5:
            raise ConfigError("--eval-fraction must be in [0, 0.5]")
        if self.agent_processes < 0:
            raise ConfigError("--agent-processes must be 0 (automatic) or more")
        Codec.parse(self.codec)
        self.privacy  # noqa: B018 -- refuses unusable --dp options before anything starts
        if self.model == "linear" and self.dataset != "synthetic":
            log.info("linear model: least-squares classifier on one-hot targets")


def run_simulation(cfg: SimConfig, out: TextIO | None = None) -> dict[str, Any]:
    """Run the federation and return (and optionally write) its JSON summary."""
    cfg.check()
    out = out if out is not None else sys.stdout
    with contextlib.ExitStack() as stack:
        workdir = cfg.workdir
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedmqtt-sim-")))
        workdir.mkdir(parents=True, exist_ok=True)
        return _Simulation(cfg, workdir, out, stack).run()


@dataclass(frozen=True)
class FederationData:
    """What a simulated federation trains on: the model spec, each device's shard, the test
    split (targets one-hot for the linear model, as the devices see them)."""

    spec: ModelSpec
    shards: list[tuple[npt.NDArray[np.float32], npt.NDArray[Any]]]
    X_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[Any]


def federation_data(cfg: SimConfig) -> FederationData:
    """The spec, shards and test split a run of ``cfg`` uses (same seed, same split)."""
    sim = _Simulation(cfg, Path(), sys.stdout, contextlib.ExitStack())
    y_test: npt.NDArray[Any] = sim.ds.y_test
    if cfg.model == "linear":
        y_test = np.eye(sim.ds.n_classes, dtype=np.float32)[y_test]
    return FederationData(sim.spec, sim._shards(), sim.ds.X_test, y_test)


class _Simulation:
    def __init__(self, cfg: SimConfig, workdir: Path, out: TextIO, stack: contextlib.ExitStack):
        self.cfg, self.workdir, self.out, self.stack = cfg, workdir, out, stack
        self.ds = datasets.load(cfg.dataset, seed=cfg.seed, n_devices=cfg.clients)
        self.spec = _spec_for(cfg, self.ds)
        self.dp = cfg.privacy
        self.plan_cfg = {
            "epochs": cfg.epochs,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "momentum": 0.9,
            "mu": 0.0,
            "codec": cfg.codec,
        }
        if cfg.participation < 1.0:
            self.plan_cfg["selection"] = {
                "participation": cfg.participation,
                "window": cfg.participation_window,
            }

    # ------------------------------------------------------------------ set-up
    def _shards(self) -> list[tuple[npt.NDArray[np.float32], npt.NDArray[Any]]]:
        ds, cfg = self.ds, self.cfg
        if ds.device_shards:
            shards = list(ds.device_shards)
        else:
            parts = partition(ds.y_train, cfg.clients, cfg.partition, seed=cfg.seed)
            shards = [(ds.X_train[p], ds.y_train[p]) for p in parts]
        if cfg.model == "linear":
            eye = np.eye(ds.n_classes, dtype=np.float32)
            return [(X, eye[y]) for X, y in shards]
        return shards

    def _broker(self) -> tuple[str, int]:
        if self.cfg.broker:
            host, _, port = self.cfg.broker.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"--broker must be HOST:PORT, not {self.cfg.broker!r}")
            return host, int(port)
        m = Mosquitto(data_dir=self.workdir / "broker")
        self.stack.callback(m.close)
        m.start()
        return m.host, m.port

    def _aggregator_config(self, host: str, port: int, signing_key: Path) -> Any:
        from aggregator.config import AggregatorConfig

        cfg = self.cfg
        holdout = self.workdir / "holdout.npz"
        y_test: npt.NDArray[Any] = self.ds.y_test
        if cfg.model == "linear":
            y_test = np.eye(self.ds.n_classes, dtype=np.float32)[y_test]
        np.savez(holdout, X=self.ds.X_test, y=y_test)
        default_k = {"fedbuff": max(1, cfg.clients // 2), "fedavg": cfg.clients}
        strategy: dict[str, Any] = {
            "name": cfg.strategy,
            "max_staleness": 50,
            "robust": cfg.robust,
        }
        if cfg.strategy == "fedbuff":
            strategy["buffer_size"] = cfg.buffer_size or default_k["fedbuff"]
        elif cfg.strategy == "fedavg":
            strategy["min_updates"] = cfg.buffer_size or default_k["fedavg"]
            strategy["deadline_s"] = 0
        if cfg.server_opt is not None:
            strategy["server_optimizer"] = cfg.server_opt
        if cfg.server_lr is not None:
            strategy["server_lr"] = cfg.server_lr
        strategy.update(cfg.extra_strategy)
        raw = {
            "federation": {"id": FEDERATION, "state_dir": str(self.workdir / "aggregator")},
            "broker": {"host": host, "port": port, "client_id": "fedmqtt-aggregator-sim"},
            "security": {
                "signing_key": str(signing_key),
                "devices_dir": str(self.workdir / "devices"),
            },
            "model": _model_table(self.spec, cfg.seed),
            "strategy": strategy,
            "plan": self.plan_cfg,
            "evaluation": {"holdout": str(holdout)},
            "onnx": {"every": cfg.onnx_every},
            "rollout": {"gate": cfg.gate, "margin": cfg.gate_margin},
            "downlink": _downlink_table(cfg),
            "metrics": {"prometheus_port": 0},
            # --robust none means no defence at all, so that the damage an attack does is
            # visible; otherwise updates above 10x the median norm are refused at the door.
            "limits": {"norm_reject_factor": 0.0 if cfg.robust == "none" else 10.0},
        }
        if self.dp.mode == "central":
            raw["privacy"] = dp.table(self.dp)
        return AggregatorConfig.from_dict(raw, base_dir=self.workdir)

    def _device(
        self,
        i: int,
        b: behaviour.DeviceBehaviour,
        broker: tuple[str, int],
        agg_pub: Path,
        shard: tuple[npt.NDArray[np.float32], npt.NDArray[Any]],
    ) -> fleet.DeviceSpec:
        host, port = broker
        dev = f"dev{i:04d}"
        home = self.workdir / "agents" / dev
        (home / "data").mkdir(parents=True, exist_ok=True)
        np.savez(home / "data" / "shard.npz", X=shard[0], y=shard[1])
        key = ChaChaPolyKey.generate()
        key.save(home / "device.key")
        key.save(self.workdir / "devices" / f"{dev}.chacha")
        raw = {
            "device": {"id": dev, "federation": FEDERATION, "state_dir": str(home / "state")},
            "broker": {"host": host, "port": port, "reconnect_min_s": 0.2, "reconnect_max_s": 5.0},
            "security": {
                "aggregator_public_key": str(agg_pub),
                "update_key": str(home / "device.key"),
            },
            "data": {"source": "npz", "path": str(home / "data")},
            "training": {"seed": self.cfg.seed * 100_003 + i, **_pace(b)},
            "logging": {"level": "WARNING"},
        }
        if self.cfg.personalise is not None:
            raw["personalise"] = {"mode": self.cfg.personalise}
        if self.cfg.eval_fraction > 0:
            raw["evaluation"] = {"fraction": self.cfg.eval_fraction}
        if self.dp.mode == "local":
            raw["privacy"] = dp.table(self.dp)
        return fleet.DeviceSpec(dev, b, raw, home)

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t_setup = time.monotonic()
        shards = self._shards()
        n = len(shards)
        sched = behaviour.schedule(
            n,
            seed=cfg.seed,
            stragglers=cfg.stragglers,
            dropout=cfg.dropout,
            attackers=cfg.attackers,
            attacker_rate=cfg.attacker_rate,
            duration_s=cfg.duration,
            median_compute_s=cfg.compute_time,
        )
        host, port = self._broker()
        signer = Ed25519Signer.generate()
        keys = self.workdir / "keys"
        signer.save(keys / "aggregator.key")
        signer.verifier().save(keys / "aggregator.pub")
        agg_cfg = self._aggregator_config(host, port, keys / "aggregator.key")
        devices = [
            self._device(i, sched[i], (host, port), keys / "aggregator.pub", shards[i])
            for i in range(n)
        ]
        central = centralized_accuracy(
            self.spec,
            np.concatenate([s[0] for s in shards]),
            np.concatenate([s[1] for s in shards]),
            self.ds.X_test,
            self.ds.y_test if cfg.model != "linear" else np.eye(self.ds.n_classes)[self.ds.y_test],
            epochs=30,
            lr=cfg.lr,
            batch_size=32,
            seed=cfg.seed,
        )
        from simulator.aggregator_thread import AggregatorThread

        seen = _UpdateLedger()
        agg = AggregatorThread(agg_cfg, on_update=seen.record)
        agg.start()
        self.stack.callback(agg.stop)  # idempotent; covers a failure while the fleet starts
        attack_at = time.time() + cfg.attack_start
        attacks = fleet.Attacks(cfg.attack, cfg.seed, self.ds.n_classes, attack_at)
        processes = fleet.host_count(cfg.agent_processes, n)
        agents: fleet.Fleet = (
            fleet.ProcessFleet(devices, attacks, processes)
            if processes
            else fleet.LocalFleet(devices, attacks)
        )
        progress = report.Progress(out=self.out, every_s=5.0)
        holdout = evalseries.HoldoutLog()
        t0 = time.monotonic()
        t0_wall = time.time()
        agents.start()
        log.info("set-up took %.1fs", t0 - t_setup)
        counts: dict[str, fleet.DeviceCounts] = {}
        reached: report.Point | None = None
        error: str | None = None
        try:
            while (now := time.monotonic() - t0) < cfg.duration:
                time.sleep(cfg.sample_s)
                try:
                    agents.tick(now)
                except RuntimeError as e:
                    error = str(e)
                    break
                snap = agg.snapshot()
                holdout.note(snap)
                dev_counts = agents.counts()
                point = report.Point(
                    t=round(now, 3),
                    version=int(snap["version"]),
                    accuracy=snap.get("accuracy"),
                    uploads=int(snap["updates_received"]),
                    bytes_uploaded=_uploaded(snap),
                    online=int(snap.get("devices_online", 0)),
                    bytes_downloaded=sum(c.bytes_downloaded for c in dev_counts.values()),
                    federated=evalseries.federated_metric(snap),
                    released_accuracy=snap.get("released_score"),
                    rollbacks=sum(dict(snap.get("rollbacks", {})).values()),
                    epsilon=self._epsilon(snap, dev_counts),
                    eval_version=snap.get("eval_version"),
                )
                if not cfg.quiet:
                    progress.record(point)
                else:
                    progress.history.append(point)
                if agg.error is not None:
                    error = f"aggregator failed: {agg.error!r}"
                    break
                if cfg.versions is not None and point.version >= cfg.versions:
                    break
                if (
                    reached is None
                    and cfg.target_accuracy is not None
                    and point.accuracy is not None
                    and point.accuracy >= cfg.target_accuracy
                ):
                    reached = point
                    if cfg.stop_at_target:
                        break
        finally:
            progress.close()
            presence = agg.presence()  # before the agents say goodbye
            counts = agents.stop()
            delivered = {dev: c.acked for dev, c in counts.items()}
            if agents.failures and error is None:
                error = "; ".join(agents.failures)
            acked = {uid for ids in delivered.values() for uid in ids}
            # Every update the broker acknowledged must reach the aggregator: wait for the
            # broker's queue to drain before the books are closed -- as long as it drains
            # (an overloaded machine can leave a backlog of minutes), at most _DRAIN_MAX_S.
            _wait_for_drain(agg, lambda: len(acked - seen.received()))
            agg.stop()  # the books close after the last message it took in was counted
            final = agg.snapshot()
            holdout.note(final)
            federated = evalseries.federated_series(agg.federated_eval(), holdout)
            cohort = getattr(getattr(agg.service, "engine", None), "cohort", None)
            trained = cohort.participation() if cohort is not None else {}
        summary = self._summary(
            final, progress, central, reached=reached, devices=devices, error=error
        )
        summary.update(_traffic(counts, time.monotonic() - t0))
        summary["federated_eval"] = federated
        summary["eval_reports"] = final.get("eval_reports")
        accepted = max(summary["updates_accepted"], 1)
        summary["bytes_per_accepted_update"] = {
            "uploaded": round(summary["bytes_uploaded"] / accepted),
            "downloaded": round(summary["bytes_downloaded"] / accepted),
        }
        summary["updates_delivered_by_agents"] = sum(len(ids) for ids in delivered.values())
        summary["updates_delivered_by_device"] = {
            d: len(ids) for d, ids in sorted(delivered.items())
        }
        # By id, so that a duplicate cannot hide a loss: acknowledged by the broker but never
        # received by the aggregator, and accepted more than once (both must stay empty).
        summary["updates_lost"] = sorted(acked - seen.received())
        summary["updates_accepted_twice"] = seen.accepted_twice()
        # Accepted or refused (a held update is observed again when it is, or is still held).
        summary["updates_observed"] = sum(1 for _, reason in seen.events if reason != HELD)
        summary["updates_held"] = int(final.get("held", 0))
        summary["setup_s"] = round(t0 - t_setup, 1)
        summary["agents_connected_at_end"] = agents.connected_at_stop
        summary["devices_not_online"] = {
            d.id: presence.get(d.id, "never seen")
            for d in devices
            if presence.get(d.id) != "online"
        }
        summary["attack_started_at_s"] = (
            round(attack_at - t0_wall, 2) if summary["attackers"] else None
        )
        summary["rollbacks"] = dict(final.get("rollbacks", {}))
        summary["released_version"] = final.get("released_version")
        summary["final_released_accuracy"] = final.get("released_score")
        summary["tail_released_accuracy"] = _tail_mean(progress.history, 0.25, released=True)
        # Participation window -> devices whose updates based on it passed the selection.
        summary["trained_per_window"] = {str(w): k for w, k in trained.items()}
        summary["workdir"] = str(self.workdir)
        if cfg.json is not None:
            report.write_json(cfg.json, summary)
        if cfg.plot is not None:
            report.plot(
                cfg.plot,
                progress.history,
                centralized=central,
                title=f"{cfg.dataset} / {cfg.strategy} / {cfg.codec} / {cfg.partition}, {n} agents",
            )
        return summary

    def _privacy_summary(
        self, final: dict[str, Any], progress: report.Progress
    ) -> dict[str, Any] | None:
        if self.dp.mode == "off":
            return None
        out = _privacy_summary_of(self.dp.mode, self.dp)
        last = [p.epsilon for p in progress.history if p.epsilon is not None]
        out["epsilon"] = max(last) if last else 0.0
        if self.dp.mode == "central" and final.get("privacy"):
            out.update(final["privacy"])
        return out

    def _epsilon(self, snap: dict[str, Any], counts: dict[str, fleet.DeviceCounts]) -> float | None:
        """ε of the worst-case device: the aggregator's (central) or from the device with
        most noised rounds (local); None without DP."""
        if self.dp.mode == "central":
            privacy = snap.get("privacy")
            return float(privacy["epsilon"]) if privacy else None
        if self.dp.mode == "local":
            return dp.local_epsilon(self.dp, max((c.rounds for c in counts.values()), default=0))
        return None

    def _summary(
        self,
        final: dict[str, Any],
        progress: report.Progress,
        central: float,
        *,
        reached: report.Point | None,
        devices: list[fleet.DeviceSpec],
        error: str | None,
    ) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.target_accuracy is not None:  # from the publication of the version reaching it
            reached = progress.first_reaching(cfg.target_accuracy)
        rejected = dict(final.get("rejected", {}))
        return {
            "config": {
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in cfg.__dict__.items()
                if k not in ("extra_strategy",)
            },
            "final_accuracy": final.get("accuracy"),
            "tail_accuracy": _tail_mean(progress.history, 0.25),
            "centralized_accuracy": round(central, 4),
            "target_accuracy": cfg.target_accuracy,
            "time_to_target_s": reached.t if reached else None,
            "version_to_target": reached.version if reached else None,
            "uploads_to_target": reached.uploads if reached else None,
            "bytes_to_target": reached.bytes_total if reached else None,
            "bytes_uploaded_to_target": reached.bytes_uploaded if reached else None,
            "bytes_downloaded_to_target": reached.bytes_downloaded if reached else None,
            "bytes_uploaded": _uploaded(final),
            "updates_received": int(final["updates_received"]),
            "updates_accepted": int(final["accepted"]),
            "updates_rejected": rejected,
            "versions": int(final["version"]),
            "agents": len(devices),
            "agent_processes": fleet.host_count(cfg.agent_processes, len(devices)),
            "attackers": [d.id for d in devices if d.behaviour.attacker],
            "stragglers": [d.id for d in devices if d.behaviour.straggler],
            "error": error,
            "privacy": self._privacy_summary(final, progress),
            "history": report.history_as_dicts(progress.history),
        }


def _uploaded(snap: dict[str, Any]) -> int:
    """Bytes the devices sent that the aggregator received: updates and evaluation reports."""
    reports = snap.get("eval_reports") or {}
    return int(snap.get("bytes_received", 0)) + int(reports.get("bytes_received", 0))


def _privacy_summary_of(mode: str, p: PrivacyConfig) -> dict[str, Any]:
    return {
        "mode": mode,
        "clip": p.clip,
        "noise_multiplier": p.noise_multiplier,
        "delta": p.delta,
        "max_epsilon": p.max_epsilon or None,
        "accountant": "rdp (dp-accounting), no amplification by sampling",
    }


def _traffic(counts: dict[str, fleet.DeviceCounts], seconds: float) -> dict[str, Any]:
    """Downlink and flash figures of the run, counted at the devices: ``bytes_downloaded`` is
    every payload the devices' MQTT clients received (model, plan, ONNX, ...), in total, by
    kind and per device; ``bytes_written_per_device_hour`` is the mean a device wrote to its
    state directory, scaled to an hour of this run; ``rounds_failed_by_agents`` the rounds
    that failed (each logged by its agent; 0 in a healthy run)."""
    by_kind: dict[str, int] = {}
    for c in counts.values():
        for k, v in c.downloaded.items():
            by_kind[k] = by_kind.get(k, 0) + v
    rejected: Counter[str] = Counter()
    for c in counts.values():
        rejected.update(c.rejected)
    hours = max(seconds, 1e-9) / 3600.0
    n = max(len(counts), 1)
    return {
        "bytes_downloaded": sum(by_kind.values()),
        "bytes_downloaded_by_kind": dict(sorted(by_kind.items())),
        "bytes_downloaded_per_device": {d: c.bytes_downloaded for d, c in sorted(counts.items())},
        "rounds_by_agents": sum(c.rounds for c in counts.values()),
        "model_fetches_by_agents": sum(c.fetches for c in counts.values()),
        "rejected_by_agents": dict(sorted(rejected.items())),
        "rounds_failed_by_agents": sum(c.failed for c in counts.values()),
        "bytes_written_by_agents": sum(c.written for c in counts.values()),
        "bytes_written_per_device_hour": round(sum(c.written for c in counts.values()) / n / hours),
    }


_DRAIN_IDLE_S = 15.0
_DRAIN_MAX_S = 300.0


class _UpdateLedger:
    """What the aggregator did with each update it received, by id (its ``on_update`` hook,
    called on the aggregator's engine thread; ``list.append`` needs no lock)."""

    def __init__(self) -> None:
        self.events: list[tuple[str | None, str | None]] = []

    def record(self, update_id: str | None, reason: str | None) -> None:
        self.events.append((update_id, reason))

    def received(self) -> set[str]:
        return {uid for uid, _ in list(self.events) if uid is not None}

    def accepted_twice(self) -> list[str]:
        accepted = Counter(uid for uid, reason in list(self.events) if reason is None)
        return sorted(str(uid) for uid, n in accepted.items() if n > 1)


def _wait_for_drain(agg: Any, missing: Callable[[], int]) -> None:
    """Wait until ``missing()`` (acknowledged updates the aggregator has not received) is 0,
    giving up after _DRAIN_IDLE_S without progress or _DRAIN_MAX_S in all."""
    start = last_progress = time.monotonic()
    left = missing()
    while left > 0 and agg.error is None:
        now = time.monotonic()
        if now - last_progress > _DRAIN_IDLE_S or now - start > _DRAIN_MAX_S:
            log.warning(
                "%d acknowledged update(s) not received by the aggregator after %.0f s",
                left,
                now - start,
            )
            return
        time.sleep(0.1)
        newer = missing()
        if newer < left:
            left, last_progress = newer, time.monotonic()


def _tail_mean(
    history: list[report.Point], fraction: float, *, released: bool = False
) -> float | None:
    """Mean accuracy over the last ``fraction`` of the run: one evaluation on a 359-sample test
    set moves in steps of 0.28 points, so comparisons between runs use this smoother figure.
    ``released``: of the version the evaluation gate released."""
    if not history:
        return None
    start = history[-1].t * (1 - fraction)
    got = [p.released_accuracy if released else p.accuracy for p in history if p.t >= start]
    accs = [a for a in got if a is not None]
    return round(sum(accs) / len(accs), 4) if accs else None


def _pace(b: behaviour.DeviceBehaviour) -> dict[str, Any]:
    """The agent's ``[training]`` pace: an honest device trains once per global version; a
    faster attacker trains again every ``compute_s`` (already divided by its rate), version
    or not, each round a new update with a fresh id."""
    if b.rate <= 1.0:
        return {}
    return {"max_updates_per_version": 0, "interval_s": b.compute_s}


def _spec_for(cfg: SimConfig, ds: datasets.Dataset) -> ModelSpec:
    n_features = ds.X_train.shape[1]
    common: dict[str, Any] = {
        "n_features": n_features,
        "n_outputs": ds.n_classes,
        "feature_offset": ds.feature_offset,
        "feature_scale": ds.feature_scale,
    }
    if cfg.model == "softmax":
        return ModelSpec("softmax", classes=tuple(range(ds.n_classes)), **common)
    if cfg.model == "mlp":
        return ModelSpec("mlp", hidden=cfg.hidden, classes=tuple(range(ds.n_classes)), **common)
    return ModelSpec("linear", **common)


def _model_table(spec: ModelSpec, seed: int) -> dict[str, Any]:
    table = dict(spec.to_wire())
    table["seed"] = seed
    return table
