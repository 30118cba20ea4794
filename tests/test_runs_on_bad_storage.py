"""Runs on storage that answers badly, on a real Ray instance.

* S3 inputs (moto behind the fault proxy) that are archived or denied: those clips fail, recorded with the store's
  code, and the rest of their shard is written.
* An output that fills up, or is read-only, stops the run at once: on a real filesystem (a small tmpfs mounted for
  the test; skipped where mounting is not permitted). What was committed is kept and valid, the shards not yet
  started are not decoded, the run ends with one error line and exit 1, and the same command completes once there
  is room."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import time
from pathlib import Path

import fsspec
import pytest
import ray

from audio_fixtures import write_audio
from outputs import read_output
from pipeline import cli, manifest, retry, runner, scheduler
from pipeline.config import RunConfig
from pipeline.runner import run
from pipeline.types import Shard

CLIPS = 16


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def test_archived_and_denied_objects_fail_their_clips_the_rest_is_written(tmp_path, s3_server, s3_url, fault_proxy,
                                                                          tiny_model_path):
    """GETs of one object answer 403 InvalidObjectState (archived), of another 403 AccessDenied, of a third 503
    SlowDown twice: the first two are recorded as ``read`` failures naming the store's code, everything else of
    their shard (the throttled clip included) is encoded, and the run ends complete."""
    for i in range(6):
        write_audio(tmp_path / "in" / f"utt{i}.wav", "wav_pcm16", 16_000, 0.3, seed=i)
    fsspec.filesystem("s3", **s3_server["storage_options"]).put(f"{tmp_path / 'in'}/", f"{s3_url}/in/",
                                                                recursive=True)
    throttled = []

    def answer(method: str, path: str):
        if method == "GET" and path.endswith("/in/utt1.wav"):
            return 403, "InvalidObjectState"
        if method == "GET" and path.endswith("/in/utt2.wav"):
            return 403, "AccessDenied"
        if method == "GET" and path.endswith("/in/utt3.wav") and len(throttled) < 2:
            throttled.append(path)
            return 503, "SlowDown"
        return None

    _, options = fault_proxy(answer=answer)
    cfg = RunConfig(input=f"{s3_url}/in", output=f"{s3_url}/out", model=tiny_model_path, files_per_shard=64,
                    storage_options=options, storage_retry_s=5, shard_retries=0, max_failure_share=0.5,
                    device="cpu")
    started = time.monotonic()
    assert run(cfg) == 0
    assert time.monotonic() - started < 60
    records, _ = manifest.load_records(cfg.output, s3_server["storage_options"])
    [record] = records.values()
    assert record["status"] == "done" and record["rows"] == 4, record
    failures = {f["clip_id"]: f for f in record["failures"]}
    assert sorted(failures) == ["utt1.wav", "utt2.wav"] and {f["stage"] for f in failures.values()} == {"read"}
    assert failures["utt1.wav"]["message"].startswith("InvalidObjectState, HTTP 403")
    assert failures["utt2.wav"]["message"].startswith("AccessDenied, HTTP 403")
    assert len(throttled) == 2


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(options)``: (re)mount a tmpfs at ``tmp_path/out-disk`` with those options; unmounted after the test."""
    where = tmp_path / "out-disk"
    where.mkdir()
    mounted = []

    def mount(options: str) -> Path:
        command = ["mount", "-o", f"remount,{options}", str(where)] if mounted else [
            "mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): needs root and mount rights")
        mounted.append(options)
        return where

    try:
        yield mount
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], check=False)


def run_cli(args: list[str], capsys) -> tuple[int, list[str]]:
    """Exit code and the CLI's own stderr lines (not Ray's forwarded worker logs)."""
    code = cli.main(args)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("mimi-tokenize")]


def command(tmp_path: Path, output: Path, model: str) -> list[str]:
    for i in range(CLIPS):
        write_audio(tmp_path / "in" / f"utt{i:02d}.wav", "wav_pcm16", 16_000, 0.3 + 0.02 * i, seed=i)
    return ["run", "--input", str(tmp_path / "in"), "--output", str(output), "--model", model, "--files-per-shard",
            "2", "--device", "cpu", "--num-encoders", "1", "--decode-tasks-per-encoder", "1", "--storage-retry-s", "5"]


