"""Training-side throughput: `mimi-tokenize export` and the `MimiCodes` loader, in tokens per second per process.

    python benchmarks/bench_loader.py [--clips 20000] [--seq-len 2048] [--num-codebooks 8]

It writes a synthetic output once (random codes in the pipeline's own Parquet layout, with done records and a
manifest: the loader and the export cannot tell it from a run's), then measures, in this one process:
export (local Parquet → codes.u16), and the loader over the Parquet output and over the export, with shuffling on,
without and with moshi delays. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import manifest  # noqa: E402
from pipeline.export import export  # noqa: E402
from pipeline.loader import MimiCodes  # noqa: E402
from pipeline.types import ClipInfo, EncodedClip, Member, Shard  # noqa: E402
from pipeline.writer import write_shard  # noqa: E402

CLIPS_PER_SHARD = 500


def synthetic_output(root: Path, clips: int, k: int, clips_per_shard: int = CLIPS_PER_SHARD,
                     frames_range: tuple[int, int] = (25, 375)) -> None:
    """An output of ``clips`` clips of ``frames_range`` frames (default 2-30 s; random codes), in shards of
    ``clips_per_shard``, complete."""
    rng = np.random.default_rng(0)
    shards, done = [], {}
    for s, start in enumerate(range(0, clips, clips_per_shard)):
        shard = Shard(f"files-{s:05d}", "files", "file:///synthetic", "file:///synthetic", f"d{s}",
                      members=(Member(f"{start}", f"file:///synthetic/{start}"),))
        rows = []
        for i in range(start, min(start + clips_per_shard, clips)):
            frames = int(rng.integers(*frames_range))
            rows.append(EncodedClip(ClipInfo(i, f"clip{i:07d}", f"file:///synthetic/{i}", 16_000, 1),
                                    rng.integers(0, 2048, (k, frames), dtype=np.int16), frames * 1920))
        result = write_shard(str(root / manifest.shard_file(shard.shard_id)), rows, num_codebooks=k,
                             file_metadata={})
        done[shard.shard_id] = manifest.write_record(str(root), shard, result, [], started=time.time(),
                                                          finished=time.time(), attempt=1)
        shards.append(shard)
    run = manifest.make_run({}, {"source": "synthetic", "revision": None, "sha256": "0" * 64}, k)
    manifest.write_manifest(str(root), manifest.build_manifest(str(root), run, shards, done, started=time.time(),
                                                               finished=time.time()))


def loader_rate(source: str, seq_len: int, k: int, delays: str | None) -> tuple[float, int]:
    dataset = MimiCodes(source, seq_len=seq_len, num_codebooks=k, delays=delays, seed=0)
    start, tokens = time.perf_counter(), 0
    for sequence in dataset:
        tokens += sequence["codes"].numel()
    return tokens / (time.perf_counter() - start), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=20_000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--num-codebooks", type=int, default=8)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mimi-bench-loader"))
    args = parser.parse_args()
    work, k = Path(args.workdir), args.num_codebooks
    output = work / f"output-{args.clips}-{k}"
    if not (output / "manifest.json").exists():
        shutil.rmtree(output, ignore_errors=True)
        synthetic_output(output, args.clips, k)
    flat = work / "flat"
    shutil.rmtree(flat, ignore_errors=True)
    start = time.perf_counter()
    meta = export(str(output), flat)
    export_s = time.perf_counter() - start
    rows = [("export (Parquet → codes.u16)", meta["tokens"] / export_s, meta["tokens"])]
    for label, source in (("loader from the Parquet output", str(output)), ("loader from the export", str(flat))):
        for delays in (None, "moshi"):
            rate, tokens = loader_rate(source, args.seq_len, k, delays)
            rows.append((f"{label}{', moshi delays' if delays else ''}", rate, tokens))
    import torch

    print(f"**{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC** · {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores · torch {torch.__version__} · `python benchmarks/bench_loader.py "
          f"{' '.join(sys.argv[1:])}`\n")
    print(f"{meta['clips']:,} clips of 2-30 s, {meta['frames']:,} frames × {k} codebooks, local disk, one process, "
          f"seq_len {args.seq_len}, shuffling on (windows of 1,024 clips)\n")
    print("| what | tokens / s (one process) | tokens |\n|---|---|---|")
    for label, rate, tokens in rows:
        print(f"| {label} | {rate / 1e6:.1f} M | {tokens:,} |")


if __name__ == "__main__":
    main()
