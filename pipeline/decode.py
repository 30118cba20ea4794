"""Decode stage: an encoded audio stream → blocks of float32 samples ``[channels, frames]`` at the file's rate.

Audio is decoded in blocks, so memory does not grow with a clip's length. libsndfile (via soundfile) reads
WAV/AIFF/AU, FLAC, OGG Vorbis/Opus and MP3; PyAV (FFmpeg) reads the rest (M4A/AAC, WebM, MP4, ...) and whatever
libsndfile cannot open. Policy: a clip is decoded completely and exactly, or it is an error:

* a file neither decoder can open, no frames, NaN/inf samples, or an error in the middle of the stream →
  ``DecodeError`` (no fallback once samples have been produced: they may already be on their way to the encoder);
* a truncated WAV (its ``data`` chunk declares more bytes than the file holds) → ``DecodeError``. libsndfile
  would silently return the shorter audio. The ``0`` and ``0xFFFFFFFF`` sizes that streaming writers leave
  as "unknown length" are accepted;
* a read error of the underlying (remote) file is raised as itself, never taken for the end of the audio
  (see :class:`pipeline.retry.RetryingFile`): the retry layer decides whether it is transient.
"""

from __future__ import annotations

import io
import itertools
import struct
from collections.abc import Iterator
from typing import BinaryIO

import av
import numpy as np
import soundfile as sf

from pipeline.retry import RetryingFile

BLOCK_FRAMES = 1 << 16  # frames per decoded block (1.4 s at 48 kHz)
_STREAMING_SIZES = (0, 0xFFFFFFFF)
_FFMPEG_FIRST = frozenset({"m4a", "aac", "mp4", "webm"})  # extensions libsndfile cannot read


class DecodeError(ValueError):
    """Audio bytes that cannot be decoded into a complete, finite, non-empty signal."""


class AudioReader:
    """An opened audio stream: ``sample_rate``, ``channels`` and :meth:`blocks` of float32 ``[channels, n]``."""

    sample_rate: int
    channels: int

    def blocks(self) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _SoundfileReader(AudioReader):
    def __init__(self, f: BinaryIO):
        self.file = sf.SoundFile(f)
        self.sample_rate, self.channels = self.file.samplerate, self.file.channels

    def blocks(self) -> Iterator[np.ndarray]:
        while True:
            block = self.file.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
            if not len(block):
                return
            yield np.ascontiguousarray(block.T)

    def close(self) -> None:
        self.file.close()


class _PyAVReader(AudioReader):
    """Rate and channel count are those of the first decoded frame (containers do not always declare them)."""

    def __init__(self, f: BinaryIO):
        self.container = av.open(f, mode="r")
        try:
            if not self.container.streams.audio:
                raise ValueError("no audio stream")
            self.frames = self._float_frames(self.container.streams.audio[0])
            self.first = next(self.frames, None)
            if self.first is None:
                raise ValueError("no audio frames")
        except BaseException:
            self.container.close()
            raise
        self.sample_rate, self.channels = self.first.sample_rate, self.first.to_ndarray().shape[0]

    def _float_frames(self, stream) -> Iterator[av.AudioFrame]:
        to_float = av.AudioResampler(format="fltp")  # keeps layout and rate
        for frame in self.container.decode(stream):
            yield from to_float.resample(frame)
        yield from to_float.resample(None)

    def blocks(self) -> Iterator[np.ndarray]:
        pending: list[np.ndarray] = []
        n = 0
        for out in itertools.chain([self.first], self.frames):
            samples = out.to_ndarray()
            if samples.shape[0] != self.channels or out.sample_rate != self.sample_rate:
                raise DecodeError(f"the stream changes from {self.channels} channel(s) at {self.sample_rate} Hz to "
                                  f"{samples.shape[0]} at {out.sample_rate} Hz")
            pending.append(samples)
            n += samples.shape[1]
            if n >= BLOCK_FRAMES:
                yield np.concatenate(pending, axis=1).astype(np.float32, copy=False)
                pending, n = [], 0
        if pending:
            yield np.concatenate(pending, axis=1).astype(np.float32, copy=False)

    def close(self) -> None:
        self.container.close()


