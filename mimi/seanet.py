"""SEANet convolutional encoder and decoder (causal, no normalisation, no LSTM), on time-major activations.

Activations are ``[B, T, C]`` so that every convolution is a matrix product over contiguous memory (MKL/cuBLAS
GEMMs run several times faster than direct convolutions at these shapes). Every conv pads on the left only, by
concatenating a "previous" block (zeros at the start of a clip, the carried tail when encoding in chunks), so a
clip encoded in chunks runs the same arithmetic as one call. ``cache`` maps a module to its carried state;
``None`` means a single, whole-clip call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MimiConfig

Cache = dict[nn.Module, torch.Tensor]


class CausalConv1d(nn.Module):
    """Conv1d with ``kernel - stride`` steps of left padding: [B, T, Cin] → [B, T / stride, Cout].

    The weight keeps the checkpoint layout ``[Cout, Cin, kernel]``; the packed GEMM operand is derived from it.
    The kernel is a multiple ``m`` of the stride (k = 2·stride for the strided convs). Two equivalent schedules:
    - im2col: windows ``[T_out, kernel·Cin]`` @ ``[kernel·Cin, Cout]`` (when the windows are small, e.g. 1 → 64);
    - tap groups: frames ``[T/stride + m - 1, stride·Cin]`` @ ``[stride·Cin, m·Cout]``, then the m column groups
      are summed at shifts 0..m-1 (no copy of the input).
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = True,
                 pad_mode: str = "constant"):
        super().__init__()
        assert kernel % stride == 0, (kernel, stride)
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel))
        self.bias = nn.Parameter(torch.empty(cout)) if bias else None
        self.kernel, self.stride, self.pad, self.pad_mode = kernel, stride, kernel - stride, pad_mode
        self.groups = kernel // stride
        self.im2col = kernel * cin <= self.groups * cout
        self._packed: tuple | None = None

    def packed(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The GEMM operand and bias row. Cached until the weights change (load, .to(), in-place edits); rebuilt on
        every call, differentiably, when autograd tracks the weights."""
        w, b = self.weight, self.bias
        if torch.is_grad_enabled() and w.requires_grad:
            return self._pack(w), b
        stamp = (w.data_ptr(), w._version, w.dtype, w.device, torch.is_inference_mode_enabled()) + (
            (b.data_ptr(), b._version) if b is not None else ())  # an inference-mode tensor is unusable outside it
        if self._packed is None or self._packed[0] != stamp:
            self._packed = (stamp, self._pack(w.detach()), None if b is None else b.detach())
        return self._packed[1], self._packed[2]

    def _pack(self, w: torch.Tensor) -> torch.Tensor:
        cout, cin, k = w.shape
        taps = w.permute(2, 1, 0)  # [k, Cin, Cout]: row tap·Cin + c
        if self.im2col:
            return taps.reshape(k * cin, cout).contiguous()
        s = self.stride
        return torch.cat([taps[j * s:(j + 1) * s].reshape(s * cin, cout) for j in range(self.groups)], dim=1)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        x = x.to(self.weight.dtype)  # a float32 conv in a half model (the first) computes, and returns, float32
        if self.pad:
            prev = cache.get(self) if cache is not None else None
            if prev is None:
                prev = x[:, :1].expand(B, self.pad, C) if self.pad_mode == "replicate" else x.new_zeros(B, self.pad, C)
            x = torch.cat([prev, x], dim=1)
            if cache is not None:
                cache[self] = x[:, -self.pad:].clone()
        x = x.contiguous()
        mat, row = self.packed()
        t_out = T // self.stride
        if self.im2col:  # overlapping windows, gathered into [B·T_out, k·Cin]
            windows = x.as_strided((B, t_out, self.kernel * C), (x.stride(0), self.stride * C, 1))
            flat = windows.reshape(B * t_out, self.kernel * C)
            y = torch.addmm(row, flat, mat) if row is not None else flat @ mat
            return y.view(B, t_out, -1)
        frames = x.view(B * (t_out + self.groups - 1), self.stride * C)
        if self.groups == 1:
            y = torch.addmm(row, frames, mat) if row is not None else frames @ mat
            return y.view(B, t_out, -1)
        z = (frames @ mat).view(B, t_out + self.groups - 1, -1)
        cout = z.shape[-1] // self.groups
        # the bias joins the first sum, so no pass is spent broadcasting it into z
        y = z[:, :t_out, :cout] + row if row is not None else z[:, :t_out, :cout].clone()
        for j in range(1, self.groups):
            y += z[:, j:j + t_out, j * cout:(j + 1) * cout]
        return y


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d that drops the last ``kernel - stride`` outputs: [B, Cin, S] → [B, Cout, S·stride]."""

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
        y = self.block[1](F.elu(x), cache)
        y = self.block[3](F.elu(y, inplace=True), cache)
        return y.add_(x)


class SEANetEncoder(nn.Module):
    """Waveform [B, T, 1] → latent [B, T / hop, dimension] (strides 4, 5, 6, 8)."""

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

    def forward(self, x: torch.Tensor, cache: Cache | None = None, start: int = 0, stop: int | None = None
                ) -> torch.Tensor:
        """Run layers ``start:stop`` (all by default)."""
        for layer in self.model[start:stop]:
            # every ELU here follows a fresh conv or residual output, so it may work in place
            x = F.elu(x, inplace=True) if isinstance(layer, nn.ELU) else layer(x, cache)
        return x


class SEANetDecoder(nn.Module):
    """Latent [B, S, dimension] → waveform [B, S · hop, 1] (strides 8, 6, 5, 4); no final activation."""

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
        for layer in self.model:
            if isinstance(layer, nn.ELU):
                x = F.elu(x)
            elif isinstance(layer, CausalConvTranspose1d):  # the transposed convs stay in [B, C, T]
                x = layer(x.transpose(1, 2)).transpose(1, 2)
            else:
                x = layer(x)
        return x
