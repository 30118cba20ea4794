"""Encode stage: a shard's clips → Mimi codes, batched deterministically (see :mod:`pipeline.batching`).

A batch that raises (e.g. CUDA out of memory) is retried clip by clip; a clip that still fails becomes a
``ClipFailure(stage="encode")``. Testable without Ray.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.batching import make_batches
from pipeline.types import SAMPLE_RATE, Clip, ClipFailure

log = logging.getLogger(__name__)


def _encode_batch(model, clips: list[Clip], num_codebooks: int, chunk_frames: int) -> list[np.ndarray]:
    """Zero-pad ``clips`` to the longest, encode them in one call, and keep each clip's own frames: ``[K, F]`` int16."""
    lengths = [len(c.audio) for c in clips]
    wav = np.zeros((len(clips), 1, max(lengths)), dtype=np.float32)
    for row, clip in zip(wav, clips):
        row[0, : len(clip.audio)] = clip.audio
    codes = model.encode(torch.from_numpy(wav), lengths, num_codebooks, chunk_frames=chunk_frames).cpu().numpy()
    return [codes[i, :, : model.num_frames(n)].astype(np.int16) for i, n in enumerate(lengths)]


def encode_clips(model, clips: list[Clip], *, num_codebooks: int, batch_max_seconds: float,
                 max_pad_ratio: float = 0.25, chunk_frames: int = 150
                 ) -> tuple[list[Clip], list[np.ndarray], list[ClipFailure]]:
    """Encode ``clips`` with ``model`` (a ``MimiModel``).

    Returns the encoded clips and their ``[K, F]`` int16 codes, both in the clips' original order, and the clips
    that could not be encoded.
    """
    batches = make_batches([len(c.audio) for c in clips], max_samples=max(1, round(batch_max_seconds * SAMPLE_RATE)),
                           max_pad_ratio=max_pad_ratio)
    codes: dict[int, np.ndarray] = {}
    failures: dict[int, ClipFailure] = {}
    for batch in batches:
        try:
            codes.update(zip(batch, _encode_batch(model, [clips[i] for i in batch], num_codebooks, chunk_frames)))
            continue
        except Exception as exc:
            log.warning("encoding a batch of %d clip(s) failed (%s: %s); retrying clip by clip", len(batch),
                        type(exc).__name__, str(exc)[:200])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for i in batch:
            try:
                codes[i] = _encode_batch(model, [clips[i]], num_codebooks, chunk_frames)[0]
            except Exception as exc:
                failures[i] = ClipFailure.from_exception(clips[i].clip_id, clips[i].source_uri, "encode", exc)
    ok = sorted(codes)
    return [clips[i] for i in ok], [codes[i] for i in ok], [failures[i] for i in sorted(failures)]
