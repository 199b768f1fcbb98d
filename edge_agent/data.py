"""Local training data: CSV or ``.npz`` files in a directory, or a plug-in callable.

The source is re-read at every round, so data that sensors append between rounds is used the
next time the device trains. Nothing here ever leaves the device: the agent sends only model
deltas.

* ``csv``: every ``*.csv`` file of ``path`` (or ``path`` itself if it is a file), in name
  order. With ``header = true`` the first line of each file names the columns and
  ``label_column`` may be a name; otherwise it is an index (negative counts from the end;
  the default ``-1`` is the last column). All other columns are features, in file order.
  Every file must have the same columns.
* ``npz``: every ``*.npz`` file of ``path`` (or the file), each holding arrays ``x_key``
  (samples x features) and ``y_key`` (one label/target per sample). Loaded with
  ``allow_pickle=False``: an ``.npz`` can otherwise carry pickled objects, i.e. code.
* ``plugin``: ``"package.module:callable"``, called with ``plugin_args`` as keyword arguments,
  returning ``(X, y)``. For sensors that are read through an API rather than files.

``labels = false`` (for an autoencoder, which learns from unlabeled data): every CSV column is
a feature (``label_column`` is not used) and an ``.npz`` needs no ``y_key`` array; the labels
passed on are zeros.

``max_samples > 0`` keeps only the newest rows (files later in name order, rows later in a
file), which bounds memory and training time on a device that accumulates data for months.
"""

from __future__ import annotations

import importlib
import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from edge_agent.config import DataConfig
from fedmqtt.errors import FedMQTTError
from fedmqtt.npz import read_npz

F32 = npt.NDArray[np.float32]
Array = npt.NDArray[Any]


class DataError(FedMQTTError):
    """The training data cannot be loaded; the message says which file and why."""


def load_data(cfg: DataConfig) -> tuple[F32, Array]:
    """Load ``(X, y)`` from the configured source: X float32 (n, d), y 1-D (or 2-D targets)."""
    if cfg.source == "plugin":
        X, y = _load_plugin(cfg)
    else:
        assert cfg.path is not None  # enforced by the config
        files = _files(cfg.path, f"*.{cfg.source}")
        loader = _load_csv if cfg.source == "csv" else _load_npz
        parts = [loader(f, cfg) for f in files]
        parts = [p for p in parts if p[0].shape[0] > 0]
        if not parts:
            raise DataError(f"no samples in {cfg.path}")
        widths = {p[0].shape[1] for p in parts}
        if len(widths) > 1:
            raise DataError(f"files in {cfg.path} have different numbers of features: {widths}")
        X = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        y = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    X, y = _check(X, y, str(cfg.path or cfg.plugin))
    if cfg.max_samples and X.shape[0] > cfg.max_samples:
        X, y = X[-cfg.max_samples :], y[-cfg.max_samples :]
    return X, y


def _files(path: Path, pattern: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"data path {path} does not exist")
    files = sorted(p for p in path.glob(pattern) if p.is_file())
    if not files:
        raise DataError(f"no {pattern} files in {path}")
    return files


def _load_csv(path: Path, cfg: DataConfig) -> tuple[F32, Array]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    lines = text.splitlines()
    names: list[str] | None = None
    if cfg.header and lines:
        names = [c.strip() for c in lines[0].split(cfg.delimiter)]
        lines = lines[1:]
    body = "\n".join(ln for ln in lines if ln.strip())
    if not body:
        return np.empty((0, 0), np.float32), np.empty(0, np.float32)
    try:
        table = np.loadtxt(io.StringIO(body), delimiter=cfg.delimiter, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise DataError(f"{path}: not a numeric CSV table ({e})") from None
    n_cols = table.shape[1]
    if names is not None and len(names) != n_cols:
        raise DataError(f"{path}: header has {len(names)} columns, rows have {n_cols}")
    if not cfg.labels:
        return table.astype(np.float32), np.zeros(table.shape[0], np.float32)
    label = cfg.label_column
    if isinstance(label, str):
        if names is None:
            raise DataError(f"{path}: label_column {label!r} is a name but header = false")
        if label not in names:
            raise DataError(f"{path}: no column named {label!r} (columns: {', '.join(names)})")
        col = names.index(label)
    else:
        if not -n_cols <= label < n_cols:
            raise DataError(f"{path}: label_column {label} out of range for {n_cols} columns")
        col = label % n_cols
    if n_cols < 2:
        raise DataError(f"{path}: need at least one feature column besides the label")
    y = table[:, col]
    X = np.delete(table, col, axis=1).astype(np.float32)
    return X, y


def _load_npz(path: Path, cfg: DataConfig) -> tuple[F32, Array]:
    try:
        wanted = (cfg.x_key, cfg.y_key) if cfg.labels else (cfg.x_key,)
        arrays, files = read_npz(path, wanted)
    except (OSError, ValueError, zipfile.BadZipFile) as e:  # ValueError: pickled objects
        raise DataError(f"cannot load {path}: {e}") from None
    if cfg.x_key not in arrays or (cfg.labels and cfg.y_key not in arrays):
        want = f"{cfg.x_key!r} and {cfg.y_key!r}" if cfg.labels else repr(cfg.x_key)
        raise DataError(f"{path}: needs arrays {want}, has {sorted(files)}")
    X = arrays[cfg.x_key]
    y = arrays[cfg.y_key] if cfg.labels else np.zeros(X.shape[0], np.float32)
    if X.ndim == 1:
        X = X.reshape(-1, 1)
    return np.asarray(X, dtype=np.float32), np.asarray(y)


def resolve_plugin(spec: str) -> Callable[..., Any]:
    """Import ``"package.module:callable"`` (also ``module:obj.attr``)."""
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise DataError(f"data plugin {spec!r}: cannot import {module_name!r}: {e}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise DataError(f"data plugin {spec!r}: {module_name} has no {attr!r}") from None
    if not callable(obj):
        raise DataError(f"data plugin {spec!r} is not callable")
    return cast(Callable[..., Any], obj)


def _load_plugin(cfg: DataConfig) -> tuple[F32, Array]:
    assert cfg.plugin is not None
    fn = resolve_plugin(cfg.plugin)
    try:
        result = fn(**dict(cfg.plugin_args))
    except Exception as e:  # a plug-in is foreign code: report, do not crash the agent
        raise DataError(f"data plugin {cfg.plugin!r} failed: {type(e).__name__}: {e}") from e
    if not isinstance(result, tuple) or len(result) != 2:
        raise DataError(f"data plugin {cfg.plugin!r} must return a tuple (X, y)")
    X = np.asarray(result[0], dtype=np.float32)
    if X.ndim == 1:
        X = X.reshape(-1, 1)
    return X, np.asarray(result[1])


def _check(X: npt.ArrayLike, y: npt.ArrayLike, where: str) -> tuple[F32, Array]:
    Xa = np.asarray(X, dtype=np.float32)
    ya = np.asarray(y)
    if Xa.ndim != 2:
        raise DataError(f"{where}: X must be 2-D (samples x features), got shape {Xa.shape}")
    if ya.ndim not in (1, 2) or ya.shape[0] != Xa.shape[0]:
        raise DataError(f"{where}: y has shape {ya.shape}, X has {Xa.shape[0]} samples")
    if not np.isfinite(Xa).all():
        raise DataError(f"{where}: X contains NaN or Inf")
    if ya.dtype.kind == "f" and not np.isfinite(ya).all():
        raise DataError(f"{where}: y contains NaN or Inf")
    return Xa, ya
