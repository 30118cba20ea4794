"""Mimi: SEANet encoder → transformer (25 Hz) → stride-2 downsample (12.5 Hz) → split RVQ, and back."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import MimiConfig
from .quantizer import SplitResidualVQ
from .seanet import CausalConv1d, CausalConvTranspose1d, SEANetDecoder, SEANetEncoder
from .transformer import Transformer


class NonFiniteLatentError(FloatingPointError):
    """The latent of some clip holds NaN or inf, so no code of it means anything: raised instead of codes."""


class MimiModel(nn.Module):
    def __init__(self, cfg: MimiConfig = MimiConfig()):
        super().__init__()
        self.config = cfg
        self.encoder = SEANetEncoder(cfg)
        self.encoder_transformer = Transformer(cfg)
        stride = cfg.downsample_stride
        self.downsample = CausalConv1d(cfg.dimension, cfg.dimension, 2 * stride, stride, bias=False,
                                       pad_mode="replicate")
        self.quantizer = SplitResidualVQ(cfg)
        self.upsample = CausalConvTranspose1d(cfg.dimension, cfg.dimension, 2 * stride, stride,
                                              groups=cfg.dimension, bias=False)
        self.decoder_transformer = Transformer(cfg)
        self.decoder = SEANetDecoder(cfg)
        # Provenance, filled in by `load_mimi`.
        self.source: str | None = None
        self.revision: str | None = None
        self.weights_sha256: str | None = None

    SEANET_CHUNK_SAMPLES = 48_000  # see `_latent`
    SEANET_SPLIT_LAYER = 7  # encoder.model[:7] runs on sub-chunks: up to the 256-channel, 1.2 kHz level

    sample_rate = property(lambda self: self.config.sample_rate)
    frame_rate = property(lambda self: self.config.frame_rate)
    frame_size = property(lambda self: self.config.frame_size)

    @property
    def max_codebooks(self) -> int:
        return self.quantizer.max_codebooks

    def num_frames(self, num_samples: int) -> int:
        """Frames a clip of ``num_samples`` owns: ceil(n / 1920)."""
        return math.ceil(num_samples / self.frame_size)

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor, lengths: torch.Tensor | list[int] | None = None, num_codebooks: int = 8,
               *, chunk_frames: int | None = 150) -> torch.Tensor:
        """Encode 24 kHz audio to codes.

        wav: float [B, 1, T], right-padded when ``lengths`` (true sample counts) is given.
        Returns int64 codes [B, K, ceil(T / 1920)]. Item i owns its first ceil(lengths[i] / 1920) frames; the
        frames after them are set to -1.

        Audio is encoded in chunks of ``chunk_frames`` frames (150 = 12 s; ``None``: one chunk) that carry the
        convolution state and the 250-step attention window, so memory stays bounded for any length and the
        codes equal a one-call encode (moshi's non-streaming path) up to float rounding.

        Raises :class:`NonFiniteLatentError` when a clip's latent holds NaN or inf (NaN/inf audio, or a float16
        overflow): never codes of it.
        """
        if wav.dim() != 3 or wav.shape[1] != 1:
            raise ValueError(f"wav must be [B, 1, T], got {tuple(wav.shape)}")
        if not wav.is_floating_point():
            raise ValueError(f"wav must be floating point, got {wav.dtype}")
        B, _, T = wav.shape
        if T == 0:
            raise ValueError("cannot encode empty audio (T = 0)")
        if not 1 <= num_codebooks <= self.max_codebooks:
            raise ValueError(f"num_codebooks must be in [1, {self.max_codebooks}], got {num_codebooks}")
        owned = None if lengths is None else self._owned_frames(lengths, B, T)
        n_frames = self.num_frames(T)
        wav = nn.functional.pad(self._as_param(wav), (0, n_frames * self.frame_size - T))
        wav = wav.view(B, -1, 1)  # time-major [B, T, 1], zero-padded to whole frames

        embeddings, cache = self.quantizer.embeddings(), {}
        step = (chunk_frames or n_frames) * self.frame_size
        chunks = [self._encode_chunk(wav[:, s:s + step], cache, num_codebooks, embeddings)
                  for s in range(0, wav.shape[1], step)]
        self._raise_unless_finite(torch.stack([finite for _, finite in chunks]).all(dim=0))
        codes = torch.cat([codes for codes, _ in chunks], dim=-1)
        if owned is not None:  # frames past a clip's end: -1
            codes.masked_fill_(torch.arange(n_frames, device=codes.device) >= owned.to(codes.device)[:, None, None], -1)
        return codes

    def encode_stream(self, num_codebooks: int = 8, *, chunk_frames: int = 150) -> "StreamingEncoder":
        """An encoder for one clip fed in pieces of any length (see :class:`StreamingEncoder`)."""
        if not 1 <= num_codebooks <= self.max_codebooks:
            raise ValueError(f"num_codebooks must be in [1, {self.max_codebooks}], got {num_codebooks}")
        return StreamingEncoder(self, num_codebooks, chunk_frames)

    def _as_param(self, wav: torch.Tensor) -> torch.Tensor:
        """The waveform on the model's device, in its first convolution's dtype (float32 in a half model)."""
        weight = self.encoder.model[0].weight
        return wav.to(device=weight.device, dtype=weight.dtype)

    def _encode_chunk(self, wav: torch.Tensor, cache: dict, num_codebooks: int,
                      embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, n·1920, 1] → codes [B, K, n] and whether each item's latent is finite (bool [B], on the device, not
        waited for), carrying the convolution and attention state in ``cache``."""
        latent = self._latent(wav, cache)
        return self.quantizer.encode(latent, num_codebooks, embeddings), latent.isfinite().flatten(1).all(dim=1)

    def _raise_unless_finite(self, finite: torch.Tensor) -> None:
        """Raise :class:`NonFiniteLatentError` unless every item's latent was finite (``finite``: bool [B])."""
        if bool(finite.all()):
            return
        dtype = str(self.downsample.weight.dtype).removeprefix("torch.")
        cause = (f"an overflow past the {dtype} range: encode these clips in float32" if dtype != "float32"
                 else "NaN or inf samples in the audio, or values too large for float32")
        raise NonFiniteLatentError(f"the latent of batch item(s) {(~finite).nonzero().flatten().tolist()} holds NaN "
                                   f"or inf, so it has no codes: {dtype} model, likely {cause}")

    def _latent(self, wav: torch.Tensor, cache: dict) -> torch.Tensor:
        """[B, n·1920, 1] → unquantized 12.5 Hz latent [B, n, C], carrying state in ``cache``.

        On the CPU, the first SEANet levels (64 and 128 channels at 24 and 6 kHz) run on sub-chunks of about
        ``SEANET_CHUNK_SAMPLES`` samples in all, so their activations stay in the CPU caches (about twice as fast
        as one pass over the chunk); the deeper, low-rate levels run on the whole chunk, where larger matrix
        products pay off. On other devices the whole chunk goes through at once.
        """
        B, T, _ = wav.shape
        if wav.device.type == "cpu":
            sub = max(1, self.SEANET_CHUNK_SAMPLES // (B * self.frame_size)) * self.frame_size
            split = self.SEANET_SPLIT_LAYER
            x = torch.cat([self.encoder(wav[:, s:s + sub], cache, 0, split) for s in range(0, T, sub)], dim=1)
            x = self.encoder(x, cache, split)
        else:  # sub-chunks help CPU caches; on a GPU they only multiply kernel launches
            x = self.encoder(wav, cache)
        return self.downsample(self.encoder_transformer(x, cache), cache)

    def _owned_frames(self, lengths: torch.Tensor | list[int], batch: int, T: int) -> torch.Tensor:
        lengths = torch.as_tensor(lengths).view(-1)
        if lengths.shape[0] != batch:
            raise ValueError(f"lengths has {lengths.shape[0]} entries for a batch of {batch}")
        if (lengths <= 0).any() or (lengths > T).any():
            raise ValueError(f"lengths must be in [1, T = {T}], got {lengths.tolist()}")
        return (lengths + self.frame_size - 1) // self.frame_size

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, K, F] (0 ≤ code < bins) → waveform [B, 1, 1920·F] at 24 kHz."""
        if codes.dim() != 3 or codes.is_floating_point():
            raise ValueError(f"codes must be integer [B, K, F], got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.bins):
            raise ValueError(f"codes must be in [0, {self.config.bins}); -1 marks padding frames, trim them first")
        codes = codes.to(next(self.parameters()).device).long()
        latent = self.quantizer.decode(codes).to(self.upsample.weight.dtype)  # the quantizer is float32
        latent = self.upsample(latent.transpose(1, 2)).transpose(1, 2)  # [B, 2F, C]
        return self.decoder(self.decoder_transformer(latent)).transpose(1, 2)


class StreamingEncoder:
    """Encodes one clip fed in pieces (:meth:`push`), then :meth:`finish`: the codes, concatenated, equal
    ``model.encode`` of the whole clip with the same ``chunk_frames`` (the same chunks, the same arithmetic), and
    memory holds one chunk and the carried state whatever the clip's length."""

    def __init__(self, model: MimiModel, num_codebooks: int, chunk_frames: int):
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        self.model, self.num_codebooks = model, num_codebooks
        self.step = chunk_frames * model.frame_size
        self.cache: dict = {}
        self.embeddings = model.quantizer.embeddings()
        self.pending: list[torch.Tensor] = []
        self.buffered = 0
        self.samples = 0

    @torch.inference_mode()
    def push(self, audio: torch.Tensor) -> torch.Tensor:
        """Add mono float audio [n] at 24 kHz; return the codes [K, f] of the chunks it completes (f may be 0)."""
        audio = audio.reshape(-1)
        self.pending.append(audio)
        self.buffered += audio.shape[0]
        self.samples += audio.shape[0]
        codes = []
        if self.buffered >= self.step:
            buffer = torch.cat(self.pending)
            whole = buffer.shape[0] // self.step * self.step
            codes = [self._chunk(buffer[s:s + self.step]) for s in range(0, whole, self.step)]
            rest = buffer[whole:]
            self.pending, self.buffered = [rest], rest.shape[0]
        return torch.cat(codes, dim=-1) if codes else self._empty()

    @torch.inference_mode()
    def finish(self) -> torch.Tensor:
        """The codes [K, f] of the rest of the clip, zero-padded to whole frames (``ceil(samples / 1920)`` in all)."""
        if self.samples == 0:
            raise ValueError("cannot encode empty audio (no samples pushed)")
        rest = torch.cat(self.pending) if self.pending else torch.zeros(0)
        self.pending, self.buffered = [], 0
        if rest.shape[0] == 0:
            return self._empty()
        frames = self.model.num_frames(rest.shape[0])
        return self._chunk(nn.functional.pad(rest, (0, frames * self.model.frame_size - rest.shape[0])))

    def _chunk(self, audio: torch.Tensor) -> torch.Tensor:
        wav = self.model._as_param(audio).view(1, -1, 1)
        codes, finite = self.model._encode_chunk(wav, self.cache, self.num_codebooks, self.embeddings)
        self.model._raise_unless_finite(finite)
        return codes[0]

    def _empty(self) -> torch.Tensor:
        return torch.zeros(self.num_codebooks, 0, dtype=torch.long, device=next(self.model.parameters()).device)
