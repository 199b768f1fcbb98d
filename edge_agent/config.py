"""The agent's configuration: ``agent.toml`` parsed into frozen dataclasses.

A device runs unattended for months, so a mistake in its config must be caught at start (and
by ``edge-agent check``), named precisely, and never discovered mid-run. Every option is read
through :class:`Table`, which checks its type and range and raises :class:`ConfigError` with
the option's full name (``[broker] port: ...``); unknown keys are refused too, because a typo
such as ``intervall_s`` would otherwise silently leave the default in force.

Relative paths are resolved against the directory of the config file (the edge-agent predictor
does the same), ``~`` is expanded. Every option is documented in ``docs/agent.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from fedmqtt import personalise as personal
from fedmqtt.cohort import check_tag_map
from fedmqtt.errors import ConfigError
from fedmqtt.mqttconf import BrokerConfig, read_connection
from fedmqtt.privacy.config import PrivacyConfig, read_privacy
from fedmqtt.readiness import ANNOUNCE_WAIT_S, FAST_REPEAT_S
from fedmqtt.signing import ALGORITHMS, DEFAULT_UPDATE_AUTH
from fedmqtt.tomltable import Table, read_toml
from fedmqtt.topics import check_id

__all__ = [
    "AgentConfig",
    "BrokerConfig",
    "ConfigError",
    "DataConfig",
    "DeviceConfig",
    "EvaluationConfig",
    "InferenceConfig",
    "LoggingConfig",
    "OutboxConfig",
    "PersonaliseConfig",
    "SecurityConfig",
    "TrainingConfig",
    "load_config",
]

DataSource = Literal["csv", "npz", "plugin"]
DATA_SOURCES: Final[tuple[DataSource, ...]] = ("csv", "npz", "plugin")
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class DeviceConfig:
    id: str
    federation: str
    state_dir: Path
    tags: Mapping[str, str] = field(default_factory=dict)  # the plan's selection reads them


@dataclass(frozen=True)
class SecurityConfig:
    aggregator_public_key: Path
    update_key: Path
    update_auth: str = DEFAULT_UPDATE_AUTH


@dataclass(frozen=True)
class DataConfig:
    source: DataSource
    path: Path | None = None
    label_column: str | int = -1
    header: bool = True
    delimiter: str = ","
    x_key: str = "X"
    y_key: str = "y"
    plugin: str | None = None
    plugin_args: Mapping[str, Any] = field(default_factory=dict)
    max_samples: int = 0
    min_samples: int = 1
    labels: bool = True  # false: the files hold features only (autoencoders)


@dataclass(frozen=True)
class TrainingConfig:
    """Local settings; ``None`` hyperparameters mean "as the aggregator's plan says"."""

    interval_s: float = 0.0
    max_updates_per_version: int = 1
    retry_s: float = 60.0
    codec: str | None = None
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    momentum: float | None = None
    mu: float | None = None
    seed: int | None = None
    announce_wait_s: float = ANNOUNCE_WAIT_S
    fast_repeat_s: float = FAST_REPEAT_S


@dataclass(frozen=True)
class OutboxConfig:
    max_updates: int = 100
    max_bytes: int = 16 * 1024 * 1024
    supersede: bool = True
    retry_s: float = 30.0
    retry_no_subscribers: bool = True
    max_in_flight: int = 10


@dataclass(frozen=True)
class EvaluationConfig:
    """``[evaluation]``: the validation split the device evaluates every new global version on
    and never trains on: ``fraction`` of the samples of ``[data]`` (chosen per sample, see
    :func:`fedmqtt.fedeval.validation_mask`), or a separate source ``[evaluation.data]``
    (same keys as ``[data]``). Neither: no evaluation."""

    fraction: float = 0.0
    data: DataConfig | None = None

    @property
    def enabled(self) -> bool:
        return self.fraction > 0.0 or self.data is not None


MAX_EVAL_FRACTION: Final = 0.5


@dataclass(frozen=True)
class InferenceConfig:
    onnx: bool = True


@dataclass(frozen=True)
class PersonaliseConfig:
    """``[personalise]``: the device's personal model (fedmqtt.models.personal)."""

    mode: str = personal.DEFAULT_MODE
    head_epochs: int = personal.DEFAULT_HEAD_EPOCHS
    onnx: bool = personal.DEFAULT_ONNX


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"


