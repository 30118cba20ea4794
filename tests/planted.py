"""A planted corpus for measuring dedup: distinct clips of real speech (espeak-ng, several voices, many clips per
voice: hard negatives) and copies of some of them through the transforms dedup must see through, plus a short clip
inside long recordings and a jingle inside many recordings. Used by tests/test_dedup.py and
benchmarks/bench_dedup.py.

Every base clip is a distinct stretch of one long utterance per voice (so a few espeak calls make hundreds of
clips); audio is 24 kHz mono float32, quantised to 16 bits as a WAV would hold it.
"""

from __future__ import annotations

import io
import subprocess
from dataclasses import dataclass, field

import av
import numpy as np
import soundfile as sf
import soxr

RATE = 24_000
VOICES = ("en+m3", "en-us+f2", "en-gb+m1", "en+f4", "en-us+m7", "en-gb-x-rp+f1")
ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "sh", "ch", "br", "st")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ee")
TRANSFORMS = ("exact", "flac", "mp3_64k", "opus_32k", "gain_-6dB", "resample_16k", "trim_0.5s", "pad_3s")


def speak(rng: np.random.Generator, voice: str, seconds: float) -> np.ndarray:
    """About ``seconds`` of espeak-ng speech of random pseudo-words, 24 kHz float32."""
    n = int(seconds * 2.7) + 2  # pseudo-words of 1-3 syllables: no two texts share a phrase
    text = " ".join("".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.integers(1, 4)))
                    for _ in range(n))
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", "160", "--stdout", text], capture_output=True,
                         check=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return quantize(soxr.resample(audio, rate, RATE))


def quantize(audio: np.ndarray) -> np.ndarray:
    """The samples a 16-bit WAV holds, as a decoder gives them (no -0.0)."""
    return (np.round(np.clip(audio, -1, 32767 / 32768) * 32768) / 32768 + 0.0).astype(np.float32)


def lossy(audio: np.ndarray, codec: str, bit_rate: int, rate: int) -> np.ndarray:
    """``audio`` through ``codec`` (PyAV: libmp3lame, libopus) at ``bit_rate`` and ``rate``, back at 24 kHz."""
    x = soxr.resample(audio, RATE, rate).astype(np.float32)
    buf = io.BytesIO()
    with av.open(buf, "w", format={"libmp3lame": "mp3", "libopus": "ogg"}[codec]) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        stream.bit_rate = bit_rate
        frame = av.AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    buf.seek(0)
    with av.open(buf) as inp:
        frames = list(inp.decode(audio=0))
    y = np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32)
    return quantize(soxr.resample(y, frames[0].sample_rate, RATE))


def via_flac(audio: np.ndarray) -> np.ndarray:
    """A FLAC of the 16-bit samples, decoded: the same samples (exact, as a WAV's)."""
    buf = io.BytesIO()
    sf.write(buf, np.round(audio * 32768).astype(np.int16), RATE, format="FLAC", subtype="PCM_16")
    buf.seek(0)
    return (sf.read(buf, dtype="int16")[0] / 32768).astype(np.float32)


@dataclass
class Planted:
    clips: dict[str, np.ndarray] = field(default_factory=dict)
    copies: list[tuple[str, str, str]] = field(default_factory=list)  # (copy, original, transform)
    jingle: dict[str, tuple[int, int]] = field(default_factory=dict)  # recording -> jingle's [start, end) samples

    def family(self) -> dict[str, str]:
        """Each clip's family: its original (a copy's, the contained clip's); clips not planted are their own."""
        fam = {name: name for name in self.clips}
        for copy, original, _ in self.copies:
            fam[copy] = original
        return fam


