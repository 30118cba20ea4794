"""Records that flow between the pipeline stages.

source → decode → resample → batch → encode → write → manifest. Each stage takes and returns these plain
dataclasses, so every stage can be tested on its own, without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SAMPLE_RATE = 24_000  # Mimi's input rate


@dataclass(frozen=True)
class Shard:
    """One unit of work: its clips are batched and encoded together and written to one Parquet file.

    ``shard_id`` is deterministic (derived from the input listing only) and names the output file
    ``data/{shard_id}.parquet``.
    """

    shard_id: str
    kind: str  # "files" | "webdataset" | "parquet" | "manifest"
    uri: str  # tar / parquet / manifest file; for "files", the input root the members are relative to
    members: tuple[str, ...] = ()  # "files": the audio file URIs of this shard, in order
    rows: tuple[int, int] | None = None  # "manifest": [start, stop) row range of the manifest
    root: str = ""  # the input root URI; "webdataset" / "parquet" clip ids start with ``uri`` relative to it


@dataclass
class ClipSource:
    """One audio item as found in a shard, still encoded (bytes of a WAV, FLAC, ...)."""

    clip_id: str  # stable, derived from the source (relative path, tar key, parquet row)
    source_uri: str  # full URI, scheme included
    data: bytes
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Clip:
    """A decoded clip, mono float32 at 24 kHz, ready to encode."""

    clip_id: str
    source_uri: str
    audio: np.ndarray  # float32 [T] at SAMPLE_RATE
    orig_sample_rate: int
    orig_channels: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE


@dataclass
class ClipFailure:
    """A clip that could not be turned into codes. Recorded, never dropped silently."""

    clip_id: str
    source_uri: str
    stage: str  # "read" | "decode" | "resample" | "encode" | "crash"
    error_class: str
    message: str

    @classmethod
    def from_exception(cls, clip_id: str, source_uri: str, stage: str, exc: BaseException) -> "ClipFailure":
        return cls(clip_id, source_uri, stage, type(exc).__name__, str(exc)[:2000])