@dataclass(frozen=True)
class AgentConfig:
    device: DeviceConfig
    security: SecurityConfig
    data: DataConfig
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    personalise: PersonaliseConfig = field(default_factory=PersonaliseConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # local DP (edge_agent.ldp)
    path: Path | None = None  # the file it was loaded from, if any

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any], *, base_dir: Path | None = None, path: Path | None = None
    ) -> AgentConfig:
        """Build a config from a parsed TOML document (or an equivalent dict).

        ``base_dir`` anchors relative paths (default: the current directory).
        """
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        root = Table(raw, "", base)
        tables = {
            name: root.table(name)
            for name in (
                "device",
                "broker",
                "security",
                "data",
                "training",
                "evaluation",
                "outbox",
                "inference",
                "personalise",
                "logging",
                "privacy",
            )
        }
        root.done()
        cfg = cls(
            device=_device(tables["device"]),
            broker=_broker(tables["broker"]),
            security=_security(tables["security"]),
            data=_data(tables["data"]),
            training=_training(tables["training"]),
            evaluation=_evaluation(tables["evaluation"]),
            outbox=_outbox(tables["outbox"]),
            inference=_inference(tables["inference"]),
            personalise=_personalise(tables["personalise"]),
            logging=_logging(tables["logging"]),
            privacy=read_privacy(tables["privacy"], ("off", "local")),
            path=path,
        )
        for t in tables.values():
            t.done()
        return cfg


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate ``agent.toml``; any problem raises ConfigError naming the option."""
    p = Path(path).expanduser()
    raw = read_toml(p)
    try:
        return AgentConfig.from_dict(raw, base_dir=p.resolve().parent, path=p)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


# ------------------------------------------------------------------------------ the tables


def _device(t: Table) -> DeviceConfig:
    values = {}
    for key in ("id", "federation"):
        values[key] = t.text(key)
        try:
            check_id(key, values[key])
        except ConfigError as e:
            raise t.error(key, str(e)) from None
    try:
        tags = check_tag_map(t.raw("tags", {}))
    except ConfigError as e:
        raise t.error("tags", str(e)) from None
    return DeviceConfig(
        id=values["id"], federation=values["federation"], state_dir=t.path("state_dir"), tags=tags
    )


def _broker(t: Table) -> BrokerConfig:
    return BrokerConfig(**read_connection(t, BrokerConfig()))


def _security(t: Table) -> SecurityConfig:
    auth = t.text("update_auth", DEFAULT_UPDATE_AUTH)
    if auth not in ALGORITHMS:
        raise t.error("update_auth", f"must be one of {', '.join(ALGORITHMS)}, not {auth!r}")
    return SecurityConfig(
        aggregator_public_key=t.path("aggregator_public_key"),
        update_key=t.path("update_key"),
        update_auth=auth,
    )


def _data(t: Table) -> DataConfig:
    source = t.text("source")
    if source not in DATA_SOURCES:
        raise t.error("source", f"must be one of {', '.join(DATA_SOURCES)}, not {source!r}")
    d = DataConfig(source=source)
    path = t.opt_path("path")
    plugin = t.opt_text("plugin")
    if source in ("csv", "npz") and path is None:
        raise t.error("path", f"is required for source = {source!r}")
    if source == "plugin":
        if plugin is None:
            raise t.error("plugin", "is required for source = 'plugin' (module:callable)")
        module, colon, func = plugin.partition(":")
        if not colon or not module or not func:
            raise t.error("plugin", f"must look like 'package.module:callable', not {plugin!r}")
    elif plugin is not None:
        raise t.error("plugin", f"is only used with source = 'plugin', not {source!r}")
    label = t.raw("label_column", d.label_column)
    if isinstance(label, bool) or not isinstance(label, str | int) or label == "":
        raise t.error("label_column", "must be a column name or an integer index")
    delimiter = t.text("delimiter", d.delimiter)
    if len(delimiter) != 1:
        raise t.error("delimiter", "must be a single character")
    args = t.raw("plugin_args", {})
    if not isinstance(args, dict):
        raise t.error("plugin_args", "must be a table")
    return DataConfig(
        source=source,
        path=path,
        label_column=label,
        header=t.flag("header", d.header),
        delimiter=delimiter,
        x_key=t.text("x_key", d.x_key),
        y_key=t.text("y_key", d.y_key),
        plugin=plugin,
        plugin_args=dict(args),
        max_samples=t.integer("max_samples", d.max_samples, lo=0),
        min_samples=t.integer("min_samples", d.min_samples, lo=1),
        labels=t.flag("labels", d.labels),
    )


def _training(t: Table) -> TrainingConfig:
    d = TrainingConfig()
    interval = t.number("interval_s", d.interval_s, lo=0.0)
    per_version = t.integer("max_updates_per_version", d.max_updates_per_version, lo=0)
    if per_version != 1 and interval <= 0:
        raise t.error(
            "max_updates_per_version",
            "more than one update per global version needs interval_s > 0 (else the device"
            " would retrain in a tight loop)",
        )
    codec = t.opt_text("codec")
    if codec is not None:
        from fedmqtt.codecs import Codec

        try:
            Codec.parse(codec)
        except ConfigError as e:
            raise t.error("codec", str(e)) from None
    momentum = t.opt_number("momentum", lo=0.0)
    if momentum is not None and momentum >= 1.0:
        raise t.error("momentum", "must be in [0, 1)")
    lr = t.opt_number("lr", lo=0.0)
    if lr is not None and lr <= 0:
        raise t.error("lr", "must be > 0")
    from fedmqtt.wire import PLAN_BATCH_SIZE, PLAN_EPOCHS

    (e_lo, e_hi), (b_lo, b_hi) = PLAN_EPOCHS, PLAN_BATCH_SIZE
    return TrainingConfig(
        interval_s=interval,
        max_updates_per_version=per_version,
        retry_s=t.number("retry_s", d.retry_s, lo=0.0),
        codec=codec,
        epochs=t.opt_integer("epochs", lo=e_lo, hi=e_hi),
        lr=lr,
        batch_size=t.opt_integer("batch_size", lo=b_lo, hi=b_hi),
        momentum=momentum,
        mu=t.opt_number("mu", lo=0.0),
        seed=t.opt_integer("seed", lo=0),
        announce_wait_s=t.number("announce_wait_s", d.announce_wait_s, lo=0.0),
        fast_repeat_s=t.number("fast_repeat_s", d.fast_repeat_s, lo=0.0),
    )


def _evaluation(t: Table) -> EvaluationConfig:
    fraction = t.number("fraction", 0.0, lo=0.0, hi=MAX_EVAL_FRACTION)
    data = None
    if t.has("data"):
        sub = t.table("data")
        data = _data(sub)
        sub.done()
        if fraction > 0.0:
            raise t.error("fraction", "set either fraction or [evaluation.data], not both")
    return EvaluationConfig(fraction=fraction, data=data)


def _outbox(t: Table) -> OutboxConfig:
    d = OutboxConfig()
    return OutboxConfig(
        max_updates=t.integer("max_updates", d.max_updates, lo=1),
        max_bytes=t.integer("max_bytes", d.max_bytes, lo=1024),
        supersede=t.flag("supersede", d.supersede),
        retry_s=t.number("retry_s", d.retry_s, lo=0.0),
        retry_no_subscribers=t.flag("retry_no_subscribers", d.retry_no_subscribers),
        max_in_flight=t.integer("max_in_flight", d.max_in_flight, lo=1, hi=1000),
    )


def _inference(t: Table) -> InferenceConfig:
    return InferenceConfig(onnx=t.flag("onnx", InferenceConfig().onnx))


def _personalise(t: Table) -> PersonaliseConfig:
    mode = t.text("mode", personal.DEFAULT_MODE)
    if mode not in personal.MODES:
        raise t.error("mode", f"must be one of {', '.join(personal.MODES)}, not {mode!r}")
    epochs = t.integer("head_epochs", personal.DEFAULT_HEAD_EPOCHS, lo=1, hi=1000)
    onnx = t.flag("onnx", personal.DEFAULT_ONNX)
    return PersonaliseConfig(mode=mode, head_epochs=epochs, onnx=onnx)


def _logging(t: Table) -> LoggingConfig:
    level = t.text("level", LoggingConfig().level).upper()
    if level not in LOG_LEVELS:
        raise t.error("level", f"must be one of {', '.join(LOG_LEVELS)}")
    return LoggingConfig(level=level)


# ------------------------------------------------------------------------------ typed reading
