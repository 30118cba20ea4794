"""Decode stage: encoded audio bytes → float32 samples ``[channels, frames]`` and their sample rate.

libsndfile (via soundfile) reads WAV/AIFF/AU, FLAC, OGG Vorbis/Opus and MP3; PyAV (FFmpeg) reads the rest
(M4A/AAC, WebM, MP4, ...). Policy: a clip is decoded completely and exactly, or it is an error:

* no frames, or NaN/inf samples → ``DecodeError``;
* a truncated WAV (its ``data`` chunk declares more bytes than the file holds) → ``DecodeError``. libsndfile
  would silently return the shorter audio. The ``0`` and ``0xFFFFFFFF`` sizes that streaming writers leave
  as "unknown length" are accepted.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

import av
import numpy as np
import soundfile as sf

_STREAMING_SIZES = (0, 0xFFFFFFFF)
_FFMPEG_FIRST = frozenset({"m4a", "aac", "mp4", "webm"})  # extensions libsndfile cannot read


class DecodeError(ValueError):
    """Audio bytes that cannot be decoded into a complete, finite, non-empty signal."""


def decode_audio(data: bytes, name_hint: str = "") -> tuple[np.ndarray, int]:
    """Decode ``data`` to float32 ``[channels, frames]`` and its sample rate; ``name_hint`` names it in errors."""
    name = name_hint or "audio"
    if not data:
        raise DecodeError(f"{name}: empty input")
    _check_wav_length(data, name)
    errors = []
    for decoder in _decoders(name_hint):
        try:
            samples, sample_rate = decoder(data)
        except Exception as exc:
            errors.append(f"{decoder.__name__.removeprefix('_decode_')}: {type(exc).__name__}: {exc}")
            continue
        return _validated(samples, sample_rate, name)
    raise DecodeError(f"{name}: cannot decode {len(data)} bytes; tried " + "; ".join(errors))


def _decoders(name_hint: str) -> tuple[Callable[[bytes], tuple[np.ndarray, int]], ...]:
    if name_hint.rpartition(".")[2].lower() in _FFMPEG_FIRST:
        return _decode_pyav, _decode_soundfile
    return _decode_soundfile, _decode_pyav


def _decode_soundfile(data: bytes) -> tuple[np.ndarray, int]:
    samples, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return np.ascontiguousarray(samples.T), sample_rate


def _decode_pyav(data: bytes) -> tuple[np.ndarray, int]:
    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        to_float = av.AudioResampler(format="fltp")  # keeps layout and rate
        chunks = [
            out.to_ndarray()
            for frame in container.decode(stream)
            for out in to_float.resample(frame)
        ]
        chunks += [out.to_ndarray() for out in to_float.resample(None)]
        if not chunks:
            raise ValueError("no audio frames")
        return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), stream.codec_context.sample_rate


def _validated(samples: np.ndarray, sample_rate: int, name: str) -> tuple[np.ndarray, int]:
    if samples.shape[1] == 0:
        raise DecodeError(f"{name}: no audio frames")
    if sample_rate <= 0:
        raise DecodeError(f"{name}: invalid sample rate {sample_rate}")
    if not np.isfinite(samples).all():
        raise DecodeError(f"{name}: NaN or infinite samples")
    return samples, int(sample_rate)


def _check_wav_length(data: bytes, name: str) -> None:
    """Raise if a RIFF/RIFX WAV's ``data`` chunk declares more bytes than the file holds."""
    if data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return
    size_format = "<I" if data[:4] == b"RIFF" else ">I"
    offset = 12
    while offset + 8 <= len(data):
        chunk_id = data[offset : offset + 4]
        (size,) = struct.unpack(size_format, data[offset + 4 : offset + 8])
        if chunk_id == b"data":
            available = len(data) - offset - 8
            if size not in _STREAMING_SIZES and size > available:
                raise DecodeError(
                    f"{name}: truncated WAV: header declares {size} data bytes, file holds {available}"
                )
            return
        offset += 8 + size + (size & 1)
