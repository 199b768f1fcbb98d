"""The aggregator's side of the plan's selection (:mod:`fedmqtt.cohort`): refuse an update
from a device the plan did not select to train on its base version (reason
``not_selected``), and warn when the selection leaves too few devices to fill a buffer.

Device tags are read from ``<devices_dir>/<device id>.tags`` (written by ``fedmqtt-admin
enroll --tag``) and cached like the keys (:mod:`aggregator.devices`): the cache is dropped when
the directory's mtime changes, checked at most every ``recheck_s`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from aggregator.config import AggregatorConfig, devices_needed
from fedmqtt.cohort import TAGS_SUFFIX, Selection, read_tags_file
from fedmqtt.errors import NOT_SELECTED, ConfigError, RejectedError
from fedmqtt.signing import DEVICE_KEY_SUFFIX

log = logging.getLogger(__name__)

WINDOWS_KEPT: Final = 256


class DeviceTags:
    """Tags of enrolled devices, by device id ({} for a device without a tags file)."""

    def __init__(self, directory: Path, *, recheck_s: float = 1.0) -> None:
        self.directory = Path(directory)
        self.recheck_s = recheck_s
        self._cache: dict[str, dict[str, str]] = {}
        self._mtime: float | None = None
        self._checked = -float("inf")
        self._lock = threading.Lock()

    def get(self, device: str) -> dict[str, str]:
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= self.recheck_s:
                self._checked = now
                try:
                    mtime: float | None = self.directory.stat().st_mtime
                except OSError:
                    mtime = None
                if mtime != self._mtime:
                    self._mtime = mtime
                    self._cache.clear()
            found = self._cache.get(device)
            if found is None:
                try:
                    found = read_tags_file(self.directory / f"{device}{TAGS_SUFFIX}")
                except ConfigError as e:
                    log.error("device %s: unusable tags, treated as none: %s", device, e)
                    found = {}
                if len(self._cache) > 100_000:
                    self._cache.clear()
                self._cache[device] = found
            return found

    def enrolled(self) -> list[str]:
        """Ids of the devices with a key file now."""
        suffixes = set(DEVICE_KEY_SUFFIX.values())
        try:
            return sorted({p.stem for p in self.directory.iterdir() if p.suffix in suffixes})
        except OSError:
            return []


class CohortGate:
    """Checks that the plan's selection lets a device train on an update's base version, and
    remembers which devices sent updates that passed, per participation window (the newest
    :data:`WINDOWS_KEPT` windows): what :meth:`participation` reports."""

    def __init__(self, federation: str, selection: Selection, tags: DeviceTags) -> None:
        self.federation = federation
        self.selection = selection
        self.tags = tags
        self._trained: dict[int, set[str]] = {}
        self._selected: tuple[int, frozenset[str]] | None = None  # (window, enrolled devices)
        self._lock = threading.Lock()

    def check(self, device: str, base_version: int) -> None:
        """RejectedError(``not_selected``) unless ``device`` trains on ``base_version``."""
        sel = self.selection
        if sel.trains(self.federation, device, self.tags.get(device), base_version):
            window = sel.window_of(base_version)
            with self._lock:
                self._trained.setdefault(window, set()).add(device)
                if len(self._trained) > WINDOWS_KEPT:
                    del self._trained[min(self._trained)]
            return
        why = sel.why_not(self.federation, device, self.tags.get(device), base_version)
        raise RejectedError(NOT_SELECTED, f"trained on v{base_version}: {why}")

    def selected(self, version: int) -> frozenset[str]:
        """The enrolled devices the selection lets train on ``version`` (listed once per
        participation window)."""
        sel = self.selection
        window = sel.window_of(version)
        with self._lock:
            if self._selected is not None and self._selected[0] == window:
                return self._selected[1]
        devices = frozenset(
            d
            for d in self.tags.enrolled()
            if sel.trains(self.federation, d, self.tags.get(d), version)
        )
        with self._lock:
            self._selected = (window, devices)
        return devices

    def complete(self, version: int, senders: Iterable[str]) -> bool:
        """Whether every device selected for ``version`` already holds a row of the buffer
        (``senders``): no further update based on this window can enter it, so waiting for a
        full buffer could wait for ever when the draw selected fewer devices than it holds."""
        return self.selected(version) <= set(senders)

    def participation(self) -> dict[int, int]:
        """Participation window -> devices whose updates based on it passed the selection."""
        with self._lock:
            return {w: len(d) for w, d in sorted(self._trained.items())}


def cohort_gate(cfg: AggregatorConfig) -> CohortGate | None:
    """The gate of ``cfg``'s plan, or None when every device trains on every version."""
    sel = cfg.plan.selection
    if sel.everyone:
        return None
    return CohortGate(cfg.federation.id, sel, DeviceTags(cfg.security.devices_dir))


def warn_if_thin(cfg: AggregatorConfig) -> None:
    """Log what the selection means for the enrolled devices, and a warning if the devices
    expected to train in a window are fewer than a buffer needs under ``max_per_device``."""
    sel = cfg.plan.selection
    if sel.everyone:
        return
    tags = DeviceTags(cfg.security.devices_dir)
    enrolled = tags.enrolled()
    eligible = [d for d in enrolled if sel.eligible(d, tags.get(d))]
    expected = len(eligible) * sel.participation
    log.info(
        "[plan.selection] %s: %d of %d enrolled devices eligible, about %.1f train per window",
        sel.describe(),
        len(eligible),
        len(enrolled),
        expected,
    )
    need = devices_needed(cfg.strategy)
    if need and expected < need:
        log.warning(
            "[plan.selection] about %.1f devices train in a %d-version window but a %s buffer "
            "needs updates from %d devices (max_per_device %d): most buffers will be applied "
            "smaller, once every selected device is in; raise participation or window, or "
            "lower buffer_size",
            expected,
            sel.window,
            cfg.strategy.name,
            need,
            cfg.strategy.max_per_device,
        )
