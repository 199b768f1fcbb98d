"""The aggregator's configuration: ``aggregator.toml`` parsed into frozen dataclasses.

The aggregator runs unattended, so every option is read through :class:`Table`, which checks
type and range and raises :class:`ConfigError` naming the option (``[strategy] buffer_size:
...``); unknown keys are refused too, because a typo would otherwise silently leave a default
in force. The same code builds a config from a dict (:meth:`AggregatorConfig.from_dict`), which
is how the simulator configures an in-process aggregator.

Relative paths are resolved against the directory of the config file (``base_dir``), ``~`` is
expanded. Every option is documented in ``docs/aggregator.md`` and, annotated, in
``aggregator/aggregator.example.toml``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

from aggregator.rollout import RolloutConfig, read_rollout
from fedmqtt import mqttconf
from fedmqtt.aggregation import serveropt
from fedmqtt.aggregation.staleness import Staleness, parse_staleness
from fedmqtt.cohort import read_selection
from fedmqtt.errors import ConfigError
from fedmqtt.models.spec import KINDS, ModelSpec
from fedmqtt.mqttconf import read_connection
from fedmqtt.privacy.config import PrivacyConfig, check_central, read_privacy
from fedmqtt.tomltable import Table, read_toml
from fedmqtt.topics import PUBLIC_SHARED_GROUP, check_id
from fedmqtt.wire import MAX_KEYFRAMES, PLAN_BATCH_SIZE, PLAN_EPOCHS, PlanSettings

__all__ = [
    "AggregatorConfig",
    "BrokerConfig",
    "CheckpointConfig",
    "ConfigError",
    "EvaluationConfig",
    "FederationConfig",
    "LimitsConfig",
    "MetricsConfig",
    "OnnxConfig",
    "PlanConfig",
    "PrivacyConfig",
    "ScaleoutConfig",
    "SecurityConfig",
    "StrategyConfig",
    "load_config",
]

STRATEGIES: Final = ("fedbuff", "fedasync", "fedavg")
ROBUST_PARTS: Final = ("clip", "trimmed-mean", "median")
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")
METRICS_FORMATS: Final = ("json", "msgpack")
# Room for the update's header, metadata, per-tensor fields and the topic above the raw size.
UPDATE_OVERHEAD_BYTES: Final = 64 * 1024


@dataclass(frozen=True)
class FederationConfig:
    id: str
    state_dir: Path


@dataclass(frozen=True)
class BrokerConfig(mqttconf.BrokerConfig):
    """The shared ``[broker]`` options with the aggregator's defaults, and its client id."""

    session_expiry_s: int = 7 * 86_400
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0
    client_id: str = "fedmqtt-aggregator"


@dataclass(frozen=True)
class SecurityConfig:
    signing_key: Path
    devices_dir: Path


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "fedbuff"
    buffer_size: int = 10
    server_lr: float = serveropt.DEFAULT_SERVER_LR[serveropt.DEFAULT_SERVER_OPTIMIZER]
    momentum: float = 0.0
    server_optimizer: str = serveropt.DEFAULT_SERVER_OPTIMIZER
    beta1: float = serveropt.DEFAULT_BETA1
    beta2: float = serveropt.DEFAULT_BETA2
    tau: float = serveropt.DEFAULT_TAU
    staleness: str = "poly:0.5"
    max_staleness: int = 20
    alpha: float = 0.6
    min_updates: int = 10
    deadline_s: float = 0.0
    robust: tuple[str, ...] = ()
    trim_fraction: float = 0.1
    clip_factor: float = 3.0
    # At most this many rows of one device per buffer (FedBuff, FedAvg) or per window of
    # ``device_window`` consecutive versions (FedAsync); 0 = unbounded.
    max_per_device: int = 1
    device_window: int = 2

    def staleness_fn(self) -> Staleness:
        return parse_staleness(self.staleness)

    @property
    def reducer(self) -> str:
        """``mean``, ``trimmed-mean`` or ``median`` (the robust part other than clipping)."""
        for r in ("trimmed-mean", "median"):
            if r in self.robust:
                return r
        return "mean"

    @property
    def clip(self) -> bool:
        return "clip" in self.robust


PlanConfig = PlanSettings  # [plan]: the wire module owns its options and their defaults


@dataclass(frozen=True)
class EvaluationConfig:
    holdout: Path | None = None


@dataclass(frozen=True)
class OnnxConfig:
    every: int = 0


