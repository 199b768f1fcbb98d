"""Crash-safe file writes: write to a temporary file, fsync, rename, fsync the directory.

Every state file fedmqtt writes (checkpoints, the agent's outbox, keys) goes through here, so a
power cut or SIGKILL leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write_bytes(
    path: Path, data: bytes, *, mode: int = 0o600, prepare: Callable[[int], None] | None = None
) -> None:
    """Replace ``path`` with ``data``; ``prepare(fd)`` runs on the temporary file before any
    byte is written (``fedmqtt-admin`` gives files to a service user this way, so a secret is
    never visible under the wrong owner)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            if prepare is not None:
                prepare(f.fileno())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Persist a rename or unlink: the directory entry itself must reach the disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_durably(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        fsync_dir(path.parent)


def clean_temp_files(directory: Path) -> int:
    """Remove leftovers of writes interrupted before their rename; returns how many."""
    n = 0
    if directory.is_dir():
        for p in directory.glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n += 1
    return n


class DirLock:
    """An exclusive, non-blocking flock on ``<directory>/<name>``, released by the kernel when
    the process ends (even on SIGKILL), so a stale lock never blocks a restart."""

    def __init__(self, directory: Path, name: str = ".lock") -> None:
        self.path = Path(directory) / name
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock; False if another open file description holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
