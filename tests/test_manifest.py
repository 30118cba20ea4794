"""pipeline.manifest: done records, resume state, run compatibility, manifest totals, redaction."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest

from pipeline import index
from pipeline import manifest as mf
from pipeline import progress, storage
from pipeline.plan import Retire
from pipeline.types import ClipFailure, ClipInfo, EncodedClip, Member, Shard
from pipeline.writer import SCHEMA_VERSION, write_shard

MODEL = {"source": "kyutai/mimi", "revision": "main", "sha256": "ab" * 32}
T0 = 1_700_000_000.0


def _write_shard(root: str, shard: Shard, n_clips: int, frames: int, failures: list[ClipFailure], *,
                 finished: float, so=None) -> dict:
    rows = [EncodedClip(ClipInfo(i, f"{shard.shard_id}-{i}", f"{shard.uri}/{i}.wav", 16_000, 1),
                        np.ones((8, frames), np.int64), frames * 1920) for i in range(n_clips)]
    result = write_shard(storage.join(root, mf.shard_file(shard.shard_id)), rows, num_codebooks=8,
                         file_metadata={}, storage_options=so)
    return mf.write_record(root, shard, result, failures, started=finished - 10, finished=finished,
                                attempt=1, storage_options=so)


def _shards(n: int) -> list[Shard]:
    return [Shard(f"shard-{i:05d}", "files", f"/in/{i}", f"/in/{i}", f"digest-{i}",
                  members=(Member("a.wav", f"/in/{i}/a.wav"),)) for i in range(n)]


def _failure(cls: str) -> ClipFailure:
    return ClipFailure("c", "/in/c.wav", "decode", cls, "bad header")


def test_done_record_layout(tmp_path):
    root = str(tmp_path)
    shard = _shards(1)[0]
    record = _write_shard(root, shard, 3, 25, [_failure("DecodeError")], finished=T0)
    on_disk = storage.read_json(storage.join(root, "_state/shards/shard-00000.json"))
    assert on_disk == record
    assert record["shard"] == {"shard_id": "shard-00000", "kind": "files", "uri": "/in/0", "digest": "digest-0"}
    assert (record["status"], record["carried"], record["schema"]["columns"]) == ("done", 0, [])
    assert record["file"] == "data/shard-00000.parquet"
    assert os.path.getsize(tmp_path / "data" / "shard-00000.parquet") == record["bytes"]
    assert (record["rows"], record["frames"], record["clips"], record["failed"]) == (3, 75, 4, 1)
    assert record["hours"] == pytest.approx(3 * 2.0 / 3600)
    assert record["failures"] == [{"clip_id": "c", "source_uri": "/in/c.wav", "stage": "decode",
                                   "error_class": "DecodeError", "message": "bad header"}]
    assert record["attempt"] == 1 and record["started"] < record["finished"]


def test_load_done_skips_missing_or_wrong_size_files(tmp_path):
    root = str(tmp_path)
    shards = _shards(4)
    for s in shards[:3]:
        _write_shard(root, s, 2, 10, [], finished=T0)
    assert set(mf.load_done(root)) == {"shard-00000", "shard-00001", "shard-00002"}
    os.remove(tmp_path / "data" / "shard-00001.parquet")  # crashed between... or deleted by hand
    with open(tmp_path / "data" / "shard-00002.parquet", "ab") as f:  # replaced by another file
        f.write(b"x")
    (tmp_path / "data" / "shard-00003.parquet").write_bytes(b"no record: not done")
    assert set(mf.load_done(root)) == {"shard-00000"}


def test_load_done_on_s3(s3_server, s3_url):
    so = s3_server["storage_options"]
    assert mf.load_done(s3_url, so) == {}
    records = {s.shard_id: _write_shard(s3_url, s, 2, 5, [], finished=T0, so=so) for s in _shards(3)}
    assert mf.load_done(s3_url, so) == records
    fs, path = storage.get_fs(storage.join(s3_url, "data/shard-00002.parquet"), so)
    fs.rm(path)
    assert set(mf.load_done(s3_url, so)) == {"shard-00000", "shard-00001"}


def test_init_run_and_compatibility(tmp_path):
    root = str(tmp_path)
    run = mf.make_run({"batch_size": 8}, MODEL, 8, created=T0)
    assert mf.init_run(root, run) == run
    assert storage.read_json(storage.join(root, "_state/run.json")) == run
    resumed = mf.make_run({"batch_size": 32}, MODEL, 8, created=T0 + 100)
    assert mf.init_run(root, resumed) == run  # other batch size is fine; the stored identity is kept

    with pytest.raises(mf.IncompatibleOutputError, match=r"model sha256.*'abab.*'cdcd"):
        mf.init_run(root, mf.make_run({}, {**MODEL, "sha256": "cd" * 32}, 8))
    with pytest.raises(mf.IncompatibleOutputError, match=r"model source.*other/mimi"):
        mf.check_compatible(run, mf.make_run({}, {**MODEL, "source": "other/mimi"}, 8))
    with pytest.raises(mf.IncompatibleOutputError, match=r"num_codebooks: output has 8, this run has 32"):
        mf.check_compatible(run, mf.make_run({}, MODEL, 32))
    with pytest.raises(mf.IncompatibleOutputError, match="schema version"):
        mf.check_compatible(run, {**run, "schema_version": SCHEMA_VERSION + 1})
    mf.check_compatible(run, {**run, "model": {**MODEL, "revision": "v2"}})  # same weights, other label


def test_manifest_totals_status_and_speed(tmp_path):
    root = str(tmp_path)
    shards = _shards(4)
    run = mf.make_run({"batch_size": 8}, MODEL, 8, created=T0 - 1000)
    started = T0
    done = {
        # from an earlier session: counted in totals, not in this session's speed
        "shard-00000": _write_shard(root, shards[0], 2, 25, [], finished=T0 - 500),
        "shard-00001": _write_shard(root, shards[1], 3, 50, [_failure("DecodeError"), _failure("DecodeError")],
                                    finished=T0 + 30),
        "shard-00002": _write_shard(root, shards[2], 1, 100, [_failure("EncodeError")], finished=T0 + 60),
    }
    m = mf.build_manifest(root, run, shards, done, started=started)
    m_now = m["timing"]["updated"]
    assert m["status"] == "running"
    assert m["totals"] == {
        "shards": 4, "shards_done": 3, "partial_shards": 0, "retained_files": 0, "clips": 6, "kept_clips": 0, "failed_clips": 3,
        "failed_by_class": {"DecodeError": 2, "EncodeError": 1},
        "hours": pytest.approx((2 * 2 + 3 * 4 + 8) / 3600),
        "frames": 2 * 25 + 3 * 50 + 100, "tokens": (2 * 25 + 3 * 50 + 100) * 8,
    }
    entries = m["shards"].to_pylist()  # the index table, in index order
    assert [e["status"] for e in entries] == ["done", "done", "done", "pending"]
    assert entries[1]["file"] == "data/shard-00001.parquet" and entries[1]["failed"] == 2
    assert m["model"] == MODEL and m["num_codebooks"] == 8 and m["schema_version"] == SCHEMA_VERSION
    assert set(m["software"]) == {"python", "torch", "ray", "pyarrow", "mimi-tokenize"}
    assert m["software"]["pyarrow"] and m_now
    assert mf.failure_share(m) == pytest.approx(3 / 9)

    finished = T0 + 100
    m = mf.build_manifest(root, run, shards, done, started=started, finished=finished)
    assert m["status"] == "incomplete"
    assert m["timing"]["wall_s"] == pytest.approx(100)
    assert m["timing"]["x_realtime"] == pytest.approx((3 * 4 + 8) / 100)  # this session's shards only
    assert m["timing"]["eta_s"] is None
    done["shard-00003"] = _write_shard(root, shards[3], 1, 10, [], finished=T0 + 90)
    m = mf.build_manifest(root, run, shards, done, started=started, finished=finished)
    assert m["status"] == "complete" and m["totals"]["shards_done"] == 4

    written = mf.write_manifest(root, m)
    on_disk = mf.read_manifest(root)
    assert on_disk == json.loads(json.dumps(written)) and "shards" not in on_disk
    assert on_disk.items() >= json.loads(json.dumps({k: v for k, v in m.items() if k != "shards"})).items()
    assert mf.shard_entries(root, on_disk) == m["shards"].to_pylist()


def test_summarize_and_eta(tmp_path):
    root = str(tmp_path)
    shards = _shards(4)
    run = mf.make_run({}, MODEL, 8)
    started = time.time() - 100
    done = {s.shard_id: _write_shard(root, s, 2, 25, [_failure("DecodeError")] if i == 0 else [],
                                     finished=started + 10) for i, s in enumerate(shards[:2])}
    m = mf.build_manifest(root, run, shards, done, started=started)
    assert m["timing"]["wall_s"] == pytest.approx(100, abs=5)
    assert m["timing"]["eta_s"] == pytest.approx(m["timing"]["wall_s"])  # 2 shards left at 2 per wall_s
    assert m["timing"]["x_realtime"] == pytest.approx(4 * 2.0 / m["timing"]["wall_s"])
    text = mf.summarize(m)
    assert "running" in text and "2/4 shards done (50.0%)" in text
    assert "4 clips; 1 failed (20.00%)" in text and "DecodeError 1" in text
    assert "100 frames × 8 codebooks = 800 tokens" in text and "ETA 0:01:4" in text
    finished = mf.build_manifest(root, run, shards, done, started=started, finished=started + 20)
    assert "incomplete" in mf.summarize(finished) and "ETA" not in mf.summarize(finished)


def test_redact():
    config = {
        "hf_token": "hf_abc", "max_tokens": 4096, "tokenizer": "mimi",
        "storage_options": {"key": "AKIA123", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://x"},
                            "headers": {"Authorization": "Bearer zzz"}},
        "sources": [{"uri": "s3://user:pa55@host/bucket", "password": "p"}, "gs://b/x"],
        "awsSecretAccessKey": "k", "apiKey": None, "batch_size": 8,
    }
    out = mf.redact(config)
    assert out == {
        "hf_token": "***", "max_tokens": 4096, "tokenizer": "mimi",
        "storage_options": {"key": "***", "secret": "***", "client_kwargs": {"endpoint_url": "http://x"},
                            "headers": {"Authorization": "***"}},
        "sources": [{"uri": "s3://***@host/bucket", "password": "***"}, "gs://b/x"],
        "awsSecretAccessKey": "***", "apiKey": None, "batch_size": 8,
    }
    assert config["hf_token"] == "hf_abc"  # input untouched


def test_secrets_never_reach_storage(tmp_path):
    root = str(tmp_path)
    secrets = ["hf_SUPERSECRET", "AKIASECRETKEY", "wJalrSECRET", "pa55w0rd"]
    config = {"model": {"hf_token": secrets[0]},
              "storage_options": {"key": secrets[1], "secret": secrets[2]},
              "input": f"s3://me:{secrets[3]}@minio/bucket"}
    run = mf.init_run(root, mf.make_run(config, MODEL, 8))
    shards = _shards(1)
    done = {shards[0].shard_id: _write_shard(root, shards[0], 1, 5, [], finished=T0)}
    mf.write_manifest(root, mf.build_manifest(f"s3://me:{secrets[3]}@minio/out", run, shards, done, started=T0))
    for name in ("manifest.json", "_state/run.json"):
        text = (tmp_path / name).read_text()
        assert "storage_options" in text
        for s in secrets:
            assert s not in text, (name, s)


def _entries(n: int) -> list[dict]:
    """n fabricated entries: done, pending and retained ones, as build_manifest makes them."""
    entries = []
    for i in range(n):
        entry = {"shard_id": f"files-{(i * 7919) % n:06d}", "kind": "files", "uri": f"s3://corpus/in/{i:06d}",
                 "change": "added"}
        if i % 5 == 4:
            entries.append({**entry, "status": "pending"})
            continue
        entries.append({**entry, "status": "retained" if i % 50 == 3 else "done", "file": f"data/{entry['shard_id']}"
                        ".parquet", "rows": 150, "carried": 0, "frames": 150 * 125, "bytes": 200_000 + i,
                        "sha256": f"{i:064x}", "clips": 151, "failed": 1, "hours": 150 * 10 / 3600, "attempt": 1})
    return entries


def _manifest_of(entries: list[dict]) -> dict:
    run = mf.make_run({"batch_size": 8}, MODEL, 8, created=T0)
    written = [e for e in entries if e["status"] != "pending"]
    m = mf.build_manifest("/out", run, [], {}, started=T0, finished=T0 + 1)
    m["totals"].update(shards=len(entries), shards_done=sum(e["status"] == "done" for e in entries),
                       clips=sum(e["rows"] for e in written))
    return {**m, "shards": entries}


def test_manifest_stays_small_and_the_index_holds_every_entry(tmp_path):
    root, entries = str(tmp_path), _entries(2_000)
    mf.write_manifest(root, _manifest_of(entries))
    assert (tmp_path / "manifest.json").stat().st_size < 8_192  # ~900 KB with the entries inline
    current = mf.read_manifest(root)
    assert "shards" not in current and current["index"]["rows"] == 2_000 and current["index"]["files"] == 1_600
    table = mf.shard_table(root, current)
    assert table.num_rows == 2_000 and table.schema == index.SCHEMA
    by_id = {e["shard_id"]: e for e in table.to_pylist()}
    assert by_id == {e["shard_id"]: {name: e.get(name) for name in index.SCHEMA.names} for e in entries}
    written = mf.shard_entries(root, current, statuses=index.WRITTEN, columns=["file", "bytes"])
    assert written == sorted(({"file": e["file"], "bytes": e["bytes"]} for e in entries if e["status"] != "pending"),
                             key=lambda e: e["file"])  # the data files first, by name
    assert [e["status"] for e in mf.shard_entries(root, current, statuses=["pending"], columns=["status"])] == \
        ["pending"] * 400


def test_a_manifest_never_points_to_a_missing_index(tmp_path, monkeypatch):
    root = str(tmp_path)
    mf.write_manifest(root, _manifest_of(_entries(300)))
    held = mf.read_manifest(root)  # a reader holds the manifest while a run rewrites it ...
    newer = _entries(310)
    real_write_json, real_remove = storage.write_json, index.remove_others
    for step in ("manifest", "cleanup"):  # ... and a rewrite killed at each step
        def fail(*args, step=step, **kwargs):
            raise OSError(f"killed at {step}")
        monkeypatch.setattr(storage, "write_json", fail if step == "manifest" else real_write_json)
        monkeypatch.setattr(index, "remove_others", fail if step == "cleanup" else real_remove)
        with pytest.raises(OSError, match="killed"):
            mf.write_manifest(root, _manifest_of(newer))
        current = mf.read_manifest(root)
        assert mf.shard_table(root, current).num_rows == current["index"]["rows"]
    monkeypatch.undo()
    mf.write_manifest(root, _manifest_of(newer))
    current = mf.read_manifest(root)
    assert [p.name for p in (tmp_path / "_index").iterdir()] == [current["index"]["path"].split("/")[-1]]
    assert mf.shard_table(root, held).num_rows == 310  # its index is gone: the reader follows the new manifest


def test_old_outputs_with_inline_entries_are_read(tmp_path):
    root, entries = str(tmp_path), _entries(20)
    storage.write_json(storage.join(root, mf.MANIFEST_PATH), json.loads(json.dumps(_manifest_of(entries))))
    current = mf.read_manifest(root)
    files = mf.shard_entries(root, current, statuses=index.WRITTEN, columns=["file"])
    assert files == sorted(({"file": e["file"]} for e in entries if e["status"] != "pending"),
                           key=lambda e: e["file"])


def test_manifest_entries_come_from_each_record_whatever_its_shape(tmp_path):
    root = str(tmp_path)
    shards, gone = _shards(3), _shards(5)[4]
    run = mf.make_run({}, MODEL, 8, created=T0 - 1000)
    done = {"shard-00000": _write_shard(root, shards[0], 2, 25, [_failure("DecodeError")], finished=T0 + 5),
            "shard-00001": {**_write_shard(root, shards[1], 1, 10, [_failure("EncodeError")], finished=T0 + 6),
                            "edited": "by hand"},  # not the writer's shape: held as JSON, its failures still counted
            gone.shard_id: {**_write_shard(root, gone, 3, 30, [_failure("DecodeError")], finished=T0 - 50),
                            "status": "retained"}}
    m = mf.build_manifest(root, run, shards, done, started=T0, finished=T0 + 10, change={"shard-00002": "added"},
                          removed=[Retire("shard-00009", "files", "/in/9", [])])
    entries = m["shards"].to_pylist()
    assert [(e["shard_id"], e["status"], e["change"], e["rows"]) for e in entries] == [
        ("shard-00000", "done", None, 2), ("shard-00001", "done", None, 1), ("shard-00004", "retained", None, 3),
        ("shard-00002", "pending", "added", None), ("shard-00009", "removed", "removed", None)]  # index order
    assert entries[2]["uri"] == "/in/4" and entries[1]["file"] == "data/shard-00001.parquet"
    assert m["totals"]["failed_by_class"] == {"DecodeError": 2, "EncodeError": 1}
    assert (m["totals"]["clips"], m["totals"]["retained_files"], m["totals"]["shards_done"]) == (6, 1, 2)
    assert m["timing"]["x_realtime"] == pytest.approx((2 * 25 + 10) * 1920 / 24_000 / 10)  # this session's two


def test_progress_counts_each_shard_in_constant_time_and_equals_a_rebuild(tmp_path):
    root = str(tmp_path)
    shards = _shards(5)
    run = mf.make_run({}, MODEL, 8)
    earlier = {"shard-00000": _write_shard(root, shards[0], 2, 25, [], finished=T0 - 50)}
    started = T0
    counters = progress.Progress(mf.build_manifest(root, run, shards, earlier, started=started), started)
    assert counters.snapshot(T0 + 1)["shards"].column("status")[0].as_py() == "done"  # until the index is written
    counters.indexed({"path": "_index/x.parquet", "shards_done": 1, "written": "then"})
    done = dict(earlier)
    for i, failures in ((1, [_failure("DecodeError")]), (2, []), (3, [_failure("EncodeError")] * 2)):
        done[shards[i].shard_id] = record = _write_shard(root, shards[i], i, 10 * i, failures, finished=T0 + 10 * i)
        counters.add(record)
    counters.add(record)  # a shard committed twice is counted once
    now = T0 + 40
    got, rebuilt = counters.snapshot(now), mf.build_manifest(root, run, shards, done, started=started)
    assert "shards" not in got and got["index"]["path"] == "_index/x.parquet"
    assert "by then; 3 more were done after it" in mf.index_lag(got)  # what export/publish --force say they leave out
    assert got["totals"] == {**rebuilt["totals"], "hours": pytest.approx(rebuilt["totals"]["hours"])}
    rebuilt_timing = mf.build_manifest(root, run, shards, done, started=started, finished=now)["timing"]
    assert got["timing"]["x_realtime"] == pytest.approx(rebuilt_timing["x_realtime"])
    assert got["timing"]["eta_s"] == pytest.approx(40 / 3)  # 1 shard left, at 3 per 40 s


def test_latest_writer_writes_the_newest_value_and_retries():
    written, failures, gate = [], [OSError("store down")], threading.Event()

    def write(value: int) -> None:
        gate.wait(5)
        if failures:
            raise failures.pop()
        written.append(value)

    with progress.LatestWriter(write, name="test-writer", retry_s=0.05, close_s=5) as writer:
        for value in range(5):
            writer.submit(value)  # the first write blocks on the gate; 1-3 are replaced by 4
        gate.set()
        deadline = time.time() + 5
        while written[-1:] != [4] and time.time() < deadline:
            time.sleep(0.01)
    assert written == [4] or written == [0, 4]  # 0 failed once; whether it was retried before 4 came is timing
    assert not writer.thread.is_alive()
