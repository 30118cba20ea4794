"""The fingerprint's peak rule on signals whose peaks are known: at most PEAKS_PER_FRAME per frame, the strongest."""

from __future__ import annotations

import numpy as np

from pipeline import fingerprint as fpm


def test_a_frame_keeps_its_strongest_peaks_only():
    t = np.arange(3 * 24_000) / 24_000
    bins = [10, 30, 50, 70, 90, 110]  # 4 kHz STFT bins (15.6 Hz each), farther apart than a peak's neighbourhood
    gains = [0.05, 0.4, 0.1, 0.3, 0.2, 0.08]  # the three strongest: bins 30, 70, 90
    audio = sum(g * np.sin(2 * np.pi * b * 4_000 / fpm.N_FFT * t) for b, g in zip(bins, gains))
    times, found = fpm.decode(fpm.fingerprint(audio.astype(np.float32)))
    inner = (times > fpm.PEAK_FRAMES) & (times < times.max() - fpm.PEAK_FRAMES)  # away from the clip's edges
    assert inner.sum() > 50
    assert np.array_equal(np.unique(found[inner]), np.array([30, 70, 90]) - fpm.LOW_BIN)
    assert np.bincount(times[inner]).max() == fpm.PEAKS_PER_FRAME