def planted_corpus(seed: int = 0, per_voice: int = 50, per_transform: int = 20, recordings: int = 3,
                   jingle_recordings: int = 20) -> Planted:
    """``per_voice`` clips of 3-6 s for each of :data:`VOICES`, ``per_transform`` copies per transform (each of a
    different original), ``recordings`` 5-minute recordings each holding a 10 s clip of the corpus, and a 5 s jingle
    in ``jingle_recordings`` recordings of 30 s."""
    rng = np.random.default_rng(seed)
    p = Planted()
    for v, voice in enumerate(VOICES):
        speech = speak(rng, voice, per_voice * 5.0)
        cuts = np.cumsum(rng.uniform(3.0, 6.0, per_voice) * RATE).astype(int)
        for i in range(per_voice):
            start = cuts[i - 1] if i else 0
            if cuts[i] <= len(speech):
                p.clips[f"v{v}/clip{i:03d}.wav"] = speech[start:cuts[i]]
    filler = speak(rng, VOICES[0], 40 * 6.0 + 30 * jingle_recordings)
    pos = 0

    def take(seconds: float) -> np.ndarray:
        nonlocal pos
        n = int(seconds * RATE)
        pos += n
        if pos > len(filler):
            raise ValueError("filler speech ran out")
        return filler[pos - n:pos]

    originals = iter(sorted(p.clips))
    make = {
        "exact": lambda a: a.copy(),
        "flac": via_flac,
        "mp3_64k": lambda a: lossy(a, "libmp3lame", 64_000, RATE),
        "opus_32k": lambda a: lossy(a, "libopus", 32_000, 48_000),
        "gain_-6dB": lambda a: quantize(a * 10 ** (-6 / 20)),
        "resample_16k": lambda a: quantize(soxr.resample(soxr.resample(a, RATE, 16_000), 16_000, RATE)),
        "trim_0.5s": lambda a: a[RATE // 2:],
        "pad_3s": lambda a: np.concatenate([take(3.0), a, take(3.0)]),
    }
    for transform in TRANSFORMS:
        for _ in range(per_transform):
            original = next(originals)
            name = f"copies/{transform}/{original.replace('/', '_')}"
            p.clips[name] = make[transform](p.clips[original])
            p.copies.append((name, original, transform))
    for r in range(recordings):  # a 10 s clip inside a 5-minute recording
        voice = VOICES[(r + 1) % len(VOICES)]
        clip, long = speak(rng, voice, 10.5)[:10 * RATE], speak(rng, voice, 290.0)
        at = int(rng.integers(RATE, len(long) - RATE))
        p.clips[f"long/clip{r}.wav"] = clip
        p.clips[f"long/recording{r}.wav"] = np.concatenate([long[:at], clip, long[at:]])
        p.copies.append((f"long/recording{r}.wav", f"long/clip{r}.wav", "inside_5min"))
    jingle = speak(rng, VOICES[3], 5.5)[:5 * RATE]
    for r in range(jingle_recordings):
        body = take(25.0)
        at = int(rng.integers(0, len(body)))
        name = f"shows/episode{r:02d}.wav"
        p.clips[name] = np.concatenate([body[:at], jingle, body[at:]])
        p.jingle[name] = (at, at + len(jingle))
    return p


def evaluate(p: Planted, kept_of: dict[str, str]) -> tuple[dict[str, float], float, list[tuple[str, str]]]:
    """Score groups (clip → its group's kept clip, for the clips in a group) against the truth: recall per
    transform (the copy in its original's group), pair precision, and the distinct pairs grouped."""
    group = {name: kept_of.get(name, name) for name in p.clips}
    hits: dict[str, list[bool]] = {}
    for copy, original, transform in p.copies:
        hits.setdefault(transform, []).append(group[copy] == group[original])
    recall = {t: float(np.mean(h)) for t, h in hits.items()}
    fam = p.family()
    members: dict[str, list[str]] = {}
    for name, g in group.items():
        members.setdefault(g, []).append(name)
    pairs = [(x, y) for names in members.values() for i, x in enumerate(sorted(names)) for y in sorted(names)[i + 1:]]
    wrong = [(x, y) for x, y in pairs if fam[x] != fam[y]]
    precision = 1 - len(wrong) / len(pairs) if pairs else 1.0
    return recall, precision, wrong
