"""Guards on the encode path (issue 18): non-finite latents fail a clip with a clear error, never give codes; half
models keep the first convolution in float32; RoPE tables and window masks are built once per shape; the model lock
covers the model calls only."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import mimi
from mimi_weights import audio
from pipeline.encode import ShardEncoding
from test_encode_stage import alone, audio as clip_audio, encode_parts, parts_of


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return mimi.load_mimi(tiny_model_path)


def test_nan_audio_raises_instead_of_codes(model):
    wav = audio(3 * 24_000, seed=2, batch=3)
    wav[1, 0, 30_000] = float("nan")
    with pytest.raises(mimi.NonFiniteLatentError, match=r"item\(s\) \[1\].*float32 model.*NaN or inf samples"):
        model.encode(wav, num_codebooks=4, chunk_frames=10)
    stream = model.encode_stream(4, chunk_frames=10)
    with pytest.raises(mimi.NonFiniteLatentError):
        stream.push(wav[1, 0])


def test_a_float16_overflow_raises_and_names_the_dtype(tiny_model_path):
    half = mimi.load_mimi(tiny_model_path, dtype=torch.float16)
    wav = audio(24_000, seed=1, batch=2)
    wav[0] *= 1e5  # unnormalised float audio: past float16's range (65504) once in float16
    with pytest.raises(mimi.NonFiniteLatentError, match=r"item\(s\) \[0\].*float16 model.*overflow.*float32"):
        half.encode(wav, num_codebooks=4)


def test_a_clip_with_a_non_finite_latent_is_a_recorded_failure(model):
    """Whole (batched) and streamed clips alike: the clip fails once, stage encode; its neighbours keep their codes."""
    clips = [clip_audio(i, s) for i, s in enumerate([0.5, 0.6, 0.4, 4.0, 0.3])]
    clips[1][100] = np.inf
    clips[3][1_000] = np.nan  # a streamed clip: it fails in its first part, its later pieces are skipped
    parts = parts_of(clips, part_seconds=1.0)
    assert sum(p.info.clip_id == "c3" for part in parts for p in part.pieces) >= 3
    encoding = encode_parts(model, parts, 4, batch_max_seconds=10.0, max_pad_ratio=100)
    assert [(f.clip_id, f.stage, f.error_class) for f in encoding.failures] == [
        ("c1", "encode", "NonFiniteLatentError"), ("c3", "encode", "NonFiniteLatentError")]
    assert "NaN or inf" in encoding.failures[0].message
    assert [r.info.clip_id for r in encoding.rows] == ["c0", "c2", "c4"] and encoding.streams == {}
    for row in encoding.rows:
        np.testing.assert_array_equal(row.codes, alone(model, clips[row.info.index], 4))


def test_half_models_run_the_first_conv_on_the_float32_waveform(model, tiny_model_path):
    """The waveform is never cast to 16 bits: the float16 model's first conv sees and computes what the float32
    model's does, bit for bit (a float16 waveform keeps 11 of a 16-bit sample's bits)."""
    half = mimi.load_mimi(tiny_model_path, dtype=torch.float16)
    wav = audio(2 * 24_000, seed=5)
    seen = {}
    for name, m in (("exact", model), ("half", half)):
        def first_call(_, args, out, name=name) -> None:
            seen.setdefault(name, (args[0], out))

        hook = m.encoder.model[0].register_forward_hook(first_call)
        try:
            m.encode(wav, num_codebooks=2)
        finally:
            hook.remove()
    assert seen["half"][0].dtype == torch.float32
    assert torch.equal(seen["half"][0], seen["exact"][0]) and torch.equal(seen["half"][1], seen["exact"][1])


class CountCalls(TorchFunctionMode):
    """Counts the torch functions called while active."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls[func] += 1
        return func(*args, **(kwargs or {}))


def test_rope_tables_and_window_masks_are_built_once_per_shape(model):
    """Once per chunk for all layers (not once per layer), and not again for a call with the same positions."""
    transformer = model.encoder_transformer
    assert len(transformer.layers) > 1
    x = torch.randn(3, 40, model.config.dimension)
    with torch.inference_mode():
        with CountCalls() as first:
            expected = transformer(x)
        with CountCalls() as again:
            assert torch.equal(transformer(x), expected)
        with CountCalls() as chunked:  # 3 chunks, 3 position ranges
            model.encode(audio(3 * 300 * 960, seed=1), num_codebooks=1, chunk_frames=150)
    assert first.calls[torch.cos] == first.calls[torch.sin] == 1 and first.calls[torch.arange] > 0
    assert again.calls[torch.cos] == again.calls[torch.sin] == again.calls[torch.arange] == 0
    assert chunked.calls[torch.cos] == 3


class GuardedLock:
    """The model lock, recording whether it is held; taking it while ``forbidden`` fails the test."""

    def __init__(self):
        self.lock, self.forbidden, self.holds = threading.Lock(), False, 0

    def __enter__(self):
        assert not self.forbidden, "the model lock was taken outside a model call"
        self.lock.acquire()
        self.holds += 1

    def __exit__(self, *exc):
        self.lock.release()

    def locked(self) -> bool:
        return self.lock.locked()


def test_the_model_lock_covers_the_model_calls_only(model, monkeypatch):
    """prepare (padding, copy to the device) and finish (codes back, int16) never take the lock; every model
    computation runs under it; codes equal each clip encoded alone, whole or streamed."""
    clips = [clip_audio(i, s) for i, s in enumerate([0.6, 3.1, 0.7, 0.2, 0.9])]
    parts = parts_of(clips, part_seconds=1.5, block=5_000)
    lock = GuardedLock()
    held = []
    encode_chunk = model._encode_chunk
    monkeypatch.setattr(model, "_encode_chunk", lambda *args: (held.append(lock.locked()), encode_chunk(*args))[1])
    encoding = ShardEncoding(model, num_codebooks=4, batch_max_seconds=4.0, chunk_frames=8, lock=lock)
    for part in parts:
        lock.forbidden = True
        prepared = encoding.prepare(part)
        lock.forbidden = False
        encoded = encoding.encode(prepared)
        lock.forbidden = True
        encoding.finish(part, encoded)
    assert held and all(held) and lock.holds > 0
    for x, row in zip(clips, encoding.rows):
        np.testing.assert_array_equal(row.codes, alone(model, x, 4, chunk_frames=8))
