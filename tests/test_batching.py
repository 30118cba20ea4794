"""Deterministic, length-sorted batching within a shard."""

import random

import pytest

from pipeline.batching import make_batches


def test_sorted_by_length_then_index_and_within_budget():
    lengths = [30, 10, 20, 10, 30, 20]
    batches = make_batches(lengths, max_samples=60, max_pad_ratio=10)
    assert batches == [[1, 3, 2], [5, 0], [4]]
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 60


def test_every_clip_exactly_once_and_deterministic():
    rng = random.Random(0)
    lengths = [rng.randint(1, 1000) for _ in range(500)]
    batches = make_batches(lengths, max_samples=5000, max_pad_ratio=0.1)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert batches == make_batches(list(lengths), max_samples=5000, max_pad_ratio=0.1)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded <= 1.1 * sum(lengths)


def test_padding_limit_splits_very_different_lengths():
    assert make_batches([100, 10], max_samples=10_000, max_pad_ratio=0.25) == [[1], [0]]
    assert make_batches([100, 90], max_samples=10_000, max_pad_ratio=0.25) == [[1, 0]]


def test_clip_longer_than_the_budget_is_its_own_batch():
    assert make_batches([5, 500, 6], max_samples=100) == [[0, 2], [1]]


def test_empty_and_bad_budget():
    assert make_batches([], max_samples=10) == []
    with pytest.raises(ValueError):
        make_batches([1], max_samples=0)
