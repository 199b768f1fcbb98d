"""Defer ``urllib.request`` until something uses it: paho imports it, the agent never does.

paho-mqtt imports ``urllib.request`` at module load, which pulls in ``http.client``, ``email``,
``tempfile`` and more, a measurable share of a device's RSS (docs/benchmarks.md, "Edge agent
footprint"). paho
only calls it to read proxy settings, and only when PySocks is installed (``_get_proxy``
returns early otherwise). Importing this module -- ``edge_agent.mqtt`` does, before paho --
puts a placeholder module in its place that imports the real one on first attribute access
and then forwards to it, so every use still gets the real ``urllib.request``.

Not :class:`importlib.util.LazyLoader`: on Python 3.11 an ``import urllib.request`` statement
reads the module's ``__spec__``, which makes the lazy loader load at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

_NAME = "urllib.request"


class _Deferred(types.ModuleType):
    """Stands in for ``urllib.request`` until an attribute other than ``__spec__`` is read."""

    def __getattr__(self, name: str) -> Any:  # only called for attributes it does not have
        real = _load()
        return getattr(real, name)


def _load() -> types.ModuleType:
    import urllib

    current = sys.modules.get(_NAME)
    if isinstance(current, _Deferred):
        del sys.modules[_NAME]
        real = importlib.import_module(_NAME)  # also sets urllib.request = real
        current.__dict__.update(real.__dict__)  # holders of the placeholder see the real names
        return real
    urllib.request = current  # type: ignore[attr-defined]
    assert current is not None
    return current


def defer_urllib_request() -> bool:
    """Install the placeholder unless ``urllib.request`` is already imported; True if it is."""
    if _NAME in sys.modules:
        return False
    spec = importlib.util.find_spec(_NAME)
    if spec is None:
        return False
    import urllib

    stub = _Deferred(_NAME)
    stub.__spec__ = spec
    sys.modules[_NAME] = stub
    urllib.request = stub  # type: ignore[attr-defined]
    return True


defer_urllib_request()
