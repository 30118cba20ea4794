"""Decode, mono and resample stages on real encoded audio."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soxr

from pipeline.decode import BLOCK_FRAMES, DecodeError, decode_audio, decode_blocks
from pipeline.prepare import prepare_clip
from pipeline.resample import MonoResampler, parse_channel_policy, to_mono
from pipeline.retry import RetryingFile, RetryPolicy, set_policy
from pipeline.types import SAMPLE_RATE, Clip, ClipFailure, ClipSource
from tests.audio_fixtures import FORMATS, corrupt_bytes, encode, lying_wav_bytes, signal, wav_bytes

RATES = (8_000, 16_000, 22_050, 44_100, 48_000)
OPUS_RATES = (8_000, 16_000, 48_000)  # the rates Opus supports among RATES
AAC_FRAME = 1024  # AAC decodes to whole frames: up to one frame of codec padding at the end


def _cases() -> list[tuple[str, int, int]]:
    return [
        (name, rate, channels)
        for name in FORMATS
        for rate in (OPUS_RATES if name == "opus" else RATES)
        for channels in (1, 2)
    ]


@pytest.mark.parametrize(("fmt_name", "rate", "channels"), _cases())
def test_decode_matches_written_signal(fmt_name: str, rate: int, channels: int) -> None:
    fmt = FORMATS[fmt_name]
    written = signal(rate, seconds=0.5, channels=channels).T  # [channels, frames]
    samples, sample_rate = decode_audio(encode(fmt, written.T, rate), f"clip.{fmt.ext}")

    assert sample_rate == rate
    assert samples.dtype == np.float32 and samples.shape[0] == channels
    n = written.shape[1]
    if fmt_name == "m4a_aac":
        assert n <= samples.shape[1] < n + AAC_FRAME
    else:
        assert samples.shape[1] == n
    if fmt.lossless:
        np.testing.assert_allclose(samples, written, rtol=0, atol=fmt.atol)
    else:
        for decoded, source in zip(samples[:, :n], written, strict=True):
            assert np.corrcoef(decoded, source)[0, 1] > 0.98


def test_pyav_fallback_without_name_hint() -> None:
    written = signal(16_000, channels=2)
    samples, sample_rate = decode_audio(encode(FORMATS["m4a_aac"], written, 16_000))  # libsndfile fails first
    assert sample_rate == 16_000 and samples.shape[0] == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty input"),
        (corrupt_bytes(), "cannot decode; tried soundfile: .*; pyav: "),
        (lying_wav_bytes(), "truncated WAV: header declares 16000 data bytes, file holds 7978"),
        (wav_bytes(np.zeros((0, 1), np.float32), 16_000), "no audio frames"),
        (wav_bytes(np.array([[0.1], [np.nan], [0.2]], np.float32), 16_000, "FLOAT"), "NaN or infinite"),
    ],
    ids=["empty", "corrupt", "lying-header", "zero-frames", "nan"],
)
def test_decode_errors(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_audio(data, "clip.wav")


def test_decode_error_is_value_error() -> None:
    assert issubclass(DecodeError, ValueError)


def test_streaming_wav_with_unknown_length_is_accepted() -> None:
    data = bytearray(wav_bytes(signal(16_000, 0.25), 16_000))
    data_chunk = data.index(b"data")
    data[data_chunk + 4 : data_chunk + 8] = b"\xff\xff\xff\xff"  # "unknown length", as written by pipes
    samples, _ = decode_audio(bytes(data))
    assert samples.shape == (1, 4_000)


def test_to_mono_policies() -> None:
    stereo = signal(16_000, channels=2).T
    np.testing.assert_allclose(to_mono(stereo, parse_channel_policy("mix", 2)), stereo.mean(axis=0), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(to_mono(stereo, parse_channel_policy("channel:1", 2)), stereo[1])
    np.testing.assert_array_equal(to_mono(stereo[:1], None), stereo[0])
    assert to_mono(stereo, None).dtype == np.float32
    with pytest.raises(ValueError, match="has 2 channel"):
        parse_channel_policy("channel:2", 2)
    with pytest.raises(ValueError, match="unknown channel policy"):
        parse_channel_policy("left", 2)


def streamed(x: np.ndarray, rate: int, sizes: list[int], channels: int = 1) -> np.ndarray:
    """``x`` [channels, n] pushed through a MonoResampler in blocks of ``sizes`` (cycled), then flushed."""
    resampler = MonoResampler(rate, channels)
    out, start, i = [], 0, 0
    while start < x.shape[1]:
        out.append(resampler.push(x[:, start:start + sizes[i % len(sizes)]]))
        start, i = start + sizes[i % len(sizes)], i + 1
    out.append(resampler.flush())
    return np.concatenate(out)


@pytest.mark.parametrize("rate", (*RATES, 24_000, 11_025))
@pytest.mark.parametrize("frames", (1_234, 8_001, 24_000))
def test_streamed_resampling_equals_one_shot(rate: int, frames: int) -> None:
    """soxr's stream, fed blocks of any sizes, gives exactly soxr's one-shot resampling of the whole signal."""
    t = np.arange(frames) / rate
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    one_shot = x if rate == SAMPLE_RATE else soxr.resample(x, rate, SAMPLE_RATE, quality="HQ")
    for sizes in ([frames], [1000], [7, 4096, 333, 1]):
        y = streamed(x[None], rate, sizes)
        assert y.dtype == np.float32
        np.testing.assert_array_equal(y, one_shot)  # bit for bit
    assert abs(len(one_shot) - frames * SAMPLE_RATE / rate) <= 0.5  # round(N * 24000 / sr)
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(one_shot)) / SAMPLE_RATE)
    edge = SAMPLE_RATE // 100  # 10 ms: the filter's start-up and tail
    np.testing.assert_allclose(one_shot[edge:-edge], expected[edge:-edge], rtol=0, atol=2e-3)


def test_decoding_in_blocks_gives_the_whole_signal() -> None:
    """A clip longer than a block, streamed from a FLAC and an MP3: the blocks concatenate to a one-shot read."""
    written = signal(44_100, seconds=4.0, channels=2)
    for fmt in ("flac", "mp3"):
        data = encode(FORMATS[fmt], written, 44_100)
        reader, blocks = decode_blocks(io.BytesIO(data), f"x.{FORMATS[fmt].ext}")
        pieces = list(blocks)
        assert len(pieces) > 1 and all(p.shape[1] <= BLOCK_FRAMES * 2 for p in pieces)
        whole = np.concatenate(pieces, axis=1)
        np.testing.assert_array_equal(whole, decode_audio(data, f"x.{FORMATS[fmt].ext}")[0])
        if fmt == "flac":
            np.testing.assert_allclose(whole, written.T, atol=FORMATS[fmt].atol)


class _FailingFS:
    """An fsspec-like filesystem over bytes whose ranged reads fail permanently after ``ok`` reads."""

    def __init__(self, data: bytes, ok: int, error: Exception):
        self.data, self.ok, self.error = data, ok, error

    def cat_file(self, path: str, start: int, end: int) -> bytes:
        if self.ok == 0:
            raise self.error
        self.ok -= 1
        return self.data[start:end]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # libsndfile's callback sees it too
def test_a_failed_read_is_never_taken_for_the_end_of_the_audio() -> None:
    """libsndfile swallows exceptions raised in its read callback and would see a short file: the error resurfaces."""
    set_policy(RetryPolicy(outage_s=0.2, base_s=0.01))
    try:
        data = encode(FORMATS["wav_pcm16"], signal(16_000, seconds=3.0), 16_000)
        fs = _FailingFS(data, ok=3, error=ConnectionResetError("connection reset by peer"))
        f = io.BufferedReader(RetryingFile(fs, "x.wav", len(data), "read x.wav"), buffer_size=4096)
        with pytest.raises(OSError, match="still failing after"):
            reader, blocks = decode_blocks(f, "x.wav")
            list(blocks)
    finally:
        set_policy(RetryPolicy())


def test_prepare_clip_to_mono_24k() -> None:
    written = signal(44_100, seconds=1.0, channels=2)
    src = ClipSource("a/b.flac", "file:///data/a/b.flac", encode(FORMATS["flac"], written, 44_100), {"k": 1})
    clip = prepare_clip(src)
    assert isinstance(clip, Clip)
    assert (clip.clip_id, clip.source_uri, clip.metadata) == ("a/b.flac", "file:///data/a/b.flac", {"k": 1})
    assert (clip.orig_sample_rate, clip.orig_channels) == (44_100, 2)
    assert clip.audio.dtype == np.float32 and len(clip.audio) == SAMPLE_RATE
    np.testing.assert_allclose(clip.audio, soxr.resample(written.mean(axis=1), 44_100, SAMPLE_RATE), atol=1e-4)


@pytest.mark.parametrize(
    ("data", "policy", "stage", "error_class"),
    [
        (corrupt_bytes(), "mix", "decode", "DecodeError"),
        (lying_wav_bytes(), "mix", "decode", "DecodeError"),
        (wav_bytes(signal(16_000), 16_000), "channel:3", "resample", "ValueError"),
    ],
    ids=["corrupt", "lying-header", "bad-channel"],
)
def test_prepare_clip_failures(data: bytes, policy: str, stage: str, error_class: str) -> None:
    failure = prepare_clip(ClipSource("x", "memory:///x.wav", data), channel_policy=policy)
    assert isinstance(failure, ClipFailure)
    assert (failure.clip_id, failure.source_uri, failure.stage, failure.error_class) == (
        "x", "memory:///x.wav", stage, error_class,
    )
    assert failure.message
