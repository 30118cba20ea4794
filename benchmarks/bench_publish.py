"""Publish packing: throughput and peak local disk of `mimi-tokenize publish` on many small shard files.

    python benchmarks/bench_publish.py [--shards 2000] [--clips-per-shard 150] [--target-file-mb 500 64]

Writes a synthetic output once (random codes in the pipeline's own Parquet layout, with done records and a manifest;
150 clips of 10 s at K = 8 per shard, about 200 KB per shard file, like a real run's small shards), then for each
target size: a dry run (packs every file into a local folder: packing throughput in MB of shard files per second),
and an upload to an in-process stand-in for the Hub (the real publish path: pack, pre-upload, delete, commit), whose
pre-upload samples the bytes under the staging folder: the peak local disk the upload needs. Prints a Markdown table
for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_loader import synthetic_output  # noqa: E402
from pipeline import publish  # noqa: E402


class NullHub:
    """An empty dataset repo that accepts every upload and keeps nothing; records the staging folder's peak size."""

    def __init__(self, staging: Path) -> None:
        self.staging, self.peak_bytes, self.commits = staging, 0, 0

    def create_repo(self, repo_id: str, **kwargs) -> str:
        return f"https://huggingface.co/datasets/{repo_id}"

    def list_repo_tree(self, repo_id: str, **kwargs) -> list:
        return []

    def preupload_lfs_files(self, repo_id: str, additions: list, **kwargs) -> None:
        used = sum(p.stat().st_size for p in self.staging.rglob("*") if p.is_file())
        self.peak_bytes = max(self.peak_bytes, used)
        for op in additions:
            op.path_or_fileobj = b""

    def create_commit(self, repo_id: str, operations: list, **kwargs) -> None:
        self.commits += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--clips-per-shard", type=int, default=150)
    parser.add_argument("--num-codebooks", type=int, default=8)
    parser.add_argument("--target-file-mb", type=float, nargs="+", default=[500, 64])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mimi-bench-publish"))
    args = parser.parse_args()
    work, k = Path(args.workdir), args.num_codebooks
    output = work / f"output-{args.shards}x{args.clips_per_shard}-{k}"
    if not (output / "manifest.json").exists():
        shutil.rmtree(output, ignore_errors=True)
        synthetic_output(output, args.shards * args.clips_per_shard, k, args.clips_per_shard, (125, 126))
    shard_bytes = sum(p.stat().st_size for p in (output / "data").glob("*.parquet"))
    rows = []
    for target_mb in args.target_file_mb:
        staging = work / "staging"
        shutil.rmtree(staging, ignore_errors=True)
        start, cpu = time.perf_counter(), time.process_time()
        result = publish.publish(str(output), "bench/packing", dry_run=True, staging=staging,
                                 target_file_bytes=int(target_mb * 2**20))
        dry_s, dry_cpu = time.perf_counter() - start, time.process_time() - cpu
        data = [f for f in result.files if f.path.startswith("data/")]
        shutil.rmtree(staging)
        hub = NullHub(staging)
        start = time.perf_counter()
        publish.publish(str(output), "bench/packing", staging=staging, api=hub,
                        target_file_bytes=int(target_mb * 2**20))
        upload_s = time.perf_counter() - start
        mib = shard_bytes / 2**20
        rows.append((target_mb, len(data), sum(f.size for f in data) / len(data) / 2**20, mib / dry_s, mib / dry_cpu,
                     mib / upload_s, hub.peak_bytes / 2**20, sum(f.size for f in data) / 2**20, hub.commits))
        shutil.rmtree(staging, ignore_errors=True)
    print(f"**{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC** · {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores · `python benchmarks/bench_publish.py {' '.join(sys.argv[1:])}`\n")
    print(f"{args.shards:,} shard files of {args.clips_per_shard} clips × 10 s (random codes, K = {k}), "
          f"{shard_bytes / 2**20:,.0f} MiB in all ({shard_bytes / args.shards / 1024:,.0f} KiB each), local disk; "
          f"peak RSS of the process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB\n")
    print("| target file | packed files (mean size) | dry run: packing MiB/s (per CPU second) | upload path: MiB/s | "
          "peak local disk during upload | local disk of a dry run | commits |\n|---|---|---|---|---|---|---|")
    for target, n, mean, dry, dry_cpu, up, peak, total, commits in rows:
        print(f"| {target:g} MiB | {n} ({mean:,.0f} MiB) | {dry:,.1f} ({dry_cpu:,.1f}) | {up:,.1f} | {peak:,.0f} MiB | "
              f"{total:,.0f} MiB | {commits} |")


if __name__ == "__main__":
    main()
