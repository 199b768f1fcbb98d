"""Data sets for simulations: scikit-learn's small tabular sets and FedProx's Synthetic(α, β).

Each loader returns a :class:`Dataset` with a fixed, seeded train/test split and the input
preprocessing that becomes part of the model spec (and so of the ONNX graph), as a real operator
would fix it from sensor ranges rather than learn it from pooled data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fedmqtt.errors import ConfigError

NAMES = ("digits", "breast_cancer", "wine", "synthetic")


@dataclass(frozen=True)
class Dataset:
    name: str
    X_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    X_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]
    n_classes: int
    feature_offset: tuple[float, ...] = ()
    feature_scale: tuple[float, ...] = ()
    # For data sets that come already split by device (synthetic): one (X, y) per device.
    device_shards: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]] = field(
        default_factory=list
    )


def load(name: str, *, seed: int, n_devices: int = 10, test_fraction: float = 0.2) -> Dataset:
    if name == "synthetic":
        return synthetic(alpha=1.0, beta=1.0, n_devices=n_devices, seed=seed)
    if name not in NAMES:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}")
    from sklearn import datasets

    loader = {
        "digits": datasets.load_digits,
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
    }[name]
    X, y = loader(return_X_y=True)
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = round(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    if name == "digits":  # pixel intensities 0..16: a fixed, known range
        offset = (0.0,) * X.shape[1]
        scale = (1.0 / 16.0,) * X.shape[1]
    else:  # standardise with the training split's statistics, frozen into the model spec
        mu = X[train].mean(axis=0)
        sd = X[train].std(axis=0)
        sd[sd == 0] = 1.0
        offset = tuple(float(v) for v in mu)
        scale = tuple(float(1.0 / v) for v in sd)
    return Dataset(name, X[train], y[train], X[test], y[test], int(y.max()) + 1, offset, scale)


def synthetic(
    *, alpha: float, beta: float, n_devices: int, seed: int, dim: int = 60, n_classes: int = 10
) -> Dataset:
    """Synthetic(α, β) of Li et al. 2020 (FedProx, §5.1), with its power-law device sizes.

    Device k draws u_k ~ N(0, α) and B_k ~ N(0, β); its model W_k, b_k ~ N(u_k, 1); its inputs
    x ~ N(v_k, Σ) with v_k ~ N(B_k, 1) and Σ_jj = j^-1.2; labels y = argmax(W_k x + b_k).
    α controls how much local models differ, β how much local data differ. Each device keeps
    20 % of its samples for the common test set.
    """
    rng = np.random.default_rng(seed)
    sizes = np.clip(rng.lognormal(4.0, 1.0, n_devices).astype(int) + 50, 50, 2000)
    cov = np.array([(j + 1) ** -1.2 for j in range(dim)])
    shards: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]] = []
    tests_X, tests_y = [], []
    for k in range(n_devices):
        u = rng.normal(0, np.sqrt(alpha))
        B = rng.normal(0, np.sqrt(beta))
        W = rng.normal(u, 1, (dim, n_classes))
        b = rng.normal(u, 1, n_classes)
        v = rng.normal(B, 1, dim)
        X = (rng.normal(0, 1, (int(sizes[k]), dim)) * np.sqrt(cov) + v).astype(np.float32)
        y = np.argmax(X @ W + b, axis=1).astype(np.int64)
        n_test = max(1, len(y) // 5)
        shards.append((X[n_test:], y[n_test:]))
        tests_X.append(X[:n_test])
        tests_y.append(y[:n_test])
    X_train = np.concatenate([s[0] for s in shards])
    y_train = np.concatenate([s[1] for s in shards])
    return Dataset(
        "synthetic",
        X_train,
        y_train,
        np.concatenate(tests_X),
        np.concatenate(tests_y),
        n_classes,
        device_shards=shards,
    )
