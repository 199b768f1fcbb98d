"""fedmqtt.npz: the one reader of ``.npz`` files, safe to call from several threads."""

from __future__ import annotations

import logging
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmqtt import npz


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "shard.npz"
    np.savez(path, X=np.arange(6, dtype=np.float32).reshape(3, 2), y=np.array([0, 1, 0]))
    return path


def test_returns_the_wanted_arrays_it_holds_and_every_name(tmp_path: Path) -> None:
    arrays, files = npz.read_npz(_file(tmp_path), ("X", "labels"))
    assert sorted(files) == ["X", "y"] and list(arrays) == ["X"]
    assert arrays["X"].shape == (3, 2) and arrays["X"].dtype == np.float32


def test_pickled_arrays_and_broken_files_raise_numpys_errors(tmp_path: Path) -> None:
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, X=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        npz.read_npz(pickled, ("X",))
    broken = tmp_path / "broken.npz"
    broken.write_bytes(_file(tmp_path).read_bytes()[:-40])
    with pytest.raises((zipfile.BadZipFile, OSError, ValueError)):
        npz.read_npz(broken, ("X",))


def _failing(monkeypatch: pytest.MonkeyPatch, errors: list[BaseException]) -> list[int]:
    """np.load raising ``errors`` one per call before loading normally; returns the calls."""
    real, calls = np.load, [0]

    def load(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        if errors:
            raise errors.pop(0)
        return real(*a, **k)

    monkeypatch.setattr(np, "load", load)
    return calls


def test_the_ast_race_is_read_again_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = _file(tmp_path)
    race = SystemError(f"{npz.AST_RACE} (before=36, after=33)")
    calls = _failing(monkeypatch, [race, race])
    with caplog.at_level(logging.WARNING, logger="fedmqtt.npz"):
        arrays, _ = npz.read_npz(path, ("X", "y"))
    assert calls[0] == 3 and arrays["y"].tolist() == [0, 1, 0]
    assert sum("AST race" in r.getMessage() for r in caplog.records) == 2


def test_the_race_on_every_attempt_is_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    race = SystemError(npz.AST_RACE)
    calls = _failing(monkeypatch, [race] * npz.ATTEMPTS)
    with pytest.raises(SystemError, match=npz.AST_RACE):
        npz.read_npz(_file(tmp_path), ("X",))
    assert calls[0] == npz.ATTEMPTS


def test_any_other_system_error_is_raised_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _failing(monkeypatch, [SystemError("something else")])
    with pytest.raises(SystemError, match="something else"):
        npz.read_npz(_file(tmp_path), ("X",))
    assert calls[0] == 1


def test_reads_from_many_threads_at_once_all_succeed(tmp_path: Path) -> None:
    path, errors = _file(tmp_path), []

    def work() -> None:
        try:
            for _ in range(50):
                assert npz.read_npz(path, ("X", "y"))[0]["X"].sum() == 15
        except BaseException as e:  # collected: an exception in a thread is not a failure
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
