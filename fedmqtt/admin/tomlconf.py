"""Read the aggregator's ``aggregator.toml`` and write a device's ``agent.toml``.

Both follow the tables in docs/contracts.md. The admin tool reads only what it needs from the
aggregator's config (federation id, key paths, broker account, model shape for sizing) and
writes a complete agent config, so an enrollment bundle runs without editing except for the
``[data]`` table, which only the device's owner knows.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmqtt.errors import ConfigError
from fedmqtt.models.spec import ModelSpec

TomlValue = str | int | float | bool | list[str] | list[int] | list[float]


@dataclass(frozen=True)
class AggregatorConfig:
    path: Path
    federation: str
    signing_key: Path
    devices_dir: Path
    username: str
    password_file: Path | None
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    spec: ModelSpec | None

    @classmethod
    def load(cls, path: Path) -> AggregatorConfig:
        try:
            doc = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"aggregator config {path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        base = path.parent

        def table(name: str) -> Mapping[str, Any]:
            t = doc.get(name, {})
            if not isinstance(t, dict):
                raise ConfigError(f"{path}: [{name}] must be a table")
            return t

        def text(t: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
            v = t.get(key, default)
            if not isinstance(v, str) or not v:
                raise ConfigError(f"{path}: [{where}] {key} must be a non-empty string")
            return v

        def opt_path(t: Mapping[str, Any], key: str) -> Path | None:
            v = t.get(key)
            if v in (None, ""):
                return None
            if not isinstance(v, str):
                raise ConfigError(f"{path}: {key} must be a path")
            return base / v

        fed, broker, sec = table("federation"), table("broker"), table("security")
        return cls(
            path=path,
            federation=text(fed, "id", "federation"),
            signing_key=base / text(sec, "signing_key", "security"),
            devices_dir=base / text(sec, "devices_dir", "security"),
            username=text(broker, "username", "broker", "aggregator"),
            password_file=opt_path(broker, "password_file"),
            ca_file=opt_path(broker, "ca_file"),
            cert_file=opt_path(broker, "cert_file"),
            key_file=opt_path(broker, "key_file"),
            spec=_spec(table("model")),
        )


def _spec(model: Mapping[str, Any]) -> ModelSpec | None:
    """The model spec if ``[model]`` describes one completely, else None (sizing then asks)."""
    try:
        return ModelSpec(
            kind=model["kind"],
            n_features=int(model["n_features"]),
            n_outputs=int(model["n_outputs"]),
            hidden=tuple(int(h) for h in model.get("hidden", ())),
            classes=tuple(int(c) for c in model.get("classes", ())),
            feature_offset=tuple(float(x) for x in model.get("feature_offset", ())),
            feature_scale=tuple(float(x) for x in model.get("feature_scale", ())),
        )
    except (KeyError, TypeError, ValueError):
        return None


def dumps(tables: Mapping[str, Mapping[str, TomlValue]], header: str = "") -> str:
    """A TOML document of flat tables of scalars and scalar lists (all agent.toml needs)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for name, table in tables.items():
        if lines:
            lines.append("")
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_value(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"


def _value(v: TomlValue) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        if any((ord(c) < 0x20 and c not in "\t\n\r") or c == "\x7f" for c in v):
            raise ConfigError(f"control character in config value {v!r}")
        # A JSON string without ASCII escaping is a valid TOML basic string.
        return json.dumps(v, ensure_ascii=False)
    return "[" + ", ".join(_value(x) for x in v) + "]"
