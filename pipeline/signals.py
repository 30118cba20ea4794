"""Per-clip signals, computed in the decode pass (no second read of the audio): what a row's audio is and how good.

A :class:`ClipSignals` is fed a clip's decoded blocks at their original rate (``[channels, n]``, before mixing and
resampling) and its 24 kHz mono blocks (the samples Mimi encodes), in order, and :meth:`~ClipSignals.finish` gives
the row's :class:`Signals`. Everything streams: a clip of any length costs a few floats per 100 ms of state.

* ``pcm_hash``: xxh3-128 of the 24 kHz mono float32 samples as little-endian bytes: the same audio in any container
  (WAV, FLAC, a tar) has the same hash; any change to a sample gives another;
* ``fingerprint``: the bytes of :class:`pipeline.fingerprint.Fingerprinter` (near duplicates; see that module);
* ``loudness_lufs``: ITU-R BS.1770-4 integrated loudness of the 24 kHz mono signal: K-weighting, 400 ms blocks with
  75 % overlap, the absolute (-70 LUFS) and relative (-10 LU) gates. The K-weighting filter is applied in the
  frequency domain, per 100 ms frame (the FFT that also gives the spectrum): its squared magnitude (the RBJ biquads
  that ``pyloudnorm`` uses, evaluated at 24 kHz) weights each frame's power spectrum, and Parseval turns that into
  the frame's K-weighted mean square. This agrees with ``pyloudnorm`` on whole clips within 0.1 LU
  (``tests/test_signals.py``) at a fraction of a time-domain IIR filter's cost (BENCHMARKS.md). Null below 400 ms or
  when no block passes the absolute gate (digital silence);
* ``peak_dbfs``: the largest absolute decoded sample, any channel, before resampling (null for digital silence);
* ``clipping_share``: the share of decoded samples (all channels, before resampling) at full scale,
  ``|x| >= 1 - 2**-15`` (the largest 16-bit value, so 16-bit sources count);
* ``silence_share``: the share of the clip's 100 ms frames whose RMS is below -60 dBFS (a full-scale square wave
  is 0 dBFS), or whose K-weighted loudness is 40 dB below the clip's loudness;
* ``bandwidth_hz``: the frequency under which 99 % of the clip's energy lies (DC excluded; 10 Hz steps, at most
  12 kHz): about 4,000 or less for telephone (8 kHz) audio upsampled, well above for full-band audio;
* ``speech_share`` (only with ``vad``): the share of 32 ms windows that Silero VAD (``pip install silero-vad``)
  scores as speech (probability >= 0.5), on the 24 kHz signal resampled to 16 kHz; null without ``vad``.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import scipy.fft
import soxr
import xxhash
from scipy.linalg.blas import isamax

from pipeline.fingerprint import Fingerprinter
from pipeline.types import SAMPLE_RATE

FRAME = SAMPLE_RATE // 10  # 100 ms: the step of the loudness blocks and the silence frames
BLOCK_FRAMES = 4  # a 400 ms loudness block
CALL_FRAMES = 24  # frames per FFT call at most: with 40 (a 16 kHz source's block) the signals cost twice as much
FULL_SCALE = 1.0 - 2.0 ** -15
ABSOLUTE_GATE_LUFS = -70.0
RELATIVE_GATE_LU = -10.0
SILENCE_DBFS = -60.0
SILENCE_BELOW_LOUDNESS_DB = 40.0
BANDWIDTH_SHARE = 0.99
VAD_RATE, VAD_WINDOW, VAD_THRESHOLD = 16_000, 512, 0.5

# The columns every output row gets (after the core columns), in order, with their Arrow types.
COLUMNS: dict[str, pa.DataType] = {
    "pcm_hash": pa.binary(16),
    "fingerprint": pa.binary(),
    "loudness_lufs": pa.float32(),
    "peak_dbfs": pa.float32(),
    "clipping_share": pa.float32(),
    "silence_share": pa.float32(),
    "bandwidth_hz": pa.float32(),
    "speech_share": pa.float32(),
}


@dataclass(frozen=True)
class Signals:
    """One clip's signals (the columns of :data:`COLUMNS`); None where undefined."""

    pcm_hash: bytes
    fingerprint: bytes
    loudness_lufs: float | None
    peak_dbfs: float | None
    clipping_share: float | None
    silence_share: float | None
    bandwidth_hz: float | None
    speech_share: float | None = None


def signal_arrays(signals: list[Signals | None]) -> dict[str, pa.Array]:
    """The :data:`COLUMNS` of rows with these signals (None: a row without signals, all null)."""
    rows = [{} if s is None else asdict(s) for s in signals]
    return {name: pa.array([r.get(name) for r in rows], type) for name, type in COLUMNS.items()}


def _biquad_power(b: np.ndarray, a: np.ndarray, w: np.ndarray) -> np.ndarray:
    z = np.exp(-1j * w)
    return np.abs(np.polyval(b[::-1], z) / np.polyval(a[::-1], z)) ** 2


