"""Deterministic batching of one shard's clips for the encoder.

Clips are sorted by (length, index) and cut greedily into batches whose padded size (batch size × longest clip)
stays within a budget, and whose padding stays a small share of the real audio. Batches depend only on the clip
lengths, never on scheduling, so a shard encodes to the same codes however often it is retried or resumed.
"""

from __future__ import annotations

from collections.abc import Sequence


def make_batches(lengths: Sequence[int], *, max_samples: int, max_pad_ratio: float = 0.25) -> list[list[int]]:
    """Cut clip indices into batches.

    ``lengths``: samples per clip. A batch holds clips of ascending length; it is closed before adding a clip would
    make ``size × longest`` exceed ``max_samples`` or the padding exceed ``max_pad_ratio`` × the batch's real
    samples. A clip longer than ``max_samples`` is a batch of its own (the model encodes it in chunks).
    """
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    batches: list[list[int]] = []
    batch: list[int] = []
    total = 0  # real samples in ``batch``
    for index in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        n = lengths[index]
        padded = (len(batch) + 1) * n  # ``n`` is the longest so far: lengths ascend
        if batch and (padded > max_samples or padded - (total + n) > max_pad_ratio * (total + n)):
            batches.append(batch)
            batch, total = [], 0
        batch.append(index)
        total += n
    if batch:
        batches.append(batch)
    return batches
