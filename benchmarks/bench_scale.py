"""Scale benchmark: what the driver pays, in time, storage requests and memory, as the shard count grows.

Outputs are fabricated through the project's own code, without encoding: a JSONL manifest input of N rows with
``files_per_shard=1`` (N shards; the audio files need not exist, the plan never reads them), one tiny Parquet file
written by :func:`pipeline.writer.write_shard` and copied to every shard's data file, and one record per shard by
:func:`pipeline.manifest.write_record` (fsync off while fabricating: setup, not measured). Each measurement runs in
a fresh process, so its peak RSS is its own.

Measurements (``--measure``, several allowed):

* ``plan``: what ``runner.run`` does before encoding — listing the input, ``manifest.load_records(check_order=True)``,
  ``plan.make_plan`` — on a finished output: without a checkpoint (every record read, as before checkpoints), after
  a fold (``manifest.fold_records``), and after 1 % of the inputs changed. Requests are counted on local disk:
  file reads (``open``) and folder listings, during ``load_records`` and ``make_plan``.

    python benchmarks/bench_scale.py --sizes 10000 100000 --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pipeline import storage  # noqa: E402

FILES_PER_SHARD = 1


def fabricate(workdir: Path, n: int) -> tuple[str, str]:
    """A JSONL input of ``n`` rows and a finished output of its ``n`` shards; returns (input, output)."""
    import numpy as np

    from pipeline import manifest
    from pipeline.sources import discover_shards
    from pipeline.types import ClipInfo, EncodedClip
    from pipeline.writer import write_shard

    folder = workdir / f"n{n}"
    inp, out = folder / "in" / "clips.jsonl", folder / "out"
    if (folder / "done").exists():
        return str(inp), str(out)
    shutil.rmtree(folder, ignore_errors=True)
    inp.parent.mkdir(parents=True)
    inp.write_text("".join(json.dumps({"id": f"c{i:07d}", "audio": f"audio/c{i:07d}.wav", "speaker": i % 97}) + "\n"
                           for i in range(n)))
    storage._fsync_path = lambda path: None  # setup only
    shards = discover_shards(str(inp), files_per_shard=FILES_PER_SHARD)
    clip = EncodedClip(ClipInfo(0, "c", "file:///c.wav", 16_000, 1), np.ones((8, 125), np.int64), 125 * 1920)
    template = str(folder / "template.parquet")
    result = write_shard(template, [clip], num_codebooks=8, file_metadata={})
    (out / "data").mkdir(parents=True)
    now = time.time()
    for shard in shards:
        shutil.copyfile(template, out / "data" / f"{shard.shard_id}.parquet")
        manifest.write_record(str(out), shard, result, [], started=now - 10, finished=now, attempt=1,
                              writer=("bench", 1))
    (folder / "done").touch()
    return str(inp), str(out)


def change_inputs(inp: str, share: float) -> int:
    """Give ``share`` of the manifest's rows a new metadata value (their shards' digests change); returns how many."""
    lines = Path(inp).read_text().splitlines()
    step = max(1, round(1 / share))
    for i in range(0, len(lines), step):
        row = json.loads(lines[i])
        row["speaker"] = -1
        lines[i] = json.dumps(row)
    Path(inp).write_text("\n".join(lines) + "\n")
    return len(range(0, len(lines), step))


def _count_requests() -> dict[str, int]:
    """Count file reads and folder listings on local disk from now on."""
    from fsspec.implementations.local import LocalFileSystem

    counts = {"reads": 0, "listings": 0}

    def wrap(owner: Any, name: str, kind: str) -> None:
        original = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[kind] += 1
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    wrap(LocalFileSystem, "_open", "reads")  # every read (cat_file opens too)
    wrap(LocalFileSystem, "ls", "listings")
    wrap(storage, "_scan_local", "listings")
    return counts


def plan_once(inp: str, out: str) -> dict[str, Any]:
    """In this process: list, load the records, plan; times, requests and peak RSS."""
    from pipeline import manifest
    from pipeline.commit import Output
    from pipeline.plan import make_plan
    from pipeline.sources import discover_shards

    t0 = time.perf_counter()
    shards = discover_shards(inp, files_per_shard=FILES_PER_SHARD)
    t1 = time.perf_counter()
    counts = _count_requests()
    records, files = manifest.load_records(out, check_order=True)
    t2 = time.perf_counter()
    plan = make_plan(shards, records, files, prune=False, read_ids=Output(out, 8, {}).read_ids)
    t3 = time.perf_counter()
    return {"shards": len(shards), "pending": len(plan.pending), "done": len(plan.done), "retire": len(plan.retire),
            "listing_s": t1 - t0, "load_records_s": t2 - t1, "make_plan_s": t3 - t2, "plan_s": t3 - t0, **counts,
            "cpu_s": _cpu_s(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fold_once(out: str) -> dict[str, Any]:
    from pipeline import manifest

    t0 = time.perf_counter()
    seq = manifest.fold_records(out)
    return {"fold_s": time.perf_counter() - t0, "checkpoint": seq, "cpu_s": _cpu_s(),
            "checkpoint_mb": sum(f.stat().st_size for f in Path(out, "_state/checkpoints").glob("*.parquet")) / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(what: str, *args: str) -> dict[str, Any]:
    """Run ``what`` in a fresh process (its own peak RSS)."""
    code = f"import json, sys; sys.path.insert(0, {str(REPO_ROOT / 'benchmarks')!r}); import bench_scale; " \
           f"print(json.dumps(bench_scale.{what}(*sys.argv[1:])))"
    done = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_plan(workdir: Path, n: int) -> list[dict[str, Any]]:
    """No-op plan without and with a checkpoint, the fold, and a plan after 1 % of the inputs changed."""
    inp, out = fabricate(workdir, n)
    checkpoints = Path(out, "_state/checkpoints")
    shutil.rmtree(checkpoints, ignore_errors=True)
    rows = [{"case": "no-op, no checkpoint (before)", **_child("plan_once", inp, out)}]
    rows.append({"case": "fold (first checkpoint)", **_child("fold_once", out)})
    rows.append({"case": "no-op, checkpoint", **_child("plan_once", inp, out)})
    changed = change_inputs(inp, 0.01)
    rows.append({"case": f"1% changed ({changed} inputs), checkpoint", **_child("plan_once", inp, out)})
    shutil.rmtree(Path(workdir, f"n{n}"))  # the manifest changed: fabricate afresh next time
    return [{"n": n, **row} for row in rows]


MEASUREMENTS = {"plan": measure_plan}


def fit(rows: list[dict[str, Any]], case: str, key: str, at: int = 10**6) -> float | None:
    """Linear fit ``a + b n`` of ``key`` over the sizes measured for ``case``, evaluated at ``at``."""
    points = [(r["n"], r[key]) for r in rows if r["case"].startswith(case) and key in r]
    if len(points) < 2:
        return None
    (n0, y0), (n1, y1) = points[0], points[-1]
    slope = (y1 - y0) / (n1 - n0)
    return y0 + slope * (at - n0)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| shards | case | listing s | load_records s | make_plan s | reads | listings | peak RSS MB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "plan_s" in r:
            lines.append(f"| {r['n']:,} | {r['case']} | {r['listing_s']:.1f} | {r['load_records_s']:.2f} | "
                         f"{r['make_plan_s']:.2f} | {r['reads']:,} | {r['listings']:,} | {r['peak_rss_mb']:.0f} |")
        else:
            lines.append(f"| {r['n']:,} | {r['case']}: {r['fold_s']:.1f} s, {r['checkpoint_mb']:.1f} MB | | | | | | "
                         f"{r['peak_rss_mb']:.0f} |")
    lines.append("")
    for case in ("no-op, no checkpoint", "no-op, checkpoint"):
        values = {key: fit(rows, case, key) for key in ("plan_s", "load_records_s", "reads", "peak_rss_mb")}
        if values["plan_s"] is not None:
            lines.append(f"fitted at 10^6 shards, {case}: plan {values['plan_s']:.0f} s (load_records "
                         f"{values['load_records_s']:.0f} s), {values['reads']:,.0f} reads, peak RSS "
                         f"{values['peak_rss_mb']:,.0f} MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--measure", nargs="+", choices=sorted(MEASUREMENTS), default=sorted(MEASUREMENTS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-scale"))
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args(argv)
    rows = []
    for what in args.measure:
        for n in args.sizes:
            rows += MEASUREMENTS[what](args.workdir, n)
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.markdown:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
