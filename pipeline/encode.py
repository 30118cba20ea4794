"""Encode stage: the parts of one shard → Mimi codes per clip, in clip order. Testable without Ray.

Whole clips of a part are batched by length (:mod:`pipeline.batching`) and encoded together; a clip streamed over
several parts is fed piece by piece to a :class:`mimi.model.StreamingEncoder`, whose codes equal a one-call encode
of the whole clip. Parts depend only on the shard's clip lengths, so the batches, and the codes, are the same
however the shard is scheduled, retried or resumed.

Only the model calls hold the model (``lock``, shared by the threads of an encoder): padding, the copy to the device
(from pinned memory, without blocking, on CUDA), the codes' copy back and the int16 conversion run outside it, so
one thread prepares or collects a part while another's clips are encoded (:meth:`ShardEncoding.add`).

Errors: a batch that fails with an error of its own (not transient) is retried clip by clip, and a clip that still
fails becomes ``ClipFailure(stage="encode")``. Out-of-memory splits a batch into single clips too, but a single clip
that runs out of memory, or any other CUDA error, is raised: it fails the attempt (a CUDA error other than out of
memory also marks the encoder broken, see :class:`EncoderBroken`), never a clip. A clip whose latent is not finite
(NaN or inf audio, a float16 overflow: :class:`mimi.NonFiniteLatentError`) fails alone, with that message.
"""

from __future__ import annotations

import logging
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch

from mimi.model import StreamingEncoder
from pipeline import retry
from pipeline.batching import make_batches
from pipeline.types import SAMPLE_RATE, ClipFailure, EncodedClip, Part, Piece

log = logging.getLogger(__name__)


class EncoderBroken(RuntimeError):
    """A CUDA error that may leave the device unusable: the encoder must be replaced (no clip is charged)."""


@dataclass
class _Stream:
    """A clip being streamed: its encoder and its codes so far."""

    clip_id: str
    encoder: StreamingEncoder
    codes: list[np.ndarray]


@dataclass
class Prepared:
    """A part made ready for the model: its whole clips padded into batches and its streamed pieces, on the model's
    device."""

    part: Part
    batches: list[tuple[list[Piece], torch.Tensor]]  # clips, audio [b, 1, T]
    streamed: list[tuple[Piece, torch.Tensor]]  # piece, audio [n]


Encoded = list[tuple[list[Piece], torch.Tensor]]  # each model call's pieces and their codes [b, K, F], on the device


def _raise_if_broken(exc: BaseException) -> None:
    """A CUDA error other than out-of-memory may leave the device unusable: the encoder must go."""
    if retry.is_cuda_error(exc) and "out of memory" not in str(exc):
        raise EncoderBroken(f"CUDA error: {retry.brief(exc)}") from exc


