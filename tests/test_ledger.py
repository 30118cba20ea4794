"""pipeline.ledger: records folded into Parquet checkpoints plan exactly as the records themselves, after rewrites,
deletions, resized files, a damaged checkpoint and a fold killed before its rename; a plan over a checkpoint reads
only the records newer than it (counted on the S3 server)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline import ledger, records, storage
from pipeline import manifest as mf
from pipeline.commit import Output
from pipeline.plan import make_plan
from pipeline.types import ClipInfo, EncodedClip, Member, Shard
from pipeline.writer import write_shard


def _shard(i: int, digest: str = "") -> Shard:
    members = tuple(Member(f"k{i}-{j}", f"/in/k{i}-{j}.wav") for j in range(2))
    return Shard(f"files-{i:04d}", "files", members[0].uri, "/in", digest or f"digest-{i:04d}", members=members)


def _commit(root: str, shard: Shard, rows: int = 2, status: str = "done", writer=None, so=None) -> dict:
    clips = [EncodedClip(ClipInfo(j, f"k{int(shard.shard_id[6:])}-{j}", f"/in/{j}.wav", 16_000, 1),
                         np.ones((8, 3), np.int64), 3 * 1920) for j in range(rows)]
    result = write_shard(storage.join(root, mf.shard_file(shard.shard_id)), clips, num_codebooks=8,
                         file_metadata={}, storage_options=so)
    return mf.write_record(root, shard, result, [], started=time.time() - 1, finished=time.time(), attempt=1,
                           status=status, writer=writer, kept_ids=[c.info.clip_id for c in clips]
                           if status == "retained" else None, storage_options=so)


def _plan(root: str, shards: list[Shard]) -> tuple:
    records, files = mf.load_records(root, check_order=True)
    plan = make_plan(shards, records, files, prune=False, read_ids=Output(root, 8, {}).read_ids)
    return (records, files, [s.shard_id for s in plan.pending], plan.done, plan.retained,
            [dataclasses.asdict(r) for r in plan.retire], plan.kept, plan.changes, plan.warnings)


def _without_checkpoints(root: str, shards: list[Shard]) -> tuple:
    hidden = Path(root, ledger.CHECKPOINT_DIR)
    hidden.rename(hidden.with_name("hidden"))
    try:
        return _plan(root, shards)
    finally:
        hidden.with_name("hidden").rename(hidden)


def _reads(monkeypatch) -> list[str]:
    """The record files read one by one from now on."""
    names: list[str] = []
    original = storage.read_json_files

    def counting(url, storage_options=None, wanted=None):
        names.extend(wanted or [])
        return original(url, storage_options, wanted)

    monkeypatch.setattr(storage, "read_json_files", counting)
    return names


def test_a_checkpoint_plans_as_the_records_do(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ledger, "READ_BATCH", 3)  # folds and plans read the record files in several batches
    root = str(tmp_path / "out")
    shards = [_shard(i) for i in range(10)]
    for s in shards[:9]:
        _commit(root, s, writer=("run-a", 1))
    _commit(root, _shard(20), status="retained")  # a retained file of inputs gone from the listing
    assert mf.fold_records(root) == 1 and mf.fold_records(root) is None  # nothing new: no second checkpoint
    storage.write_json(storage.join(root, "_state/lock.json"),
                       {"epoch": 2, "history": [{"epoch": 2, "run_id": "run-b", "took_over": True,
                                                 "began": time.time()}]})
    time.sleep(0.05)

    # after the checkpoint: a record rewritten at once with the same size (another digest), one written late by the
    # run taken over, a record deleted, a data file resized, a retained file deleted, a new shard committed
    record = Path(root, "_state/shards/files-0000.json")
    before = record.read_text()
    changed = storage.read_json(str(record))
    changed["shard"]["digest"] = "digest-000X"
    storage.write_json(str(record), changed)
    assert len(record.read_text()) == len(before) and record.read_text() != before
    _commit(root, shards[1], writer=("run-a", 1))
    os.unlink(Path(root, "_state/shards/files-0002.json"))
    _commit(root, shards[3], rows=1)
    Path(root, "_state/shards/files-0003.json").write_text(Path(root, "_state/shards/files-0004.json").read_text()
                                                             .replace("0004", "0003"))  # its file's size is not this
    os.unlink(Path(root, "_state/shards/files-0020.json"))
    _commit(root, shards[9])
    _commit(root, _shard(21), status="retained")

    reads = _reads(monkeypatch)
    with_checkpoint = _plan(root, shards)
    assert sorted(reads) == ["files-0000.json", "files-0001.json", "files-0003.json", "files-0009.json",
                             "files-0021.json"]
    assert with_checkpoint == _without_checkpoints(root, shards)
    records, _, pending, done, retained, retire = with_checkpoint[:6]
    assert pending == ["files-0000", "files-0001", "files-0002", "files-0003"]
    assert sorted(done) == ["files-0004", "files-0005", "files-0006", "files-0007", "files-0008", "files-0009"]
    assert list(retained) == ["files-0021"]
    assert sorted(r["shard_id"] for r in retire) == ["files-0000", "files-0001", "files-0002", "files-0003",
                                                      "files-0020"]
    assert records["files-0005"]["schema"] is records["files-0006"]["schema"]  # one parsed copy, shared

    # fold again on top of the first checkpoint; a damaged newest checkpoint falls back to the one before it
    assert mf.fold_records(root) == 2 and ledger.checkpoints(root) == [2, 1]
    reads.clear()
    assert _plan(root, shards) == with_checkpoint and reads == []
    Path(root, ledger.CHECKPOINT_DIR, "000000000002.parquet").write_bytes(b"PAR1 cut short")
    assert _plan(root, shards) == with_checkpoint
    assert "cannot be read" in caplog.text and len(reads) == 5  # the checkpoint before it lacks these
    assert mf.fold_records(root) == 3 and ledger.checkpoints(root) == [3, 2]


KILLED_FOLD = """
import os, signal, sys
from pipeline import manifest, storage
publish = storage._publish_local
def killed(tmp, path):
    if "checkpoints" in path:
        os.kill(os.getpid(), signal.SIGKILL)
    publish(tmp, path)
