"""End to end on a real local Ray instance (4 CPUs, 2 logical GPUs): real audio files in, Parquet out, codes equal
to the model's on the same decoded audio; failures, S3, rerun, refusals, and real worker deaths."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from audio_fixtures import FORMATS, corrupt_bytes, encode, write_audio, write_hub_parquet, write_tar
from audio_fixtures import signal as tone
from outputs import assert_codes_equal, read_output, reference_codes
from pipeline import manifest, storage
from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.runner import run
from pipeline.sources import discover_shards
from pipeline.lock import RunLock
from pipeline.writer import read_codes


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """9 good clips (WAV/FLAC/MP3, 8-48 kHz, mono/stereo, 0.3-2.5 s), a corrupt file and an empty file."""
    root = tmp_path_factory.mktemp("corpus")
    specs = [("wav_pcm16", 16_000, 0.3, 1), ("flac", 44_100, 1.1, 2), ("wav_float", 24_000, 2.5, 1),
             ("mp3", 22_050, 0.9, 1), ("wav_pcm24", 48_000, 0.5, 2), ("flac", 8_000, 1.7, 1),
             ("wav_pcm16", 32_000, 0.61, 1), ("wav_pcm16", 24_000, 1.0, 1), ("flac", 16_000, 2.0, 1)]
    for i, (fmt, sr, seconds, channels) in enumerate(specs):
        ext = "mp3" if fmt == "mp3" else "flac" if fmt == "flac" else "wav"
        write_audio(root / f"set{i % 2}" / f"clip{i:02d}.{ext}", fmt, sr, seconds, channels, seed=i)
    (root / "set0" / "corrupt.wav").write_bytes(corrupt_bytes())
    (root / "set1" / "empty.flac").write_bytes(b"")
    return root


def test_end_to_end(corpus, tiny_model_path, tmp_path, caplog, capsys, monkeypatch):
    out = str(tmp_path / "out")
    cfg = RunConfig(input=str(corpus), output=out, model=tiny_model_path, num_codebooks=8, files_per_shard=3,
                    batch_max_seconds=3.0, max_failure_share=0.5, progress_interval_s=0.5)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        assert run(cfg) == 0
    # one encoder per (logical) GPU, each in its own process with its own GPU id
    ups = re.findall(r"encoder \d+ up: (\w+) \(GPU ids \['(\d)'\]\)", caplog.text)
    assert sorted(gpu for _, gpu in ups) == ["0", "1"]
    assert {device for device, _ in ups} == {"cuda" if torch.cuda.is_available() else "cpu"}

    final = manifest.read_manifest(out)
    assert final["status"] == "complete" and final["totals"]["shards"] == len(discover_shards(str(corpus),
                                                                                             files_per_shard=3))
    assert (final["totals"]["clips"], final["totals"]["failed_clips"]) == (9, 2)
    assert final["precision"] == {"mode": "exact", "dtype": "float32", "tf32": False}
    failures = [f for s in manifest.load_done(out).values() for f in s["failures"]]
    assert sorted((f["clip_id"], f["stage"], f["error_class"]) for f in failures) == [
        ("set0/corrupt.wav", "decode", "DecodeError"), ("set1/empty.flac", "read", "ValueError")]
    assert all(f["source_uri"].startswith("file:///") and f["message"] for f in failures)

    # the Parquet output, read with pyarrow and with datasets, holds exactly the model's codes
    rows = read_output(out)
    assert_codes_equal(rows, reference_codes(str(corpus), tiny_model_path, 8, 3))
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=f"{out}/data/*.parquet", split="train")
    assert len(ds) == 9 and set(ds.column_names) >= {"id", "codes", "n_frames", "duration_s", "source_uri"}
    for row in ds:
        np.testing.assert_array_equal(read_codes(row), rows[row["id"]])
        assert row["n_frames"] == len(row["codes"]) == int(np.ceil(row["duration_s"] * 12.5 - 1e-9))

    # a second run on the finished output does nothing and leaves the manifest as it was; it lists the records once
    # (its plan reads them all from the checkpoint) and leaves the checkpoint as it is
    before = (tmp_path / "out" / "manifest.json").read_bytes()
    checkpoints = tmp_path / "out" / "_state" / "checkpoints"
    folded = sorted(checkpoints.iterdir())
    listed, list_table = [], storage.list_table
    monkeypatch.setattr(storage, "list_table", lambda url, *a, **kw: listed.append(url) or list_table(url, *a, **kw))
    assert run(cfg) == 0
    assert [url.rpartition("/_state/")[2] for url in listed if "/_state/shards" in url] == ["shards"]
    assert sorted(checkpoints.iterdir()) == folded
    shutil.rmtree(checkpoints)  # records without a checkpoint: a run with nothing to do folds them for the next
    assert run(cfg) == 0
    assert len(list(checkpoints.iterdir())) == 1
    # ... and its exit code follows max_failure_share: 2 of 11 clips failed
    assert main(["run", "--input", str(corpus), "--output", out, "--model", tiny_model_path, "--files-per-shard", "3",
                 "--max-failure-share", "0.1"]) == 1
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before

    # resuming with other settings is refused with a clear one-line error, exit code 2
    capsys.readouterr()
    assert main(["run", "--input", str(corpus), "--output", out, "--model", tiny_model_path, "--files-per-shard", "3",
                 "--num-codebooks", "4"]) == 2
    assert "num_codebooks: output has 8, this run has 4" in capsys.readouterr().err
    with pytest.raises(manifest.IncompatibleOutputError, match="dtype"):  # bf16 codes differ from float32 ones
        run(dataclasses.replace(cfg, dtype="bfloat16"))

    # status shows the output
    assert main(["status", out]) == 0
    assert f"status: complete — {final['totals']['shards']}/{final['totals']['shards']} shards done" in \
        capsys.readouterr().out


@pytest.mark.parametrize("kind", ["webdataset", "parquet"])
def test_container_inputs_keep_their_metadata(kind, tiny_model_path, tmp_path):
    """WebDataset tars (audio + .json/.txt sidecars) and Hub-style Parquet shards (an Audio column built with
    `datasets`) through the whole run: codes equal the model's, metadata passes through unchanged."""
    clips = [(f"utt{i}", encode(FORMATS[fmt], tone(sr, seconds, channels, seed=i), sr), FORMATS[fmt].ext)
             for i, (fmt, sr, seconds, channels) in enumerate([("flac", 44_100, 1.2, 2), ("wav_pcm16", 16_000, 0.7, 1),
                                                                ("ogg_vorbis", 48_000, 1.6, 1),
                                                                ("wav_float", 22_050, 0.4, 1)])]
    meta = {f"utt{i}": {"text": f"sentence {i}", "speaker": f"spk{i % 2}"} for i in range(len(clips))}
    root = tmp_path / "in"
    if kind == "webdataset":
        for part, group in enumerate((clips[:2], clips[2:])):
            write_tar(root / f"part-{part}.tar", [
                (key, {ext: data, "json": json.dumps({"speaker": meta[key]["speaker"]}).encode(),
                       "txt": meta[key]["text"].encode()}) for key, data, ext in group])
        expected_ids = {f"part-{i // 2}.tar/utt{i}" for i in range(4)}
    else:
        write_hub_parquet(root / "train-00000.parquet", [{"bytes": d, "path": f"{k}.{e}"} for k, d, e in clips],
                          text=[meta[k]["text"] for k, _, _ in clips], speaker=[meta[k]["speaker"] for k, _, _ in clips])
        expected_ids = {f"train-00000.parquet/{k}.{e}" for k, _, e in clips}
    out = str(tmp_path / "out")
    assert main(["run", "--input", str(root), "--output", out, "--model", tiny_model_path, "--device", "cpu"]) == 0
    rows = read_output(out)
    assert set(rows) == expected_ids
    assert_codes_equal(rows, reference_codes(str(root), tiny_model_path, 8, 256))
    table = pq.read_table(f"{out}/data")
    for clip_id, text, speaker in zip(*(table.column(c).to_pylist() for c in ("id", "text", "speaker"))):
        key = clip_id.rsplit("/", 1)[1].split(".")[0]
        assert (text, speaker) == (meta[key]["text"], meta[key]["speaker"])


