"""SIGKILL at every commit step. A run over a changed listing (so that it retires stale files as well as encoding
shards) on S3 behind a proxy that kills the run's whole process group the moment the store has done a given request
and before the run hears back: after taking the lock, after rewriting or deleting a stale file, after a shard's data
file, after its done record, after a manifest update, after a checkpoint of the records (folded after every record
here). After every kill no clip id is in two files; the next run completes the output, and with --prune it equals a
clean run over the new listing, file for file."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import yaml

from audio_fixtures import write_audio
from outputs import assert_codes_equal, read_output, reference_codes
from pipeline import manifest

FILES_PER_SHARD = 2


def write_clip(root: Path, rel: str, seed: int) -> None:
    write_audio(root / rel, "wav_pcm16", 16_000, 0.3 + 0.05 * (seed % 7), seed=seed)


def ids_in_files(url: str, options: dict) -> list[str]:
    fs, path = fsspec.core.url_to_fs(url, **options)
    fs.invalidate_cache()
    ids = []
    for file in sorted(fs.glob(f"{path}/data/*.parquet")):
        ids += pq.read_table(io.BytesIO(fs.cat_file(file)), columns=["id"]).column("id").to_pylist()
    return ids


def file_digests(url: str, options: dict) -> dict[str, str]:
    fs, path = fsspec.core.url_to_fs(url, **options)
    fs.invalidate_cache()
    return {f.rsplit("/", 1)[1]: hashlib.sha256(fs.cat_file(f)).hexdigest()
            for f in sorted(fs.glob(f"{path}/data/*.parquet"))}


class KillAt:
    """A proxy hook that kills the process group of the current run at the ``nth`` request ``method`` whose path
    contains ``part``."""

    def __init__(self):
        self.target: tuple[str, str, int] | None = None
        self.seen = 0
        self.pid: int | None = None
        self.killed = threading.Event()

    def arm(self, method: str, part: str, nth: int, pid: int) -> None:
        self.target, self.seen, self.pid = (method, part, nth), 0, pid
        self.killed.clear()

    def __call__(self, method: str, path: str, status: int) -> None:
        if self.target is None or self.killed.is_set():
            return
        want_method, part, nth = self.target
        if method == want_method and part in path and status < 300:
            self.seen += 1
            if self.seen == nth:
                os.killpg(self.pid, signal.SIGKILL)
                self.killed.set()


def test_kills_at_every_commit_step(tmp_path, s3_server, s3_url, fault_proxy, tiny_model_path):
    direct = s3_server["storage_options"]
    local = tmp_path / "in"
    for i in range(10):
        write_clip(local, f"spk{i % 2}/utt{i:02d}.wav", i)
    fs = fsspec.filesystem("s3", **direct)
    fs.put(f"{local}/", f"{s3_url}/in/", recursive=True)
    kill = KillAt()
    proxy, options = fault_proxy(on_request=kill)

    def command(out: str, **extra) -> list[str]:
        config = tmp_path / f"run-{len(list(tmp_path.glob('run-*.yaml')))}.yaml"
        config.write_text(yaml.safe_dump({"input": f"{s3_url}/in", "output": out, "model": tiny_model_path,
                                          "files_per_shard": FILES_PER_SHARD, "device": "cpu",
                                          "storage_options": options, "max_failure_share": 0.0,
                                          "checkpoint_every": 1, **extra}))  # a fold after every record
        return [sys.executable, "-m", "pipeline.cli", "run", "--config", str(config)]

    out = f"{s3_url}/out"
    assert subprocess.run(command(out), capture_output=True, timeout=300).returncode == 0

    # the listing changes: 2 inputs removed (their rows are kept), 3 added
    fs.rm(f"{s3_url}/in/spk0/utt02.wav")
    fs.rm(f"{s3_url}/in/spk1/utt07.wav")
    for j, rel in enumerate(["spk0/new0.wav", "spk1/utt04b.wav", "zz.wav"]):
        write_clip(local, rel, 50 + j)
        fs.put_file(str(local / rel), f"{s3_url}/in/{rel}")
    kept = {"spk0/utt02.wav", "spk1/utt07.wav"}

    steps = [("PUT", "/_state/lock.json", 1), ("DELETE", "/data/", 1), ("PUT", "/data/", 1),
             ("PUT", "/_state/shards/", 1), ("PUT", "/data/", 2), ("PUT", "/manifest.json", 1),
             ("PUT", "/_state/checkpoints/", 1)]
    killed = []
    for method, part, nth in steps:
        proc = subprocess.Popen(command(out), start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        kill.arm(method, part, nth, proc.pid)
        proc.wait(timeout=300)
        time.sleep(2)  # a write already on the wire when the run died may still land (file, then record)
        if not kill.killed.is_set():  # the run got through without that step: it finished
            assert proc.returncode == 0, (method, part, nth)
            continue
        killed.append((method, part))
        ids = ids_in_files(out, direct)
        assert len(ids) == len(set(ids)), f"after a kill at {method} {part} #{nth}: duplicate rows"
    kill.target = None
    assert killed == [(method, part) for method, part, _ in steps]

    assert subprocess.run(command(out), capture_output=True, timeout=300).returncode == 0
    rows = read_output(out, direct)
    listing = reference_codes(f"{s3_url}/in", tiny_model_path, 8, FILES_PER_SHARD, direct)
    assert sorted(rows) == sorted([*listing, *kept])
    assert_codes_equal({k: v for k, v in rows.items() if k in listing}, listing)
    assert manifest.read_manifest(out, direct)["status"] == "complete"

    assert subprocess.run(command(out, prune=True), capture_output=True, timeout=300).returncode == 0
    clean = f"{s3_url}/clean"
    assert subprocess.run(command(clean), capture_output=True, timeout=300).returncode == 0
    assert file_digests(out, direct) == file_digests(clean, direct)
