"""The per-clip signals (pipeline/signals.py) against the audio that makes them: real files (espeak-ng speech, noise,
sines) through the pipeline's decode → resample path, BS.1770 loudness against pyloudnorm, streaming against whole;
and the ``--where`` parser's errors."""

from __future__ import annotations

import subprocess

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
import soxr
import xxhash

from audio_fixtures import FORMATS, encode
from pipeline.prepare import iter_parts, open_clip, prepare_clip
from pipeline.rowfilter import WhereError, parse_where
from pipeline.signals import ClipSignals, Signals
from pipeline.sources import discover_shards
from pipeline.types import SAMPLE_RATE, ClipSource


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> tuple[np.ndarray, int]:
    """About 7 s of real (synthetic) speech from espeak-ng, float32 mono, and its rate (22,050 Hz)."""
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "The quick brown fox jumps over the lazy dog. Audio corpora "
                    "repeat themselves, and we measure how loud they are."], check=True)
    audio, rate = sf.read(path, dtype="float32")
    return audio, rate


def noise(seconds: float, rate: int, level: float = 0.1, seed: int = 0) -> np.ndarray:
    return (level * np.random.default_rng(seed).standard_normal(round(seconds * rate))).astype(np.float32)


def signals_of(samples: np.ndarray, rate: int, fmt: str = "wav_pcm16", vad: bool = False) -> Signals:
    """The signals of ``samples`` written as a ``fmt`` file and read back through the pipeline's decode path."""
    data = encode(FORMATS[fmt], samples if samples.ndim == 2 else samples[:, None], rate)
    signals = ClipSignals(vad)
    _, _, blocks = open_clip(ClipSource("clip", "mem://clip", data), signals=signals)
    for _ in blocks:
        pass
    return signals.finish()


def test_loudness_matches_pyloudnorm_on_whole_clips(speech):
    audio, rate = speech
    at_24k = soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)
    t = np.arange(len(at_24k)) / SAMPLE_RATE
    meter = pyloudnorm.Meter(SAMPLE_RATE)
    for x in [at_24k, 0.3 * at_24k, noise(6.3, SAMPLE_RATE), at_24k + 0.1 * np.sin(2 * np.pi * 15 * t) + 0.05]:
        x = x.astype(np.float32)
        signals = ClipSignals()
        for start in range(0, len(x), 7777):  # odd blocks: frames do not align with them
            signals.mono(x[start:start + 7777])
        assert signals.finish().loudness_lufs == pytest.approx(meter.integrated_loudness(x.astype(np.float64)),
                                                               abs=0.1)


def test_quality_columns_follow_the_signal(speech):
    audio, rate = speech
    full = signals_of(audio, rate)
    quieter = signals_of(audio * 10 ** (-6 / 20), rate)
    assert quieter.loudness_lufs == pytest.approx(full.loudness_lufs - 6, abs=0.5)
    assert quieter.peak_dbfs == pytest.approx(full.peak_dbfs - 6, abs=0.1)
    assert full.clipping_share == quieter.clipping_share == 0

    telephone = soxr.resample(audio, rate, 8_000).astype(np.float32)
    assert signals_of(telephone, 8_000).bandwidth_hz < 4_000 < full.bandwidth_hz
    assert signals_of(noise(3, 48_000), 48_000, "flac").bandwidth_hz > 11_000

    half = signals_of(np.concatenate([noise(3, 48_000), np.zeros(3 * 48_000, np.float32)]), 48_000, "flac")
    assert half.silence_share == pytest.approx(0.5, abs=0.02)
    assert signals_of(noise(3, 48_000), 48_000).silence_share == 0

    t = np.arange(2 * 44_100) / 44_100
    sine = 2 * np.sin(2 * np.pi * 441 * t)  # clipped wherever |sin| >= 1/2: two thirds of the time
    clipped = signals_of(np.clip(np.stack([sine, sine], axis=1), -1, 1).astype(np.float32), 44_100)
    assert clipped.clipping_share == pytest.approx(2 / 3, abs=0.01)

    silence = signals_of(np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    assert (silence.loudness_lufs, silence.peak_dbfs, silence.bandwidth_hz) == (None, None, None)
    assert (silence.silence_share, silence.clipping_share, silence.speech_share) == (1.0, 0.0, None)


def test_pcm_hash_names_the_24k_samples(speech):
    audio, rate = speech
    wav, flac = (encode(FORMATS[fmt], audio[:, None], rate) for fmt in ("wav_pcm16", "flac"))
    assert wav != flac
    clip = prepare_clip(ClipSource("a", "mem://a.wav", wav))
    assert signals_of(audio, rate).pcm_hash == signals_of(audio, rate, "flac").pcm_hash == \
        xxhash.xxh3_128(clip.audio.astype("<f4").tobytes()).digest()
    assert signals_of(audio * 0.9, rate).pcm_hash != signals_of(audio, rate).pcm_hash


def test_a_long_clip_streamed_across_parts_has_the_signals_of_the_whole(speech, tmp_path):
    audio, rate = speech
    long = np.concatenate([audio, noise(4, rate, 0.02), audio * 0.5, np.zeros(rate, np.float32)])
    sf.write(tmp_path / "long.flac", np.stack([long, 0.5 * long], axis=1), rate)
    (shard,) = discover_shards(str(tmp_path))
    parts = list(iter_parts(shard, part_seconds=2.0))
    finals = [p for part in parts for p in part.pieces if p.final]
    assert len(parts) >= 6 and len(finals) == 1
    streamed = finals[0].signals

    whole = ClipSignals()
    decoded, _ = sf.read(tmp_path / "long.flac", dtype="float32", always_2d=True)
    whole.original(decoded.T)
    whole.mono(prepare_clip(ClipSource("long", "mem://long.flac", (tmp_path / "long.flac").read_bytes())).audio)
    expected = whole.finish()
    assert streamed.pcm_hash == expected.pcm_hash and len(streamed.pcm_hash) == 16
    for name in ("loudness_lufs", "peak_dbfs", "clipping_share", "silence_share", "bandwidth_hz"):
        assert getattr(streamed, name) == pytest.approx(getattr(expected, name), rel=1e-5, abs=1e-6), name
    assert 0.05 < streamed.silence_share < 0.5


def test_speech_share_with_vad(speech):
    audio, rate = speech
    talk = signals_of(audio, rate, vad=True).speech_share
    hiss = signals_of(noise(3, 16_000, 0.05), 16_000, vad=True).speech_share
    assert talk > 0.5 and hiss < 0.1


@pytest.mark.parametrize("text", ["silence_share <", "silence_share < 0.5 and", "(bandwidth_hz > 1", "x >> 1",
                                  "bandwidth_hz > 1 bandwidth_hz", "__import__('os').system('true')", "", "1 < 2",
                                  "silence_share < 'a'"])
def test_bad_where_expressions_are_one_line_errors(text):
    with pytest.raises(WhereError) as error:
        parse_where(text)
    assert "\n" not in str(error.value) and str(error.value).startswith("--where")
