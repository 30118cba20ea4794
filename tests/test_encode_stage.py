"""ShardEncoding: parts → codes. Batched whole clips equal clips encoded alone; clips streamed over parts equal a
one-call encode of the whole clip; order, failures, and errors that fail the attempt instead of a clip (no Ray)."""

import numpy as np
import pytest
import torch

import mimi
from audio_fixtures import write_audio
from pipeline.encode import EncoderBroken, ShardEncoding
from pipeline.prepare import PartBuilder, iter_parts, prepare_shard
from pipeline.sources import discover_shards
from pipeline.types import SAMPLE_RATE, ClipFailure, ClipInfo, Part


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return mimi.load_mimi(tiny_model_path)


def audio(i: int, seconds: float) -> np.ndarray:
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    x = 0.4 * np.sin(2 * np.pi * (200 + 40 * i) * t) + 0.02 * np.random.default_rng(i).standard_normal(len(t))
    return x.astype(np.float32)


def info(i: int) -> ClipInfo:
    return ClipInfo(i, f"c{i}", f"file:///c{i}.wav", SAMPLE_RATE, 1)


def parts_of(clips: list[np.ndarray], part_seconds: float, block: int = 7_000, fail: dict[int, int] | None = None
             ) -> list[Part]:
    """The parts a decode task would send for ``clips``, fed in blocks; clip i of ``fail`` fails after that many
    samples."""
    builder, parts = PartBuilder("s", round(part_seconds * SAMPLE_RATE)), []
    for i, x in enumerate(clips):
        builder.begin(info(i))
        for start in range(0, len(x), block):
            if fail and i in fail and start >= fail[i]:
                builder.fail(ClipFailure(f"c{i}", f"file:///c{i}.wav", "decode", "DecodeError", "broken"))
                break
            parts += builder.add(x[start:start + block])
        else:
            parts += builder.end()
    return parts + [builder.finish()]


def alone(model, x: np.ndarray, k: int, chunk_frames: int = 150) -> np.ndarray:
    return model.encode(torch.from_numpy(x)[None, None], num_codebooks=k, chunk_frames=chunk_frames)[0].numpy()


def encode_parts(model, parts: list[Part], k: int = 8, **kwargs) -> ShardEncoding:
    encoding = ShardEncoding(model, num_codebooks=k, batch_max_seconds=kwargs.pop("batch_max_seconds", 4.0), **kwargs)
    for part in parts:
        encoding.add(part)
    return encoding


def test_batched_codes_equal_each_clip_encoded_alone(model):
    clips = [audio(i, s) for i, s in enumerate([1.3, 0.5, 2.9, 0.51, 1.0, 0.08, 2.0, 0.77])]
    encoding = encode_parts(model, parts_of(clips, part_seconds=60))
    assert encoding.failures == [] and [r.info.clip_id for r in encoding.rows] == [f"c{i}" for i in range(8)]
    for x, row in zip(clips, encoding.rows):
        assert row.codes.dtype == np.int16 and row.codes.shape == (8, model.num_frames(len(x)))
        assert row.samples == len(x)
        np.testing.assert_array_equal(row.codes, alone(model, x, 8))


def test_clips_longer_than_a_part_are_streamed_with_one_call_codes(model):
    """A 7 s and a 3.3 s clip over 1.5 s parts: streamed piece by piece, their codes equal a one-call encode of the
    whole clip; the short clips around them are batched."""
    clips = [audio(0, 0.6), audio(1, 7.0), audio(2, 0.7), audio(3, 3.3), audio(4, 0.2)]
    parts = parts_of(clips, part_seconds=1.5, block=5_000)
    streamed = {p.info.clip_id for part in parts for p in part.pieces if not p.whole}
    assert streamed == {"c1", "c3"} and max(part.samples for part in parts) < 1.5 * SAMPLE_RATE + 5_000
    encoding = encode_parts(model, parts, 4, chunk_frames=8)
    assert [r.info.clip_id for r in encoding.rows] == [f"c{i}" for i in range(5)]
    for x, row in zip(clips, encoding.rows):
        np.testing.assert_array_equal(row.codes, alone(model, x, 4, chunk_frames=8))