DOWNLINK_CODECS: Final = ("raw", "fp16", "int8", "int4")  # a full model (topk: a delta codec)


@dataclass(frozen=True)
class DownlinkConfig:
    """``[downlink]``: the codec of the published model's parameters (aggregator.publish),
    and the delta downlink (aggregator.keyframes): ``delta`` is the codec of deltas from a
    keyframe ("" = none), ``keyframes`` how many keyframes are kept, ``keyframe_every`` and
    ``keyframe_fraction`` when a version becomes a keyframe. ``compact``: everything the
    aggregator publishes is in the compact wire form (fedmqtt.wire); false keeps the long
    form, which devices of earlier releases read, until they are upgraded."""

    codec: str = "int8"
    delta: str = ""
    keyframes: int = 3
    keyframe_every: int = 20
    keyframe_fraction: float = 0.8
    compact: bool = True


@dataclass(frozen=True)
class MetricsConfig:
    prometheus_port: int = 0
    bind: str = "127.0.0.1"
    publish_interval_s: float = 10.0
    format: str = "json"
    status_interval_s: float = 5.0
    per_device: bool = False  # Prometheus series labelled by device (cardinality: the fleet)


@dataclass(frozen=True)
class LimitsConfig:
    max_update_bytes: int
    receive_maximum: int = 1000
    max_inflight_bytes: int = 512 * 1024 * 1024
    # A broker that keeps at most this many QoS 1 messages in flight to our session whatever
    # Receive Maximum we ask for (0: the broker honours it). Buffers larger than that are then
    # applied in parts, since buffered updates are acknowledged only once applied.
    broker_inflight: int = 0
    norm_reject_factor: float = 10.0
    max_norm: float = 0.0
    norm_window: int = 100
    norm_min_samples: int = 5
    batch_max: int = 256
    verify_threads: int = 2
    # Per-device token bucket: updates per second it refills at (0 = off), and its size.
    device_rate: float = 10.0
    device_burst: int = 20

    @property
    def inflight_window(self) -> int:
        """Receive Maximum actually requested: bounded by the memory budget of unacked updates."""
        by_memory = max(1, self.max_inflight_bytes // max(1, self.max_update_bytes))
        window = min(self.receive_maximum, by_memory)
        if self.broker_inflight:
            window = min(window, self.broker_inflight)
        return max(1, window)


@dataclass(frozen=True)
class CheckpointConfig:
    keep: int = 5  # state files kept: the versions fl-aggregator rollback can go back to
    min_interval_s: float = 0.1


@dataclass(frozen=True)
class ScaleoutConfig:
    workers: int = 0
    group: str = PUBLIC_SHARED_GROUP
    worker_brokers: tuple[BrokerConfig, ...] = ()
    pin_cpu: bool = True


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"


@dataclass(frozen=True)
class AggregatorConfig:
    federation: FederationConfig
    security: SecurityConfig
    spec: ModelSpec
    limits: LimitsConfig
    seed: int = 0
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    downlink: DownlinkConfig = field(default_factory=DownlinkConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scaleout: ScaleoutConfig = field(default_factory=ScaleoutConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    path: Path | None = None

    @property
    def state_dir(self) -> Path:
        return self.federation.state_dir

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any], *, base_dir: Path | None = None, path: Path | None = None
    ) -> AggregatorConfig:
        """Build a config from a parsed TOML document (or an equivalent dict).

        ``base_dir`` anchors relative paths (default: the current directory).
        """
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        root = Table(raw, "", base)
        names = (
            "federation",
            "broker",
            "security",
            "model",
            "strategy",
            "plan",
            "evaluation",
            "onnx",
            "downlink",
            "metrics",
            "limits",
            "checkpoint",
            "rollout",
            "scaleout",
            "logging",
            "privacy",
        )
        t = {name: root.table(name) for name in names}
        root.done()
        spec, seed = _model(t["model"])
        broker = _broker(t["broker"])
        cfg = cls(
            federation=_federation(t["federation"]),
            security=SecurityConfig(
                signing_key=t["security"].path("signing_key"),
                devices_dir=t["security"].path("devices_dir"),
            ),
            spec=spec,
            seed=seed,
            broker=broker,
            strategy=_strategy(t["strategy"]),
            plan=_plan(t["plan"]),
            evaluation=EvaluationConfig(holdout=t["evaluation"].opt_path("holdout")),
            onnx=OnnxConfig(every=t["onnx"].integer("every", 0, lo=0)),
            downlink=_downlink(t["downlink"]),
            metrics=_metrics(t["metrics"]),
            limits=_limits(t["limits"], spec),
            checkpoint=_checkpoint(t["checkpoint"]),
            rollout=read_rollout(t["rollout"]),
            scaleout=_scaleout(t["scaleout"], broker, base),
            logging=_logging(t["logging"]),
            privacy=read_privacy(t["privacy"], ("off", "central")),
            path=path,
        )
        for table in t.values():
            table.done()
        _check_window(cfg)
        check_central(
            cfg.privacy,
            strategy=cfg.strategy.name,
            reducer=cfg.strategy.reducer,
            adaptive_clip=cfg.strategy.clip,
            max_per_device=cfg.strategy.max_per_device,
            norm_reject_factor=cfg.limits.norm_reject_factor,
        )
        return cfg


def buffer_capacity(s: StrategyConfig) -> int:
    """How many accepted updates the strategy may hold unapplied (and so unacknowledged)."""
    return {"fedbuff": s.buffer_size, "fedavg": s.min_updates}.get(s.name, 1)


def devices_needed(s: StrategyConfig) -> int:
    """Distinct devices whose updates fill a buffer (FedAsync: a ``device_window`` of
    versions) under ``max_per_device``; 0 if it is unbounded."""
    if not s.max_per_device:
        return 0
    rows = s.device_window if s.name == "fedasync" else buffer_capacity(s)
    return -(-rows // s.max_per_device)


def window_pressure(cfg: AggregatorConfig) -> int:
    """Messages awaiting acknowledgement at which a partial buffer is applied early: 90 % of
    the window, but never below the buffer's own capacity (which ``_check_window`` keeps under
    the window), so a normal buffer always fills first."""
    window = cfg.limits.inflight_window
    capacity = buffer_capacity(cfg.strategy)
    if window <= capacity:  # only with [limits] broker_inflight: apply what the window holds
        return window
    return max(capacity, window * 9 // 10)


def _check_window(cfg: AggregatorConfig) -> None:
    """Buffered updates stay unacknowledged until applied: the Receive Maximum window must be
    able to hold a full buffer, or the buffer could never fill."""
    s = cfg.strategy
    capacity = buffer_capacity(s)
    window = cfg.limits.inflight_window
    if window <= capacity and window != cfg.limits.broker_inflight:
        raise ConfigError(
            f"[limits] receive_maximum: the window of unacknowledged updates ({window}, also "
            f"bounded by max_inflight_bytes / max_update_bytes) must exceed the {s.name} buffer "
            f"({capacity}); updates are acknowledged only once applied"
        )


def load_config(path: str | Path) -> AggregatorConfig:
    """Read and validate ``aggregator.toml``; any problem raises ConfigError naming the option."""
    p = Path(path).expanduser()
    raw = read_toml(p)
    try:
        return AggregatorConfig.from_dict(raw, base_dir=p.resolve().parent, path=p)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


# ------------------------------------------------------------------------------ the tables


def _federation(t: Table) -> FederationConfig:
    fed = t.text("id")
    try:
        check_id("federation id", fed)
    except ConfigError as e:
        raise t.error("id", str(e)) from None
    return FederationConfig(id=fed, state_dir=t.path("state_dir"))


def _broker(t: Table) -> BrokerConfig:
    d = BrokerConfig()
    protocol = str(t.raw("protocol", "5"))
    if protocol not in ("5", "5.0"):
        raise t.error(
            "protocol",
            f"only MQTT 5 is supported, not {protocol!r}: the aggregator relies on Receive "
            "Maximum flow control and PUBACK reason codes (see docs/aggregator.md)",
        )
    client_id = t.text("client_id", d.client_id)
    try:
        check_id("client_id", client_id)
    except ConfigError as e:
        raise t.error("client_id", str(e)) from None
    return BrokerConfig(client_id=client_id, **read_connection(t, d, min_session_expiry_s=60))


def _model(t: Table) -> tuple[ModelSpec, int]:
    kind = t.text("kind")
    if kind not in KINDS:
        raise t.error("kind", f"must be one of {', '.join(KINDS)}, not {kind!r}")
    n_features = t.integer("n_features", None, lo=1)
    n_outputs = t.integer("n_outputs", None, lo=1)
    hidden = t.int_list("hidden", lo=1)
    classes = t.int_list("classes")
    offset = t.float_list("feature_offset")
    scale = t.float_list("feature_scale")
    names = t.raw("feature_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise t.error("feature_names", "must be a list of strings")
    extra = t.raw("extra", {})
    if not isinstance(extra, Mapping):
        raise t.error("extra", "must be a table")
    seed = t.integer("seed", 0, lo=0)
    try:
        spec = ModelSpec(
            kind=cast(Any, kind),
            n_features=n_features,
            n_outputs=n_outputs,
            hidden=tuple(hidden),
            classes=tuple(classes),
            feature_offset=tuple(offset),
            feature_scale=tuple(scale),
            feature_names=tuple(names),
            extra=dict(extra),
        )
    except ValueError as e:
        raise ConfigError(f"[model]: {e}") from None
    return spec, seed


def _strategy(t: Table) -> StrategyConfig:
    d = StrategyConfig()
    name = t.text("name", d.name)
    if name not in STRATEGIES:
        raise t.error("name", f"must be one of {', '.join(STRATEGIES)}, not {name!r}")
    staleness = t.text("staleness", "constant" if name == "fedavg" else d.staleness)
    try:
        parse_staleness(staleness)
    except ConfigError as e:
        raise t.error("staleness", str(e)) from None
    robust_text = t.text("robust", "none").strip().lower()
    robust: tuple[str, ...] = ()
    if robust_text not in ("", "none"):
        parts = tuple(p.strip() for p in robust_text.split("+"))
        for p in parts:
            if p not in ROBUST_PARTS:
                raise t.error(
                    "robust",
                    f"unknown part {p!r}: use none, clip, trimmed-mean, median or a combination "
                    "such as clip+median",
                )
        if "trimmed-mean" in parts and "median" in parts:
            raise t.error("robust", "choose one of trimmed-mean and median")
        if name == "fedasync" and set(parts) - {"clip"}:
            raise t.error("robust", "fedasync applies one update at a time: only clip applies")
        robust = parts
    momentum = t.number("momentum", d.momentum, lo=0.0)
    if momentum >= 1.0:
        raise t.error("momentum", "must be in [0, 1)")
    alpha = t.number("alpha", d.alpha, lo=0.0, hi=1.0)
    trim = t.number("trim_fraction", d.trim_fraction, lo=0.0)
    if trim >= 0.5:
        raise t.error("trim_fraction", "must be in [0, 0.5)")
    opt, server_lr, beta1, beta2, tau = _server_optimizer(t, momentum)
    clip_factor = t.number("clip_factor", d.clip_factor, lo=0.0)
    if clip_factor <= 0:
        raise t.error("clip_factor", "must be > 0")
    return StrategyConfig(
        name=name,
        buffer_size=t.integer("buffer_size", d.buffer_size, lo=1, hi=100_000),
        server_lr=server_lr,
        momentum=momentum,
        server_optimizer=opt,
        beta1=beta1,
        beta2=beta2,
        tau=tau,
        staleness=staleness,
        max_staleness=t.integer("max_staleness", d.max_staleness, lo=0, hi=1_000_000),
        alpha=alpha,
        min_updates=t.integer("min_updates", d.min_updates, lo=1, hi=100_000),
        deadline_s=t.number("deadline_s", d.deadline_s, lo=0.0),
        robust=robust,
        trim_fraction=trim,
        clip_factor=clip_factor,
        max_per_device=t.integer("max_per_device", d.max_per_device, lo=0, hi=100_000),
        device_window=t.integer("device_window", d.device_window, lo=1, hi=100_000),
    )


def _server_optimizer(t: Table, momentum: float) -> tuple[str, float, float, float, float]:
    """``server_optimizer``, ``server_lr`` (its default depends on the optimizer), ``beta1``,
    ``beta2``, ``tau`` of ``[strategy]``."""
    opt = t.text("server_optimizer", serveropt.DEFAULT_SERVER_OPTIMIZER)
    if opt not in serveropt.SERVER_OPTIMIZERS:
        raise t.error(
            "server_optimizer", f"must be one of {', '.join(serveropt.SERVER_OPTIMIZERS)}"
        )
    server_lr = t.number("server_lr", serveropt.DEFAULT_SERVER_LR[cast(Any, opt)], lo=0.0)
    if server_lr <= 0:
        raise t.error("server_lr", "must be > 0")
    beta1 = t.number("beta1", serveropt.DEFAULT_BETA1, lo=0.0)
    if beta1 >= 1.0:
        raise t.error("beta1", "must be in [0, 1)")
    beta2 = t.number("beta2", serveropt.DEFAULT_BETA2, lo=0.0)
    if beta2 >= 1.0:
        raise t.error("beta2", "must be in [0, 1)")
    tau = t.number("tau", serveropt.DEFAULT_TAU, lo=0.0)
    if tau <= 0:
        raise t.error("tau", "must be > 0")
    if opt == "sgd":
        for key in ("beta1", "beta2", "tau"):
            if t.has(key):
                raise t.error(key, "applies only to server_optimizer adagrad, adam or yogi")
    elif momentum:
        raise t.error(
            "momentum", f"is the plain server step's; server_optimizer {opt} has beta1 instead"
        )
    return opt, server_lr, beta1, beta2, tau


def _plan(t: Table) -> PlanConfig:
    d = PlanConfig()
    codec = t.text("codec", d.codec)
    from fedmqtt.codecs import Codec

    try:
        Codec.parse(codec)
    except ConfigError as e:
        raise t.error("codec", str(e)) from None
    lr = t.number("lr", d.lr, lo=0.0)
    if lr <= 0:
        raise t.error("lr", "must be > 0")
    momentum = t.number("momentum", d.momentum, lo=0.0)
    if momentum >= 1.0:
        raise t.error("momentum", "must be in [0, 1)")
    (e_lo, e_hi), (b_lo, b_hi) = PLAN_EPOCHS, PLAN_BATCH_SIZE
    return PlanConfig(
        epochs=t.integer("epochs", d.epochs, lo=e_lo, hi=e_hi),
        lr=lr,
        batch_size=t.integer("batch_size", d.batch_size, lo=b_lo, hi=b_hi),
        momentum=momentum,
        mu=t.number("mu", d.mu, lo=0.0),
        codec=codec,
        min_interval_s=t.number("min_interval_s", d.min_interval_s, lo=0.0),
        selection=read_selection(t.table("selection")),
    )


def _downlink(t: Table) -> DownlinkConfig:
    codec = t.text("codec", DownlinkConfig.codec)
    from fedmqtt.codecs import Codec

    try:
        parsed = Codec.parse(codec)
    except ConfigError as e:
        raise t.error("codec", str(e)) from None
    if parsed.name not in DOWNLINK_CODECS:
        raise t.error("codec", f"a model is sent whole: one of {', '.join(DOWNLINK_CODECS)}")
    d = DownlinkConfig()
    delta = t.opt_text("delta") or ""
    if delta:
        try:
            delta = str(Codec.parse(delta))
        except ConfigError as e:
            raise t.error("delta", str(e)) from None
    return DownlinkConfig(
        codec=str(parsed),
        delta=delta,
        keyframes=t.integer("keyframes", d.keyframes, lo=1, hi=MAX_KEYFRAMES),
        keyframe_every=t.integer("keyframe_every", d.keyframe_every, lo=1),
        keyframe_fraction=t.number("keyframe_fraction", d.keyframe_fraction, lo=0.0, hi=1.0),
        compact=t.flag("compact", d.compact),
    )


def _metrics(t: Table) -> MetricsConfig:
    d = MetricsConfig()
    fmt = t.text("format", d.format)
    if fmt not in METRICS_FORMATS:
        raise t.error("format", f"must be one of {', '.join(METRICS_FORMATS)}")
    return MetricsConfig(
        prometheus_port=t.integer("prometheus_port", d.prometheus_port, lo=0, hi=65535),
        bind=t.text("bind", d.bind),
        publish_interval_s=t.number("publish_interval_s", d.publish_interval_s, lo=0.1),
        format=fmt,
        status_interval_s=t.number("status_interval_s", d.status_interval_s, lo=0.1),
        per_device=t.flag("per_device", d.per_device),
    )


def _limits(t: Table, spec: ModelSpec) -> LimitsConfig:
    d_params = spec.layout().size
    default_bytes = 4 * d_params + UPDATE_OVERHEAD_BYTES
    d = LimitsConfig(max_update_bytes=default_bytes)
    max_norm = t.number("max_norm", d.max_norm, lo=0.0)
    window = t.integer("norm_window", d.norm_window, lo=1, hi=100_000)
    return LimitsConfig(
        max_update_bytes=t.integer("max_update_bytes", default_bytes, lo=1024, hi=1 << 31),
        receive_maximum=t.integer("receive_maximum", d.receive_maximum, lo=1, hi=65535),
        max_inflight_bytes=t.integer("max_inflight_bytes", d.max_inflight_bytes, lo=1 << 20),
        broker_inflight=t.integer("broker_inflight", d.broker_inflight, lo=0, hi=65535),
        norm_reject_factor=t.number("norm_reject_factor", d.norm_reject_factor, lo=0.0),
        max_norm=max_norm,
        norm_window=window,
        norm_min_samples=t.integer("norm_min_samples", d.norm_min_samples, lo=1, hi=window),
        batch_max=t.integer("batch_max", d.batch_max, lo=1, hi=100_000),
        verify_threads=t.integer("verify_threads", d.verify_threads, lo=1, hi=64),
        device_rate=t.number("device_rate", d.device_rate, lo=0.0),
        device_burst=t.integer("device_burst", d.device_burst, lo=1, hi=1_000_000),
    )


def _checkpoint(t: Table) -> CheckpointConfig:
    d = CheckpointConfig()
    return CheckpointConfig(
        keep=t.integer("keep", d.keep, lo=2, hi=1000),
        min_interval_s=t.number("min_interval_s", d.min_interval_s, lo=0.0, hi=60.0),
    )


def _scaleout(t: Table, broker: BrokerConfig, base: Path) -> ScaleoutConfig:
    d = ScaleoutConfig()
    group = t.text("group", d.group)
    try:
        check_id("shared subscription group", group)
    except ConfigError as e:
        raise t.error("group", str(e)) from None
    files = t.raw("worker_configs", [])
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        raise t.error("worker_configs", "must be a list of file names")
    workers = t.integer("workers", len(files), lo=0, hi=64)
    brokers: list[BrokerConfig] = []
    if files:
        if workers != len(files):
            raise t.error("workers", f"is {workers} but worker_configs names {len(files)} files")
        for i, name in enumerate(files):
            p = (base / Path(name).expanduser()).resolve()
            raw = read_toml(p)
            try:
                b = _broker(Table(raw.get("broker", {}), "broker", p.parent))
            except ConfigError as e:
                raise t.error("worker_configs", f"{p}: {e}") from None
            if b.username is not None and b.username == broker.username:
                raise t.error("worker_configs", f"{p}: a worker needs its own broker account")
            # A copied aggregator.toml keeps the owner's client id; brokers that force the id
            # to the user name ignore it anyway, the others need it distinct.
            brokers.append(_worker_broker(b, i) if b.client_id == broker.client_id else b)
    else:
        # Without per-worker accounts, workers connect as the main account with suffixed
        # client ids (fine on brokers that do not force the client id to the user name).
        for i in range(workers):
            brokers.append(_worker_broker(broker, i))
    if len({b.client_id for b in brokers} | {broker.client_id}) != len(brokers) + 1:
        raise t.error("worker_configs", "every worker needs its own client id (or user name)")
    if group == PUBLIC_SHARED_GROUP and any(_logs_in(b) for b in brokers):
        # Mosquitto 2.0 grants every SUBSCRIBE and applies the ACL only to delivered messages:
        # a client of any account that joins a group it knows gets its share of the updates,
        # which the broker then drops. A broker without accounts (development) has no ACL
        # to keep anyone out anyway, so the public name is refused only where clients log in.
        raise t.error(
            "group",
            f"is the public default {PUBLIC_SHARED_GROUP!r}, but the workers log in to the "
            "broker: any client that can log in (a device of any federation) could join the "
            "group and take a share of the updates, which the broker then drops. Run "
            "fedmqtt-admin aggregator-setup on this config (it writes a secret group), or set "
            "a name nobody can guess (e.g. openssl rand -hex 16); docs/security.md, ACL",
        )
    return ScaleoutConfig(
        workers=workers,
        group=group,
        worker_brokers=tuple(brokers),
        pin_cpu=t.flag("pin_cpu", d.pin_cpu),
    )


def _logs_in(b: BrokerConfig) -> bool:
    """Whether the connection authenticates (user name or client certificate)."""
    return b.username is not None or b.cert_file is not None


def _worker_broker(broker: BrokerConfig, i: int) -> BrokerConfig:
    from dataclasses import replace

    return replace(broker, client_id=f"{broker.client_id}-w{i + 1}")


def _logging(t: Table) -> LoggingConfig:
    level = t.text("level", LoggingConfig().level).upper()
    if level not in LOG_LEVELS:
        raise t.error("level", f"must be one of {', '.join(LOG_LEVELS)}")
    return LoggingConfig(level=level)


# ------------------------------------------------------------------------------ typed reading
