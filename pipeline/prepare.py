"""Decode + mono + resample a shard's clips, streamed, into bounded :class:`~pipeline.types.Part` s for the encoder.

A shard never sits in memory decoded. Its clips are decoded block by block (:mod:`pipeline.decode`), mixed down and
resampled with soxr's streaming resampler (:mod:`pipeline.resample`), and gathered into parts of about
``part_seconds`` of 24 kHz audio:

* a clip that fits in a part is whole in one part (the encoder batches such clips by length within the part);
* a clip longer than a part is streamed: each part holds the next piece of it, and the encoder carries Mimi's
  state from piece to piece;
* part boundaries depend only on the clips' lengths, so a shard always gives the same parts, and the same batches,
  however often it is decoded.

Memory per decode task: about two parts of audio plus one decode block, whatever the clips' lengths. A clip longer
than ``max_clip_seconds`` (e.g. a tiny file that decodes to days of silence) stops as a recorded ``decode``
failure, at that length. Any other error of a clip's own becomes a ``ClipFailure``: stage ``"read"`` for a file
that cannot be opened or read (denied, archived, missing), ``"decode"`` for undecodable audio, ``"resample"`` for
the conversion to mono 24 kHz (channel policy included); a transient error (storage outage) is raised: it fails
the attempt, never the clip.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipeline import retry
from pipeline.decode import DecodeError, decode_blocks
from pipeline.resample import MonoResampler
from pipeline.signals import ClipSignals, Signals
from pipeline.sources import iter_clips
from pipeline.types import SAMPLE_RATE, Clip, ClipFailure, ClipInfo, ClipSource, Part, Piece, Shard


class ClipTooLongError(DecodeError):
    """A clip that decodes to more than ``max_clip_seconds`` of audio."""


class _ClipError(Exception):
    """A clip's own error and the stage it happened in."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(stage)
        self.stage, self.error = stage, error


def _own_error(exc: Exception) -> Exception:
    """The error to raise for ``exc``, met opening or decoding a clip: itself when transient (it fails the attempt),
    else the clip's own: a read error (an ``OSError``: denied, archived, missing) or a decode error."""
    if retry.is_transient(exc):
        return exc
    return _ClipError("read" if isinstance(exc, OSError) else "decode", exc)


def open_clip(src: ClipSource, *, channel_policy: str = "mix", max_clip_seconds: float | None = None,
              signals: ClipSignals | None = None) -> tuple[int, int, Iterator[np.ndarray]]:
    """(original sample rate, original channels, blocks of mono float32 at 24 kHz) of ``src``; ``signals`` is fed
    every decoded block and every 24 kHz block on the way.

    Raises :class:`_ClipError` for the clip's own errors (when opening, and while iterating the blocks); transient
    errors are raised as themselves.
    """
    try:
        f = src.open()
    except Exception as exc:
        raise _own_error(exc) from exc
    try:
        reader, blocks = decode_blocks(f, src.source_uri)
    except Exception as exc:
        f.close()
        raise _own_error(exc) from exc
    try:
        resampler = MonoResampler(reader.sample_rate, reader.channels, channel_policy)
    except Exception as exc:
        blocks.close()
        f.close()
        raise _ClipError("resample", exc) from exc
    max_samples = None if max_clip_seconds is None else round(max_clip_seconds * SAMPLE_RATE)

    def mono_blocks() -> Iterator[np.ndarray]:
        n = 0
        try:
            for out in _pushed(blocks, resampler, signals):
                n += len(out)
                if max_samples is not None and n > max_samples:
                    raise ClipTooLongError(f"{src.source_uri}: longer than max_clip_seconds ({max_clip_seconds:g} s)")
                if len(out):
                    yield out
        except Exception as exc:
            raise _own_error(exc) from exc
        finally:
            blocks.close()
            f.close()

    return reader.sample_rate, reader.channels, mono_blocks()


def _pushed(blocks: Iterator[np.ndarray], resampler: MonoResampler, signals: ClipSignals | None
            ) -> Iterator[np.ndarray]:
    for block in blocks:
        if signals is not None:
            signals.original(block)
        yield _fed(resampler.push(block), signals)
    yield _fed(resampler.flush(), signals)


def _fed(out: np.ndarray, signals: ClipSignals | None) -> np.ndarray:
    if signals is not None:
        signals.mono(out)
    return out


