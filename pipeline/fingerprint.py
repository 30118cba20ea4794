"""An acoustic fingerprint of a clip, robust to lossy re-encoding, gain, resampling, a time offset and padding:
spectral-peak landmarks in the spirit of Shazam (Wang, 2003) and audfprint, computed while the clip is decoded.

:class:`Fingerprinter` takes the clip's 24 kHz mono float32 samples in blocks of any length and keeps its
spectral peaks; :meth:`Fingerprinter.finish` packs them into a few bytes per second (the ``fingerprint`` column).
The bytes are the same however the clip is cut into blocks.

* **Analysis**: the samples are summed in groups of :data:`DECIMATE` (a box filter: 24 kHz → 4 kHz; the band under
  2 kHz holds the fundamentals, the first formants and their harmonics), then a Hann-windowed STFT of
  :data:`N_FFT` samples every :data:`HOP` (32 ms frames, 15.6 Hz bins), log power.
* **Peaks**: a bin that is the maximum of its neighbourhood (±:data:`PEAK_BINS` bins, ±:data:`PEAK_FRAMES` frames),
  at least :data:`PEAK_OVER_MEAN_DB` over its frame's mean and above an absolute floor (silence has no peaks). Local
  maxima do not move with gain, resampling or a codec that keeps the band; at most :data:`PEAKS_PER_FRAME` per frame.
* **Bytes**: ``version, varint count, varint frame deltas, one byte per peak bin`` (about 2 bytes per peak).

:func:`triplets` and :func:`landmarks` turn peaks into hashes at the anchor peak's frame: an anchor with two of
the next :data:`FAN_OUT` peaks within :data:`MAX_DT` frames (32 bits: what :mod:`pipeline.dedup` joins the whole
output on), and an anchor with one of them (19 bits, about twice as many survive a codec or a shifted frame grid:
what a candidate pair is verified with). Copies of the same audio share hashes at a constant frame offset.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

VERSION = 1
SAMPLE_RATE = 24_000
DECIMATE = 6  # 24 kHz → 4 kHz
N_FFT = 256
HOP = 128
FRAME_RATE = SAMPLE_RATE / DECIMATE / HOP  # 31.25 frames per second
LOW_BIN, HIGH_BIN = 3, 127  # 47 Hz .. 1.98 kHz at 4 kHz
PEAK_BINS = 6
PEAK_FRAMES = 4
PEAK_OVER_MEAN_DB = 10.0
PEAKS_PER_FRAME = 3
FLOOR_DB = -75.0  # a bin's power relative to a full-scale sine in that bin
FAN_OUT = 5
MIN_DT = 1
MAX_DT = 64
ANALYSE_SAMPLES = 1 << 15  # 4 kHz samples (8.2 s) buffered per STFT: fewer, larger numpy calls
DT_STEP = 2  # frame distances and bins are halved in hashes: a peak one frame or bin off still matches half the time
_ONES = np.ones(DECIMATE, np.float32)
_WINDOW = np.hanning(N_FFT + 2)[1:-1].astype(np.float32)
_WIDTH = HIGH_BIN - LOW_BIN + 2 * PEAK_BINS  # the band and -inf on either side (the neighbourhood beyond it)
_FLOOR = 10 * np.log10((DECIMATE * N_FFT / 4) ** 2) + FLOOR_DB  # log power of a full-scale sine, plus the floor


class Fingerprinter:
    """Streaming landmarks of one clip: feed its 24 kHz mono float32 blocks in order, then finish()."""

    def __init__(self) -> None:
        self._rest = np.zeros(0, np.float32)  # 24 kHz samples not yet summed (fewer than DECIMATE)
        self._low: list[np.ndarray] = []  # 4 kHz samples from the next frame's start
        self._buffered = 0  # their count
        self._spec = np.full((PEAK_FRAMES, _WIDTH), -np.inf, np.float32)  # frames not yet decided
        self._first = -PEAK_FRAMES  # frame index of self._spec[0]
        self._frames = 0
        self._times: list[np.ndarray] = []
        self._bins: list[np.ndarray] = []

    def feed(self, audio: np.ndarray) -> None:
        audio = np.asarray(audio, np.float32).reshape(-1)
        if len(self._rest):
            audio = np.concatenate([self._rest, audio])
        whole = len(audio) // DECIMATE * DECIMATE
        self._rest = audio[whole:].copy()
        self._low.append(audio[:whole].reshape(-1, DECIMATE) @ _ONES)
        self._buffered += whole // DECIMATE
        if self._buffered >= ANALYSE_SAMPLES:
            self._analyse()

    def _analyse(self) -> None:
        """The log power spectra of the whole frames buffered, on to :meth:`_decide`."""
        low = np.concatenate(self._low) if len(self._low) != 1 else self._low[0]
        n = (len(low) - N_FFT) // HOP + 1 if len(low) >= N_FFT else 0
        if n <= 0:
            return
        frames = np.lib.stride_tricks.as_strided(low, (n, N_FFT), (HOP * low.itemsize, low.itemsize), writeable=False)
        parts = scipy.fft.rfft(frames * _WINDOW, axis=1).view(np.float32)  # (re, im) pairs
        np.square(parts, out=parts)
        spec = np.empty((len(self._spec) + n, _WIDTH), np.float32)
        spec[:len(self._spec)] = self._spec
        spec[len(self._spec):, :PEAK_BINS] = spec[len(self._spec):, -PEAK_BINS:] = -np.inf
        power = spec[len(self._spec):, PEAK_BINS:-PEAK_BINS]
        np.add(parts[:, 2 * LOW_BIN:2 * HIGH_BIN:2], parts[:, 2 * LOW_BIN + 1:2 * HIGH_BIN:2], out=power)
        power += 1e-12
        np.log10(power, out=power)
        power *= 10
        self._low = [low[n * HOP:].copy()]
        self._buffered = len(self._low[0])
        self._frames += n
        self._decide(spec)

    def _decide(self, spec: np.ndarray) -> None:
        """Pick the peaks of the frames of ``spec`` whose neighbourhood it holds whole; keep the rest for later."""
        ready = len(spec) - 2 * PEAK_FRAMES
        if ready > 0:
            core = spec[PEAK_FRAMES:PEAK_FRAMES + ready, PEAK_BINS:-PEAK_BINS]
            mean = core.mean(axis=1)  # of the log power: robust to a few loud bins
            local = _running_max(_running_max(spec, 2 * PEAK_FRAMES + 1, axis=0), 2 * PEAK_BINS + 1, axis=1)
            # The local maxima are few (about 1 bin in 100): threshold and rank those, not the whole spectrum.
            t, f = np.divmod(np.flatnonzero(core == local), core.shape[1])
            value = core[t, f]
            strong = value >= np.maximum(mean[t] + PEAK_OVER_MEAN_DB, _FLOOR)
            t, f, value = t[strong], f[strong], value[strong]
            t, f = _strongest(t, f, value, np.bincount(t, minlength=ready))
            self._times.append(t + self._first + PEAK_FRAMES)
            self._bins.append(f)
            self._first += ready
            spec = spec[ready:]
        self._spec = spec

    def finish(self) -> bytes:
        """The clip's fingerprint (see :func:`encode`); the tail's frames are closed with silence."""
        self.feed(np.zeros(-len(self._rest) % DECIMATE, np.float32))  # the last group of samples, zero-padded
        self._analyse()
        covered = N_FFT - HOP if self._frames else 0
        if self._buffered > covered:  # samples no frame has covered yet: one more frame, zero-padded
            self.feed(np.zeros((N_FFT - self._buffered) * DECIMATE, np.float32))
            self._analyse()
        self._decide(np.concatenate([self._spec, np.full((PEAK_FRAMES, _WIDTH), -np.inf, np.float32)]))
        times = np.concatenate(self._times) if self._times else np.zeros(0, np.int64)
        bins = np.concatenate(self._bins) if self._bins else np.zeros(0, np.int64)
        return encode(times, bins)


def _strongest(t: np.ndarray, f: np.ndarray, value: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The peaks (frame ``t``, bin ``f``, in frame order) of frames with more than :data:`PEAKS_PER_FRAME` cut to
    those at least as strong as their frame's :data:`PEAKS_PER_FRAME`-th (ties kept); ``counts``: peaks per frame."""
    crowded = counts > PEAKS_PER_FRAME
    if not crowded.any():
        return t, f
    member = crowded[t]
    ranked = value[member][np.lexsort((-value[member], t[member]))]  # by frame, strongest first
    sizes = np.where(crowded, counts, 0)
    cut = np.full(len(counts), -np.inf, np.float32)
    cut[crowded] = ranked[(np.cumsum(sizes) - sizes)[crowded] + PEAKS_PER_FRAME - 1]
    keep = value >= cut[t]
    return t[keep], f[keep]


