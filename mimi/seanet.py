"""SEANet convolutional encoder and decoder (causal, no normalisation, no LSTM).

Every conv pads on the left only. Left padding is done by concatenating a "previous" block, zeros at the start
of a clip, so that encoding a clip in chunks (carrying that block in ``cache``) runs the same arithmetic as one
call. ``cache`` maps a module to its carried state; ``None`` means a single, whole-clip call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MimiConfig

Cache = dict[nn.Module, torch.Tensor]


class CausalConv1d(nn.Module):
    """Conv1d with ``kernel - stride`` steps of left padding (zeros, or copies of the first step)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = True,
                 pad_mode: str = "constant"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel))
        self.bias = nn.Parameter(torch.empty(cout)) if bias else None
        self.stride = stride
        self.pad = kernel - stride
        self.pad_mode = pad_mode

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        # x: [B, Cin, T], T a multiple of the stride → [B, Cout, T / stride]
        if self.pad:
            prev = cache.get(self) if cache is not None else None
            if prev is None:
                if self.pad_mode == "replicate":
                    prev = x[..., :1].expand(-1, -1, self.pad)
                else:
                    prev = x.new_zeros(x.shape[0], x.shape[1], self.pad)
            x = torch.cat([prev, x], dim=-1)
            if cache is not None:
                cache[self] = x[..., -self.pad:].clone()
        return F.conv1d(x, self.weight, self.bias, self.stride)


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d that drops the last ``kernel - stride`` outputs (whole-clip decoding)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int = 1, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cin, cout // groups, kernel))
        self.bias = nn.Parameter(torch.empty(cout)) if bias else None
        self.stride = stride
        self.groups = groups
        self.trim = kernel - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose1d(x, self.weight, self.bias, self.stride, groups=self.groups)
        return y[..., : y.shape[-1] - self.trim]


class ResBlock(nn.Module):
    """x + Conv1x1(ELU(Conv_k(ELU(x)))), hidden width dim / compress. Indices 1 and 3 match the checkpoints."""

    def __init__(self, dim: int, kernel: int, compress: int):
        super().__init__()
        hidden = dim // compress
        self.block = nn.ModuleList([nn.ELU(), CausalConv1d(dim, hidden, kernel), nn.ELU(),
                                    CausalConv1d(hidden, dim, 1)])

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        y = x
        for layer in self.block:
            y = layer(y, cache) if isinstance(layer, CausalConv1d) else layer(y)
        return x + y


def _run(layers: nn.ModuleList, x: torch.Tensor, cache: Cache | None) -> torch.Tensor:
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv1d, ResBlock)) else layer(x)
    return x


class SEANetEncoder(nn.Module):
    """Waveform [B, 1, T] → latent [B, dimension, T / hop] (strides 4, 5, 6, 8)."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        ch = cfg.n_filters
        layers: list[nn.Module] = [CausalConv1d(1, ch, cfg.kernel_size)]
        for ratio in reversed(cfg.ratios):
            layers += [ResBlock(ch, cfg.residual_kernel_size, cfg.compress), nn.ELU(),
                       CausalConv1d(ch, ch * 2, 2 * ratio, ratio)]
            ch *= 2
        layers += [nn.ELU(), CausalConv1d(ch, cfg.dimension, cfg.last_kernel_size)]
        self.model = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        return _run(self.model, x, cache)


class SEANetDecoder(nn.Module):
    """Latent [B, dimension, S] → waveform [B, 1, S * hop] (strides 8, 6, 5, 4); no final activation."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        ch = cfg.n_filters * 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [CausalConv1d(cfg.dimension, ch, cfg.kernel_size)]
        for ratio in cfg.ratios:
            layers += [nn.ELU(), CausalConvTranspose1d(ch, ch // 2, 2 * ratio, ratio),
                       ResBlock(ch // 2, cfg.residual_kernel_size, cfg.compress)]
            ch //= 2
        layers += [nn.ELU(), CausalConv1d(ch, 1, cfg.last_kernel_size)]
        self.model = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run(self.model, x, None)
