"""Staleness discount functions s(tau) for asynchronous aggregation.

An update trained from global version ``base_version`` arrives when the server is at
``current_version``; its staleness is ``tau = current_version - base_version >= 0``. The older
the base, the further the update's direction is from the current model's gradient, so it is
discounted by ``s(tau)`` with ``s(0) = 1`` and ``s`` non-increasing.

The families are those of

    Cong Xie, Sanmi Koyejo, Indranil Gupta. "Asynchronous Federated Optimization."
    arXiv:1903.03934 (2019), section "staleness" functions: constant, polynomial
    ``(1 + tau) ** -a`` and hinge ``1 if tau <= b else 1 / (a * (tau - b) + 1)``;

and FedBuff's default ``1 / sqrt(1 + tau)`` (polynomial with ``a = 0.5``) from

    John Nguyen, Kshitiz Malik, Hongyuan Zhan, Ashkan Yousefpour, Michael Rabbat, Mani Malek,
    Dzmitry Huba. "Federated Learning with Buffered Asynchronous Aggregation." AISTATS 2022,
    arXiv:2106.06639.

Each function object prints as the text :func:`parse_staleness` reads (``"poly:0.5"``,
``"hinge:10,4"``), so a configured value can be logged and written back unchanged. Objects are
frozen dataclasses: equal parameters compare equal, which makes the round trip testable.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Protocol

from fedmqtt.errors import ConfigError


class Staleness(Protocol):
    """A discount ``s(tau)`` in (0, 1] for an update ``tau`` versions old."""

    def __call__(self, tau: int) -> float: ...


def _tau(tau: int) -> int:
    # operator.index accepts numpy integers but refuses floats, which would hide a unit mistake.
    t = operator.index(tau)
    if t < 0:
        raise ValueError(f"staleness must be >= 0, got {t} (base version newer than current?)")
    return t


def _param(x: float, name: str) -> float:
    v = float(x)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"staleness parameter {name} must be finite and >= 0, got {x!r}")
    return v


def _fmt(x: float) -> str:
    """Shortest text that parses back to exactly ``x`` ("10" rather than "10.0")."""
    if x.is_integer() and abs(x) < 2**53:
        return str(int(x))
    return repr(x)


@dataclass(frozen=True, repr=False)
class ConstantStaleness:
    """s(tau) = 1: staleness ignored (FedAsync's "constant")."""

    def __call__(self, tau: int) -> float:
        _tau(tau)
        return 1.0

    def __repr__(self) -> str:
        return "constant"


@dataclass(frozen=True, repr=False)
class PolynomialStaleness:
    """s(tau) = (1 + tau) ** -a."""

    a: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "a", _param(self.a, "a"))

    def __call__(self, tau: int) -> float:
        return float((1 + _tau(tau)) ** -self.a)

    def __repr__(self) -> str:
        return f"poly:{_fmt(self.a)}"


@dataclass(frozen=True, repr=False)
class HingeStaleness:
    """s(tau) = 1 for tau <= b, then 1 / (a * (tau - b) + 1)."""

    a: float
    b: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "a", _param(self.a, "a"))
        object.__setattr__(self, "b", _param(self.b, "b"))

    def __call__(self, tau: int) -> float:
        t = _tau(tau)
        if t <= self.b:
            return 1.0
        return 1.0 / (self.a * (t - self.b) + 1.0)

    def __repr__(self) -> str:
        return f"hinge:{_fmt(self.a)},{_fmt(self.b)}"


def constant() -> Staleness:
    """s(tau) = 1."""
    return ConstantStaleness()


def polynomial(a: float) -> Staleness:
    """s(tau) = (1 + tau) ** -a, ``a >= 0``; ``a = 0.5`` is FedBuff's 1 / sqrt(1 + tau)."""
    return PolynomialStaleness(a)


def hinge(a: float, b: float) -> Staleness:
    """s(tau) = 1 if tau <= b else 1 / (a * (tau - b) + 1), ``a, b >= 0`` (Xie et al. 2019)."""
    return HingeStaleness(a, b)


_SYNTAX = 'expected "constant", "poly:<a>" (or "polynomial:<a>") or "hinge:<a>,<b>"'


def parse_staleness(text: str) -> Staleness:
    """Parse a configuration value such as ``"poly:0.5"`` or ``"hinge:10,4"``.

    Case and surrounding spaces are ignored. Parameters are plain numbers, finite and >= 0.
    Raises :class:`~fedmqtt.errors.ConfigError` saying what is accepted.
    """
    if not isinstance(text, str):
        raise ConfigError(f"staleness must be a string, got {type(text).__name__}; {_SYNTAX}")
    name, sep, rest = text.strip().lower().partition(":")
    name = name.strip()
    args = [p.strip() for p in rest.split(",")] if sep else []
    try:
        values = [float(p) for p in args]
    except ValueError:
        raise ConfigError(f"staleness {text!r}: parameters must be numbers; {_SYNTAX}") from None
    try:
        if name == "constant" and not sep:
            return constant()
        if name in ("poly", "polynomial") and len(values) == 1:
            return polynomial(values[0])
        if name == "hinge" and len(values) == 2:
            return hinge(values[0], values[1])
    except ValueError as exc:
        raise ConfigError(f"staleness {text!r}: {exc}") from None
    raise ConfigError(f"staleness {text!r} not understood; {_SYNTAX}")
