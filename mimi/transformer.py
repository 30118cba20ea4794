"""The 8-layer causal transformer that runs at 25 Hz inside Mimi: pre-norm, interleaved RoPE, LayerScale,
bias-free projections and a causal sliding window of ``context`` steps (250 = 10 s), also in one-call mode.

For chunked encoding, ``cache`` carries per layer the RoPE'd keys and values of the last ``context - 1`` steps
and the position offset, so every query sees exactly the keys it would see in one call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import MimiConfig

Cache = dict[nn.Module, object]


def apply_rope(q: torch.Tensor, k: torch.Tensor, offset: int, max_period: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of q, k [B, H, T, D] by angle pos · max_period^(-2i/D)."""
    B, H, T, D = q.shape
    ds = torch.arange(D // 2, device=q.device, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / D))
    ts = torch.full((B, 1), float(offset), device=q.device) + torch.arange(T, device=q.device, dtype=torch.float32)
    ts = ts.view(B, 1, -1, 1)
    rotr, roti = torch.cos(freqs * ts), torch.sin(freqs * ts)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.view(*x.shape[:-1], D // 2, 2)
        xr, xi = x[..., 0].float(), x[..., 1].float()
        out = torch.stack([(xr * rotr - xi * roti).to(x.dtype), (xr * roti + xi * rotr).to(x.dtype)], dim=-1)
        return out.view(*x.shape[:-2], D)

    return rotate(q), rotate(k)


class Attention(nn.Module):
    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.num_heads, self.context, self.max_period = cfg.num_heads, cfg.context, cfg.max_period
        self.in_proj = nn.Linear(cfg.dimension, 3 * cfg.dimension, bias=False)  # rows: q, k, v; head-major
        self.out_proj = nn.Linear(cfg.dimension, cfg.dimension, bias=False)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        past_k, past_v, offset = cache.get(self, (None, None, 0)) if cache is not None else (None, None, 0)
        q, k, v = self.in_proj(x).view(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 × [B, H, T, D]
        q, k = apply_rope(q, k, offset, self.max_period)
        if past_k is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        if cache is not None:
            keep = self.context - 1
            cache[self] = (k[:, :, -keep:].clone(), v[:, :, -keep:].clone(), offset + T)
        # Boolean window mask [B, 1, T, S]: query i (absolute offset + i) sees keys within the last `context` steps.
        pos_k = torch.arange(offset + T - k.shape[2], offset + T, device=x.device).expand(B, -1)[:, None]
        pos_q = offset + torch.arange(T, device=x.device).view(-1, 1)
        delta = pos_q - pos_k
        mask = ((pos_k >= 0) & (delta >= 0) & (delta < self.context))[:, None]
        y = F.scaled_dot_product_attention(q, k, v, mask)
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

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        x = x + self.layer_scale_1 * self.attn(self.norm1(x), cache)
        return x + self.layer_scale_2 * self.linear2(F.gelu(self.linear1(self.norm2(x))))


class Transformer(nn.Module):
    """[B, T, C] → [B, T, C] (no final norm, no input or output projection)."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(cfg) for _ in range(cfg.num_layers)])

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cache)
        return x
