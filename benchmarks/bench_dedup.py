"""Dedup: what the fingerprint costs in the decode pass, how accurate dedup is on a planted corpus of real speech, and
how `mimi-tokenize dedup` scales.

    python benchmarks/bench_dedup.py fingerprint [--minutes 10]   # CPU s per audio hour, bytes and peaks/s
    python benchmarks/bench_dedup.py accuracy                      # recall per transform, precision (tests/planted)
    python benchmarks/bench_dedup.py scale [--clips 100000]        # dedup on a fabricated output: clips/s, peak RSS

Each prints a Markdown table for BENCHMARKS.md. ``scale`` writes an output folder whose rows carry synthetic
fingerprints (random peaks at speech density; 5 % of clips are copies of others with 20 % of their peaks moved or
dropped) through the project's writer, then runs the ``dedup`` command in a fresh process and reads its peak RSS, and
each stage's CPU seconds and peak RSS (sampled every 20 ms).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import fingerprint as fpm  # noqa: E402
from pipeline import matching  # noqa: E402


def _header(what: str) -> None:
    print(f"**{dt.date.today()}**, {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}: "
          f"`python benchmarks/bench_dedup.py {what}`\n")


def bench_fingerprint(minutes: float) -> None:
    from tests.planted import VOICES, speak

    rng = np.random.default_rng(0)
    audio = np.concatenate([speak(rng, voice, minutes * 60 / len(VOICES)) for voice in VOICES])
    hours = len(audio) / 24_000 / 3600
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        fp = fpm.Fingerprinter()
        for start in range(0, len(audio), 48_000):  # 2 s blocks, as the decoder hands them
            fp.feed(audio[start:start + 48_000])
        data = fp.finish()
        best = min(best, time.process_time() - started)
    times, bins = fpm.decode(data)
    seconds = hours * 3600
    _header(f"fingerprint --minutes {minutes:g}")
    print("| audio | CPU s per audio hour (1 thread, best of 3) | x-realtime | peaks/s | bytes/s | pair hashes/s | "
          "triplet hashes/s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {seconds / 60:.1f} min espeak-ng speech, 24 kHz, {len(VOICES)} voices | {best / hours:.2f} | "
          f"{seconds / best:,.0f} | {len(times) / seconds:.1f} | {len(data) / seconds:.1f} | "
          f"{len(fpm.landmarks(times, bins)[0]) / seconds:.1f} | {len(fpm.triplets(times, bins)[0]) / seconds:.1f} |")


def bench_accuracy() -> None:
    import xxhash

    from tests.planted import evaluate, planted_corpus

    started = time.time()
    p = planted_corpus(seed=1)
    names = sorted(p.clips)
    prints, info = {}, {}
    for key, name in enumerate(names):
        cp = matching.clip_print(fpm.fingerprint(p.clips[name]))
        prints[key] = cp
        info[key] = matching.ClipInfo(name, len(p.clips[name]) / 24_000, None,
                                      xxhash.xxh3_128_digest(p.clips[name].tobytes()), cp.first, cp.last)
    matched = time.time()
    members, occurrences, rels = matching.match_clips(prints, info)
    elapsed = time.time() - matched
    kept_of = {info[m.key].id: info[m.kept].id for m in members}
    relation = {info[m.key].id: m.relation for m in members}
    recall, precision, wrong = evaluate(p, kept_of)
    counts: dict[str, list[str]] = {}
    for copy, original, transform in p.copies:
        counts.setdefault(transform, []).append(relation.get(copy) or relation.get(original) or "-")
    base = sum(1 for n in names if n.startswith("v"))
    _header("accuracy")
    print(f"{len(names)} clips ({sum(len(a) for a in p.clips.values()) / 24_000 / 3600:.2f} h): {base} distinct clips "
          f"of espeak-ng speech ({len(set(n.split('/')[0] for n in names if n.startswith('v')))} voices), "
          f"their copies, 3 five-minute recordings with a 10 s clip of the corpus inside, and 20 recordings with a "
          f"5 s jingle; matching {elapsed:.1f} s (corpus built in {matched - started:.0f} s).\n")
    print("| transform | copies | recall | relation found |")
    print("|---|---|---|---|")
    for transform, found in counts.items():
        kinds = ", ".join(f"{k} {found.count(k)}" for k in sorted(set(found)))
        print(f"| {transform} | {len(found)} | {100 * recall[transform]:.0f} % | {kinds} |")
    jingle = {o.segment for o in occurrences if info[o.key].id in p.jingle}
    errors = [max(abs(o.start / fpm.FRAME_RATE - p.jingle[info[o.key].id][0] / 24_000),
                  abs(o.end / fpm.FRAME_RATE - p.jingle[info[o.key].id][1] / 24_000))
              for o in occurrences if info[o.key].id in p.jingle]
    print(f"\nPair precision {100 * precision:.2f} % ({len(wrong)} distinct pairs grouped); the jingle: "
          f"{len(jingle)} repeated segment over {len(errors)} of {len(p.jingle)} recordings, boundaries within "
          f"{max(errors, default=float('nan')):.2f} s; {len({o.segment for o in occurrences})} repeated segments "
          f"in all.")


def _fabricate(root: Path, n_clips: int, seed: int = 0) -> float:
    """An output of ``n_clips`` rows with synthetic fingerprints (see the module docstring); its audio hours."""
    import xxhash

    from pipeline import manifest as mf
    from pipeline import storage
    from pipeline.signals import Signals
    from pipeline.types import ClipInfo, EncodedClip, Shard
    from pipeline.writer import write_shard

    rng = np.random.default_rng(seed)
    run = mf.init_run(str(root), mf.make_run({}, {"source": "bench", "sha256": "ab" * 32}, 1, created=time.time()))
    durations = rng.uniform(3, 12, n_clips)
    peaks: list[tuple[np.ndarray, np.ndarray]] = []
    for i, d in enumerate(durations):
        if i > 100 and rng.random() < 0.05:  # a copy of an earlier clip, 20 % of its peaks moved or dropped
            times, bins = peaks[int(rng.integers(0, i))]
            keep = rng.random(len(times)) > 0.1
            times = np.sort(times[keep] + (rng.random(keep.sum()) < 0.1))
            bins, durations[i] = bins[keep], durations[int(rng.integers(0, i))]
        else:
            n = int(d * 20)
            times = np.sort(rng.integers(0, int(d * fpm.FRAME_RATE), n))
            bins = rng.integers(0, fpm.HIGH_BIN - fpm.LOW_BIN, n)
        peaks.append((times, bins))
    shards, done, per_file = [], {}, 700
    for s, start in enumerate(range(0, n_clips, per_file)):
        shard = Shard(f"files-{s:05d}", "files", "/in", "/in", f"d{s}")
        rows = [EncodedClip(ClipInfo(i - start, f"clip{i:08d}", f"/in/clip{i:08d}.wav", 24_000, 1),
                            np.zeros((1, 1), np.int16), int(durations[i] * 24_000),
                            Signals(xxhash.xxh3_128_digest(np.int64(i).tobytes()), fpm.encode(*peaks[i]),
                                    None, None, None, None, 8000.0))
                for i in range(start, min(start + per_file, n_clips))]
        result = write_shard(storage.join(str(root), mf.shard_file(shard.shard_id)), rows, num_codebooks=1,
                             file_metadata={})
        done[shard.shard_id] = mf.write_record(str(root), shard, result, [], started=time.time() - 1,
                                               finished=time.time(), attempt=1)
        shards.append(shard)
    mf.write_manifest(str(root), mf.build_manifest(str(root), run, shards, done, started=time.time() - 5,
                                                   finished=time.time()))
    return float(durations.sum()) / 3600


STAGES = ("_prints", "_exact", "_pair_partitions", "_votes", "_pairs", "_clip_info", "_write_tables")


def _rss_mib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20


def _dedup_child(root: str, partitions: int) -> None:
    """Run dedup in this (fresh) process; print its summary, wall time, peak RSS and per stage: calls, CPU s, peak
    RSS (of the process while the stage ran)."""
    import threading

    from pipeline import dedup as dd

    peak = [0]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.02)

    stages: dict[str, dict[str, float]] = {}

    def timed(name: str, stage: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            peak[0], cpu = _rss_mib(), time.process_time()
            try:
                return stage(*args, **kwargs)
            finally:
                s = stages.setdefault(name.strip("_"), {"calls": 0, "cpu_s": 0.0, "peak_mib": 0})
                s["calls"] += 1
                s["cpu_s"] += time.process_time() - cpu
                s["peak_mib"] = max(s["peak_mib"], peak[0], _rss_mib())
        return run

    for name in STAGES:
        setattr(dd, name, timed(name, getattr(dd, name)))
    threading.Thread(target=sample, daemon=True).start()
    started = time.time()
    summary = dd.dedup(root, partitions=partitions)
    print(json.dumps({"wall": time.time() - started, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "summary": summary, "stages": stages}))


def bench_scale(n_clips: int, partitions: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "out"
        started = time.time()
        hours = _fabricate(root, n_clips)
        made = time.time() - started
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import bench_dedup; "
                f"bench_dedup._dedup_child({str(root)!r}, {partitions})")
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = json.loads(out.strip().splitlines()[-1])
        work = sum(f.stat().st_size for f in (root / "_dedup/work").rglob("*") if f.is_file())
        votes = json.loads((root / "_dedup/work/votes.json").read_text())
        again = time.time()
        second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[1])
        rerun = time.time() - again
        if second.returncode:  # reported, not raised: the first pass's figures stand
            print(f"rerun failed (exit {second.returncode}): {second.stderr[-2000:]}", file=sys.stderr)
    s = result["summary"]
    cpu_s = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    _header(f"scale --clips {n_clips} --partitions {partitions}")
    print(f"Fabricated in {made:.0f} s: {n_clips:,} clips, {hours:,.0f} h, synthetic fingerprints (20 peaks/s).\n")
    print("| clips | partitions | wall s | CPU s | clips/s (CPU) | peak RSS | work files | found: removed / groups / "
          "segments | rerun (nothing to do) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {n_clips:,} | {partitions} | {result['wall']:.0f} | {cpu_s:.0f} | {n_clips / cpu_s:,.0f} | "
          f"{result['rss'] / 1024:,.0f} MiB | {work / 2**20:,.0f} MiB | {s['removed_clips']:,} / {s['groups']:,} / "
          f"{s['segments']:,} | {rerun:.1f} s |")
    print(f"\n{sum(votes['votes']):,} votes (upper bound) over {votes['pair_partitions']} pair partitions.\n")
    print("| stage | calls | CPU s | peak RSS of the process while it ran |")
    print("|---|---|---|---|")
    for name, stage in result["stages"].items():
        print(f"| {name} | {stage['calls']} | {stage['cpu_s']:.1f} | {stage['peak_mib']:,} MiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("fingerprint").add_argument("--minutes", type=float, default=10)
    sub.add_parser("accuracy")
    scale = sub.add_parser("scale")
    scale.add_argument("--clips", type=int, default=100_000)
    scale.add_argument("--partitions", type=int, default=16)
    args = parser.parse_args()
    if args.what == "fingerprint":
        bench_fingerprint(args.minutes)
    elif args.what == "accuracy":
        bench_accuracy()
    else:
        bench_scale(args.clips, args.partitions)


if __name__ == "__main__":
    main()
