"""Writers of real audio inputs for the tests: short synthetic signals in every container the pipeline reads,
WebDataset tars, Hub-style Parquet shards, manifests, and broken files."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow.parquet as pq
import soundfile as sf


@dataclass(frozen=True)
class AudioFormat:
    """How to write one container/codec, and how closely its decoding must match the written signal."""

    ext: str
    container: str  # soundfile format, or "m4a" (written with PyAV)
    subtype: str | None
    lossless: bool
    atol: float = 0.0  # lossless formats: max abs error against the written float signal


FORMATS = {
    "wav_pcm16": AudioFormat("wav", "WAV", "PCM_16", True, 1 / 2**15),
    "wav_pcm24": AudioFormat("wav", "WAV", "PCM_24", True, 1 / 2**23),
    "wav_float": AudioFormat("wav", "WAV", "FLOAT", True, 0.0),
    "wav_ulaw": AudioFormat("wav", "WAV", "ULAW", True, 0.02),  # 8-bit companding: lossy, but sample exact
    "flac": AudioFormat("flac", "FLAC", "PCM_16", True, 1 / 2**15),
    "aiff": AudioFormat("aiff", "AIFF", "PCM_16", True, 1 / 2**15),
    "mp3": AudioFormat("mp3", "MP3", "MPEG_LAYER_III", False),
    "ogg_vorbis": AudioFormat("ogg", "OGG", "VORBIS", False),
    "opus": AudioFormat("opus", "OGG", "OPUS", False),
    "m4a_aac": AudioFormat("m4a", "m4a", None, False),
}


def signal(sample_rate: int, seconds: float = 0.5, channels: int = 1, seed: int = 0) -> np.ndarray:
    """float32 ``[frames, channels]``: a distinct sine per channel plus a little noise, peak < 0.6."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(sample_rate * seconds)) / sample_rate
    tones = [0.5 * np.sin(2 * np.pi * (330 + 110 * c) * t) for c in range(channels)]
    return (np.stack(tones, axis=1) + 0.01 * rng.standard_normal((len(t), channels))).astype(np.float32)


def encode(fmt: AudioFormat, samples: np.ndarray, sample_rate: int) -> bytes:
    """Encode ``samples`` ``[frames, channels]`` into the bytes of a ``fmt`` file."""
    if fmt.container == "m4a":
        return _encode_aac(samples, sample_rate)
    out = io.BytesIO()
    sf.write(out, samples, sample_rate, format=fmt.container, subtype=fmt.subtype)
    return out.getvalue()


def _encode_aac(samples: np.ndarray, sample_rate: int) -> bytes:
    out = io.BytesIO()
    layout = {1: "mono", 2: "stereo"}[samples.shape[1]]
    with av.open(out, "w", format="ipod") as container:
        stream = container.add_stream("aac", rate=sample_rate, layout=layout)
        planar = np.ascontiguousarray(samples.T)
        for start in range(0, planar.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(planar[:, start : start + 1024]), format="fltp", layout=layout
            )
            frame.sample_rate, frame.pts = sample_rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return out.getvalue()


def write_audio(path: Path, fmt_name: str, sample_rate: int, seconds: float = 0.5, channels: int = 1,
                seed: int = 0) -> np.ndarray:
    """Write a real ``fmt_name`` file at ``path``; returns the written signal ``[frames, channels]``."""
    samples = signal(sample_rate, seconds, channels, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(FORMATS[fmt_name], samples, sample_rate))
    return samples


def wav_bytes(samples: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, sample_rate, format="WAV", subtype=subtype)
    return out.getvalue()


def lying_wav_bytes(sample_rate: int = 16_000, seconds: float = 0.5) -> bytes:
    """A PCM_16 WAV cut in half: its header still declares the full data length."""
    data = wav_bytes(signal(sample_rate, seconds), sample_rate)
    return data[: len(data) // 2]


def corrupt_bytes(n: int = 4096, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A WebDataset tar: each ``(key, {extension: bytes})`` becomes members ``{key}.{extension}``, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_hub_parquet(path: Path, audio: list[dict[str, Any]], row_group_size: int = 32, **columns: list[Any]) -> None:
    """A Parquet shard as ``datasets`` builds it: an ``Audio`` column (struct of bytes/path, declared in the
    ``huggingface`` schema metadata) plus metadata columns, in row groups of ``row_group_size``.

    Written with pyarrow from the ``datasets`` table (``Dataset.to_parquet`` would stat rows that have no bytes).
    """
    from datasets import Audio, Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    dataset = Dataset.from_dict({"audio": audio, **columns}).cast_column("audio", Audio(decode=False))
    pq.write_table(dataset.data.table, path, row_group_size=row_group_size)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
