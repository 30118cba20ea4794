"""Never complete, exit 0 and wrong: a retried commit writes the same file again, metadata types widen across runs and
never change a value, a damaged container is never a quiet short shard, and audio rewritten in place under a
manifest's URI is encoded again. Real runs on a local Ray, the S3 server behind the fault proxy, real tars and
Parquet files."""

from __future__ import annotations

import json
import os
import tarfile
import threading
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from audio_fixtures import wav_bytes, signal, write_audio, write_hub_parquet, write_jsonl, write_tar
from outputs import assert_codes_equal, read_output, reference_codes
from pipeline import manifest, scheduler
from pipeline.config import RunConfig
from pipeline.runner import run
from pipeline.sources import discover_shards, iter_clips
from pipeline.types import ClipFailure


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def config(corpus: str, out: str, model: str, **overrides) -> RunConfig:
    return RunConfig(**{"input": corpus, "output": out, "model": model, "files_per_shard": 8, "device": "cpu",
                        "max_failure_share": 0.0, **overrides})


def wav(i: int, seconds: float = 0.2) -> bytes:
    return wav_bytes(signal(16_000, seconds, seed=i), 16_000)


def test_a_retried_commit_writes_its_kept_rows_once(tmp_path, s3_server, s3_url, fault_proxy, tiny_model_path,
                                                     monkeypatch):
    """The issue's case: 24 files on S3, one deleted, the rerun's record PUTs refused (503 SlowDown) for a while after
    the changed shard's file is written. Its first attempt writes new rows + the kept row, then fails before its
    record; the retry must write that same file again (23 listed clips + 1 kept, each once), not the new rows twice."""
    monkeypatch.setattr(scheduler, "RETRY_BACKOFF_S", 1.0)
    direct = s3_server["storage_options"]
    s3 = fsspec.filesystem("s3", **direct)
    for i in range(24):
        s3.pipe_file(f"{s3_url}/in/utt{i:03d}.wav", wav(i, 0.15 + 0.01 * (i % 7)))
    assert run(config(f"{s3_url}/in", f"{s3_url}/out", tiny_model_path, storage_options=direct)) == 0
    before = read_output(f"{s3_url}/out", direct)
    shard = next(s for s in discover_shards(f"{s3_url}/in", files_per_shard=8, storage_options=direct)
                 if len(s.members) >= 3)
    gone = shard.members[1].key  # not its first key: the shard keeps its id, and its new file carries the row
    s3.rm_file(f"{s3_url}/in/{gone}")

    data_puts, refusing = [], threading.Event()

    def after(method: str, path: str, status: int) -> None:
        if method == "PUT" and path.endswith(f"/out/data/{shard.shard_id}.parquet"):
            data_puts.append(path)
            if len(data_puts) == 2:  # its commit (the first write is the retire's: the kept row alone)
                refusing.set()
                threading.Timer(4.0, refusing.clear).start()

    proxy, options = fault_proxy(on_request=after, answer=lambda method, path: (
        (503, "SlowDown") if method == "PUT" and path.endswith(f"/{shard.shard_id}.json") and refusing.is_set()
        else None))
    proxy.set_faults(True)
    options["config_kwargs"] = {"retries": {"total_max_attempts": 1}}  # botocore's own retries would ride it out
    cfg = config(f"{s3_url}/in", f"{s3_url}/out", tiny_model_path, storage_options=options, storage_retry_s=1.5,
                 shard_retries=4)
    assert run(cfg) == 0
    assert proxy.stats["SlowDown"] > 0 and len(data_puts) >= 3  # the record was refused, and the file written again

    rows = read_output(cfg.output, direct)  # asserts that no id is in two rows
    assert len(rows) == 24
    ref = reference_codes(cfg.input, tiny_model_path, 8, 8, direct)
    assert_codes_equal({k: v for k, v in rows.items() if k != gone}, ref)
    assert np.array_equal(rows[gone], before[gone])  # the kept row, as it was
    final = manifest.read_manifest(cfg.output, direct)
    assert final["status"] == "complete" and final["totals"]["clips"] == 24 and final["totals"]["kept_clips"] == 1
    assert max(e["attempt"] for e in manifest.shard_entries(cfg.output, final, direct)) >= 2


def _sidecar_tar(path: Path, first: int, n: int, sidecar: dict) -> None:
    write_tar(path, [(f"k{i:03d}", {"wav": wav(i), "json": json.dumps(sidecar).encode()})
                     for i in range(first, first + n)])