def test_a_full_output_stops_the_run_and_the_rerun_completes(tmp_path, tmpfs, tiny_model_path, monkeypatch, capsys,
                                                              caplog):
    """A 40 kB disk holds the run's state and a few shards (a file and its record take 4 kB pages each)."""
    monkeypatch.setattr(runner, "MIN_FREE_BYTES", 0, raising=False)
    caplog.set_level(logging.INFO, logger="pipeline")
    output = tmpfs("size=40k") / "tokens"
    args = command(tmp_path, output, tiny_model_path)

    code, lines = run_cli(args, capsys)
    assert code == 1 and len(lines) == 1, lines
    assert "No space left on device" in lines[0] and "run the same command again" in lines[0], lines
    records, files = manifest.load_records(str(output))
    assert records, "no shard fitted: the disk is too small for this test"
    for record in records.values():  # what was committed is whole
        data = (output / record["file"]).read_bytes()
        assert manifest.file_matches(record, files) and hashlib.sha256(data).hexdigest() == record["sha256"]
    not_started = [r.getMessage() for r in caplog.records if "shard(s) not started" in r.getMessage()]
    assert len(not_started) == 1 and int(not_started[0].split()[0]) >= 2, not_started  # it stopped at once
    total = int(not_started[0].split()[0]) + len(records) + 1
    assert "the manifest could not be written" in caplog.text

    tmpfs("size=4m")
    code, lines = run_cli(args, capsys)
    assert code == 0 and not lines, lines
    rows = read_output(str(output))  # asserts every clip is there once
    assert sorted(rows) == [f"utt{i:02d}.wav" for i in range(CLIPS)]
    assert len(manifest.load_records(str(output))[0]) == total


def test_a_read_only_or_nearly_full_output_is_refused_at_the_start(tmp_path, tmpfs, tiny_model_path, monkeypatch,
                                                                    capsys):
    output = tmpfs("size=1m") / "tokens"
    args = command(tmp_path, output, tiny_model_path)
    code, lines = run_cli(args, capsys)
    assert code == 2 and len(lines) == 1 and "MB free on the disk of" in lines[0], lines

    monkeypatch.setattr(runner, "MIN_FREE_BYTES", 0, raising=False)
    tmpfs("ro")
    code, lines = run_cli(args, capsys)
    assert code == 1 and len(lines) == 1 and "Read-only file system" in lines[0], lines


@ray.remote
class StubEncoder:
    """An encoder whose commits find the output full (shard ``full``), take long (``slow``) or succeed."""

    def info(self) -> dict:
        return {"device": "cpu", "gpu_ids": [], "node": ray.get_runtime_context().get_node_id()}

    def process(self, shard_id: str) -> dict:
        if shard_id == "slow":
            time.sleep(60)
        if shard_id == "full":
            raise retry.OutputUnwritable("cannot write out/data/full.parquet: [Errno 28] No space left on device")
        return {"shard": shard_id}


def test_the_scheduler_drains_for_a_bounded_time_and_starts_nothing_more(monkeypatch):
    """Two slots: ``slow`` is in flight when ``full`` fails; nothing else is started, ``slow`` is waited for
    DRAIN_WAIT_S only, and the run stops with every shard accounted for."""
    monkeypatch.setattr(scheduler, "DRAIN_WAIT_S", 2.0)
    pool = scheduler.EncoderPool(StubEncoder.options(max_concurrency=2).remote, fixed=1, use_gpus=False, slots=2)
    jobs = [scheduler.Job(Shard(name, "files", "x", "x", "")) for name in ("slow", "full", "a", "b")]
    done = []
    stopping = scheduler.Scheduler(pool, jobs, submit=lambda e, job: e.handle.process.remote(job.shard.shard_id),
                                   on_done=done.append, shard_retries=0, encoder_wait_s=60, wait_log_s=60)
    started = time.monotonic()
    try:
        errors = stopping.run(lambda: None)
    finally:
        pool.shutdown()
    assert time.monotonic() - started < 20
    assert isinstance(stopping.fatal, retry.OutputUnwritable) and "No space left" in str(stopping.fatal)
    assert not done and sorted(errors) == ["a", "b", "full", "slow"]
    assert errors["a"].startswith("not started") and errors["slow"].startswith("not finished")
