"""Checkpoints of the LoRA tree alone, with orbax.

- :mod:`~lorax_fn.checkpoint.io`: :func:`save`, :func:`restore`, :func:`checkpoint_info`
  (one adapter in one directory);
- :mod:`~lorax_fn.checkpoint.manager`: :class:`LoraCheckpointManager` (resumable training:
  steps, optimizer state, retention);
- :mod:`~lorax_fn.checkpoint.format`: the on-disk format and every check against a base;
- :mod:`~lorax_fn.checkpoint.extra`: non-parameter state saved beside the adapter;
- :mod:`~lorax_fn.checkpoint.errors`: damaged files told apart from other read failures.
"""

from lorax_fn.checkpoint.errors import CheckpointDamaged
from lorax_fn.checkpoint.format import Shardings
from lorax_fn.checkpoint.io import CheckpointInfo, checkpoint_info, restore, save
from lorax_fn.checkpoint.manager import LoraCheckpointManager, TrainState

__all__ = [
    "CheckpointDamaged",
    "CheckpointInfo",
    "LoraCheckpointManager",
    "Shardings",
    "TrainState",
    "checkpoint_info",
    "restore",
    "save",
]