storage._publish_local = killed
manifest.fold_records(sys.argv[1])
"""


def test_a_fold_killed_before_its_rename_leaves_the_plan_as_it_was(tmp_path):
    root = str(tmp_path / "out")
    shards = [_shard(i) for i in range(6)]
    for s in shards[:4]:
        _commit(root, s)
    assert mf.fold_records(root) == 1
    before = _plan(root, shards)
    for s in shards[4:]:
        _commit(root, s)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", KILLED_FOLD, root], env=env, timeout=120)
    assert killed.returncode == -9
    leftovers = os.listdir(Path(root, ledger.CHECKPOINT_DIR))
    assert sorted(leftovers)[0].startswith(".000000000002.parquet.tmp-") and ledger.checkpoints(root) == [1]
    after = _plan(root, shards)
    assert after == _without_checkpoints(root, shards)
    assert after[2] == [] and sorted(after[3]) == [s.shard_id for s in shards] and before[2] == ["files-0004",
                                                                                                   "files-0005"]
    assert mf.fold_records(root) == 2 and mf.load_records(root)[0] == after[0]


def test_a_plan_over_a_checkpoint_reads_a_few_objects_on_s3(s3_url, s3_server, fault_proxy):
    direct = s3_server["storage_options"]
    counts: dict[str, int] = {}

    def count(method: str, path: str, status: int) -> None:
        what = "list" if "list-type" in path else method
        counts[what] = counts.get(what, 0) + 1

    _, through_proxy = fault_proxy(on_request=count)
    n = 120
    for i in range(n):
        _commit(s3_url, _shard(i), so=direct)
    records = mf.load_records(s3_url, through_proxy)
    assert counts.get("GET", 0) >= n  # one GET per record
    assert counts.get("HEAD", 0) <= 2, counts  # and no HEAD per record (s3fs asks the size before a read)
    mf.fold_records(s3_url, through_proxy)
    counts.clear()
    assert mf.load_records(s3_url, through_proxy) == records
    assert counts.get("GET", 0) + counts.get("HEAD", 0) <= 8, counts  # the lock, the checkpoint's footer and body
    assert counts.get("list", 0) <= 4, counts  # records, data files, checkpoints


def test_records_read_back_from_columns_exactly_as_written(tmp_path):
    """Every shape of record reads back equal, from a RecordSet and through a checkpoint: the writer's (with and
    without a writer, retained with no digest, with failures and kept ids), and shapes only JSON can hold (a key more,
    a bool where a count goes, no schema key)."""
    root = str(tmp_path / "out")
    usual = _commit(root, _shard(1), writer=("run-a", 3))
    shaped = {
        "usual": usual,
        "no_writer": _commit(root, _shard(2)),
        "retained": _commit(root, _shard(3), status="retained"),
        "failures": {**usual, "failed": 1, "failures": [{"clip_id": "k1-9", "stage": "decode", "error_class": "E",
                                                         "message": "bad\u00e9", "source_uri": "/in/x.wav"}],
                     "kept_ids": ["k0-1"], "carried": 1},
        "extra_key": {**usual, "note": {"by": "hand"}},
        "bool_count": {**usual, "rows": True},
        "no_schema": {k: v for k, v in usual.items() if k != "schema"},
        "null_epoch": {**usual, "epoch": None},
    }
    for name, record in shaped.items():
        shaped[name] = {**record, "shard": {**record["shard"], "shard_id": f"files-{name}"}}
        storage.write_json(storage.join(root, mf.SHARDS_STATE_DIR, f"files-{name}.json"), shaped[name])
    by_id = {r["shard"]["shard_id"]: r for r in shaped.values()}
    direct = records.RecordSet.of((f"{k}.json", r) for k, r in by_id.items())
    assert dict(direct.items()) == by_id and dict(direct) == by_id and direct["files-failures"] == by_id[
        "files-failures"] and "files-none" not in direct
    assert direct.table.column("record").null_count == 4  # the writer's shapes are columns, not JSON
    mf.fold_records(root)
    loaded, _ = mf.load_records(root)
    assert {k: v for k, v in loaded.items() if k.startswith("files-") and not k[6:].isdigit()} == by_id
