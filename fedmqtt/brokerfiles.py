"""Where the broker configuration templates are: the project's ``broker_config/``.

``fedmqtt-admin`` renders the production configuration from them, and the test and simulator
harness (``simulator.broker``) the development one, so both run the documented configuration.
"""

from __future__ import annotations

import os
from pathlib import Path


def config_dir() -> Path:
    """The project's ``broker_config/`` (override with ``FEDMQTT_BROKER_CONFIG_DIR``)."""
    env = os.environ.get("FEDMQTT_BROKER_CONFIG_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "broker_config"
