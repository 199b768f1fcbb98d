"""Randomness for devices without ``numpy.random``.

Local training needs a shuffle and the int8 codec needs uniform noise for stochastic rounding;
nothing more. ``import numpy.random`` alone costs ~6.7 MiB of peak RSS (it loads every bit
generator and the legacy ``mtrand``), a quarter of a bare numpy process, so the agent uses
:class:`LightRandom`, which draws bytes from the standard library's Mersenne Twister and shapes
them with plain numpy. Anything that accepts a :class:`RandomSource` also accepts a
``numpy.random.Generator``, which the aggregator, the simulator and the tests use.
"""

from __future__ import annotations

import random
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

_U32_TO_UNIT = np.float32(2.0**-24)


class RandomSource(Protocol):
    """The two draws fedmqtt needs; ``numpy.random.Generator`` provides both."""

    def random(self, size: int, dtype: Any = ...) -> Any: ...

    def permutation(self, x: int) -> Any: ...


class LightRandom:
    """Seedable uniform floats and permutations from ``random.Random``.

    ``random(n)`` returns float32 values in [0, 1) on a 2^-24 grid (the top 24 bits of each
    32-bit draw), exactly representable in float32, so ``floor(x + u)`` rounds without bias.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._r = random.Random(seed)

    def random(self, size: int, dtype: Any = np.float32) -> npt.NDArray[np.float32]:
        if dtype not in (np.float32, "float32"):
            raise TypeError("LightRandom draws float32 only")
        words = np.frombuffer(self._r.randbytes(4 * int(size)), dtype="<u4")
        out = (words >> np.uint32(8)).astype(np.float32)
        out *= _U32_TO_UNIT
        return out

    def permutation(self, x: int) -> npt.NDArray[np.intp]:
        keys = np.frombuffer(self._r.randbytes(8 * int(x)), dtype="<u8")
        return np.argsort(keys, kind="stable")


def seed_of(*parts: int) -> int:
    """One integer seed from several (e.g. a device seed and a round number)."""
    acc = 0
    for p in parts:
        acc = (acc * 1_000_003 + int(p)) & ((1 << 63) - 1)
    return acc
