"""Anomaly-detection data for simulations, and a federation of autoencoders over a real broker.

Data sources:

* :func:`novelty`: novelty detection on the bundled scikit-learn sets. ``breast_cancer``: the
  benign samples are normal, the malignant ones the anomalies. ``digits``: the digits 0-4 are
  normal, 5-9 the anomalies. Devices train on normal samples only; the held-out test set mixes
  held-out normal samples with anomalies (a quarter of it). The data are unlabeled for
  training, so a non-IID split cannot follow labels: :attr:`NoveltyData.proxy` holds k-means
  cluster ids of the training samples, a label-free proxy that ``dirichlet:BETA`` splits on.
* :class:`SensorStream`: a synthetic multi-sensor stream per device. Each reading is
  ``A z + b_d + drift_d * t + noise``: the sensors share two latent operating factors ``z``
  (load, ambient) through a fleet-wide mixing ``A`` (the same machine type), each device has
  its own offset ``b_d`` (its own machine, room) and a slow legitimate drift. Faults (label
  1) are injected on request: *spikes* (one sensor jumps by 5-8 standard deviations),
  *stuck* sensors (one sensor repeats a constant instead of following the load) and *slow
  drift* (one sensor ramps away by up to 4 standard deviations, unlike its neighbours).
  :class:`SensorFeed` appends readings to a device's data directory while its agent runs, and
  the agent trains on the newest ``[data] max_samples`` readings: a sliding window over a data
  source that grows between rounds.

:func:`run_federation` runs one federation of real :class:`~edge_agent.agent.EdgeAgent`\\ s
and the real aggregator over a real Mosquitto until the global model reaches a version, and
returns the final model and threshold (tests/test_anomaly_e2e.py, bench/anomaly_quality.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedmqtt.errors import ConfigError, FedMQTTError
from fedmqtt.fsutil import atomic_write_bytes
from fedmqtt.models.spec import ModelSpec
from fedmqtt.params import Params

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
NOVELTY: Final = ("breast_cancer", "digits")
FEDERATION: Final = "anomaly-sim"
_BLOCK: Final = 256  # readings generated per seeded block


@dataclass(frozen=True)
class NoveltyData:
    name: str
    X_train: F32  # normal samples only
    proxy: I64  # k-means cluster of each training sample (label-free, for skewed splits)
    X_test: F32
    y_test: I64  # 1 = anomaly
    feature_offset: tuple[float, ...]
    feature_scale: tuple[float, ...]


def novelty(name: str, *, seed: int, test_fraction: float = 0.3) -> NoveltyData:
    """A novelty-detection split of a bundled data set (see the module docstring)."""
    from sklearn import datasets
    from sklearn.cluster import KMeans

    if name == "breast_cancer":
        X, y = datasets.load_breast_cancer(return_X_y=True)
        normal_mask = y == 1  # benign
        n_clusters = 5
    elif name == "digits":
        X, y = datasets.load_digits(return_X_y=True)
        normal_mask = y <= 4
        n_clusters = 10
    else:
        raise ConfigError(f"unknown novelty data set {name!r}; choose one of {NOVELTY}")
    X = np.asarray(X, dtype=np.float32)
    rng = np.random.default_rng(seed)
    normal = rng.permutation(np.flatnonzero(normal_mask))
    anomalies = rng.permutation(np.flatnonzero(~normal_mask))
    n_test = round(len(normal) * test_fraction)
    test_normal, train = normal[:n_test], normal[n_test:]
    test_anomalies = anomalies[: max(1, n_test // 3)]  # a quarter of the test set
    Xtr = X[train]
    if name == "digits":  # pixel intensities 0..16: a fixed, known range
        offset = (0.0,) * X.shape[1]
        scale = (1.0 / 16.0,) * X.shape[1]
    else:  # standardise with the normal training data, frozen into the spec
        sd = Xtr.std(axis=0)
        sd[sd == 0] = 1.0
        offset = tuple(float(v) for v in Xtr.mean(axis=0))
        scale = tuple(float(1.0 / v) for v in sd)
    Xp = (Xtr - np.asarray(offset, np.float32)) * np.asarray(scale, np.float32)
    km = KMeans(n_clusters=n_clusters, n_init=4, random_state=seed).fit(Xp)
    X_test = np.concatenate([X[test_normal], X[test_anomalies]])
    y_test = np.r_[np.zeros(len(test_normal)), np.ones(len(test_anomalies))].astype(np.int64)
    return NoveltyData(name, Xtr, km.labels_.astype(np.int64), X_test, y_test, offset, scale)


# ---------------------------------------------------------------------------- sensor stream


@dataclass(frozen=True)
class SensorStream:
    """Readings of one device's sensors, a deterministic function of ``(seed, device, t)``."""

    seed: int
    device: int
    n_sensors: int = 6
    drift_per_1000: float = 0.3  # legitimate drift of the device's offsets, per 1000 readings
    noise: float = 0.1

    def _fleet(self) -> tuple[F32, F32, F32]:
        shared = np.random.default_rng([self.seed, 0x5E45])
        mixing = shared.normal(0.0, 1.0, (2, self.n_sensors)).astype(np.float32)
        own = np.random.default_rng([self.seed, 0x5E45, self.device + 1])
        offset = own.normal(0.0, 1.0, self.n_sensors).astype(np.float32)
        drift = own.normal(0.0, 1.0, self.n_sensors).astype(np.float32)
        return mixing, offset, drift * np.float32(self.drift_per_1000 / 1000.0)

    def readings(self, start: int, stop: int) -> F32:
        """Normal readings ``start <= t < stop`` (shape ``(stop - start, n_sensors)``)."""
        if not 0 <= start <= stop:
            raise ValueError("need 0 <= start <= stop")
        mixing, offset, drift = self._fleet()
        blocks = []
        for b in range(start // _BLOCK, (stop - 1) // _BLOCK + 1 if stop > start else 0):
            rng = np.random.default_rng([self.seed, self.device + 1, b])
            z = rng.normal(0.0, 1.0, (_BLOCK, 2)).astype(np.float32)
            eps = rng.normal(0.0, self.noise, (_BLOCK, self.n_sensors)).astype(np.float32)
            blocks.append(z @ mixing + eps)
        if not blocks:
            return np.empty((0, self.n_sensors), np.float32)
        base = np.concatenate(blocks)
        first = (start // _BLOCK) * _BLOCK
        x = base[start - first : stop - first]
        t = np.arange(start, stop, dtype=np.float32)[:, None]
        out: F32 = (x + offset + t * drift).astype(np.float32)
        return out

    def with_faults(self, start: int, stop: int, rate: float, seed: int) -> tuple[F32, I64]:
        """Readings with a fraction ``rate`` of faulty rows (label 1): spikes, stuck sensors
        and slow drift, one third each; the other rows are normal (label 0)."""
        X = self.readings(start, stop).copy()
        n = X.shape[0]
        rng = np.random.default_rng([seed, self.device + 1, 0xFA17])
        labels: I64 = np.asarray(rng.random(n) < rate, dtype=np.int64)
        sd = np.sqrt(np.sum(self._fleet()[0] ** 2, axis=0) + self.noise**2)
        for i in np.flatnonzero(labels):
            j = int(rng.integers(self.n_sensors))
            kind = int(rng.integers(3))
            if kind == 0:  # spike
                X[i, j] += rng.choice([-1.0, 1.0]) * rng.uniform(5.0, 8.0) * sd[j]
            elif kind == 1:  # stuck: a constant, not the load-driven value
                X[i, j] = self._fleet()[1][j] + 2.5 * sd[j]
            else:  # slow drift, caught at 2-4 standard deviations from where it should be
                X[i, j] += rng.uniform(2.0, 4.0) * sd[j]
        return X, labels


class SensorFeed:
    """Appends ``batch`` new readings of ``stream`` to ``directory`` every ``period_s`` (one
    CSV file per batch, written atomically), in a thread, starting with ``initial`` readings."""

    def __init__(
        self,
        stream: SensorStream,
        directory: Path,
        *,
        initial: int,
        batch: int,
        period_s: float,
    ) -> None:
        self.stream = stream
        self.directory = directory
        self.batch = batch
        self.period_s = period_s
        self.written = 0
        self.files = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sensor-feed", daemon=True)
        directory.mkdir(parents=True, exist_ok=True)
        self._write(initial)

    def _write(self, n: int) -> None:
        X = self.stream.readings(self.written, self.written + n)
        header = ",".join(f"s{j}" for j in range(X.shape[1]))
        lines = [header] + [",".join(f"{v:.6g}" for v in row) for row in X]
        path = self.directory / f"readings-{self.files:06d}.csv"
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
        self.written += n
        self.files += 1

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._write(self.batch)

    def start(self) -> SensorFeed:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop writing (idempotent); :attr:`written` is final once this returns."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)


# ---------------------------------------------------------------------------- federation


@dataclass
class FederationResult:
    version: int
    params: Params
    threshold: float | None
    # device -> ((level, score quantile) pairs, samples, base version)
    reports: dict[str, tuple[tuple[tuple[float, float], ...], int, int]]
    wall_s: float
    # Each agent's home directory and configuration (as the dict of its agent.toml).
    agents: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    # Readings each stream device's feed had written when the run ended (0: a fixed shard).
    readings: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Device:
    """One device of :func:`run_federation`: a fixed shard (``npz``) or a growing feed."""

    X: F32 | None = None
    stream: SensorStream | None = None
    window: int = 0  # [data] max_samples for a stream


def run_federation(
    spec: ModelSpec,
    devices: Sequence[Device],
    workdir: Path,
    *,
    versions: int | None,
    seed: int = 0,
    buffer_size: int | None = None,
    plan: dict[str, Any] | None = None,
    onnx_every: int = 0,
    timeout_s: float = 600.0,
    feed_period_s: float = 0.2,
    feed_batch: int = 20,
    downlink: str = "int8",
    strategy: dict[str, Any] | None = None,
    require_versions: bool = True,
) -> FederationResult:
    """Run agents and aggregator until the global model reaches ``versions``; FedMQTTError
    if it does not within ``timeout_s`` (``require_versions=False``: the run just ends
    there). ``versions=None``: run for ``timeout_s``."""
    from simulator.broker import Mosquitto

    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(Mosquitto(data_dir=workdir / "broker").start())
        agg, homes, feeds = _start(
            stack,
            spec,
            devices,
            workdir,
            broker.port,
            seed=seed,
            buffer_size=buffer_size,
            plan=plan,
            onnx_every=onnx_every,
            feed_period_s=feed_period_s,
            feed_batch=feed_batch,
            downlink=downlink,
            strategy=strategy,
        )
        target = versions if versions is not None else float("inf")
        reached = agg.wait_for(lambda s: s["version"] >= target, timeout=timeout_s)
        if versions is not None and require_versions and not reached:
            raise FedMQTTError(
                f"version {versions} not reached in {timeout_s:.0f} s: {agg.snapshot()}"
            )
        engine = agg.service.engine
        # Stop the feeds (the data the model has seen ends here), then the aggregator, so that
        # the model read here is the last one published.
        for feed in feeds:
            if feed is not None:
                feed.stop()
        agg.stop()
        est = engine.thresholds
        reports = (
            {}
            if est is None
            else {d: (r.points, r.num_samples, r.base_version) for d, r in est.reports.items()}
        )
        return FederationResult(
            version=engine.version,
            params=engine.layout.unflatten(engine.params.copy()),
            threshold=engine.threshold,
            reports=reports,
            wall_s=time.monotonic() - t0,
            agents=homes,
            readings=[0 if f is None else f.written for f in feeds],
        )
    raise AssertionError("unreachable")  # pragma: no cover


def _start(
    stack: contextlib.ExitStack,
    spec: ModelSpec,
    devices: Sequence[Device],
    workdir: Path,
    port: int,
    *,
    seed: int,
    buffer_size: int | None,
    plan: dict[str, Any] | None,
    onnx_every: int,
    feed_period_s: float,
    feed_batch: int,
    downlink: str,
    strategy: dict[str, Any] | None,
) -> tuple[Any, list[tuple[Path, dict[str, Any]]], list[SensorFeed | None]]:
    from aggregator.config import AggregatorConfig
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import AgentConfig
    from fedmqtt.signing import ChaChaPolyKey, Ed25519Signer
    from simulator.aggregator_thread import AggregatorThread

    signer = Ed25519Signer.generate()
    signer.save(workdir / "aggregator.key")
    signer.verifier().save(workdir / "aggregator.pub")
    (workdir / "devices").mkdir(parents=True, exist_ok=True)
    raw_agents: list[tuple[dict[str, Any], Path]] = []
    feeds: list[SensorFeed | None] = []
    for i, dev in enumerate(devices):
        name = f"dev{i:03d}"
        home = workdir / "agents" / name
        data = home / "data"
        data.mkdir(parents=True, exist_ok=True)
        key = ChaChaPolyKey.generate()
        key.save(home / "device.key")
        key.save(workdir / "devices" / f"{name}.chacha")
        data_table: dict[str, Any]
        if dev.stream is not None:
            feed = SensorFeed(
                dev.stream, data, initial=dev.window, batch=feed_batch, period_s=feed_period_s
            )
            stack.callback(feed.stop)
            feed.start()
            feeds.append(feed)
            data_table = {
                "source": "csv",
                "path": str(data),
                "labels": False,
                "max_samples": dev.window,
            }
        else:
            assert dev.X is not None
            np.savez(data / "shard.npz", X=dev.X)
            data_table = {"source": "npz", "path": str(data), "labels": False}
            feeds.append(None)
        raw_agents.append(
            (
                {
                    "device": {
                        "id": name,
                        "federation": FEDERATION,
                        "state_dir": str(home / "state"),
                    },
                    "broker": {
                        "host": "127.0.0.1",
                        "port": port,
                        "reconnect_min_s": 0.2,
                        "reconnect_max_s": 2.0,
                    },
                    "security": {
                        "aggregator_public_key": str(workdir / "aggregator.pub"),
                        "update_key": str(home / "device.key"),
                    },
                    "data": data_table,
                    "training": {"seed": seed * 100_003 + i},
                    "logging": {"level": "WARNING"},
                },
                home,
            )
        )
    model = dict(spec.to_wire())
    model["seed"] = seed
    k = buffer_size or max(1, len(devices) // 2)
    raw = {
        "federation": {"id": FEDERATION, "state_dir": str(workdir / "aggregator")},
        "broker": {"host": "127.0.0.1", "port": port, "client_id": "anomaly-aggregator"},
        "security": {
            "signing_key": str(workdir / "aggregator.key"),
            "devices_dir": str(workdir / "devices"),
        },
        "model": model,
        "strategy": {"name": "fedbuff", "buffer_size": k, "max_staleness": 20, **(strategy or {})},
        "plan": {
            "epochs": 1,
            "lr": 0.01,
            "batch_size": 16,
            "momentum": 0.9,
            "codec": "raw",
            **(plan or {}),
        },
        "onnx": {"every": onnx_every},
        "downlink": {"codec": downlink},
        "metrics": {"prometheus_port": 0},
    }
    agg = AggregatorThread(AggregatorConfig.from_dict(raw, base_dir=workdir)).start()
    stack.callback(agg.stop)
    for raw_agent, home in raw_agents:
        agent = EdgeAgent(AgentConfig.from_dict(raw_agent, base_dir=home))
        stop = threading.Event()
        thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
        thread.start()
        stack.callback(thread.join, 15.0)
        stack.callback(stop.set)
    return agg, [(h, raw) for raw, h in raw_agents], feeds


def iter_shards(X: F32, parts: Sequence[npt.NDArray[np.int64]]) -> Iterator[Device]:
    for p in parts:
        yield Device(X=X[p])