def test_a_streamed_clip_that_fails_mid_way_is_dropped_and_recorded(model):
    clips = [audio(0, 0.5), audio(1, 4.0), audio(2, 0.4)]
    encoding = encode_parts(model, parts_of(clips, part_seconds=1.0, fail={1: 60_000}))
    assert [r.info.clip_id for r in encoding.rows] == ["c0", "c2"] and encoding.streams == {}
    assert [(f.clip_id, f.stage) for f in encoding.failures] == [("c1", "decode")]


def test_failing_batch_is_retried_clip_by_clip(model):
    clips = [audio(0, 0.5), np.zeros(0, np.float32), audio(1, 0.4)]
    encoding = encode_parts(model, parts_of(clips, part_seconds=60), 2, batch_max_seconds=10.0, max_pad_ratio=100)
    assert [r.info.clip_id for r in encoding.rows] == ["c0", "c2"]
    for x, row in zip([clips[0], clips[2]], encoding.rows):
        np.testing.assert_array_equal(row.codes, alone(model, x, 2))
    assert [(f.clip_id, f.stage, f.error_class) for f in encoding.failures] == [("c1", "encode", "ValueError")]


class Failing:
    """The model, except that its encode raises ``error`` (a CPU machine cannot produce real CUDA errors)."""

    def __init__(self, model, error: Exception):
        self.model, self.error = model, error

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode(self, *args, **kwargs):
        raise self.error


def test_cuda_errors_fail_the_attempt_never_a_clip(model):
    parts = parts_of([audio(0, 0.5), audio(1, 0.4)], part_seconds=60)
    with pytest.raises(EncoderBroken, match="illegal memory access"):
        encode_parts(Failing(model, RuntimeError("CUDA error: an illegal memory access was encountered")), parts)
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(torch.cuda.OutOfMemoryError):  # the batch is split, then a single clip still fails: raised
        encode_parts(Failing(model, oom), parts)


def test_the_whole_data_path_streams_long_files_exactly(model, tmp_path):
    """Real files through decode blocks → streamed resampling → parts → ShardEncoding: every clip's codes equal
    the model's one-call encode of the same clip decoded whole, with parts far shorter than the long clips."""
    for i, (fmt, rate, seconds, channels) in enumerate([("flac", 44_100, 9.0, 2), ("wav_pcm16", 16_000, 0.5, 1),
                                                        ("mp3", 22_050, 6.2, 1), ("ogg_vorbis", 48_000, 1.1, 2)]):
        ext = {"wav_pcm16": "wav", "ogg_vorbis": "ogg"}.get(fmt, fmt)
        write_audio(tmp_path / f"c{i}.{ext}", fmt, rate, seconds, channels, seed=i)
    (shard,) = discover_shards(str(tmp_path))
    parts = list(iter_parts(shard, part_seconds=2.0))
    assert parts[-1].last and sum(not p.whole for part in parts for p in part.pieces) >= 6
    encoding = encode_parts(model, parts, 8, chunk_frames=25)
    whole, _ = prepare_shard(shard)
    assert [r.info.clip_id for r in encoding.rows] == [c.clip_id for c in whole]
    for clip, row in zip(whole, encoding.rows):
        assert row.samples == len(clip.audio)
        np.testing.assert_array_equal(row.codes, alone(model, clip.audio, 8, chunk_frames=25))
    # each row carries its clip's signals, the same whether the clip was streamed or whole in one part
    in_one_part = {p.info.clip_id: p.signals for part in iter_parts(shard, part_seconds=60.0) for p in part.pieces}
    assert [row.signals for row in encoding.rows] == [in_one_part[c.clip_id] for c in whole]
    assert all(row.signals.pcm_hash for row in encoding.rows)
