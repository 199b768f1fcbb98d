"""Reading TOML configuration strictly: every option type-checked, unknown options refused.

Both services (``agent.toml``, ``aggregator.toml``) read their files through :class:`Table`, so
a mistake is reported the same way everywhere: ``[section] option: what is wrong``, and a
misspelt option is an error rather than a silently ignored line.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from fedmqtt.errors import ConfigError


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; unreadable or invalid files raise ConfigError naming the file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None


class Table:
    """One TOML table, read key by key with type checks; remembers which keys were used.

    Relative paths are resolved against ``base`` (the config file's directory).
    """

    def __init__(self, raw: object, name: str, base: Path) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"[{name}] must be a table")
        self._raw = cast(Mapping[str, Any], raw)
        self._name = name
        self._base = base
        self._used: set[str] = set()

    def error(self, key: str, message: str) -> ConfigError:
        where = f"[{self._name}] {key}" if self._name else key
        return ConfigError(f"{where}: {message}")

    def has(self, key: str) -> bool:
        return key in self._raw

    def raw(self, key: str, default: Any = None) -> Any:
        self._used.add(key)
        return self._raw.get(key, default)

    def table(self, key: str) -> Table:
        value = self.raw(key, {})
        if not isinstance(value, Mapping):
            raise ConfigError(f"[{key}] must be a table")
        return Table(value, key, self._base)

    def done(self) -> None:
        """Refuse options nobody read: a typo must not be silently ignored."""
        unknown = sorted(set(self._raw) - self._used)
        if unknown:
            where = f"[{self._name}]" if self._name else "top level"
            raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}")

    def text(self, key: str, default: str | None = None) -> str:
        value = self.raw(key, default)
        if value is None:
            raise self.error(key, "is required")
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty string, not {value!r}")
        return value

    def opt_text(self, key: str) -> str | None:
        """A string, or None when absent or empty."""
        value = self.raw(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, not {value!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        return value

    def integer(
        self, key: str, default: int | None = None, *, lo: int | None = None, hi: int | None = None
    ) -> int:
        value = self.raw(key, default)
        if value is None:
            raise self.error(key, "is required")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, not {value!r}")
        self._check_range(key, value, lo, hi)
        return value

    def opt_integer(self, key: str, *, lo: int | None = None, hi: int | None = None) -> int | None:
        if self.has(key):
            return self.integer(key, lo=lo, hi=hi)
        self._used.add(key)
        return None

    def number(
        self,
        key: str,
        default: float | None = None,
        *,
        lo: float | None = None,
        hi: float | None = None,
    ) -> float:
        value = self.raw(key, default)
        if value is None:
            raise self.error(key, "is required")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, not {value!r}")
        v = float(value)
        if not math.isfinite(v):
            raise self.error(key, "must be finite")
        self._check_range(key, v, lo, hi)
        return v

    def opt_number(
        self, key: str, *, lo: float | None = None, hi: float | None = None
    ) -> float | None:
        if self.has(key):
            return self.number(key, lo=lo, hi=hi)
        self._used.add(key)
        return None

    def int_list(self, key: str, *, lo: int | None = None) -> list[int]:
        value = self.raw(key, [])
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise self.error(key, "must be a list of integers")
        out: list[int] = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
                raise self.error(key, f"must be a list of integers{f' >= {lo}' if lo else ''}")
            out.append(v)
        return out

    def float_list(self, key: str) -> list[float]:
        value = self.raw(key, [])
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise self.error(key, "must be a list of numbers")
        out: list[float] = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise self.error(key, "must be a list of finite numbers")
            out.append(float(v))
        return out

    def path(self, key: str) -> Path:
        value = self.raw(key)
        if value is None:
            raise self.error(key, "is required")
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be a path, not {value!r}")
        return (self._base / Path(value).expanduser()).resolve()

    def opt_path(self, key: str) -> Path | None:
        value = self.raw(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise self.error(key, f"must be a path, not {value!r}")
        return (self._base / Path(value).expanduser()).resolve()

    def _check_range(self, key: str, value: float, lo: float | None, hi: float | None) -> None:
        if lo is not None and value < lo:
            raise self.error(key, f"must be >= {lo}, not {value}")
        if hi is not None and value > hi:
            raise self.error(key, f"must be <= {hi}, not {value}")
