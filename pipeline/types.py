"""Records that flow between the pipeline stages.

source → decode → resample → part → encode → write → manifest. Each stage takes and returns these plain
dataclasses, so every stage can be tested on its own, without Ray.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from pipeline import retry

if TYPE_CHECKING:
    from pipeline.signals import Signals

SAMPLE_RATE = 24_000  # Mimi's input rate


@dataclass(frozen=True, slots=True)
class Member:
    """One input of a ``files`` or ``manifest`` shard: an audio file, or a manifest row."""

    key: str  # the clip id (path relative to the input root; the manifest's id, else its URI as written)
    uri: str  # full URI of the audio, scheme included ("" for a manifest row without one: a read failure)
    size: int = 0  # bytes, from the listing (0: unknown)
    version: str = ""  # ETag, generation or mtime from the listing ("": unknown)
    row: str = ""  # manifest: the row's metadata columns as compact JSON
    error: str = ""  # why it cannot be read, known from the listing (a manifest row without a URI)


@dataclass(frozen=True, slots=True)
class Shard:
    """One unit of work: its clips are encoded together and written to one Parquet file, ``data/{shard_id}.parquet``.

    ``shard_id`` comes from the content of the listing, not from positions in it (see :mod:`pipeline.sharding`), and
    ``digest`` hashes what the shard holds (its members and their sizes and versions, or its container file's): a done
    shard whose digest no longer matches the listing is redone.
    """

    shard_id: str
    kind: str  # "files" | "webdataset" | "parquet" | "manifest"
    uri: str  # tar / parquet / manifest file; for "files", the input root the members are relative to
    root: str  # the input root URI; container clip ids start with ``uri`` relative to it
    digest: str
    members: tuple[Member, ...] = ()  # "files" / "manifest": the shard's inputs, sorted by key
    size: int = 0  # "webdataset" / "parquet": the container file's size and version
    version: str = ""


@dataclass
class ClipSource:
    """One audio item as found in a shard, still encoded: whole ``data`` in memory, or an ``opener`` of a stream."""

    clip_id: str  # stable, derived from the source (relative path, tar key, parquet row, manifest id)
    source_uri: str  # full URI, scheme included
    data: bytes | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    opener: Callable[[], BinaryIO] | None = None  # for audio too large to hold in memory

    def open(self) -> BinaryIO:
        """A seekable binary stream of the encoded audio."""
        return self.opener() if self.opener is not None else io.BytesIO(self.data or b"")


@dataclass
class ClipInfo:
    """What the output row of a clip holds besides its codes."""

    index: int  # position of the clip in its shard
    clip_id: str
    source_uri: str
    orig_sample_rate: int
    orig_channels: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Piece:
    """A stretch of one clip's 24 kHz mono audio. A clip that fits in a part is one piece (``start == 0``,
    ``final``); a longer one is streamed to the encoder as consecutive pieces across parts."""

    info: ClipInfo
    audio: np.ndarray  # float32 [n] at SAMPLE_RATE
    start: int  # sample offset of this piece in the clip
    final: bool
    signals: Signals | None = None  # the clip's signals, on its final piece

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.final


@dataclass
class Part:
    """A bounded slice of a decoded shard (at most ``part_seconds`` of audio plus one decode block), in clip order.

    ``failures`` are the clips that failed while this part was being built; one of them may be a streamed clip whose
    earlier pieces were in earlier parts (the encoder drops what it has of it). ``last`` marks the shard's final part.
    """

    shard_id: str
    index: int
    pieces: list[Piece] = field(default_factory=list)
    failures: list[ClipFailure] = field(default_factory=list)
    last: bool = False

    @property
    def samples(self) -> int:
        return sum(len(p.audio) for p in self.pieces)


@dataclass
class EncodedClip:
    """A clip's output row: its info, its codes ``[K, F]`` int16, its length in 24 kHz samples, and its signals
    (None: null columns)."""

    info: ClipInfo
    codes: np.ndarray
    samples: int
    signals: Signals | None = None

    @property
    def duration_s(self) -> float:
        return self.samples / SAMPLE_RATE


@dataclass
class Clip:
    """A whole decoded clip, mono float32 at 24 kHz (the single-file tools and the tests hold clips whole)."""

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
    """A clip that could not be turned into codes. Recorded, never dropped silently.

    Stage ``container``: a tar or Parquet input that could not be read to its end (or at all); ``clip_id`` names the
    container, and what it held past the damage is unknown (a tar has no index), so its shard is recorded ``partial``:
    not done, it gates the exit code and is redone by the next run."""

    clip_id: str
    source_uri: str
    stage: str  # "read" | "decode" | "resample" | "encode" | "crash" | "container"
    error_class: str
    message: str

    @classmethod
    def from_exception(cls, clip_id: str, source_uri: str, stage: str, exc: BaseException) -> "ClipFailure":
        """The failure for ``exc``; the message starts with the store's answer (code, HTTP status) when there is
        one (``AccessDenied, HTTP 403: Access Denied``)."""
        answer = retry.answer_of(exc)
        message = (f"{answer}: " if answer else "") + str(exc)
        return cls(clip_id, source_uri, stage, type(exc).__name__, message[:2000])
