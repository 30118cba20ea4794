"""Split residual vector quantizer: one semantic codebook and ``n_q - 1`` acoustic ones.

Both halves project the *same* latent with their own 1×1 conv; the acoustic RVQ does not see the semantic
residual. Codebooks are stored as EMA sums: ``embedding = embedding_sum / clamp(cluster_usage, 1e-5)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MimiConfig


class Codebook(nn.Module):
    def __init__(self, bins: int, dim: int):
        super().__init__()
        self.register_buffer("embedding_sum", torch.zeros(bins, dim))
        self.register_buffer("cluster_usage", torch.ones(bins))
        self.register_buffer("initialized", torch.zeros(1))

    @property
    def embedding(self) -> torch.Tensor:
        """[bins, dim], cached until the buffers change (loading weights can never leave it stale)."""
        s, u = self.embedding_sum, self.cluster_usage
        stamp = (s.data_ptr(), s._version, u.data_ptr(), u._version, s.dtype, s.device, torch.is_inference_mode_enabled())
        if getattr(self, "_cached", (None,))[0] != stamp:
            self._cached = (stamp, s.float() / u.float().clamp(min=1e-5)[:, None])  # float32 whatever the model dtype
        return self._cached[1]


class ResidualVQ(nn.Module):
    def __init__(self, cfg: MimiConfig, n_q: int):
        super().__init__()
        self.input_proj = nn.Conv1d(cfg.dimension, cfg.codebook_dim, 1, bias=False)
        self.output_proj = nn.Conv1d(cfg.codebook_dim, cfg.dimension, 1, bias=False)
        self.codebooks = nn.ModuleList([Codebook(cfg.bins, cfg.codebook_dim) for _ in range(n_q)])

    def encode(self, latent: torch.Tensor, n_q: int, embeddings: list[torch.Tensor]) -> torch.Tensor:
        # latent [B, F, C] → codes [B, n_q, F]; the nearest-code search runs in float32 even in a bf16/fp16 model
        B, Fr, _ = latent.shape
        residual = F.linear(latent.float(), self.input_proj.weight[..., 0].float()).view(B * Fr, -1)  # [B·F, D]
        codes = []
        for emb in embeddings[:n_q]:
            idx = torch.cdist(residual[None], emb[None], p=2)[0].argmin(dim=-1)
            residual = residual - F.embedding(idx, emb)
            codes.append(idx.view(B, Fr))
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor, embeddings: list[torch.Tensor]) -> torch.Tensor:
        # codes [B, n, F] → [B, F, C]
        quantized = sum(F.embedding(codes[:, j], embeddings[j]) for j in range(codes.shape[1]))
        weight = self.output_proj.weight[..., 0]
        return F.linear(quantized.to(weight.dtype), weight)


class SplitResidualVQ(nn.Module):
    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.n_q_semantic = cfg.n_q_semantic
        self.semantic = ResidualVQ(cfg, cfg.n_q_semantic)
        self.acoustic = ResidualVQ(cfg, cfg.n_q - cfg.n_q_semantic)

    @property
    def max_codebooks(self) -> int:
        return len(self.semantic.codebooks) + len(self.acoustic.codebooks)

    def embeddings(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The derived codebooks of both halves (compute once per encode call)."""
        return ([c.embedding for c in self.semantic.codebooks], [c.embedding for c in self.acoustic.codebooks])

    def encode(self, latent: torch.Tensor, num_codebooks: int,
               embeddings: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> torch.Tensor:
        sem, aco = embeddings or self.embeddings()
        codes = self.semantic.encode(latent, min(num_codebooks, self.n_q_semantic), sem)
        if num_codebooks > self.n_q_semantic:
            codes = torch.cat([codes, self.acoustic.encode(latent, num_codebooks - self.n_q_semantic, aco)], dim=1)
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        sem, aco = self.embeddings()
        latent = self.semantic.decode(codes[:, : self.n_q_semantic], sem)
        if codes.shape[1] > self.n_q_semantic:
            latent = latent + self.acoustic.decode(codes[:, self.n_q_semantic:], aco)
        return latent
