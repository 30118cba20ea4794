"""Mimi hyperparameters. The defaults are the released model (kyutai/mimi, moshi's tokenizer checkpoint)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class MimiConfig:
    sample_rate: int = 24_000
    frame_rate: float = 12.5
    # SEANet (shared by encoder and decoder). `ratios` is in decoder order; the encoder runs them reversed.
    dimension: int = 512
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 6, 5, 4)
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    compress: int = 2
    # Transformers (one after the encoder, one before the decoder), at the SEANet rate (25 Hz).
    num_layers: int = 8
    num_heads: int = 8
    dim_feedforward: int = 2048
    context: int = 250  # causal attention window, in steps
    max_period: float = 10_000.0  # RoPE base
    norm_eps: float = 1e-5
    # Split residual vector quantizer: 1 semantic codebook + (n_q - 1) acoustic ones.
    n_q: int = 32
    n_q_semantic: int = 1
    bins: int = 2048
    codebook_dim: int = 256

    @property
    def hop_length(self) -> int:
        """Samples per SEANet output step (960)."""
        return math.prod(self.ratios)

    @property
    def frame_size(self) -> int:
        """Samples per code frame (1920)."""
        return int(self.sample_rate / self.frame_rate)

    @property
    def downsample_stride(self) -> int:
        """SEANet steps per code frame (2: 25 Hz → 12.5 Hz)."""
        return self.frame_size // self.hop_length

    @property
    def head_dim(self) -> int:
        return self.dimension // self.num_heads

    @classmethod
    def tiny(cls, **overrides) -> "MimiConfig":
        """A small model with the released rates and window, for tests and the offline demo."""
        small = dict(dimension=64, n_filters=8, num_layers=2, num_heads=1, dim_feedforward=128, codebook_dim=32)
        return replace(cls(**small), **overrides)
