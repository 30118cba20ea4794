"""Encode stage: the parts of one shard → Mimi codes per clip, in clip order. Testable without Ray.

Whole clips of a part are batched by length (:mod:`pipeline.batching`) and encoded together; a clip streamed over
several parts is fed piece by piece to a :class:`mimi.model.StreamingEncoder`, whose codes equal a one-call encode
of the whole clip. Parts depend only on the shard's clip lengths, so the batches, and the codes, are the same
however the shard is scheduled, retried or resumed.

Errors: a batch that fails with an error of its own (not transient) is retried clip by clip, and a clip that still
fails becomes ``ClipFailure(stage="encode")``. Out-of-memory splits a batch into single clips too, but a single clip
that runs out of memory, or any other CUDA error, is raised: it fails the attempt (a CUDA error other than out of
memory also marks the encoder broken, see :class:`EncoderBroken`), never a clip.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

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
    encoder: object  # mimi.model.StreamingEncoder
    codes: list[np.ndarray]


def _writable(audio: np.ndarray) -> np.ndarray:
    """A writable array (torch refuses read-only ones, as parts read zero-copy from Ray's object store are)."""
    return audio if audio.flags.writeable else audio.copy()


def _raise_if_broken(exc: BaseException) -> None:
    """A CUDA error other than out-of-memory may leave the device unusable: the encoder must go."""
    if retry.is_cuda_error(exc) and "out of memory" not in str(exc):
        raise EncoderBroken(f"CUDA error: {retry.brief(exc)}") from exc


class ShardEncoding:
    """Feed a shard's parts in order with :meth:`add`; read :attr:`rows` (clip order) and :attr:`failures`."""

    def __init__(self, model, *, num_codebooks: int, batch_max_seconds: float, max_pad_ratio: float = 0.25,
                 chunk_frames: int = 150):
        self.model, self.num_codebooks, self.chunk_frames = model, num_codebooks, chunk_frames
        self.max_samples = max(1, round(batch_max_seconds * SAMPLE_RATE))
        self.max_pad_ratio = max_pad_ratio
        self.streams: dict[int, _Stream] = {}  # by clip index
        self.rows: list[EncodedClip] = []
        self.failures: list[ClipFailure] = []
        self.next_part = 0

    def add(self, part: Part) -> None:
        if part.index != self.next_part:
            raise RuntimeError(f"shard {part.shard_id}: part {part.index} arrived, expected {self.next_part}")
        self.next_part += 1
        failed = {f.clip_id for f in part.failures}
        for index in [i for i, stream in self.streams.items() if stream.clip_id in failed]:
            del self.streams[index]  # a streamed clip that failed later in decoding
        self.failures += part.failures
        done = self._encode_whole([p for p in part.pieces if p.whole])
        for piece in part.pieces:
            if not piece.whole:
                done += self._stream(piece)
        self.rows += sorted(done, key=lambda row: row.info.index)
        if part.last and self.streams:
            raise RuntimeError(f"shard {part.shard_id}: the last part leaves clip(s) "
                               f"{sorted(self.streams)} unfinished")

    def _encode_whole(self, pieces: list[Piece]) -> list[EncodedClip]:
        batches = make_batches([len(p.audio) for p in pieces], max_samples=self.max_samples,
                               max_pad_ratio=self.max_pad_ratio)
        rows = []
        for batch in batches:
            try:
                rows += self._encode_batch([pieces[i] for i in batch])
                continue
            except Exception as exc:
                _raise_if_broken(exc)
                if len(batch) == 1 and retry.is_transient(exc):
                    raise  # out of memory with a single clip: the attempt fails
                log.warning("encoding a batch of %d clip(s) failed (%s); retrying clip by clip", len(batch),
                            retry.brief(exc))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            for i in batch:
                try:
                    rows += self._encode_batch([pieces[i]])
                except Exception as exc:
                    _raise_if_broken(exc)
                    if retry.is_transient(exc):
                        raise
                    self.failures.append(ClipFailure.from_exception(pieces[i].info.clip_id, pieces[i].info.source_uri,
                                                                    "encode", exc))
        return rows

    def _encode_batch(self, pieces: list[Piece]) -> list[EncodedClip]:
        """Zero-pad to the longest, encode in one call, keep each clip's own frames as ``[K, F]`` int16."""
        lengths = [len(p.audio) for p in pieces]
        wav = np.zeros((len(pieces), 1, max(lengths)), dtype=np.float32)
        for row, piece in zip(wav, pieces):
            row[0, : len(piece.audio)] = piece.audio
        codes = self.model.encode(torch.from_numpy(wav), lengths, self.num_codebooks,
                                  chunk_frames=self.chunk_frames).cpu().numpy()
        return [EncodedClip(p.info, codes[i, :, : self.model.num_frames(n)].astype(np.int16), n)
                for i, (p, n) in enumerate(zip(pieces, lengths))]

    def _stream(self, piece: Piece) -> list[EncodedClip]:
        info = piece.info
        try:
            if piece.start == 0:
                encoder = self.model.encode_stream(self.num_codebooks, chunk_frames=self.chunk_frames)
                self.streams[info.index] = _Stream(info.clip_id, encoder, [])
            stream = self.streams[info.index]
            if stream.encoder.samples != piece.start:
                raise RuntimeError(f"clip {info.clip_id}: piece at sample {piece.start}, expected "
                                   f"{stream.encoder.samples}")
            pushed = stream.encoder.push(torch.from_numpy(_writable(piece.audio)))
            stream.codes.append(pushed.cpu().numpy().astype(np.int16))
            if not piece.final:
                return []
            stream.codes.append(stream.encoder.finish().cpu().numpy().astype(np.int16))
            del self.streams[info.index]
            return [EncodedClip(info, np.concatenate(stream.codes, axis=1), stream.encoder.samples)]
        except Exception as exc:
            _raise_if_broken(exc)
            if retry.is_transient(exc):
                raise
            self.streams.pop(info.index, None)
            self.failures.append(ClipFailure.from_exception(info.clip_id, info.source_uri, "encode", exc))
            return []
