"""Kyutai's Mimi neural audio codec in plain PyTorch: 24 kHz mono ↔ 12.5 Hz codes (up to 32 codebooks)."""

from .checkpoint import (CheckpointError, is_untrained, load_mimi, random_state_dict, save_checkpoint,
                         write_random_checkpoint)
from .config import MimiConfig
from .model import MimiModel, NonFiniteLatentError

__all__ = ["CheckpointError", "MimiConfig", "MimiModel", "NonFiniteLatentError", "is_untrained", "load_mimi",
           "random_state_dict", "save_checkpoint", "write_random_checkpoint"]