def k_weighting_power(n_fft: int, rate: int = SAMPLE_RATE) -> np.ndarray:
    """``|H(f)|**2`` of the BS.1770 K-weighting filter at the ``rfft`` bins of ``n_fft`` points: the high shelf
    (+4 dB above 1.5 kHz) and the 38 Hz high pass, as the RBJ biquads ``pyloudnorm`` uses."""
    w = 2 * np.pi * np.arange(n_fft // 2 + 1) / n_fft
    gain, w0 = 10 ** (4.0 / 40), 2 * np.pi * 1500.0 / rate
    alpha, cos, root = np.sin(w0) / (2 / np.sqrt(2)), np.cos(w0), 2 * np.sqrt(10 ** (4.0 / 40))
    shelf = _biquad_power(
        gain * np.array([(gain + 1) + (gain - 1) * cos + root * alpha, -2 * ((gain - 1) + (gain + 1) * cos),
                         (gain + 1) + (gain - 1) * cos - root * alpha]),
        np.array([(gain + 1) - (gain - 1) * cos + root * alpha, 2 * ((gain - 1) - (gain + 1) * cos),
                  (gain + 1) - (gain - 1) * cos - root * alpha]), w)
    w0 = 2 * np.pi * 38.0 / rate
    alpha, cos = np.sin(w0) / (2 * 0.5), np.cos(w0)
    high_pass = _biquad_power(np.array([(1 + cos) / 2, -(1 + cos), (1 + cos) / 2]),
                              np.array([1 + alpha, -2 * cos, 1 - alpha]), w)
    return shelf * high_pass


def _parseval() -> np.ndarray:
    """``[bins]``: a frame's ``rfft`` power spectrum weighted by this sums to its mean square (Parseval)."""
    weights = np.full(FRAME // 2 + 1, 2.0 / FRAME**2)
    weights[0] = weights[-1] = 1.0 / FRAME**2  # DC and Nyquist appear once in the full spectrum (FRAME is even)
    return weights


# [2, 2 * bins]: plain and K-weighted, each repeated for a bin's (re, im) pair: weighting the squared parts sums the
# weighted power spectrum without forming it
_WEIGHTS = np.repeat(np.stack([_parseval(), _parseval() * k_weighting_power(FRAME)]), 2, axis=1).astype(np.float32)
_vad_models = threading.local()


def vad_model():
    """This thread's Silero VAD model (loaded once per thread: its state is per stream)."""
    model = getattr(_vad_models, "model", None)
    if model is None:
        try:
            from silero_vad import load_silero_vad
        except ImportError as exc:
            raise RuntimeError("vad needs the silero-vad package: pip install 'mimi-tokenize[vad]'") from exc
        model = _vad_models.model = load_silero_vad()
    return model


class _SpeechShare:
    """Silero VAD over a 24 kHz stream: 512-sample windows at 16 kHz, the model's state carried across them."""

    def __init__(self):
        import torch

        self.torch, self.model = torch, vad_model()
        self.model.reset_states()
        self.resampler = soxr.ResampleStream(SAMPLE_RATE, VAD_RATE, 1, dtype="float32", quality="HQ")
        self.pending = np.zeros(0, np.float32)
        self.windows = self.speech = 0

    def feed(self, audio: np.ndarray, last: bool = False) -> None:
        x = np.concatenate([self.pending, self.resampler.resample_chunk(audio, last=last)])
        n = len(x) // VAD_WINDOW * VAD_WINDOW
        with self.torch.inference_mode():
            for start in range(0, n, VAD_WINDOW):
                window = self.torch.from_numpy(x[start:start + VAD_WINDOW])
                self.speech += self.model(window, VAD_RATE).item() >= VAD_THRESHOLD
        self.windows += n // VAD_WINDOW
        self.pending = x[n:].copy()

    def finish(self) -> float | None:
        self.feed(np.zeros(0, np.float32), last=True)
        return self.speech / self.windows if self.windows else None


class ClipSignals:
    """A streaming accumulator of one clip's :class:`Signals` (see the module docstring): feed :meth:`original` the
    decoded blocks and :meth:`mono` the 24 kHz blocks, in order, then :meth:`finish`."""

    def __init__(self, vad: bool = False):
        self.hash = xxhash.xxh3_128()
        self.fingerprinter = Fingerprinter()
        self.vad = _SpeechShare() if vad else None
        self.peak, self.clipped, self.decoded = 0.0, 0, 0
        self.pending = np.zeros(0, np.float32)  # 24 kHz samples not yet in a whole frame
        self.levels: list[np.ndarray] = []  # per whole frame: mean square, plain and K-weighted [n, 2]
        self.spectrum = np.zeros(FRAME + 2)  # the frames' summed squared (re, im) parts, per rfft bin

    def original(self, block: np.ndarray) -> None:
        """A decoded block ``[channels, n]`` at the clip's own rate, before mixing and resampling."""
        if not block.size:
            return
        samples = np.ascontiguousarray(block, np.float32).reshape(-1)
        peak = abs(float(samples[isamax(samples)]))  # BLAS: the largest |x| in one pass; max and min take two
        self.peak = max(self.peak, peak)
        if peak >= FULL_SCALE:
            self.clipped += int(np.count_nonzero(np.abs(samples) >= FULL_SCALE))
        self.decoded += block.size

    def mono(self, audio: np.ndarray) -> None:
        """A block of the clip's mono float32 samples at 24 kHz."""
        audio = np.ascontiguousarray(audio, dtype="<f4")
        self.hash.update(memoryview(audio).cast("B"))
        self.fingerprinter.feed(audio)
        if self.vad is not None:
            self.vad.feed(audio)
        x = np.concatenate([self.pending, audio]) if len(self.pending) else audio
        whole = len(x) // FRAME * FRAME
        for start in range(0, whole, CALL_FRAMES * FRAME):
            self.levels.append(self._frames(x[start:min(start + CALL_FRAMES * FRAME, whole)].reshape(-1, FRAME)))
        self.pending = x[whole:].copy()

    def _frames(self, frames: np.ndarray) -> np.ndarray:
        """Accumulate the frames' power spectrum; return their mean squares, plain and K-weighted ``[n, 2]``."""
        parts = scipy.fft.rfft(frames, axis=1).view(np.float32)  # float32 in, complex64 out: (re, im) pairs
        np.square(parts, out=parts)
        self.spectrum += np.add.reduce(parts, axis=0)  # float32 over one block's frames, float64 across blocks
        # einsum, not a matrix product (BLAS threads cost more CPU than they save here) nor products and sums
        return np.einsum("ij,kj->ki", parts, _WEIGHTS).T

    def finish(self) -> Signals:
        """The clip's signals (call once, after its last block)."""
        tail = len(self.pending)
        tail_level = None
        if tail:  # the last, partial frame: zero-padded for the spectrum, its mean square over its own length
            padded = np.zeros((1, FRAME), np.float32)
            padded[0, :tail] = self.pending
            tail_level = self._frames(padded) * (FRAME / tail)
        levels = np.concatenate([*self.levels, np.zeros((0, 2), np.float32)]).astype(np.float64)
        loudness = _integrated_loudness(levels[:, 1])
        if tail_level is not None:
            levels = np.concatenate([levels, tail_level.astype(np.float64)])
        weights = np.full(len(levels), float(FRAME))
        if tail:
            weights[-1] = tail
        with np.errstate(divide="ignore"):
            silent = 10 * np.log10(levels[:, 0]) < SILENCE_DBFS
            if loudness is not None:
                silent |= -0.691 + 10 * np.log10(levels[:, 1]) < loudness - SILENCE_BELOW_LOUDNESS_DB
        return Signals(
            pcm_hash=self.hash.digest(),
            fingerprint=self.fingerprinter.finish(),
            loudness_lufs=loudness,
            peak_dbfs=float(20 * np.log10(self.peak)) if self.peak > 0 else None,
            clipping_share=self.clipped / self.decoded if self.decoded else None,
            silence_share=float(weights[silent].sum() / weights.sum()) if len(weights) else None,
            bandwidth_hz=_bandwidth(self.spectrum[0::2] + self.spectrum[1::2]),
            speech_share=self.vad.finish() if self.vad is not None else None,
        )


def _integrated_loudness(frame_power: np.ndarray) -> float | None:
    """BS.1770 gated loudness from the K-weighted mean squares of consecutive 100 ms frames (None: undefined)."""
    if len(frame_power) < BLOCK_FRAMES:
        return None
    sums = np.concatenate([[0.0], np.cumsum(frame_power)])
    blocks = (sums[BLOCK_FRAMES:] - sums[:-BLOCK_FRAMES]) / BLOCK_FRAMES
    with np.errstate(divide="ignore"):
        loudness = -0.691 + 10 * np.log10(blocks)
    gated = blocks[loudness >= ABSOLUTE_GATE_LUFS]
    if not len(gated):
        return None
    relative = -0.691 + 10 * np.log10(gated.mean()) + RELATIVE_GATE_LU
    gated = blocks[(loudness > relative) & (loudness > ABSOLUTE_GATE_LUFS)]
    return float(-0.691 + 10 * np.log10(gated.mean())) if len(gated) else None


def _bandwidth(spectrum: np.ndarray) -> float | None:
    """The frequency under which :data:`BANDWIDTH_SHARE` of the (DC-free) energy lies, in Hz (None: no energy)."""
    energy = np.cumsum(spectrum[1:])
    if not len(energy) or energy[-1] <= 0:
        return None
    return float((np.searchsorted(energy, BANDWIDTH_SHARE * energy[-1]) + 1) * SAMPLE_RATE / FRAME)
