"""Decode, mono and resample stages on real encoded audio."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.decode import DecodeError, decode_audio
from pipeline.prepare import prepare_clip
from pipeline.resample import resample, to_mono
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
        (corrupt_bytes(), "cannot decode 4096 bytes; tried soundfile: .*; pyav: "),
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
    np.testing.assert_allclose(to_mono(stereo), stereo.mean(axis=0), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(to_mono(stereo, "channel:1"), stereo[1])
    np.testing.assert_array_equal(to_mono(stereo[:1]), stereo[0])
    assert to_mono(stereo).dtype == np.float32
    with pytest.raises(ValueError, match="has 2 channel"):
        to_mono(stereo, "channel:2")
    with pytest.raises(ValueError, match="unknown channel policy"):
        to_mono(stereo, "left")


@pytest.mark.parametrize("rate", (*RATES, 24_000, 11_025))
@pytest.mark.parametrize("frames", (1_234, 8_001, 24_000))
def test_resample_length_and_content(rate: int, frames: int) -> None:
    t = np.arange(frames) / rate
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    y = resample(x, rate)
    assert y.dtype == np.float32
    assert abs(len(y) - frames * SAMPLE_RATE / rate) <= 0.5  # round(N * 24000 / sr)
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(y)) / SAMPLE_RATE)
    edge = SAMPLE_RATE // 100  # 10 ms: the filter's start-up and tail
    np.testing.assert_allclose(y[edge:-edge], expected[edge:-edge], rtol=0, atol=2e-3)


def test_resample_identity_at_target_rate() -> None:
    x = signal(SAMPLE_RATE)[:, 0]
    np.testing.assert_array_equal(resample(x, SAMPLE_RATE), x)


def test_prepare_clip_to_mono_24k() -> None:
    written = signal(44_100, seconds=1.0, channels=2)
    src = ClipSource("a/b.flac", "file:///data/a/b.flac", encode(FORMATS["flac"], written, 44_100), {"k": 1})
    clip = prepare_clip(src)
    assert isinstance(clip, Clip)
    assert (clip.clip_id, clip.source_uri, clip.metadata) == ("a/b.flac", "file:///data/a/b.flac", {"k": 1})
    assert (clip.orig_sample_rate, clip.orig_channels) == (44_100, 2)
    assert clip.audio.dtype == np.float32 and len(clip.audio) == SAMPLE_RATE
    np.testing.assert_allclose(clip.audio, resample(written.mean(axis=1), 44_100), atol=1e-4)


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
