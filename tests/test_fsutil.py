"""Crash-safe writes (fedmqtt.fsutil): whole file or old file, never a torn one or a stray temp."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedmqtt.fsutil import atomic_write_bytes, clean_temp_files


def test_atomic_write_creates_then_replaces_with_the_mode_and_leaves_no_temp(
    tmp_path: Path,
) -> None:
    target = tmp_path / "sub" / "state.bin"
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    atomic_write_bytes(target, b"second", mode=0o644)
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.bin"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    atomic_write_bytes(target, b"old")
    seen: list[str] = []

    def fail(fd: int) -> None:
        seen.extend(p.name for p in tmp_path.iterdir() if p.name != "state.bin")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new", prepare=fail)
    assert target.read_bytes() == b"old"
    assert len(seen) == 1 and seen[0].startswith(".state.bin.") and seen[0].endswith(".tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def test_temp_names_never_reuse_an_existing_file_and_leftovers_are_cleaned(
    tmp_path: Path,
) -> None:
    target = tmp_path / "state.bin"
    for _ in range(50):
        atomic_write_bytes(target, b"x")
    leftover = tmp_path / ".state.bin.0123456789abcdef.tmp"  # as a crash would leave it
    leftover.write_bytes(b"torn")
    atomic_write_bytes(target, b"y")
    assert leftover.read_bytes() == b"torn"  # not opened, not replaced
    assert clean_temp_files(tmp_path) == 1
    assert sorted(os.listdir(tmp_path)) == ["state.bin"]
