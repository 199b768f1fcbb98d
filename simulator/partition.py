"""Split a training set between devices: IID, Dirichlet label skew, or label shards.

- ``iid``: a seeded random permutation cut into equal parts.
- ``dirichlet:BETA``: for every class, device proportions ~ Dir(β) (Hsu et al. 2019); small β
  means each device sees few classes. Every device is guaranteed ``min_size`` samples.
- ``shards:K``: sort by label, cut into ``n·K`` shards, give each device K of them (McMahan et
  al. 2017's pathological non-IID split).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedmqtt.errors import ConfigError

Index = npt.NDArray[np.int64]


def partition(
    y: npt.NDArray[np.int64], n_devices: int, scheme: str, *, seed: int, min_size: int = 10
) -> list[Index]:
    if n_devices < 1:
        raise ConfigError("need at least one device")
    if n_devices * min_size > len(y):
        raise ConfigError(f"{len(y)} samples cannot give {n_devices} devices {min_size} each")
    rng = np.random.default_rng(seed)
    kind, _, arg = scheme.partition(":")
    if kind == "iid" and not arg:
        return [np.sort(p) for p in np.array_split(rng.permutation(len(y)), n_devices)]
    if kind == "dirichlet":
        return _dirichlet(y, n_devices, _positive(arg, scheme), rng, min_size)
    if kind == "shards":
        return _shards(y, n_devices, int(_positive(arg, scheme)), rng)
    raise ConfigError(f"unknown partition {scheme!r}; use iid, dirichlet:BETA or shards:K")


def _positive(arg: str, scheme: str) -> float:
    try:
        v = float(arg)
    except ValueError:
        raise ConfigError(f"partition {scheme!r} needs a number after ':'") from None
    if not v > 0:
        raise ConfigError(f"partition {scheme!r}: the parameter must be positive")
    return v


def _dirichlet(
    y: npt.NDArray[np.int64], n: int, beta: float, rng: np.random.Generator, min_size: int
) -> list[Index]:
    classes = np.unique(y)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(n)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            props = rng.dirichlet(np.full(n, beta))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for dev, chunk in enumerate(np.split(idx, cuts)):
                parts[dev].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ConfigError(f"dirichlet:{beta} could not give every device {min_size} samples")


def _shards(y: npt.NDArray[np.int64], n: int, k: int, rng: np.random.Generator) -> list[Index]:
    order = np.argsort(y, kind="stable")
    shards = np.array_split(order, n * k)
    pick = rng.permutation(n * k)
    return [
        np.sort(np.concatenate([shards[s] for s in pick[d * k : (d + 1) * k]])) for d in range(n)
    ]
