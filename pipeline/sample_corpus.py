"""A small, deterministic sample corpus made by the project itself: try the pipeline with no data of your own.

``make_sample_corpus(folder)`` writes 24 clips (about 2.5 minutes in all) of speech-like synthetic audio: a
glottal-like harmonic source whose pitch moves within each syllable, shaped by formant resonances that change
from syllable to syllable, syllable-shaped loudness envelopes with pauses between "words", short fricative-like
noise bursts, and a low noise floor. Five "speakers" differ in pitch range, formant scale and speed.

The clips come in the containers and rates a real corpus mixes (cycled clip by clip):

* WAV, 16-bit PCM, 16 kHz, mono
* FLAC, 44.1 kHz, stereo (the two channels differ slightly)
* MP3, 48 kHz, mono
* OGG Vorbis, 48 kHz, mono

Durations vary from 1 to 20 s; clip 5 is the longest (~18 s, longer than Mimi's 10 s attention window and
than one 12 s encode chunk). The same ``n_clips`` and ``seed`` give the same audio (the same files byte for byte,
except that libvorbis gives each OGG file a random stream serial number; its decoded samples are the same).

Layout (``folder`` is what to pass as ``--input``)::

    folder/spk0/utt000.wav, folder/spk1/utt001.flac, ..., folder/spk0/utt005.flac, ...

With ``manifest=True`` the audio goes under ``folder/audio/`` and ``folder/metadata.jsonl`` lists every clip
(``id``, ``audio``, ``speaker``, ``text``, ``format``, ``f0_hz``); the extra columns pass through to the
output Parquet. Pass the ``.jsonl`` as ``--input`` then (a folder holding both audio files and a manifest is
refused by the pipeline as mixed input).
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

MARKER = ".mimi-sample-corpus"  # marks a folder written here (so it may be rewritten); not an audio file
LONG_CLIP = 5  # index of the ~18 s clip
LONG_SECONDS = 18.4
N_SPEAKERS = 5  # voices (pitch range, formant scale, speed), one per folder spk0..spk4


@dataclass(frozen=True)
class _Format:
    name: str
    ext: str
    container: str
    subtype: str
    sample_rate: int
    channels: int


FORMATS = (
    _Format("wav_pcm16_16k_mono", "wav", "WAV", "PCM_16", 16_000, 1),
    _Format("flac_44k1_stereo", "flac", "FLAC", "PCM_16", 44_100, 2),
    _Format("mp3_48k_mono", "mp3", "MP3", "MPEG_LAYER_III", 48_000, 1),
    _Format("ogg_vorbis_48k_mono", "ogg", "OGG", "VORBIS", 48_000, 1),
)

# (F1, F2, F3) in Hz of a few vowels, for an adult male voice; scaled per speaker
_VOWELS = np.array([(730, 1090, 2440), (270, 2290, 3010), (530, 1840, 2480), (570, 840, 2410),
                    (300, 870, 2240), (660, 1720, 2410), (490, 1350, 1690)], dtype=np.float64)
_BANDWIDTHS = np.array([90.0, 110.0, 170.0])
_SYLLABLES = ("ka", "mi", "to", "re", "su", "na", "lo", "pe", "di", "fa", "zu", "shi")


def _durations(n_clips: int, rng: np.random.Generator) -> list[float]:
    durations = [float(d) for d in rng.uniform(1.0, 9.0, n_clips).round(2)]
    if n_clips > LONG_CLIP:
        durations[LONG_CLIP] = LONG_SECONDS
    return durations


def synthesize(seconds: float, sample_rate: int, rng: np.random.Generator, *, f0: float = 140.0,
               formant_scale: float = 1.0, rate: float = 1.0) -> tuple[np.ndarray, list[str]]:
    """Speech-like mono float32 audio of ``seconds`` at ``sample_rate`` (peak ~0.5), and its "syllables".

    ``f0``: the speaker's mean pitch (Hz); ``formant_scale``: vocal tract scaling; ``rate``: speaking speed.
    """
    n = max(1, round(seconds * sample_rate))
    out = np.zeros(n, dtype=np.float64)
    words: list[str] = []
    pos = int(rng.uniform(0.05, 0.25) * sample_rate)  # leading silence
    while True:
        n_syllables = int(rng.integers(1, 4))
        word = ""
        for _ in range(n_syllables):
            length = int(rng.uniform(0.12, 0.30) / rate * sample_rate)
            if pos + length > n - int(0.05 * sample_rate):
                break
            out[pos:pos + length] += _syllable(length, sample_rate, rng, f0, formant_scale)
            word += _SYLLABLES[int(rng.integers(len(_SYLLABLES)))]
            pos += length + int(rng.uniform(0.0, 0.04) * sample_rate)
        else:
            words.append(word)
            pos += int(rng.uniform(0.08, 0.45) / rate * sample_rate)  # pause between words
            continue
        if word:
            words.append(word)
        break
    out += 0.003 * rng.standard_normal(n)  # noise floor
    out *= 0.5 / max(np.abs(out).max(), 1e-9)
    return out.astype(np.float32), words


def _syllable(length: int, sample_rate: int, rng: np.random.Generator, f0: float, formant_scale: float) -> np.ndarray:
    t = np.arange(length) / sample_rate
    x = t / t[-1] if length > 1 else t
    # pitch: a rise-fall around the speaker's f0, plus a little vibrato-like wobble
    start, peak = f0 * rng.uniform(0.85, 1.1), f0 * rng.uniform(1.0, 1.35)
    pitch = start + (peak - start) * np.sin(np.pi * x) + 3.0 * np.sin(2 * np.pi * 5.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    # formants glide from one vowel to the next across the syllable
    a, b = _VOWELS[rng.integers(len(_VOWELS), size=2)] * formant_scale
    formants = a[None, :] + (b - a)[None, :] * x[:, None] ** 1.5  # [T, 3]
    n_harmonics = int(min(4_000, 0.45 * sample_rate) / f0)
    k = np.arange(1, n_harmonics + 1)
    harmonic_freqs = pitch[:, None] * k[None, :]  # [T, H]
    gain = np.zeros_like(harmonic_freqs)
    for i, (bandwidth, level) in enumerate(zip(_BANDWIDTHS, (1.0, 0.6, 0.3))):
        gain += level / (1.0 + ((harmonic_freqs - formants[:, i:i + 1]) / bandwidth) ** 2)
    gain *= (1.0 / np.sqrt(k))[None, :] * (harmonic_freqs < 0.45 * sample_rate)
    voiced = (gain * np.sin(phase[:, None] * k[None, :])).sum(axis=1)
    # envelope: quick attack, longer decay
    attack = np.clip(x / 0.15, 0, 1)
    envelope = np.sin(0.5 * np.pi * attack) * np.clip((1 - x) / 0.4, 0, 1) ** 0.7
    signal = voiced * envelope * rng.uniform(0.6, 1.0)
    if rng.random() < 0.35:  # a fricative-like onset: high-passed noise burst
        burst = min(length, int(rng.uniform(0.03, 0.08) * sample_rate))
        noise = np.diff(rng.standard_normal(burst + 1))
        signal[:burst] += 0.25 * np.abs(voiced).max() * noise * np.hanning(burst)
    return signal


def _encode(samples: np.ndarray, fmt: _Format) -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, fmt.sample_rate, format=fmt.container, subtype=fmt.subtype)
    return out.getvalue()


def make_sample_corpus(folder: str | Path, *, n_clips: int = 24, seed: int = 0, manifest: bool = False) -> Path:
    """Write the sample corpus into ``folder``; return what to pass as ``--input`` (``folder``, or with
    ``manifest=True`` ``folder/metadata.jsonl``).

    ``folder`` must be missing, empty, or a sample corpus written before (it is then rewritten); a folder with
    other content is refused, never overwritten.
    """
    if n_clips < 1:
        raise ValueError(f"n_clips must be >= 1, got {n_clips}")
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"{folder} exists and is not a folder")
        if any(folder.iterdir()):
            if not (folder / MARKER).is_file():
                raise ValueError(f"{folder} is not empty and was not written by sample-corpus; pick another folder")
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    audio_root = folder / "audio" if manifest else folder
    rng = np.random.default_rng(seed)
    rows = []
    for i, seconds in enumerate(_durations(n_clips, rng)):
        fmt = FORMATS[i % len(FORMATS)]
        speaker = i % N_SPEAKERS
        voice_rng, clip_rng = np.random.default_rng([seed, 1_000 + speaker]), np.random.default_rng([seed, i])
        voice = dict(f0=float(voice_rng.uniform(95, 230)), formant_scale=float(voice_rng.uniform(0.9, 1.2)),
                     rate=float(voice_rng.uniform(0.85, 1.2)))
        mono, words = synthesize(seconds, fmt.sample_rate, clip_rng, **voice)
        if fmt.channels == 2:  # the right channel: a little later, quieter, with its own noise
            delay = int(0.0007 * fmt.sample_rate)
            right = 0.8 * np.concatenate([np.zeros(delay, np.float32), mono[:len(mono) - delay]])
            right += 0.002 * clip_rng.standard_normal(len(mono)).astype(np.float32)
            samples = np.stack([mono, right], axis=1)
        else:
            samples = mono[:, None]
        relative = f"spk{speaker}/utt{i:03d}.{fmt.ext}"
        path = audio_root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_encode(samples, fmt))
        rows.append({"id": relative.rsplit(".", 1)[0], "audio": f"audio/{relative}", "speaker": f"spk{speaker}",
                     "text": " ".join(words), "format": fmt.name, "f0_hz": round(voice["f0"], 1)})
    if manifest:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / MARKER).write_text(json.dumps({"n_clips": n_clips, "seed": seed, "manifest": manifest}) + "\n")
    return folder / "metadata.jsonl" if manifest else folder


def describe(folder: str | Path) -> str:
    """One line: how many audio files and minutes a sample corpus holds."""
    files = [p for p in Path(folder).rglob("*") if p.suffix in {f".{f.ext}" for f in FORMATS}]
    seconds = sum(sf.info(str(p)).duration for p in files)
    return f"{len(files)} clips, {seconds / 60:.1f} min of audio"
