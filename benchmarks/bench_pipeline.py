"""End-to-end pipeline benchmark: a FLAC corpus (44.1 kHz stereo) through `mimi-tokenize run` on a local Ray.

It writes the corpus and released-size random weights once (``--workdir``), runs the real pipeline into a fresh
output folder, and reports hours of audio per hour of wall time, per encoder device and per CPU core, plus the
run's own figures from manifest.json. On a GPU machine the encoders run on CUDA (one per GPU).

    python benchmarks/bench_pipeline.py --minutes 20                  # 20 minutes of audio
    python benchmarks/bench_pipeline.py --minutes 60 --clip-seconds 30 --files-per-shard 32 --markdown
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import mimi  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.runner import run  # noqa: E402


def make_flac_corpus(folder: Path, minutes: float, clip_seconds: float, sample_rate: int = 44_100,
                     seed: int = 0) -> int:
    """Stereo 16-bit FLAC clips of speech-like noise-excited harmonics; returns the number of clips."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n_clips = max(1, round(minutes * 60 / clip_seconds))
    for i in range(n_clips):
        seconds = clip_seconds * rng.uniform(0.5, 1.5)
        t = np.arange(int(seconds * sample_rate)) / sample_rate
        pitch = 120 + 60 * np.sin(2 * np.pi * 0.3 * t + i)
        voiced = np.sin(2 * np.pi * np.cumsum(pitch) / sample_rate) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) ** 2
        mono = 0.3 * voiced + 0.03 * rng.standard_normal(t.shape)
        stereo = np.stack([mono, 0.8 * mono + 0.01 * rng.standard_normal(t.shape)], axis=1)
        sf.write(folder / f"clip-{i:05d}.flac", stereo.astype(np.float32), sample_rate, subtype="PCM_16")
    return n_clips


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="minutes of audio in the corpus")
    parser.add_argument("--clip-seconds", type=float, default=20.0, help="mean clip length")
    parser.add_argument("--files-per-shard", type=int, default=16)
    parser.add_argument("--num-codebooks", type=int, default=8)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-max-seconds", type=float, default=None)
    parser.add_argument("--workdir", default="/tmp/mimi-bench-pipeline", help="corpus and weights are kept here")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown block for BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    work = Path(args.workdir)
    corpus = work / f"flac-{args.minutes:g}min-{args.clip_seconds:g}s"
    if not corpus.exists():
        make_flac_corpus(corpus, args.minutes, args.clip_seconds)
    weights = work / "weights" / mimi.checkpoint.MOSHI_FILENAME
    if not weights.exists():
        mimi.write_random_checkpoint(weights, seed=0)
    output = work / "output"
    shutil.rmtree(output, ignore_errors=True)

    overrides = {"input": str(corpus), "output": str(output), "model": str(weights), "device": args.device,
                 "num_codebooks": args.num_codebooks, "files_per_shard": args.files_per_shard,
                 "progress_interval_s": 10}
    if args.batch_max_seconds:
        overrides["batch_max_seconds"] = args.batch_max_seconds
    start = time.time()
    code = run(load_config(None, overrides))
    wall = time.time() - start
    manifest = json.loads((output / "manifest.json").read_text())
    hours = manifest["totals"]["hours"]
    cores = os.cpu_count() or 1
    import torch

    gpus = torch.cuda.device_count()
    result = {
        "date": dt.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, {cores} cores"
        + (f", {gpus}x {torch.cuda.get_device_name(0)}" if gpus else ""),
        "command": "python " + shlex.join(sys.argv), "exit_code": code, "clips": manifest["totals"]["clips"],
        "failed_clips": manifest["totals"]["failed_clips"], "audio_hours": hours, "wall_s": wall,
        "x_realtime": hours * 3600 / wall, "hours_per_hour_per_device": hours * 3600 / wall / max(gpus, 1),
        "hours_per_hour_per_cpu_core": hours * 3600 / wall / cores,
    }
    print(json.dumps(result, indent=2))
    if args.markdown:
        device = f"{gpus} GPU(s)" if gpus else "CPU only"
        print(f"\n{result['date']}, {result['machine']}, {device}\n\n    {result['command']}\n\n"
              f"| audio | clips | wall | x-realtime (= audio h per h) | per {'GPU' if gpus else 'CPU core'} |\n"
              f"|---|---|---|---|---|\n| {hours * 60:.1f} min | {result['clips']} | {wall:.1f} s | "
              f"{result['x_realtime']:.1f} | "
              f"{result['hours_per_hour_per_device'] if gpus else result['hours_per_hour_per_cpu_core']:.1f} |")
    return code


if __name__ == "__main__":
    sys.exit(main())
