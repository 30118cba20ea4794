"""Memory that does not grow with clip length: a whole run (driver, Ray, workers, object store; summed PSS) on two
8-minute clips peaks where the same run on two 1-minute clips does, because clips are decoded, resampled and encoded
as streams, in parts of part_seconds (30 s here, so that the 1-minute clips are streamed too). A tiny file that
decodes to hours of silence stops at max_clip_seconds as a recorded failure.
(The two-hour case is measured by `benchmarks/bench_datapath.py longform`.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf

from pipeline.prepare import iter_parts
from pipeline.sources import discover_shards
from pipeline.types import SAMPLE_RATE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from procmem import PeakMemory  # noqa: E402


def write_long(path: Path, seconds: float, sample_rate: int, **kwargs) -> None:
    """Stereo speech-like audio written in blocks (the test itself never holds it whole)."""
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", sample_rate, 2, **kwargs) as f:
        block = 10 * sample_rate
        for start in range(0, round(seconds * sample_rate), block):
            t = (start + np.arange(min(block, round(seconds * sample_rate) - start))) / sample_rate
            mono = 0.3 * np.sin(2 * np.pi * (150 + 40 * np.sin(t)) * t) + 0.02 * rng.standard_normal(t.shape)
            f.write(np.stack([mono, 0.8 * mono], axis=1).astype(np.float32))


def peak_of_run(corpus: Path, out: Path, model: str) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--input", str(corpus), "--output",
                             str(out), "--model", model, "--device", "cpu", "--part-seconds", "30"],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    sampler = PeakMemory(proc.pid)
    sampler.start()
    _, err = proc.communicate(timeout=600)
    peak = sampler.stop()
    assert proc.returncode == 0, err.decode()[-3000:]
    return peak


def test_long_clips_do_not_grow_the_run(tmp_path, tiny_model_path, capsys):
    peaks, frames = {}, {}
    for name, seconds in (("short", 60.0), ("long", 480.0)):
        corpus = tmp_path / name
        corpus.mkdir()
        write_long(corpus / "a.flac", seconds, 48_000, format="FLAC", subtype="PCM_16")
        write_long(corpus / "b.mp3", seconds + 7.3, 44_100, format="MP3", subtype="MPEG_LAYER_III")
        peaks[name] = peak_of_run(corpus, tmp_path / f"{name}-out", tiny_model_path)
        table = pq.read_table(tmp_path / f"{name}-out" / "data")
        frames[name] = dict(zip(table.column("id").to_pylist(), table.column("n_frames").to_pylist()))
    with capsys.disabled():
        print(f"\n[run peak PSS] 2 x 1 min: {peaks['short'] / 2**20:.0f} MiB, "
              f"2 x 8 min: {peaks['long'] / 2**20:.0f} MiB")
    assert frames["long"]["a.flac"] == 480 * 12.5 and abs(frames["long"]["b.mp3"] - 487.3 * 12.5) <= 2
    # held whole, the two long clips would add ~1 GB (48 kHz stereo float32 when decoded, 24 kHz mono after)
    assert peaks["long"] - peaks["short"] < 120 * 2**20


def test_a_decompression_bomb_stops_at_max_clip_seconds(tmp_path):
    """Ten minutes of digital silence in a FLAC of a few kB: with max_clip_seconds 60, a recorded failure after about
    60 s of audio, with parts no larger than part_seconds."""
    with sf.SoundFile(tmp_path / "bomb.flac", "w", 48_000, 2, format="FLAC") as f:
        for _ in range(60):
            f.write(np.zeros((480_000, 2), np.float32))
    sf.write(tmp_path / "fine.wav", np.zeros(16_000, np.float32) + 0.1, 16_000)
    assert (tmp_path / "bomb.flac").stat().st_size < 200_000
    (shard,) = discover_shards(str(tmp_path))
    parts = list(iter_parts(shard, part_seconds=10.0, max_clip_seconds=60.0))
    assert max(p.samples for p in parts) <= 10 * SAMPLE_RATE + 2**16
    failures = [f for p in parts for f in p.failures]
    assert [(f.clip_id, f.stage, f.error_class) for f in failures] == [("bomb.flac", "decode", "ClipTooLongError")]
    assert {p.info.clip_id for part in parts for p in part.pieces if p.final} == {"fine.wav"}