class PartBuilder:
    """Gathers clips' 24 kHz blocks into parts of about ``part_samples`` samples (see the module docstring)."""

    def __init__(self, shard_id: str, part_samples: int):
        self.shard_id, self.limit = shard_id, max(1, part_samples)
        self.index = 0
        self.pieces: list[Piece] = []  # whole clips and final pieces, for the current part
        self.samples = 0
        self.failures: list[ClipFailure] = []
        self.info: ClipInfo | None = None  # the clip being decoded, its blocks not yet in a piece
        self.blocks: list[np.ndarray] = []
        self.pending = 0
        self.start = 0  # samples of the current clip already sent in earlier (non-final) pieces

    def begin(self, info: ClipInfo) -> None:
        self.info, self.blocks, self.pending, self.start = info, [], 0, 0

    def add(self, block: np.ndarray) -> Iterator[Part]:
        """Add a block of the current clip; yield the parts it completes."""
        self.blocks.append(block)
        self.pending += len(block)
        if self.samples + self.pending <= self.limit:
            return
        if self.pieces:  # the current clip moves on to the next part
            yield self._emit()
        if self.pending >= self.limit:  # alone it fills a part: stream it
            yield self._emit([self._take(final=False)])

    def end(self, signals: Signals | None = None) -> Iterator[Part]:
        """The current clip is complete (``signals``: its signals, carried by its final piece); yield the part this
        completes, if any."""
        piece = self._take(final=True)
        piece.signals = signals
        self.pieces.append(piece)
        self.samples += len(piece.audio)
        self.info = None
        if self.samples >= self.limit:
            yield self._emit()

    def fail(self, failure: ClipFailure) -> None:
        """Record a failure; a clip being decoded is dropped (its streamed pieces are dropped by the encoder)."""
        self.info, self.blocks, self.pending = None, [], 0
        self.failures.append(failure)

    def finish(self) -> Part:
        """The shard's last part (possibly without audio)."""
        return self._emit(last=True)

    def _take(self, final: bool) -> Piece:
        audio = self.blocks[0] if len(self.blocks) == 1 else np.concatenate([np.zeros(0, np.float32), *self.blocks])
        piece = Piece(self.info, np.ascontiguousarray(audio, dtype=np.float32), self.start, final)
        self.start += len(audio)
        self.blocks, self.pending = [], 0
        return piece

    def _emit(self, pieces: list[Piece] | None = None, last: bool = False) -> Part:
        part = Part(self.shard_id, self.index, pieces if pieces is not None else self.pieces, self.failures, last)
        self.index += 1
        if pieces is None:
            self.pieces, self.samples = [], 0
        self.failures = []
        return part


def iter_parts(shard: Shard, *, channel_policy: str = "mix", part_seconds: float = 300.0,
               max_clip_seconds: float | None = None, storage_options: dict | None = None,
               only: int | None = None, vad: bool = False) -> Iterator[Part]:
    """Read, decode and resample the clips of ``shard`` (only the item at index ``only`` if given) into parts; each
    clip's final piece carries its :class:`~pipeline.signals.Signals` (``speech_share`` only with ``vad``)."""
    builder = PartBuilder(shard.shard_id, round(part_seconds * SAMPLE_RATE))
    for i, item in enumerate(iter_clips(shard, storage_options=storage_options, only=only)):
        if isinstance(item, ClipFailure):
            builder.fail(item)
            continue
        signals = ClipSignals(vad)
        try:
            sample_rate, channels, blocks = open_clip(item, channel_policy=channel_policy,
                                                      max_clip_seconds=max_clip_seconds, signals=signals)
            builder.begin(ClipInfo(i if only is None else only, item.clip_id, item.source_uri, sample_rate, channels,
                                   item.metadata))
            for block in blocks:
                yield from builder.add(block)
        except _ClipError as exc:
            builder.fail(ClipFailure.from_exception(item.clip_id, item.source_uri, exc.stage, exc.error))
            continue
        if builder.start + builder.pending == 0:
            builder.fail(ClipFailure(item.clip_id, item.source_uri, "resample", "ValueError",
                                     "no samples left after resampling to 24 kHz"))
            continue
        yield from builder.end(signals.finish())
    yield builder.finish()


def prepare_clip(src: ClipSource, *, channel_policy: str = "mix", max_clip_seconds: float | None = None
                 ) -> Clip | ClipFailure:
    """Decode ``src`` whole, as mono float32 at 24 kHz (the same samples the parts of a run carry)."""
    try:
        sample_rate, channels, blocks = open_clip(src, channel_policy=channel_policy,
                                                  max_clip_seconds=max_clip_seconds)
        audio = np.concatenate([np.zeros(0, np.float32), *blocks])
    except _ClipError as exc:
        return ClipFailure.from_exception(src.clip_id, src.source_uri, exc.stage, exc.error)
    return Clip(src.clip_id, src.source_uri, audio, sample_rate, channels, src.metadata)


def prepare_shard(shard: Shard, *, channel_policy: str = "mix", storage_options: dict | None = None
                  ) -> tuple[list[Clip], list[ClipFailure]]:
    """Read and prepare every clip of ``shard`` whole, in order; failures are collected, never dropped."""
    clips: list[Clip] = []
    failures: list[ClipFailure] = []
    for item in iter_clips(shard, storage_options=storage_options):
        result = item if isinstance(item, ClipFailure) else prepare_clip(item, channel_policy=channel_policy)
        (failures if isinstance(result, ClipFailure) else clips).append(result)
    return clips, failures