def test_sidecar_types_widen_across_runs_and_no_value_changes(tmp_path, tiny_model_path):
    """Three tars with {"duration": 5, "speaker": "spk1"}, then a fourth with {"duration": 12.75, "speaker": 7}: the
    rerun succeeds, duration becomes float in every file (12.75 kept exactly, not 12), and speaker becomes JSON text
    in every file (int and string cannot meet), as the README promises; the output loads as one dataset."""
    corpus, out = tmp_path / "in", tmp_path / "out"
    for t in range(3):
        _sidecar_tar(corpus / f"part-{t}.tar", 3 * t, 3, {"duration": 5, "speaker": "spk1"})
    assert run(config(str(corpus), str(out), tiny_model_path)) == 0
    _sidecar_tar(corpus / "part-3.tar", 9, 3, {"duration": 12.75, "speaker": 7})
    assert run(config(str(corpus), str(out), tiny_model_path)) == 0

    values = {}
    for path in sorted((out / "data").glob("*.parquet")):
        table = pq.read_table(path)
        assert str(table.schema.field("duration").type) == "double"
        assert table.schema.field("speaker").metadata == {b"mimi_tokenize.encoding": b"json"}
        for row in table.select(["id", "duration", "speaker"]).to_pylist():
            values[row["id"]] = (row["duration"], json.loads(row["speaker"]))
    assert len(values) == 12
    assert {v for k, v in values.items() if k.startswith("part-3")} == {(12.75, 7)}
    assert {v for k, v in values.items() if not k.startswith("part-3")} == {(5.0, "spk1")}

    from datasets import load_dataset
    dataset = load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    assert dataset.num_rows == 12


