"""Crash-safe aggregator state: one file per global version, written atomically.

A state file holds everything needed to resume *exactly*: parameters, version, optimizer and
strategy state (including the buffer of accepted but not yet aggregated updates), the window of
applied update ids, the norm history and the counters. It is a msgpack map whose tensors are
``{"dtype": "<f4", "shape": [...], "data": <raw bytes>}`` -- never pickle, so a planted or
corrupted file cannot execute code -- behind a fixed header::

    8 bytes  magic b"FMQAGG1\\n"
    32 bytes sha256 of the body
    body     msgpack map

Files are named ``state-<version:012d>.ckpt`` and written through
:func:`fedmqtt.fsutil.atomic_write_bytes` (temp file, fsync, rename, fsync of the directory), so
a ``kill -9`` or power cut leaves either the old or the new file. A later checkpoint at the same
version (the buffer changed) replaces that version's file. The newest ``keep`` versions are kept
(at least two): if the newest file fails its checksum, :meth:`CheckpointStore.load_latest` falls
back to the previous one and says so in the log.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import msgpack
import numpy as np

from fedmqtt.errors import FedMQTTError
from fedmqtt.fsutil import atomic_write_bytes, clean_temp_files, remove_durably
from fedmqtt.params import F32

log = logging.getLogger(__name__)

MAGIC: Final = b"FMQAGG1\n"
FORMAT_VERSION: Final = 1
_NAME = re.compile(r"^state-(\d{12})\.ckpt$")
_HEADER_LEN: Final = len(MAGIC) + 32


class CheckpointError(FedMQTTError):
    """A state file is missing, corrupted, or belongs to another federation or model."""


def tensor(a: np.ndarray[Any, Any]) -> dict[str, Any]:
    """A float32 (or int64) array as a msgpack-able map with its raw little-endian bytes."""
    if a.dtype == np.float32:
        dtype = "<f4"
    elif a.dtype == np.int64:
        dtype = "<i8"
    else:
        raise TypeError(f"checkpoints store float32 or int64 arrays, not {a.dtype}")
    return {"dtype": dtype, "shape": list(a.shape), "data": a.astype(dtype, copy=False).tobytes()}


def array(obj: object, what: str) -> np.ndarray[Any, Any]:
    """Inverse of :func:`tensor` (a new, writeable array); CheckpointError if malformed."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{what}: expected a tensor map")
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if dtype not in ("<f4", "<i8") or not isinstance(shape, list) or not isinstance(data, bytes):
        raise CheckpointError(f"{what}: malformed tensor")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise CheckpointError(f"{what}: malformed shape")
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if n * np.dtype(dtype).itemsize != len(data):
        raise CheckpointError(f"{what}: {len(data)} bytes do not fit shape {shape}")
    native = np.float32 if dtype == "<f4" else np.int64
    return np.frombuffer(data, dtype=dtype).astype(native).reshape(shape)


def f32(obj: object, what: str) -> F32:
    a = array(obj, what)
    if a.dtype != np.float32:
        raise CheckpointError(f"{what}: expected float32")
    return cast(F32, a)


def encode_state(state: Mapping[str, Any]) -> bytes:
    body = cast(bytes, msgpack.packb(dict(state), use_bin_type=True))
    return MAGIC + hashlib.sha256(body).digest() + body


def decode_state(data: bytes, what: str = "state file") -> dict[str, Any]:
    if len(data) < _HEADER_LEN or not data.startswith(MAGIC):
        raise CheckpointError(f"{what}: not an aggregator state file")
    digest, body = data[len(MAGIC) : _HEADER_LEN], memoryview(data)[_HEADER_LEN:]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"{what}: checksum mismatch (corrupted file)")
    try:
        state = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise CheckpointError(f"{what}: body is not msgpack ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{what}: unsupported state format")
    return cast(dict[str, Any], state)


@dataclass(frozen=True)
class Loaded:
    path: Path
    version: int
    state: dict[str, Any]


class CheckpointStore:
    """The state files of one aggregator in ``directory`` (created 0700)."""

    def __init__(self, directory: Path, *, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = max(2, keep)

    def path_for(self, version: int) -> Path:
        return self.directory / f"state-{version:012d}.ckpt"

    def versions(self) -> list[int]:
        """Versions with a state file, newest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found, reverse=True)

    def write(self, version: int, data: bytes) -> Path:
        """Durably write the state of ``version`` (already encoded), then prune old files."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.path_for(version)
        atomic_write_bytes(path, data, mode=0o600)
        for old in self.versions()[self.keep :]:
            remove_durably(self.path_for(old))
        return path

    def load_latest(self) -> Loaded | None:
        """The newest readable state, or None if there is none at all.

        Raises CheckpointError if files exist but none can be read: starting from scratch
        would silently throw the model away, which an operator must decide.
        """
        clean_temp_files(self.directory)
        versions = self.versions()
        errors = []
        for v in versions:
            path = self.path_for(v)
            try:
                state = decode_state(path.read_bytes(), str(path))
            except (OSError, CheckpointError) as e:
                log.error("cannot use %s: %s; trying the previous state file", path, e)
                errors.append(str(e))
                continue
            if state.get("version") != v:
                log.error("%s holds version %r; skipping it", path, state.get("version"))
                errors.append(f"{path}: version mismatch")
                continue
            return Loaded(path, v, state)
        if versions:
            raise CheckpointError("no usable state file: " + "; ".join(errors))
        return None
