"""Read the aggregator's ``aggregator.toml`` and write a device's ``agent.toml``.

Both follow the tables in docs/contracts.md. The admin tool reads only what it needs from the
aggregator's config (federation id, key paths, broker account, model shape for sizing) and
writes a complete agent config, so an enrollment bundle runs without editing except for the
``[data]`` table, which only the device's owner knows.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmqtt.errors import ConfigError
from fedmqtt.models.spec import ModelSpec
from fedmqtt.topics import check_id

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
    scaleout_group: str | None  # [scaleout] group, if set

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
        group = table("scaleout").get("group")
        if group is not None:
            if not isinstance(group, str):
                raise ConfigError(f"{path}: [scaleout] group must be a string")
            check_id(f"{path}: [scaleout] group", group)
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
            scaleout_group=group,
        )


_SCALEOUT_HEADER = re.compile(r"^[ \t]*\[[ \t]*scaleout[ \t]*\][ \t]*(#.*)?$")
_TABLE_HEADER = re.compile(r"^[ \t]*\[")
_GROUP_KEY = re.compile(r"^[ \t]*group[ \t]*=")
_GROUP_COMMENT = (
    "# Shared-subscription group of the scale-out workers: a secret written by fedmqtt-admin\n"
    "# aggregator-setup (any broker client that knows it can take a share of the updates).\n"
)


def with_scaleout_group(text: str, group: str, where: Path) -> str:
    """``text`` (an aggregator.toml) with ``[scaleout] group = group``: the line replaced if
    there is one, added to an existing ``[scaleout]`` table, or a new table appended; comments
    and every other value stay as they are. The result is parsed again and must differ from
    ``text`` in that one value only; a layout this cannot edit safely (an inline or dotted
    ``scaleout`` table, a multi-line value) is refused with what to write by hand."""
    check_id("[scaleout] group", group)
    lines = text.splitlines(keepends=True)
    line = f"group = {_value(group)}\n"
    start = next(
        (i for i, ln in enumerate(lines) if _SCALEOUT_HEADER.match(ln.rstrip("\r\n"))), None
    )
    if start is None:
        sep = "" if not text or text.endswith("\n") else "\n"
        new = f"{text}{sep}\n[scaleout]\n{_GROUP_COMMENT}{line}"
    else:
        end = next(
            (j for j in range(start + 1, len(lines)) if _TABLE_HEADER.match(lines[j])),
            len(lines),
        )
        at = next((j for j in range(start + 1, end) if _GROUP_KEY.match(lines[j])), None)
        if at is None:
            lines.insert(start + 1, _GROUP_COMMENT + line)
        else:
            lines[at] = line
        new = "".join(lines)
    try:
        before, after = tomllib.loads(text), tomllib.loads(new)
    except tomllib.TOMLDecodeError:
        before = after = {}
    got = after.get("scaleout")
    if (
        isinstance(got, dict)
        and got.get("group") == group
        and _without_group(before) == _without_group(after)
    ):
        return new
    raise ConfigError(
        f"{where}: cannot add the scale-out group to its [scaleout] table automatically; "
        f"write it there by hand: group = {_value(group)}"
    )


def _without_group(doc: dict[str, Any]) -> dict[str, Any]:
    scaleout = doc.get("scaleout", {})
    if isinstance(scaleout, dict):
        scaleout = {k: v for k, v in scaleout.items() if k != "group"}
    return {**doc, "scaleout": scaleout}


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
