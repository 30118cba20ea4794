"""Runs on S3 (moto on loopback) behind a fault-injecting proxy (tests/fault_proxy.py): storage outages, connection
resets, 500s and responses cut mid-body. A transient error is never charged to a clip; an outage longer than the
retry window fails the attempt, leaves the shard undone, and the next run completes it; nothing is lost or
duplicated."""

from __future__ import annotations

import json
import subprocess
import sys
import os
import time
from pathlib import Path

import fsspec
import pytest
import ray
import yaml

from audio_fixtures import write_audio
from outputs import assert_codes_equal, read_output, reference_codes
from pipeline import manifest, retry
from pipeline.config import RunConfig
from pipeline.runner import run


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def corpus(root: Path, n: int) -> Path:
    for i in range(n):
        write_audio(root / f"spk{i % 7}" / f"utt{i:03d}.wav", "wav_pcm16", 16_000, 0.2 + 0.05 * (i % 9), seed=i)
    return root


def upload(local: Path, url: str, storage_options: dict) -> None:
    fsspec.filesystem("s3", **storage_options).put(f"{local}/", f"{url}/", recursive=True)


def test_outages_resets_and_500s_lose_nothing(tmp_path, s3_server, s3_url, fault_proxy, tiny_model_path):
    """The store answers 503 SlowDown or resets every connection for 15 s out of every 30, and fails 3 % of the other
    requests (500, reset, cut-off body): 102 clips, S3 in and out, all encoded once, no clip failed."""
    direct = s3_server["storage_options"]
    upload(corpus(tmp_path / "in", 102), f"{s3_url}/in", direct)
    proxy, options = fault_proxy(every_s=30, outage_s=15, mode="mixed", error_rate=0.03, seed=7)
    proxy.set_faults(True)
    cfg = RunConfig(input=f"{s3_url}/in", output=f"{s3_url}/out", model=tiny_model_path, files_per_shard=8,
                    storage_options=options, progress_interval_s=5, max_failure_share=0.0)
    assert run(cfg) == 0
    proxy.set_faults(False)
    stats = dict(proxy.stats)
    assert stats.get("503", 0) and stats.get("reset", 0) and stats.get("500", 0), stats

    final = manifest.read_manifest(cfg.output, direct)
    assert final["status"] == "complete" and final["totals"]["failed_clips"] == 0, final["totals"]
    assert_codes_equal(read_output(cfg.output, direct), reference_codes(cfg.input, tiny_model_path, 8, 8, direct))


def test_an_outage_past_the_retry_window_fails_the_attempt_not_the_clips(tmp_path, s3_server, s3_url, fault_proxy,
                                                                          tiny_model_path):
    """With a 2 s retry window (and botocore's own retries off, so that they do not ride out the outage first), an
    outage of 15 s that starts at the first shard commit: the run ends non-zero with shards left undone and not a
    single clip recorded as failed; once the store is back, the same command completes the output with every clip
    once."""
    direct = s3_server["storage_options"]
    upload(corpus(tmp_path / "in", 12), f"{s3_url}/in", direct)

    def outage_at_first_commit(method: str, path: str, status: int) -> None:
        if method == "PUT" and "/out/data/" in path and not proxy.faults:
            proxy.every_s, proxy.outage_s, proxy.mode = 1000, 15, "mixed"
            proxy.set_faults(True)

    proxy, options = fault_proxy(on_request=outage_at_first_commit)
    options["config_kwargs"] = {"retries": {"max_attempts": 1}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "input": f"{s3_url}/in", "output": f"{s3_url}/out", "model": tiny_model_path, "files_per_shard": 2,
        "storage_options": options, "storage_retry_s": 2, "shard_retries": 0, "device": "cpu"}))
    first = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", str(config)], timeout=300,
                           capture_output=True, text=True, env=os.environ)
    assert first.returncode == 1, first.stderr[-3000:]
    assert proxy.stats["503"] + proxy.stats["reset"] > 0
    assert "still failing after" in first.stderr  # the log names the storage error that failed the attempts

    records, files = manifest.load_records(f"{s3_url}/out", direct)
    assert all(r["failed"] == 0 for r in records.values())  # nothing charged to a clip
    assert sum(r["rows"] for r in records.values()) < 12  # some shards were left undone

    proxy.set_faults(False)
    time.sleep(0.5)
    cfg = RunConfig(**{**yaml.safe_load(config.read_text()), "storage_retry_s": 60.0, "device": "auto"})
    assert run(cfg) == 0
    final = manifest.read_manifest(cfg.output, direct)
    assert final["status"] == "complete" and final["totals"]["failed_clips"] == 0
    assert_codes_equal(read_output(cfg.output, direct), reference_codes(cfg.input, tiny_model_path, 8, 2, direct))


