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
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from fedmqtt.broker import Mosquitto
from fedmqtt.codecs import Codec
from fedmqtt.errors import ConfigError
from fedmqtt.models.spec import ModelSpec
from fedmqtt.params import Params
from fedmqtt.signing import Ed25519Signer, HmacKey
from simulator import behaviour, datasets, report
from simulator.central import centralized_accuracy
from simulator.partition import partition

log = logging.getLogger("fedmqtt.simulate")
FEDERATION = "sim"


@dataclass(frozen=True)
class SimConfig:
    dataset: str = "digits"
    model: str = "softmax"
    clients: int = 10
    partition: str = "dirichlet:0.5"
    strategy: str = "fedbuff"
    codec: str = "int8"
    stragglers: float = 0.0
    dropout: float = 0.0
    attackers: float = 0.0
    attack: str = "signflip"
    robust: str = "none"
    duration: float = 60.0
    target_accuracy: float | None = None
    stop_at_target: bool = False
    buffer_size: int | None = None
    compute_time: float = 0.3
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
    extra_strategy: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SimConfig:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    def check(self) -> None:
        if self.clients < 1:
            raise ConfigError("--clients must be at least 1")
        if self.duration <= 0:
            raise ConfigError("--duration must be positive")
        Codec.parse(self.codec)
        if self.model == "linear" and self.dataset != "synthetic":
            log.info("linear model: least-squares classifier on one-hot targets")


@dataclass
class _Device:
    id: str
    behaviour: behaviour.DeviceBehaviour
    config: Any  # edge_agent.config.AgentConfig
    thread: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    agent: Any = None
    delivered_before: int = 0  # PUBACKed updates of earlier agent instances (after outages)

    @property
    def delivered(self) -> int:
        return self.delivered_before + (self.agent.updates_sent if self.agent is not None else 0)


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


