"""Crash and resume: SIGKILL a running `mimi-tokenize run` (its whole process group, Ray included) after its first
committed shard, run the same command again, and compare with an uninterrupted run: same rows, identical codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

import mimi
from audio_fixtures import write_audio
from pipeline import manifest
from pipeline.sources import discover_shards


def command(corpus: Path, out: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "run", "--input", str(corpus), "--output", str(out),
            "--model", str(model), "--files-per-shard", "2", "--num-codebooks", "8", "--batch-max-seconds", "4"]


def rows(out: Path) -> dict[str, bytes]:
    found = {}
    for file in sorted((out / "data").glob("*.parquet")):
        table = pq.read_table(file)
        for clip_id, codes in zip(table.column("id").to_pylist(), table.column("codes").to_pylist()):
            assert clip_id not in found, f"duplicate row {clip_id}"
            found[clip_id] = np.asarray(codes, dtype=np.int16).tobytes()
    return found


def test_killed_run_resumes_to_the_same_output(tmp_path):
    corpus, model = tmp_path / "in", tmp_path / "tiny.safetensors"
    mimi.write_random_checkpoint(model, mimi.MimiConfig.tiny())
    for i in range(12):
        write_audio(corpus / f"clip{i:02d}.wav", "wav_pcm16", 16_000, 2.0 + 0.25 * (i % 5), seed=i)
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"

    proc = subprocess.Popen(command(corpus, interrupted, model), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards_dir = interrupted / "_state" / "shards"
    deadline = time.time() + 120
    while not (shards_dir.is_dir() and any(shards_dir.glob("*.json"))):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no shard was committed within 120 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    shards = discover_shards(str(corpus), files_per_shard=2)
    committed = len(list(shards_dir.glob("*.json")))
    assert 1 <= committed < len(shards), f"{committed} of {len(shards)} shards were done when the run was killed"
    assert (interrupted / "_state" / "lock.json").exists()  # a dead run's lock, taken over below

    assert subprocess.run(command(corpus, interrupted, model), capture_output=True, timeout=300).returncode == 0
    assert subprocess.run(command(corpus, reference, model), capture_output=True, timeout=300).returncode == 0

    resumed, uninterrupted = rows(interrupted), rows(reference)
    assert sorted(resumed) == sorted(uninterrupted) == [f"clip{i:02d}.wav" for i in range(12)]
    assert all(resumed[k] == uninterrupted[k] for k in uninterrupted)
    # deterministic names and contents: the very same files
    records = [manifest.load_done(str(out)) for out in (interrupted, reference)]
    assert {k: r["sha256"] for k, r in records[0].items()} == {k: r["sha256"] for k, r in records[1].items()}
    assert manifest.read_manifest(str(interrupted))["status"] == "complete"
    lock = json.loads((interrupted / "_state" / "lock.json").read_text())
    assert lock["released"] and [h["epoch"] for h in lock["history"]] == [1, 2]  # the killed run's, then the resumed
    visible = [p.name for p in (interrupted / "data").iterdir() if not p.name.startswith(".")]
    assert sorted(visible) == sorted(f"{s.shard_id}.parquet" for s in shards)