def test_transient_and_permanent_errors_are_told_apart():
    """The classification every retry and every clip failure rests on, on the errors the clients really raise."""
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    transient = [OSError(16, "SlowDown"), OSError(121, "InternalError"), OSError("unknown S3 error"),
                 PermissionError("ExpiredToken"), ConnectionResetError(), TimeoutError(), MemoryError(),
                 EndpointConnectionError(endpoint_url="http://x"), ConnectionClosedError(endpoint_url="http://x"),
                 ReadTimeoutError(endpoint_url="http://x"),
                 RuntimeError("CUDA error: an illegal memory access was encountered"),
                 retry.StorageUnavailable("read x: still failing")]
    permanent = [FileNotFoundError("NoSuchKey"), IsADirectoryError(), OSError(22, "InvalidRange"),
                 ValueError("no audio bytes"), RuntimeError("shapes do not match")]
    assert [retry.is_transient(e) for e in transient] == [True] * len(transient)
    assert [retry.is_transient(e) for e in permanent] == [False] * len(permanent)
    try:  # a decode error caused by a transient-looking error is still the clip's own
        try:
            raise ConnectionResetError()
        except ConnectionResetError as exc:
            raise ValueError("undecodable") from exc
    except ValueError as exc:
        assert not retry.is_transient(exc)


def test_retry_backs_off_and_gives_up_after_the_window(monkeypatch):
    sleeps = []
    monkeypatch.setattr(retry.time, "sleep", sleeps.append)
    clock = iter(range(0, 10_000, 7))  # every call to monotonic() advances the clock by 7 s
    monkeypatch.setattr(retry.time, "monotonic", lambda: next(clock))
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionResetError("reset")
        return "ok"

    policy = retry.RetryPolicy(outage_s=1000, base_s=1, max_delay_s=8)
    assert retry.call(flaky, what="read x", retry=policy) == "ok" and len(calls) == 4
    assert len(sleeps) == 3 and all(0 <= s <= cap for s, cap in zip(sleeps, [1, 2, 4]))  # full jitter, doubling

    with pytest.raises(retry.StorageUnavailable, match="read y: still failing after .* retry window"):
        retry.call(lambda: (_ for _ in ()).throw(OSError(16, "SlowDown")), what="read y",
                   retry=retry.RetryPolicy(outage_s=30, base_s=1))
    with pytest.raises(FileNotFoundError):  # permanent: raised at once, never retried
        retry.call(lambda: (_ for _ in ()).throw(FileNotFoundError("gone")), what="read z", retry=policy)


def test_healthy_store_costs_no_retries(s3_server, s3_url, fault_proxy):
    """Through the proxy with faults off: every request is forwarded once (the retry layer adds no request)."""
    proxy, options = fault_proxy()
    fs = fsspec.filesystem("s3", **options)
    retry.call(fs.pipe_file, f"{s3_url}/x.json", json.dumps({"a": 1}).encode(), what="write")
    assert json.loads(retry.call(fs.cat_file, f"{s3_url}/x.json", what="read")) == {"a": 1}
    assert proxy.stats["requests"] == proxy.stats["forwarded"] and not set(proxy.stats) - {"requests", "forwarded"}
