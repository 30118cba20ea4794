"""Decode + mono + resample a clip (or a whole shard) into ``Clip`` records ready to encode.

Any error becomes a ``ClipFailure``: stage ``"decode"`` for undecodable bytes, ``"resample"`` for the
conversion to mono 24 kHz (channel policy included).
"""

from __future__ import annotations

from pipeline.decode import decode_audio
from pipeline.resample import resample, to_mono
from pipeline.sources import iter_clips
from pipeline.types import Clip, ClipFailure, ClipSource, Shard


def prepare_clip(src: ClipSource, *, channel_policy: str = "mix") -> Clip | ClipFailure:
    """Decode ``src`` and convert it to mono float32 at 24 kHz."""
    try:
        samples, sample_rate = decode_audio(src.data, src.source_uri)
    except Exception as exc:
        return ClipFailure.from_exception(src.clip_id, src.source_uri, "decode", exc)
    try:
        audio = resample(to_mono(samples, channel_policy), sample_rate)
    except Exception as exc:
        return ClipFailure.from_exception(src.clip_id, src.source_uri, "resample", exc)
    return Clip(src.clip_id, src.source_uri, audio, sample_rate, samples.shape[0], src.metadata)


def prepare_shard(
    shard: Shard, *, channel_policy: str = "mix", storage_options: dict | None = None
) -> tuple[list[Clip], list[ClipFailure]]:
    """Read and prepare every clip of ``shard``, in order; failures are collected, never dropped."""
    clips: list[Clip] = []
    failures: list[ClipFailure] = []
    for item in iter_clips(shard, storage_options=storage_options):
        result = item if isinstance(item, ClipFailure) else prepare_clip(item, channel_policy=channel_policy)
        (failures if isinstance(result, ClipFailure) else clips).append(result)
    return clips, failures