def check_read_errors(f: BinaryIO) -> None:
    """Re-raise a read error that a decoder may have swallowed (see :class:`pipeline.retry.RetryingFile`)."""
    raw = getattr(f, "raw", f)
    if isinstance(raw, RetryingFile):
        raw.check()


def open_audio(f: BinaryIO, name: str = "audio") -> AudioReader:
    """Open the seekable binary stream ``f`` with the first decoder that can read it (see the module docstring)."""
    _check_wav_length(f, name)
    errors = []
    readers = (_PyAVReader, _SoundfileReader) if name.rpartition(".")[2].lower() in _FFMPEG_FIRST else (
        _SoundfileReader, _PyAVReader)
    for reader in readers:
        f.seek(0)
        try:
            opened = reader(f)
        except Exception as exc:
            check_read_errors(f)
            errors.append(f"{reader.__name__.strip('_').removesuffix('Reader').lower()}: {type(exc).__name__}: {exc}")
            continue
        if opened.sample_rate <= 0 or opened.channels <= 0:
            opened.close()
            errors.append(f"{reader.__name__}: {opened.channels} channel(s) at {opened.sample_rate} Hz")
            continue
        return opened
    raise DecodeError(f"{name}: cannot decode; tried " + "; ".join(errors))


def decode_blocks(f: BinaryIO, name: str = "audio") -> tuple[AudioReader, Iterator[np.ndarray]]:
    """Open ``f`` and return the reader and a generator of its validated blocks (float32 ``[channels, n]``).

    The generator raises :class:`DecodeError` on NaN/inf samples, on a decoder error mid-stream and, at the end,
    when there were no frames at all; it closes the reader when exhausted or closed.
    """
    reader = open_audio(f, name)

    def blocks() -> Iterator[np.ndarray]:
        total = 0
        try:
            for block in reader.blocks():
                check_read_errors(f)
                if not np.isfinite(block).all():
                    raise DecodeError(f"{name}: NaN or infinite samples")
                total += block.shape[1]
                yield block
            check_read_errors(f)
        except DecodeError:
            raise
        except Exception as exc:  # a read error of the file is raised as itself; anything else is the decoder's
            check_read_errors(f)
            raise DecodeError(f"{name}: decoding failed after {total} frames: {type(exc).__name__}: {exc}") from exc
        finally:
            reader.close()
        if total == 0:
            raise DecodeError(f"{name}: no audio frames")

    return reader, blocks()


def decode_audio(data: bytes, name_hint: str = "") -> tuple[np.ndarray, int]:
    """Decode whole ``data`` to float32 ``[channels, frames]`` and its sample rate (the blocks, concatenated)."""
    name = name_hint or "audio"
    if not data:
        raise DecodeError(f"{name}: empty input")
    reader, blocks = decode_blocks(io.BytesIO(data), name)
    return np.concatenate(list(blocks), axis=1), reader.sample_rate


def _check_wav_length(f: BinaryIO, name: str) -> None:
    """Raise if a RIFF/RIFX WAV's ``data`` chunk declares more bytes than the file holds (reads chunk headers only)."""
    f.seek(0)
    head = f.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
        return
    size_format = "<I" if head[:4] == b"RIFF" else ">I"
    length = f.seek(0, io.SEEK_END)
    offset = 12
    while offset + 8 <= length:
        f.seek(offset)
        header = f.read(8)
        chunk_id, (size,) = header[:4], struct.unpack(size_format, header[4:8])
        if chunk_id == b"data":
            available = length - offset - 8
            if size not in _STREAMING_SIZES and size > available:
                raise DecodeError(f"{name}: truncated WAV: header declares {size} data bytes, file holds {available}")
            return
        offset += 8 + size + (size & 1)
