"""The 8-layer causal transformer that runs at 25 Hz inside Mimi: pre-norm, interleaved RoPE, LayerScale,
bias-free projections and a causal sliding window of ``context`` steps (250 = 10 s), also in one-call mode.

For chunked encoding, ``cache`` carries per layer the RoPE'd keys and values of the last ``context - 1`` steps,
and per transformer the number of steps seen, so every query sees exactly the keys it would see in one call.
The RoPE tables and the window mask depend on the positions only: a transformer builds them once per chunk for
all its layers, and keeps the last ones built, which the next call reuses when its positions are the same (every
batch of short clips, every steady-state chunk's mask).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable

import torch
import torch.nn.functional as F
from torch import nn

from .config import MimiConfig

Cache = dict[nn.Module, object]
Rope = tuple[torch.Tensor, torch.Tensor]


def rope_tables(offset: int, T: int, D: int, max_period: float, device: torch.device) -> Rope:
    """cos, sin [T, D/2] (float32) of the angles (offset + t) · max_period^(-2i/D) for steps t < T."""
    ds = torch.arange(D // 2, device=device, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / D))
    ts = (float(offset) + torch.arange(T, device=device, dtype=torch.float32)).view(-1, 1)
    return torch.cos(freqs * ts), torch.sin(freqs * ts)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of x [B, H, T, D] by the angles of ``rope`` (in float32)."""
    rotr, roti = rope
    D = x.shape[-1]
    x = x.view(*x.shape[:-1], D // 2, 2)
    xr, xi = x[..., 0].float(), x[..., 1].float()
    out = torch.stack([(xr * rotr - xi * roti).to(x.dtype), (xr * roti + xi * rotr).to(x.dtype)], dim=-1)
    return out.view(*x.shape[:-2], D)


def window_mask(T: int, past: int, context: int, device: torch.device) -> torch.Tensor:
    """Boolean [T, past + T]: query t, after ``past`` cached keys, sees key s when 0 ≤ (past + t) − s < context."""
    delta = torch.arange(past, past + T, device=device)[:, None] - torch.arange(past + T, device=device)
    return (delta >= 0) & (delta < context)


class Attention(nn.Module):
    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.num_heads, self.context = cfg.num_heads, cfg.context
        self.in_proj = nn.Linear(cfg.dimension, 3 * cfg.dimension, bias=False)  # rows: q, k, v; head-major
        self.out_proj = nn.Linear(cfg.dimension, cfg.dimension, bias=False)

    def forward(self, x: torch.Tensor, rope: Rope, mask: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.in_proj(x).view(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 × [B, H, T, D]
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:
            if self in cache:
                past_k, past_v = cache[self]
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # [B, H, past + T, D]
            keep = self.context - 1
            cache[self] = (k[:, :, -keep:].clone(), v[:, :, -keep:].clone())
        y = F.scaled_dot_product_attention(q, k, v, mask)  # mask [T, past + T] broadcasts over B, H
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class TransformerLayer(nn.Module):
    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dimension, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.layer_scale_1 = nn.Parameter(torch.empty(cfg.dimension))
        self.norm2 = nn.LayerNorm(cfg.dimension, eps=cfg.norm_eps)
        self.linear1 = nn.Linear(cfg.dimension, cfg.dim_feedforward, bias=False)
        self.linear2 = nn.Linear(cfg.dim_feedforward, cfg.dimension, bias=False)
        self.layer_scale_2 = nn.Parameter(torch.empty(cfg.dimension))

    def forward(self, x: torch.Tensor, rope: Rope, mask: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        x = x + self.layer_scale_1 * self.attn(self.norm1(x), rope, mask, cache)
        return x + self.layer_scale_2 * self.linear2(F.gelu(self.linear1(self.norm2(x))))


class Transformer(nn.Module):
    """[B, T, C] → [B, T, C] (no final norm, no input or output projection)."""

    KEEP_MAX_ELEMENTS = 1 << 24  # larger masks (one-call passes over long clips) are rebuilt rather than kept

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.context, self.max_period, self.head_dim = cfg.context, cfg.max_period, cfg.head_dim
        self.layers = nn.ModuleList([TransformerLayer(cfg) for _ in range(cfg.num_layers)])
        self._kept: dict[str, tuple[Hashable, object]] = {}

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        T, device = x.shape[1], x.device
        offset = cache.get(self, 0) if cache is not None else 0  # steps seen before this chunk
        past = min(offset, self.context - 1)  # of which the layers hold the keys of the last `past`
        rope = self._kept_or_built("rope", (offset, T, device),
                                   lambda: rope_tables(offset, T, self.head_dim, self.max_period, device))
        mask = self._kept_or_built("mask", (T, past, device), lambda: window_mask(T, past, self.context, device),
                                   keep=T * (past + T) <= self.KEEP_MAX_ELEMENTS)
        for layer in self.layers:
            x = layer(x, rope, mask, cache)
        if cache is not None:
            cache[self] = offset + T
        return x

    def _kept_or_built(self, name: str, key: Hashable, build: Callable[[], object], keep: bool = True) -> object:
        """What ``build`` gives for ``key``, reused while the key stays the same (one kept per ``name``)."""
        key = (key, torch.is_inference_mode_enabled())  # an inference-mode tensor is unusable outside it
        kept = self._kept.get(name)
        if kept is not None and kept[0] == key:
            return kept[1]
        value = build()
        if keep:
            self._kept[name] = (key, value)
        return value
