"""Reading ``.npz`` files from several threads of one process.

``numpy.load`` parses each array's header with ``ast.literal_eval``. CPython 3.11 keeps the AST
constructor's recursion depth in per-interpreter state, so two threads building ASTs at once
can make a correct parse raise ``SystemError: AST constructor recursion depth mismatch``
(python/cpython#106905). One agent per process never meets it; the in-process simulator (20
agents re-reading their shards every round, and the aggregator its holdout, on threads) met it
about once in a hundred runs, and the failed round was retried a minute later.

:func:`read_npz` is the one place fedmqtt opens an ``.npz``: reads are serialised by a
process-wide lock, and the one ``SystemError`` with that message (from a thread that builds an
AST outside this module) is retried, at most :data:`ATTEMPTS` times in all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

ATTEMPTS: Final = 3
AST_RACE: Final = "AST constructor recursion depth mismatch"
_LOCK = threading.Lock()


def read_npz(path: Path, names: Collection[str]) -> tuple[dict[str, npt.NDArray[Any]], list[str]]:
    """The arrays ``names`` of ``path`` that it holds, and the names of all it holds.

    Loaded with ``allow_pickle=False`` (an ``.npz`` can otherwise carry pickled objects, i.e.
    code). numpy's own errors pass through: ``OSError``, ``ValueError`` and
    ``zipfile.BadZipFile`` for a missing, unreadable or malformed file.

    Args:
        path: the ``.npz`` file.
        names: the arrays wanted; one the file lacks is absent from the result.
    """
    for _ in range(ATTEMPTS - 1):
        try:
            return _read(path, names)
        except SystemError as e:
            if AST_RACE not in str(e):
                raise
            log.warning("reading %s hit CPython's AST race (%s); reading it again", path, e)
    return _read(path, names)


def _read(path: Path, names: Collection[str]) -> tuple[dict[str, npt.NDArray[Any]], list[str]]:
    with _LOCK, np.load(path, allow_pickle=False) as z:
        files = list(z.files)
        return {n: z[n] for n in names if n in files}, files