def _running_max(x: np.ndarray, width: int, axis: int) -> np.ndarray:
    """The maximum over the whole windows of ``width`` along ``axis`` (0 or 1; ``len - width + 1`` of them), by
    doubling, in log2(width) steps."""
    span = 1
    while span < width:
        step = min(span, width - span)
        x = np.maximum(x[:-step], x[step:]) if axis == 0 else np.maximum(x[:, :-step], x[:, step:])
        span += step
    return x


def fingerprint(audio: np.ndarray) -> bytes:
    """The fingerprint of a whole clip (24 kHz mono float32)."""
    fp = Fingerprinter()
    fp.feed(audio)
    return fp.finish()


# --- bytes ---------------------------------------------------------------------------------------------------------


def _varints(values: np.ndarray) -> bytes:
    """LEB128 of non-negative ints, vectorised."""
    values = np.asarray(values, np.uint64)
    if not len(values):
        return b""
    n_bytes = np.ones(len(values), np.int64)
    for k in range(1, 10):
        n_bytes += values >= np.uint64(1 << (7 * k))
    out = np.zeros(int(n_bytes.sum()), np.uint8)
    starts = np.concatenate([[0], np.cumsum(n_bytes)[:-1]])
    for k in range(int(n_bytes.max())):
        have = n_bytes > k
        byte = (values[have] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (n_bytes[have] > k + 1).astype(np.uint64) << np.uint64(7)
        out[starts[have] + k] = (byte | more).astype(np.uint8)
    return out.tobytes()


def _read_varints(data: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """The first ``count`` LEB128 ints of ``data`` (uint8) and the bytes they take."""
    ends = np.flatnonzero(data < 0x80)[:count]
    if len(ends) < count:
        raise ValueError("truncated fingerprint")
    used = int(ends[-1]) + 1 if count else 0
    body = data[:used].astype(np.uint64)
    group = np.zeros(used, np.int64)
    group[ends[:-1] + 1] = 1
    group = np.cumsum(group)
    position = np.arange(used) - np.concatenate([[0], ends[:-1] + 1])[group]
    values = np.zeros(count, np.uint64)
    np.add.at(values, group, (body & np.uint64(0x7F)) << (np.uint64(7) * position.astype(np.uint64)))
    return values.astype(np.int64), used


def encode(times: np.ndarray, bins: np.ndarray) -> bytes:
    """Peaks (frame indices, sorted; bins from :data:`LOW_BIN`) → bytes."""
    deltas = np.diff(np.asarray(times, np.int64), prepend=0)
    return bytes([VERSION]) + _varints([len(times)]) + _varints(deltas) + np.asarray(bins, np.uint8).tobytes()


def decode(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """bytes → (frame indices, bins) of the peaks, as :func:`encode` took them."""
    raw = np.frombuffer(data, np.uint8)
    if not len(raw) or raw[0] != VERSION:
        raise ValueError(f"not a fingerprint of version {VERSION}")
    (count,), used = _read_varints(raw[1:], 1)
    deltas, used_deltas = _read_varints(raw[1 + used:], int(count))
    start = 1 + used + used_deltas
    bins = raw[start:start + count].astype(np.int64)
    if len(bins) != count:
        raise ValueError("truncated fingerprint")
    return np.cumsum(deltas), bins


def landmarks(times: np.ndarray, bins: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hashes, anchor frames, target frames), int64, of peak pairs: each peak with each of the next
    :data:`FAN_OUT` peaks at :data:`MIN_DT` to :data:`MAX_DT` frames after it. A hash packs the anchor's bin, the
    bin difference and the frame distance, each divided by :data:`DT_STEP` (19 bits). Pairs within one
    bin (a held harmonic) say little and are left out."""
    hashes, anchors, targets = [], [], []
    for k in range(1, FAN_OUT + 1):
        dt = times[k:] - times[:-k]
        f1, f2 = bins[:-k] // DT_STEP, bins[k:] // DT_STEP
        ok = (dt >= MIN_DT) & (dt <= MAX_DT) & (f1 != f2)
        hashes.append((((f1 << 7) | (f2 - f1 + 64)) << 6 | dt // DT_STEP)[ok])
        anchors.append(times[:-k][ok])
        targets.append(times[k:][ok])
    return np.concatenate(hashes), np.concatenate(anchors), np.concatenate(targets)


def triplets(times: np.ndarray, bins: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hashes, anchor frames, last frames), int64, of peak triplets: each peak with two of the next :data:`FAN_OUT`
    peaks, within :data:`MAX_DT` frames. 32 bits (anchor bin, two bin differences, two frame distances, halved as in
    :func:`landmarks`): selective enough to join 10^7 clips on, where a pair's 19 bits would collide everywhere."""
    q = bins // DT_STEP
    hashes, anchors, targets = [], [], []
    for k1 in range(1, FAN_OUT + 1):
        for k2 in range(k1 + 1, FAN_OUT + 1):
            n = len(times) - k2
            if n <= 0:
                continue
            t0, t1, t2 = times[:n], times[k1:k1 + n], times[k2:k2 + n]
            f0, f1, f2 = q[:n], q[k1:k1 + n], q[k2:k2 + n]
            d1, d2 = t1 - t0, t2 - t0
            ok = (d1 >= MIN_DT) & (d2 <= MAX_DT) & (t2 > t1) & (f0 != f1) & (f0 != f2)
            h = (f0 << 26) | ((f1 - f0 + 64) << 19) | ((f2 - f0 + 64) << 12) | ((d1 // DT_STEP) << 6) | d2 // DT_STEP
            hashes.append(h[ok])
            anchors.append(t0[ok])
            targets.append(t2[ok])
    if not hashes:
        return (np.zeros(0, np.int64),) * 3
    return np.concatenate(hashes), np.concatenate(anchors), np.concatenate(targets)