class _Simulation:
    def __init__(self, cfg: SimConfig, workdir: Path, out: TextIO, stack: contextlib.ExitStack):
        self.cfg, self.workdir, self.out, self.stack = cfg, workdir, out, stack
        self.ds = datasets.load(cfg.dataset, seed=cfg.seed, n_devices=cfg.clients)
        self.spec = _spec_for(cfg, self.ds)
        self.plan_cfg = {"epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size,
                         "momentum": 0.9, "mu": 0.0, "codec": cfg.codec}

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
        strategy.update(cfg.extra_strategy)
        raw = {
            "federation": {"id": FEDERATION, "state_dir": str(self.workdir / "aggregator")},
            "broker": {"host": host, "port": port, "client_id": "fedmqtt-aggregator-sim"},
            "security": {"signing_key": str(signing_key),
                         "devices_dir": str(self.workdir / "devices")},
            "model": _model_table(self.spec, cfg.seed),
            "strategy": strategy,
            "plan": self.plan_cfg,
            "evaluation": {"holdout": str(holdout)},
            "onnx": {"every": cfg.onnx_every},
            "metrics": {"prometheus_port": 0},
            # --robust none means no defence at all, so that the damage an attack does is
            # visible; otherwise updates above 10x the median norm are refused at the door.
            "limits": {"norm_reject_factor": 0.0 if cfg.robust == "none" else 10.0},
        }
        return AggregatorConfig.from_dict(raw, base_dir=self.workdir)

    def _device_config(self, i: int, host: str, port: int, agg_pub: Path,
                       shard: tuple[npt.NDArray[np.float32], npt.NDArray[Any]]) -> Any:
        from edge_agent.config import AgentConfig

        dev = f"dev{i:04d}"
        home = self.workdir / "agents" / dev
        (home / "data").mkdir(parents=True, exist_ok=True)
        np.savez(home / "data" / "shard.npz", X=shard[0], y=shard[1])
        key = HmacKey.generate()
        key.save(home / "device.hmac")
        key.save(self.workdir / "devices" / f"{dev}.hmac")
        raw = {
            "device": {"id": dev, "federation": FEDERATION, "state_dir": str(home / "state")},
            "broker": {"host": host, "port": port, "reconnect_min_s": 0.2,
                       "reconnect_max_s": 5.0},
            "security": {"aggregator_public_key": str(agg_pub),
                         "update_key": str(home / "device.hmac")},
            "data": {"source": "npz", "path": str(home / "data")},
            "training": {"seed": self.cfg.seed * 100_003 + i},
            "logging": {"level": "WARNING"},
        }
        return AgentConfig.from_dict(raw, base_dir=home)

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t_setup = time.monotonic()
        shards = self._shards()
        n = len(shards)
        sched = behaviour.schedule(
            n, seed=cfg.seed, stragglers=cfg.stragglers, dropout=cfg.dropout,
            attackers=cfg.attackers, duration_s=cfg.duration, median_compute_s=cfg.compute_time,
        )
        host, port = self._broker()
        signer = Ed25519Signer.generate()
        keys = self.workdir / "keys"
        signer.save(keys / "aggregator.key")
        signer.verifier().save(keys / "aggregator.pub")
        agg_cfg = self._aggregator_config(host, port, keys / "aggregator.key")
        devices = [
            _Device(cfg_dev.device.id, b, cfg_dev)
            for b, cfg_dev in (
                (sched[i], self._device_config(i, host, port, keys / "aggregator.pub", shards[i]))
                for i in range(n)
            )
        ]
        central = centralized_accuracy(
            self.spec, np.concatenate([s[0] for s in shards]),
            np.concatenate([s[1] for s in shards]), self.ds.X_test,
            self.ds.y_test if cfg.model != "linear" else np.eye(self.ds.n_classes)[self.ds.y_test],
            epochs=30, lr=cfg.lr, batch_size=32, seed=cfg.seed,
        )
        from aggregator.service import AggregatorThread

        agg = AggregatorThread(agg_cfg)
        agg.start()
        progress = report.Progress(out=self.out, every_s=5.0)
        t0 = time.monotonic()
        for d in devices:
            self._start_device(d)
        log.info("set-up took %.1fs", t0 - t_setup)
        reached: report.Point | None = None
        error: str | None = None
        try:
            while (now := time.monotonic() - t0) < cfg.duration:
                time.sleep(0.25)
                self._apply_dropout(devices, now)
                snap = agg.snapshot()
                point = report.Point(
                    t=round(now, 3), version=int(snap["version"]),
                    accuracy=snap.get("accuracy"), uploads=int(snap["updates_received"]),
                    bytes_uploaded=int(snap.get("bytes_received", 0)),
                    online=int(snap.get("devices_online", 0)),
                )
                if not cfg.quiet:
                    progress.record(point)
                else:
                    progress.history.append(point)
                if agg.error is not None:
                    error = f"aggregator failed: {agg.error!r}"
                    break
                if (reached is None and cfg.target_accuracy is not None
                        and point.accuracy is not None and point.accuracy >= cfg.target_accuracy):
                    reached = point
                    if cfg.stop_at_target:
                        break
        finally:
            progress.close()
            for d in devices:
                d.stop.set()
            for d in devices:
                if d.thread is not None:
                    d.thread.join(15)
            # Every update the broker acknowledged must reach the aggregator: wait for the
            # broker's queue to drain before the books are closed.
            delivered = sum(d.delivered for d in devices)
            deadline = time.monotonic() + 30
            while (agg.snapshot()["updates_received"] < delivered and agg.error is None
                   and time.monotonic() < deadline):
                time.sleep(0.1)
            final = agg.snapshot()
            agg.stop()
        summary = self._summary(final, progress, central, reached=reached, devices=devices,
                                error=error)
        summary["updates_delivered_by_agents"] = delivered
        summary["workdir"] = str(self.workdir)
        if cfg.json is not None:
            report.write_json(cfg.json, summary)
        if cfg.plot is not None:
            report.plot(cfg.plot, progress.history, centralized=central,
                        title=f"{cfg.dataset} / {cfg.strategy} / {cfg.codec} / "
                              f"{cfg.partition}, {n} agents")
        return summary

    def _start_device(self, d: _Device) -> None:
        from edge_agent.agent import EdgeAgent

        cfg = self.cfg
        b = d.behaviour
        attack: Callable[[Params], Params] | None = None
        data_tf = None
        if b.attacker:
            if cfg.attack == "labelflip":
                data_tf = behaviour.label_flip(self.ds.n_classes)
            else:
                attack = behaviour.delta_attack(cfg.attack, seed=cfg.seed + b.index)
        compute_s = b.compute_s
        d.stop = threading.Event()

        def delta_tf(delta: Params, stop: threading.Event = d.stop) -> Params:
            # Emulated slow hardware: the update leaves compute_s after the model arrived,
            # so its staleness is what a device of this speed would produce.
            stop.wait(compute_s)
            return attack(delta) if attack is not None else delta

        d.agent = EdgeAgent(d.config, delta_transform=delta_tf, data_transform=data_tf)
        d.thread = threading.Thread(target=d.agent.run, args=(d.stop,), name=d.id, daemon=True)
        d.thread.start()

    def _apply_dropout(self, devices: list[_Device], now: float) -> None:
        for d in devices:
            offline = any(a <= now < b for a, b in d.behaviour.offline)
            running = d.thread is not None and d.thread.is_alive()
            if offline and running:
                d.stop.set()
                d.thread.join(15)  # type: ignore[union-attr]
                d.thread = None
                d.delivered_before = d.delivered
                d.agent = None
            elif not offline and not running and d.behaviour.offline:
                self._start_device(d)

    def _summary(self, final: dict[str, Any], progress: report.Progress, central: float, *,
                 reached: report.Point | None, devices: list[_Device],
                 error: str | None) -> dict[str, Any]:
        cfg = self.cfg
        if reached is None and cfg.target_accuracy is not None:
            reached = progress.first_reaching(cfg.target_accuracy)
        rejected = dict(final.get("rejected", {}))
        return {
            "config": {k: (str(v) if isinstance(v, Path) else v)
                       for k, v in cfg.__dict__.items() if k not in ("extra_strategy",)},
            "final_accuracy": final.get("accuracy"),
            "tail_accuracy": _tail_mean(progress.history, 0.25),
            "centralized_accuracy": round(central, 4),
            "target_accuracy": cfg.target_accuracy,
            "time_to_target_s": reached.t if reached else None,
            "uploads_to_target": reached.uploads if reached else None,
            "bytes_to_target": reached.bytes_uploaded if reached else None,
            "bytes_uploaded": int(final.get("bytes_received", 0)),
            "updates_received": int(final["updates_received"]),
            "updates_accepted": int(final["accepted"]),
            "updates_rejected": rejected,
            "versions": int(final["version"]),
            "agents": len(devices),
            "attackers": [d.id for d in devices if d.behaviour.attacker],
            "stragglers": [d.id for d in devices if d.behaviour.straggler],
            "error": error,
            "history": report.history_as_dicts(progress.history),
        }


def _tail_mean(history: list[report.Point], fraction: float) -> float | None:
    """Mean accuracy over the last ``fraction`` of the run: one evaluation on a 359-sample test
    set moves in steps of 0.28 points, so comparisons between runs use this smoother figure."""
    if not history:
        return None
    start = history[-1].t * (1 - fraction)
    accs = [p.accuracy for p in history if p.t >= start and p.accuracy is not None]
    return round(sum(accs) / len(accs), 4) if accs else None


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
        return ModelSpec("mlp", hidden=(32,), classes=tuple(range(ds.n_classes)), **common)
    return ModelSpec("linear", **common)


def _model_table(spec: ModelSpec, seed: int) -> dict[str, Any]:
    table = dict(spec.to_wire())
    table["seed"] = seed
    return table


def iter_configs(base: SimConfig, **grid: list[Any]) -> Iterator[SimConfig]:
    """Every combination of ``grid`` applied to ``base`` (for benchmark scripts)."""
    keys = list(grid)

    def rec(i: int, cur: SimConfig) -> Iterator[SimConfig]:
        if i == len(keys):
            yield cur
            return
        for v in grid[keys[i]]:
            yield from rec(i + 1, replace(cur, **{keys[i]: v}))

    yield from rec(0, base)
