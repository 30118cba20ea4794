"""The time and peak memory of listing a large local input: ``list_input`` and ``discover_shards`` over N empty
audio files (1,000 per folder), each measured in a fresh process (its peak RSS is the listing's).

    python benchmarks/bench_listing.py [--files 1000000] [--repo PATH] [--keep DIR]

``--repo`` measures another checkout's code (e.g. the commit before a change) on the same files; ``--keep DIR``
fabricates the files once into DIR and reuses them on later calls. Prints one Markdown table row per measure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PER_FOLDER = 1000

# run in a fresh interpreter with the code under test first on sys.path; prints one JSON line
_CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from pipeline.sources import discover_shards
from pipeline.sources.listing import list_input
what, root = sys.argv[2], sys.argv[3]
start = time.perf_counter()
if what == "list_input":
    n, shards = len(list_input(root).files), None
else:
    shards = discover_shards(root, files_per_shard=256)
    n = sum(len(s.members) for s in shards)
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": time.perf_counter() - start, "files": n, "shards": shards and len(shards),
                  "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}))
"""


def fabricate(root: Path, files: int) -> None:
    """``files`` empty ``.wav`` files, :data:`PER_FOLDER` per folder (kept if already there)."""
    marker = root / f".made-{files}"
    if marker.exists():
        return
    for i in range(files):
        folder = root / f"d{i // PER_FOLDER:05d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(folder / f"utt{i:08d}.wav", os.O_CREAT | os.O_WRONLY, 0o644))
    marker.touch()


def measure(repo: Path, what: str, root: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(repo), what, str(root)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose pipeline/ is measured")
    parser.add_argument("--keep", type=Path, help="folder to fabricate the files in once and reuse")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        start = time.perf_counter()
        fabricate(root, args.files)
        print(f"# {args.files:,} files in {root} ({time.perf_counter() - start:.0f} s to fabricate); code: {args.repo}")
        print("| measure | files | shards | wall s | CPU s (process) | peak RSS MB |\n|---|---|---|---|---|---|")
        for what in ("list_input", "discover_shards"):
            r = measure(args.repo, what, root)
            print(f"| {what} | {r['files']:,} | {r['shards'] or '-'} | {r['seconds']:.1f} | {r['cpu_s']:.1f} | "
                  f"{r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