def test_locked_output_is_refused(corpus, tiny_model_path, tmp_path, capsys):
    out = str(tmp_path / "out")
    lock = RunLock(out, run_id="other-run", settle_s=0)
    lock.acquire()
    try:
        assert main(["run", "--input", str(corpus), "--output", out, "--model", tiny_model_path]) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert "is locked by run 'other-run'" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "data").exists()


def test_expected_errors_are_one_line(tmp_path, tiny_model_path, capsys):
    assert main(["run", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o"),
                 "--model", tiny_model_path]) == 2
    assert main(["run", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o"),
                 "--model", str(tmp_path / "nope.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "input not found" in err[0] and "neither a local file" in err[1]


def test_s3_input_and_output(corpus, tiny_model_path, s3_server, s3_url):
    import s3fs

    options = s3_server["storage_options"]
    s3fs.S3FileSystem(**options).put(str(corpus) + "/", f"{s3_url}/in/", recursive=True)
    cfg = RunConfig(input=f"{s3_url}/in", output=f"{s3_url}/out", model=tiny_model_path, files_per_shard=4,
                    max_failure_share=0.5, storage_options=options)
    assert run(cfg) == 0
    rows = read_output(cfg.output, options)
    assert_codes_equal(rows, reference_codes(cfg.input, tiny_model_path, 8, 4, options))
    final = manifest.read_manifest(cfg.output, options)
    assert final["status"] == "complete" and final["totals"]["failed_clips"] == 2
    assert final["config"]["storage_options"]["secret"] == manifest.REDACTED
    assert "testing" not in json.dumps(final["config"]["storage_options"])


def own_processes() -> set[int]:
    """Pids of this test process's descendants: the Ray cluster it started, and that cluster's workers only."""
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parents[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    ours, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier and pid not in ours}
        ours |= frontier
    return ours


class Killer(threading.Thread):
    """Kills (SIGSEGV) this test's own Ray worker processes whose title starts with a prefix, up to a number of times
    each: real worker deaths, chosen by the task names the runner gives (``decode:{shard}``, ``decode:{shard}#{i}``).
    Processes of any other Ray cluster on the machine are never touched."""

    def __init__(self, budgets: dict[str, int]):
        super().__init__(daemon=True)
        self.budgets, self.kills, self.done = dict(budgets), [], threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for pid in own_processes():
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
                except OSError:
                    continue
                for prefix, left in self.budgets.items():
                    if left and title.startswith(prefix) and (prefix, pid) not in self.kills:
                        os.kill(pid, signal.SIGSEGV)
                        self.budgets[prefix] -= 1
                        self.kills.append((prefix, pid))
            time.sleep(0.003)


def test_worker_deaths_are_retried_and_isolated(tiny_model_path, tmp_path):
    root = tmp_path / "in"
    for i, seconds in enumerate([1.0, 2.0, 1.5]):
        write_audio(root / f"a{i}.wav", "wav_pcm16", 16_000, seconds, seed=i)
    write_audio(root / "b_bad.flac", "flac", 48_000, 120.0)  # killed whenever it is decoded
    write_audio(root / "c0.wav", "wav_pcm16", 24_000, 3.0, seed=9)
    shards = discover_shards(str(root), files_per_shard=2)
    [bad_shard] = [s for s in shards if "b_bad.flac" in [m.key for m in s.members]]
    bad_index = [m.key for m in bad_shard.members].index("b_bad.flac")
    killer = Killer({f"ray::decode:{bad_shard.shard_id}": 2, f"ray::decode:{bad_shard.shard_id}#{bad_index}": 2,
                     "ray::ShardEncoder": 1})
    killer.start()
    cfg = RunConfig(input=str(root), output=str(tmp_path / "out"), model=tiny_model_path, files_per_shard=2,
                    shard_retries=1, max_failure_share=0.5)
    try:
        code = run(cfg)
    finally:
        killer.done.set()
        killer.join()
    assert sorted({p for p, _ in killer.kills}) == sorted(killer.budgets) and not any(killer.budgets.values())
    assert code == 0
    done = manifest.load_done(cfg.output)
    assert sorted(done) == sorted(s.shard_id for s in shards)
    [failure] = done[bad_shard.shard_id]["failures"]
    assert (failure["clip_id"], failure["stage"]) == ("b_bad.flac", "crash")
    assert all(r["attempt"] == 1 for r in done.values())  # a lost encoder charges no attempt
    ref = reference_codes(str(root), tiny_model_path, 8, 2)
    del ref["b_bad.flac"]
    assert_codes_equal(read_output(cfg.output), ref)
