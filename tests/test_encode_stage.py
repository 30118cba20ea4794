"""encode_clips: batched codes equal per-clip codes, original order, failures isolated clip by clip (no Ray)."""

import numpy as np
import pytest
import torch

import mimi
from pipeline.encode import encode_clips
from pipeline.types import SAMPLE_RATE, Clip


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return mimi.load_mimi(tiny_model_path)


def clip(i: int, seconds: float) -> Clip:
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    audio = 0.4 * np.sin(2 * np.pi * (200 + 40 * i) * t) + 0.02 * np.random.default_rng(i).standard_normal(len(t))
    return Clip(f"c{i}", f"file:///c{i}.wav", audio.astype(np.float32), SAMPLE_RATE, 1)


def alone(model, c: Clip, k: int, chunk_frames: int = 150) -> np.ndarray:
    return model.encode(torch.from_numpy(c.audio)[None, None], num_codebooks=k, chunk_frames=chunk_frames)[0].numpy()


def test_batched_codes_equal_each_clip_encoded_alone(model):
    clips = [clip(i, s) for i, s in enumerate([1.3, 0.5, 2.9, 0.51, 1.0, 0.08, 2.0, 0.77])]
    encoded, codes, failures = encode_clips(model, clips, num_codebooks=8, batch_max_seconds=4.0)
    assert failures == [] and [c.clip_id for c in encoded] == [c.clip_id for c in clips]
    for c, k in zip(clips, codes):
        assert k.dtype == np.int16 and k.shape == (8, model.num_frames(len(c.audio)))
        np.testing.assert_array_equal(k, alone(model, c, 8))


def test_long_clip_is_its_own_chunked_batch(model):
    clips = [clip(0, 0.6), clip(1, 3.0), clip(2, 0.7)]
    _, codes, _ = encode_clips(model, clips, num_codebooks=4, batch_max_seconds=1.5, chunk_frames=8)
    for c, k in zip(clips, codes):
        np.testing.assert_array_equal(k, alone(model, c, 4, chunk_frames=8))


def test_failing_batch_is_retried_clip_by_clip(model):
    empty = Clip("empty", "file:///empty.wav", np.zeros(0, np.float32), SAMPLE_RATE, 1)
    clips = [clip(0, 0.5), empty, clip(1, 0.4)]
    encoded, codes, failures = encode_clips(model, clips, num_codebooks=2, batch_max_seconds=10.0, max_pad_ratio=100)
    assert [c.clip_id for c in encoded] == ["c0", "c1"]
    for c, k in zip(encoded, codes):
        np.testing.assert_array_equal(k, alone(model, c, 2))
    assert [(f.clip_id, f.stage, f.error_class) for f in failures] == [("empty", "encode", "ValueError")]
    assert "empty" in failures[0].message
