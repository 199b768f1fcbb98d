"""Per-device log prefixes: several agents may share one process (the simulator)."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any


class DeviceLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every message with ``[<device id>]`` so interleaved logs stay attributable."""

    def __init__(self, logger: logging.Logger, device_id: str) -> None:
        super().__init__(logger, {"device": device_id})
        self._prefix = f"[{device_id}] " if device_id else ""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        return f"{self._prefix}{msg}", kwargs