def _cut(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_a_tar_cut_short_is_not_done_until_it_is_whole(tmp_path, tiny_model_path):
    """A tar cut after about half of its 20 clips: the clips before the cut are written, the shard is recorded
    partial (not done), the run exits 1, and every rerun tries again without duplicating a row; once the tar is
    whole, the rerun completes it with all 20 clips once."""
    corpus, out = tmp_path / "in", tmp_path / "out"
    whole = tmp_path / "whole.tar"
    write_tar(whole, [(f"k{i:03d}", {"wav": wav(i)}) for i in range(20)])
    corpus.mkdir()
    (corpus / "a.tar").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    cfg = config(str(corpus), str(out), tiny_model_path, max_failure_share=1.0)
    for _ in range(2):
        assert run(cfg) == 1
        final = manifest.read_manifest(str(out))
        (entry,) = manifest.shard_entries(str(out), final)
        assert entry["status"] == "partial" and final["status"] == "incomplete"
        assert 5 <= final["totals"]["clips"] < 20 and final["totals"]["partial_shards"] == 1
        assert len(read_output(str(out))) == final["totals"]["clips"]  # each once
    (corpus / "a.tar").write_bytes(whole.read_bytes())
    assert run(cfg) == 0
    assert len(read_output(str(out))) == 20


def test_a_tar_cut_at_a_member_boundary_is_a_container_failure(tmp_path):
    """tarfile reads a tar cut exactly between two members as a complete, shorter tar: the missing end-of-archive
    marker gives it away."""
    path = tmp_path / "a.tar"
    write_tar(path, [(f"k{i:03d}", {"wav": wav(i)}) for i in range(10)])
    with tarfile.open(path) as tar:
        fifth = tar.getmembers()[4]
    _cut(path, fifth.offset_data + -(-fifth.size // 512) * 512)
    (shard,) = discover_shards(str(path))
    items = list(iter_clips(shard))
    assert [i.clip_id for i in items[:5]] == [f"a.tar/k{i:03d}" for i in range(5)]
    assert isinstance(items[5], ClipFailure) and items[5].stage == "container" and len(items) == 6


def test_a_damaged_parquet_input_accounts_for_every_row(tmp_path):
    """A Hub Parquet file whose third row group is damaged: the other row groups are read, and every row the footer
    says the file holds is either a clip or a failure of its own (none vanishes from the accounting)."""
    path = tmp_path / "in" / "train-0.parquet"
    write_hub_parquet(path, [{"bytes": wav(i), "path": f"c{i:02d}.wav"} for i in range(40)], row_group_size=8,
                      speaker=[f"s{i % 3}" for i in range(40)])
    group = pq.ParquetFile(path).metadata.row_group(2)
    (column,) = [group.column(c) for c in range(group.num_columns) if group.column(c).path_in_schema == "audio.bytes"]
    offset = column.dictionary_page_offset or column.data_page_offset  # the column chunk's first page header
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 16)
    (shard,) = discover_shards(str(path))
    items = list(iter_clips(shard))
    ids = [i.clip_id for i in items]
    assert ids == [f"train-0.parquet/c{i:02d}.wav" for i in range(40)]
    failed = [i for i in items if isinstance(i, ClipFailure)]
    assert [f.clip_id for f in failed] == ids[16:24]
    assert all(f.stage == "read" and "row group" not in f.message and "could not be read" in f.message for f in failed)


def test_manifest_audio_rewritten_in_place_is_encoded_again(tmp_path, tiny_model_path):
    """A manifest row's audio replaced under the same URI (same size, new content): its shard is redone, the
    others are not."""
    audio = tmp_path / "audio"
    for i in range(6):
        write_audio(audio / f"c{i}.wav", "wav_pcm16", 16_000, 0.3, seed=i)
    write_jsonl(tmp_path / "m.jsonl", [{"id": f"c{i}", "audio": f"audio/c{i}.wav"} for i in range(6)])
    out = tmp_path / "out"
    cfg = config(str(tmp_path / "m.jsonl"), str(out), tiny_model_path, files_per_shard=2)
    assert run(cfg) == 0
    records = {k: r["finished"] for k, r in manifest.load_records(str(out))[0].items()}
    stat = (audio / "c3.wav").stat()
    write_audio(audio / "c3.wav", "wav_pcm16", 16_000, 0.3, seed=99)
    os.utime(audio / "c3.wav", (stat.st_atime + 10, stat.st_mtime + 10))
    assert (audio / "c3.wav").stat().st_size == stat.st_size
    assert run(cfg) == 0
    assert_codes_equal(read_output(str(out)), reference_codes(cfg.input, tiny_model_path, 8, 2))
    after = {k: r["finished"] for k, r in manifest.load_records(str(out))[0].items()}
    assert sum(after[k] != records[k] for k in records) == 1


def test_a_run_that_loses_its_lease_stops_writing_and_another_completes(tmp_path, s3_server, s3_url, fault_proxy,
                                                                         tiny_model_path, monkeypatch):
    """Two runs on one S3 output. Run A's store browns out (every request 503) right after its second commit: it
    cannot renew its 6 s lease, so its commits stop retrying when the lease ends and it stops itself; run B, waiting
    for the lock, takes it over once A's lease has expired (epoch 2) and completes the output. Not one of A's writes
    reaches the store after the brownout began, the output equals the model's codes with each clip once, and a
    third run finds nothing to redo."""
    monkeypatch.setattr(scheduler, "RETRY_BACKOFF_S", 1.0)
    direct = s3_server["storage_options"]
    corpus = tmp_path / "in"
    for i in range(16):
        write_audio(corpus / f"utt{i:03d}.wav", "wav_pcm16", 16_000, 0.3, seed=i)
    out = f"{s3_url}/out"
    brownout, writes_after = threading.Event(), []

    def after(method: str, path: str, status: int) -> None:
        if brownout.is_set() and method in ("PUT", "POST", "DELETE"):
            writes_after.append(f"{method} {path}")
        if method == "PUT" and "/out/_state/shards/" in path and sum(1 for _ in after.records) == 1:
            brownout.set()
        if method == "PUT" and "/out/_state/shards/" in path:
            after.records.append(path)

    after.records = []
    proxy, options = fault_proxy(on_request=after,
                                 answer=lambda method, path: (503, "SlowDown") if brownout.is_set() else None)
    proxy.set_faults(True)
    options["config_kwargs"] = {"retries": {"total_max_attempts": 1}}
    common = dict(files_per_shard=2, lock_lease_s=6.0, storage_retry_s=30.0, decode_tasks_per_encoder=1)
    outcome: list = []

    def run_a() -> None:
        try:
            outcome.append(run(config(str(corpus), out, tiny_model_path, storage_options=options, **common)))
        except Exception as exc:
            outcome.append(exc)

    a = threading.Thread(target=run_a)
    a.start()
    assert brownout.wait(timeout=120), "run A never committed"
    assert run(config(str(corpus), out, tiny_model_path, storage_options=direct, lock_wait_s=60, **common)) == 0
    a.join(timeout=120)
    brownout.clear()
    assert not a.is_alive() and outcome and not outcome[0] == 0, outcome
    assert "lock" in str(outcome[0])
    assert writes_after == []  # nothing of A's reached the store once its lease could not be renewed

    lock = json.loads(fsspec.filesystem("s3", **direct).cat_file(f"{out}/_state/lock.json"))
    assert [h["epoch"] for h in lock["history"]] == [1, 2] and lock["released"]
    records, _ = manifest.load_records(out, direct)
    assert {r["epoch"] for r in records.values()} == {1, 2}
    assert len(records) == len(discover_shards(str(corpus), files_per_shard=2))
    assert_codes_equal(read_output(out, direct), reference_codes(str(corpus), tiny_model_path, 8, 2))
    assert run(config(str(corpus), out, tiny_model_path, storage_options=direct, **common)) == 0
    assert manifest.load_records(out, direct)[0] == records  # nothing redone
