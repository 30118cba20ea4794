"""The cost of the manifest as an output grows: one progress update, manifest.json's size, the index.

    python benchmarks/bench_manifest.py [--shards 1000 100000] [--repeats 5]

For each size, fabricates a finished output's records in memory (150 clips of 10 s per shard, one failure in ten
shards; no Parquet data is written) and measures, on local disk in a temporary folder:

* before (the manifest with every entry inline, as until the index): one progress update = ``build_manifest`` over
  all shards + ``manifest.json`` written (``indent=2``), all on the scheduler's thread;
* after: one progress update on the scheduler's thread = ``Progress.add`` (one finished shard) + ``snapshot``; and
  on the writer's thread, the small ``manifest.json`` written;
* once per session (start and end): ``build_manifest`` + the index written; and a reader's
  ``shard_table(statuses=WRITTEN, columns=["file"])``.

Times are medians of ``--repeats`` after one warm-up call. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import index, manifest, storage  # noqa: E402
from pipeline.progress import Progress  # noqa: E402
from pipeline.types import Member, Shard  # noqa: E402

T0 = 1_700_000_000.0


def fabricate(n: int) -> tuple[list[Shard], dict[str, dict]]:
    """``n`` shards of the listing and a done record for each (as :func:`pipeline.manifest.write_record` makes)."""
    shards, done = [], {}
    for i in range(n):
        shard_id = f"files-{i * 2654435761 % 2**32:08x}{i:07d}"
        shard = Shard(shard_id, "files", f"s3://corpus/in/{i:07d}", f"s3://corpus/in/{i:07d}", f"{i:064x}",
                      members=(Member(f"{i}", f"s3://corpus/in/{i:07d}/a.flac"),))
        failures = [{"clip_id": f"c{i}", "source_uri": "s3://corpus/x.wav", "stage": "decode",
                     "error_class": "DecodeError", "message": "bad header"}] if i % 10 == 0 else []
        done[shard_id] = {
            "shard": {"shard_id": shard_id, "kind": "files", "uri": shard.uri, "digest": shard.digest},
            "status": "done", "file": manifest.shard_file(shard_id), "rows": 150, "carried": 0, "frames": 150 * 125,
            "bytes": 200_000 + i, "sha256": f"{i:064x}", "clips": 150 + len(failures), "failed": len(failures),
            "failures": failures, "hours": 150 * 10 / 3600, "schema": {"columns": []},
            "started": manifest._iso(T0 + i), "finished": manifest._iso(T0 + i + 5), "attempt": 1, "kept_ids": [],
        }
        shards.append(shard)
    return shards, done


def median_s(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls, after one untimed call (imports, caches)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(n: int, repeats: int, root: str) -> dict[str, float]:
    shards, done = fabricate(n)
    run = manifest.make_run({"batch_size": 8}, {"source": "kyutai/mimi", "revision": "main", "sha256": "0" * 64}, 8)
    url = storage.join(root, manifest.MANIFEST_PATH)
    last = done.pop(shards[-1].shard_id)  # the shard that finishes in the update measured

    def before() -> None:  # one progress update until the index: rebuild everything, write it all
        storage.write_json(url, manifest.build_manifest(root, run, shards, {**done, last["shard"]["shard_id"]: last},
                                                        started=T0))

    out: dict[str, float] = {"before_update_s": median_s(before, repeats), "before_bytes": os.path.getsize(url)}
    start = manifest.build_manifest(root, run, shards, done, started=T0)
    out["session_index_s"] = median_s(lambda: manifest.write_manifest(root, start), repeats)
    counters = Progress(start, T0)
    counters.indexed(manifest.read_manifest(root)["index"])

    def after_driver() -> None:  # the scheduler's thread: count one finished shard, take the snapshot
        counters.add(last)
        counters.snapshot()

    out["after_driver_s"] = median_s(after_driver, repeats * 20)
    snapshot = counters.snapshot()
    out["after_writer_s"] = median_s(lambda: manifest.write_manifest(root, snapshot), repeats)
    out["after_bytes"] = os.path.getsize(url)
    current = manifest.read_manifest(root)
    out["index_bytes"] = current["index"]["bytes"]
    out["read_files_s"] = median_s(lambda: manifest.shard_table(root, current, statuses=index.WRITTEN,
                                                                columns=["file"]), repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[1_000, 100_000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC · {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores · Python {platform.python_version()}\n")
    print("| shards | before: update (driver) | before: manifest.json | after: update (driver) | after: write "
          "(writer thread) | after: manifest.json | index (once per session): write | index size | "
          "read data files |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.shards:
        with tempfile.TemporaryDirectory() as root:
            r = measure(n, args.repeats, root)
        print(f"| {n:,} | {r['before_update_s'] * 1e3:,.1f} ms | {r['before_bytes'] / 1024:,.0f} KiB | "
              f"{r['after_driver_s'] * 1e6:,.1f} µs | {r['after_writer_s'] * 1e3:,.2f} ms | "
              f"{r['after_bytes'] / 1024:,.1f} KiB | {r['session_index_s']:,.2f} s | "
              f"{r['index_bytes'] / 1024:,.0f} KiB | {r['read_files_s'] * 1e3:,.1f} ms |", flush=True)


if __name__ == "__main__":
    main()
