"""Checkpoints for the Mimi tests: random calibrated weights written in the official layouts (cached per session)."""

from __future__ import annotations

from pathlib import Path

import torch

import mimi


SR = 24_000


def audio(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """Speech-like test signal [B, 1, n] at 24 kHz: a wobbling chirp plus noise."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 24_000
    chirp = 0.3 * torch.sin(2 * torch.pi * (150 + 40 * torch.sin(t)) * t)
    return (chirp + 0.1 * torch.randn(batch, 1, n, generator=gen)).float()


def checkpoint(root: Path, cfg: mimi.MimiConfig, layout: str, seed: int = 0) -> Path:
    name = f"{'full' if cfg == mimi.MimiConfig() else 'tiny'}-{seed}-{layout}"
    target = root / (name if layout == "transformers" else f"{name}.safetensors")
    if not target.exists():  # unlabelled (save_checkpoint), byte for byte the layout of the released files
        mimi.save_checkpoint(mimi.random_state_dict(cfg, seed), target, layout, cfg)
    return target
