"""LCM-Lookahead encoder training (installed as ``lcmla_sdk.train``). Depends on the core, never the reverse.

``lcmla train --config train.yaml [key=value ...]`` runs :class:`Trainer`; docs/TRAINING.md has the details.
"""

from .arcface import load_arcface
from .checkpoints import CheckpointError, latest_checkpoint
from .config import ConfigError, TrainConfig, config_from_dict, load_config
from .data import DataError
from .trainer import Trainer

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "TrainConfig", "Trainer", "config_from_dict",
    "latest_checkpoint", "load_arcface", "load_config",
]  # fmt: skip