class ShardEncoding:
    """Feed a shard's parts in order with :meth:`add`; read :attr:`rows` (clip order) and :attr:`failures`.

    ``lock`` is held around each model call, and around nothing else (threads sharing the model pass its lock)."""

    def __init__(self, model, *, num_codebooks: int, batch_max_seconds: float, max_pad_ratio: float = 0.25,
                 chunk_frames: int = 150, lock: AbstractContextManager | None = None):
        self.model, self.num_codebooks, self.chunk_frames = model, num_codebooks, chunk_frames
        self.max_samples = max(1, round(batch_max_seconds * SAMPLE_RATE))
        self.max_pad_ratio = max_pad_ratio
        self.lock = lock or threading.Lock()
        self.device = next(model.parameters()).device
        self.streams: dict[int, _Stream] = {}  # by clip index
        self.dropped: set[int] = set()  # streamed clips that failed to encode: their later pieces are skipped
        self.rows: list[EncodedClip] = []
        self.failures: list[ClipFailure] = []
        self.next_part = 0

    def add(self, part: Part) -> None:
        """:meth:`prepare`, :meth:`encode` (the model calls) and :meth:`finish` the part."""
        self.finish(part, self.encode(self.prepare(part)))

    def prepare(self, part: Part) -> Prepared:
        """Cut the part's whole clips into batches, zero-padded to their longest, and copy them and the streamed
        pieces to the model's device (from pinned memory, without blocking the host, on CUDA). No model call."""
        if part.index != self.next_part:
            raise RuntimeError(f"shard {part.shard_id}: part {part.index} arrived, expected {self.next_part}")
        self.next_part += 1
        whole = [p for p in part.pieces if p.whole]
        batches = make_batches([len(p.audio) for p in whole], max_samples=self.max_samples,
                               max_pad_ratio=self.max_pad_ratio)
        clips = [[whole[i] for i in batch] for batch in batches]
        return Prepared(part, [(pieces, self._to_device(pieces)[:, None]) for pieces in clips],
                        [(p, self._to_device([p])[0]) for p in part.pieces if not p.whole])

    def encode(self, prepared: Prepared) -> Encoded:
        """The model calls, each under the lock: the batches (a failing batch is split into clips), then the pieces
        of streamed clips. Records the clips that fail."""
        part = prepared.part
        failed = {f.clip_id for f in part.failures}
        for index in [i for i, stream in self.streams.items() if stream.clip_id in failed]:
            del self.streams[index]  # a streamed clip that failed later in decoding
        self.failures += part.failures
        encoded = [call for pieces, wav in prepared.batches for call in self._encode_batch(pieces, wav)]
        return encoded + [call for piece, audio in prepared.streamed for call in self._stream(piece, audio)]

    def finish(self, part: Part, encoded: Encoded) -> None:
        """Bring the codes to the host (one copy per model call) as each clip's ``[K, F]`` int16 row; a streamed
        clip's row is complete with its final piece."""
        done = []
        for pieces, codes in encoded:
            for piece, clip in zip(pieces, codes.cpu().numpy()):
                if piece.whole:
                    samples = len(piece.audio)
                    done.append(EncodedClip(piece.info, clip[:, :self.model.num_frames(samples)].astype(np.int16),
                                            samples, piece.signals))
                    continue
                stream = self.streams[piece.info.index]
                stream.codes.append(clip.astype(np.int16))
                if piece.final:
                    del self.streams[piece.info.index]
                    done.append(EncodedClip(piece.info, np.concatenate(stream.codes, axis=1), stream.encoder.samples,
                                            piece.signals))
        self.rows += sorted(done, key=lambda row: row.info.index)
        if part.last and self.streams:
            raise RuntimeError(f"shard {part.shard_id}: the last part leaves clip(s) "
                               f"{sorted(self.streams)} unfinished")

    def _to_device(self, pieces: list[Piece]) -> torch.Tensor:
        """The pieces' audio zero-padded to the longest, float32 [b, T] on the model's device."""
        host = torch.zeros(len(pieces), max(len(p.audio) for p in pieces), pin_memory=self.device.type == "cuda")
        for row, piece in zip(host.numpy(), pieces):
            row[: len(piece.audio)] = piece.audio
        return host.to(self.device, non_blocking=True)

    def _encode_batch(self, pieces: list[Piece], wav: torch.Tensor) -> Encoded:
        """Encode padded clips [b, 1, T] in one call; when that fails, each clip alone, and record a clip that fails
        alone (out of memory and CUDA errors are raised: they fail the attempt)."""
        lengths = [len(p.audio) for p in pieces]
        try:
            with self.lock:
                return [(pieces, self.model.encode(wav, lengths, self.num_codebooks, chunk_frames=self.chunk_frames))]
        except Exception as exc:
            _raise_if_broken(exc)
            if len(pieces) == 1:
                if retry.is_transient(exc):
                    raise
                self.failures.append(ClipFailure.from_exception(pieces[0].info.clip_id, pieces[0].info.source_uri,
                                                                "encode", exc))
                return []
            log.warning("encoding a batch of %d clip(s) failed (%s); retrying clip by clip", len(pieces),
                        retry.brief(exc))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return [call for i, (piece, n) in enumerate(zip(pieces, lengths))
                for call in self._encode_batch([piece], wav[i:i + 1, :, :n])]

    def _stream(self, piece: Piece, audio: torch.Tensor) -> Encoded:
        """Feed a piece of a streamed clip to its encoder: the codes of the chunks it completes, and of the rest of
        the clip when it is the final piece."""
        info = piece.info
        if info.index in self.dropped:
            return []
        try:
            with self.lock:
                if piece.start == 0:
                    encoder = self.model.encode_stream(self.num_codebooks, chunk_frames=self.chunk_frames)
                    self.streams[info.index] = _Stream(info.clip_id, encoder, [])
                encoder = self.streams[info.index].encoder
                if encoder.samples != piece.start:
                    raise RuntimeError(f"clip {info.clip_id}: piece at sample {piece.start}, expected "
                                       f"{encoder.samples}")
                codes = encoder.push(audio)
                if piece.final:
                    codes = torch.cat([codes, encoder.finish()], dim=-1)
            return [([piece], codes[None])]
        except Exception as exc:
            _raise_if_broken(exc)
            if retry.is_transient(exc):
                raise
            self.streams.pop(info.index, None)
            self.dropped.add(info.index)
            self.failures.append(ClipFailure.from_exception(info.clip_id, info.source_uri, "encode", exc))
            return []
