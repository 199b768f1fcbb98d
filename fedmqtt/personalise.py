"""The options of on-device personalisation (agent.toml ``[personalise]``) and their defaults.

Kept apart from :mod:`fedmqtt.models.personal`, which does the training, so that reading the
agent's configuration does not import numpy.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

Mode = Literal["off", "head", "finetune"]
MODES: Final[tuple[Mode, ...]] = get_args(Mode)
KINDS: Final = ("softmax", "mlp", "linear")  # the supervised kinds that can be personalised

DEFAULT_MODE: Final[Mode] = "off"
DEFAULT_HEAD_EPOCHS: Final = 5
DEFAULT_ONNX: Final = False  # the agent stores the ONNX export too (imports the onnx package)
