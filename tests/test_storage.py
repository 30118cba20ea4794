"""pipeline.storage: URLs, atomic writes on local disk and S3 (moto), JSON files, the run lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
import s3fs

from pipeline import storage
from pipeline.lock import OutputLockedError, RunLock


class Boom(Exception):
    pass


@pytest.mark.parametrize(("url", "parts", "expected"), [
    ("s3://bucket/out", ("data", "a.parquet"), "s3://bucket/out/data/a.parquet"),
    ("s3://bucket/out/", ("/_state/", "lock.json"), "s3://bucket/out/_state/lock.json"),
    ("memory://", ("x",), "memory://x"),
    ("/tmp/out", ("data",), "/tmp/out/data"),
    ("/tmp/out", (), "/tmp/out"),
])
def test_join(url, parts, expected):
    assert storage.join(url, *parts) == expected


def _raw_s3(server) -> s3fs.S3FileSystem:
    """A separate, uncached client: sees what is really in the bucket."""
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **server["storage_options"])


def test_atomic_output_local_publishes_only_on_clean_exit(tmp_path):
    url = str(tmp_path / "out" / "a.bin")
    with storage.atomic_output(url) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"hello")
        assert not os.path.exists(url)
    assert open(url, "rb").read() == b"hello"
    assert os.listdir(tmp_path / "out") == ["a.bin"]  # no temporaries left


@pytest.mark.parametrize("write", ["atomic_write_bytes", "atomic_put_file"])
def test_local_publish_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch, write):
    """What reaches the disk, in order (a power loss must never leave a renamed file without its bytes)."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    monkeypatch.setattr(storage.os, "replace", replace)
    url = str(tmp_path / "out" / "a.bin")
    if write == "atomic_put_file":
        (tmp_path / "src.bin").write_bytes(b"hello")
        storage.atomic_put_file(str(tmp_path / "src.bin"), url)
    else:
        storage.atomic_write_bytes(url, b"hello")
    assert [e[0] for e in events] == ["fsync", "rename", "fsync"], events
    assert os.path.basename(events[0][1]).startswith(".a.bin.tmp-") and events[1][1] == url
    assert events[2][1] == str(tmp_path / "out")
    assert open(url, "rb").read() == b"hello"


def test_atomic_output_local_failure_leaves_nothing(tmp_path):
    url = str(tmp_path / "out" / "a.bin")
    storage.atomic_write_bytes(url, b"old")
    with pytest.raises(Boom):
        with storage.atomic_output(url) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise Boom
    assert open(url, "rb").read() == b"old"
    assert os.listdir(tmp_path / "out") == ["a.bin"]


def test_atomic_output_commit_failure_cleans_up(tmp_path):
    target = tmp_path / "out" / "a.bin"
    target.mkdir(parents=True)  # a folder where the file should go: the final rename fails
    with pytest.raises(OSError):
        storage.atomic_write_bytes(str(target), b"data")
    assert os.listdir(tmp_path / "out") == ["a.bin"] and target.is_dir()


def test_atomic_output_s3(s3_server, s3_url):
    so = s3_server["storage_options"]
    url = storage.join(s3_url, "a.bin")
    raw = _raw_s3(s3_server)
    with storage.atomic_output(url, so) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"x" * 1000)
        assert not raw.exists(url)
    assert raw.cat_file(url) == b"x" * 1000
    assert raw.ls(s3_url) == [url.removeprefix("s3://")]
    assert not os.path.exists(tmp)


def test_atomic_output_s3_failure_leaves_nothing(s3_server, s3_url):
    so = s3_server["storage_options"]
    url = storage.join(s3_url, "a.bin")
    with pytest.raises(Boom):
        with storage.atomic_output(url, so) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise Boom
    assert not _raw_s3(s3_server).exists(s3_url)
    assert not os.path.exists(tmp)
    assert not storage.exists(url, so)


def test_atomic_put_file_overwrites(s3_server, s3_url, tmp_path):
    so = s3_server["storage_options"]
    local = tmp_path / "f"
    for content in (b"one", b"two-two"):
        local.write_bytes(content)
        storage.atomic_put_file(str(local), storage.join(s3_url, "f"), so)
        storage.atomic_put_file(str(local), str(tmp_path / "copy" / "f"))
    assert _raw_s3(s3_server).cat_file(storage.join(s3_url, "f")) == b"two-two"
    assert (tmp_path / "copy" / "f").read_bytes() == b"two-two"
    assert os.listdir(tmp_path / "copy") == ["f"]


@pytest.mark.parametrize("where", ["local", "memory", "s3"])
def test_json_exists_and_listing(where, tmp_path, request):
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        root, so = request.getfixturevalue("s3_url"), server["storage_options"]
    else:
        root, so = (str(tmp_path) if where == "local" else f"memory://{tmp_path.name}"), None
    folder = storage.join(root, "state")
    assert storage.list_files(folder, so) == {}
    assert storage.read_json_files(folder, so) == {}
    assert not storage.exists(storage.join(folder, "a.json"), so)
    with pytest.raises(FileNotFoundError):
        storage.read_json(storage.join(folder, "a.json"), so)
    storage.write_json(storage.join(folder, "a.json"), {"n": 1, "s": "é"}, so)
    storage.write_json(storage.join(folder, "b.json"), [1, 2], so)
    storage.atomic_write_bytes(storage.join(folder, "c.txt"), b"12345", so)
    assert storage.exists(storage.join(folder, "a.json"), so)
    assert storage.read_json(storage.join(folder, "a.json"), so) == {"n": 1, "s": "é"}
    sizes = storage.list_files(folder, so)
    assert sorted(sizes) == ["a.json", "b.json", "c.txt"] and sizes["c.txt"] == 5
    assert storage.read_json_files(folder, so) == {"a.json": {"n": 1, "s": "é"}, "b.json": [1, 2]}


# --- run lock -------------------------------------------------------------------------------------------------------


def _lock(root, run_id, so=None, **kw) -> RunLock:
    return RunLock(root, run_id, storage_options=so, settle_s=kw.pop("settle_s", 0.0), **kw)


def _stored(root, so=None) -> dict:
    return storage.read_json(storage.join(root, "_state/lock.json"), so)


def test_lock_refuses_second_live_run_and_epochs_grow(tmp_path):
    root = str(tmp_path)
    first = _lock(root, "run-1")
    first.acquire()
    lock = _stored(root)
    assert (lock["host"], lock["pid"], lock["run_id"], lock["epoch"]) == (socket.gethostname(), os.getpid(), "run-1", 1)
    with pytest.raises(OutputLockedError, match=r"run-1.*" + socket.gethostname()) as err:
        _lock(root, "run-2").acquire()
    assert "lock-wait-s" in str(err.value) and "force" not in str(err.value)
    first.refresh()  # still ours
    first.release()
    assert _stored(root)["released"] is True  # released, not deleted: the next run's epoch follows this one's
    with _lock(root, "run-2") as second:
        lock = _stored(root)
        assert (lock["run_id"], lock["epoch"], second.epoch) == ("run-2", 2, 2)
        assert [h["epoch"] for h in lock["history"]] == [1, 2] and all("began" in h for h in lock["history"])


def test_lock_stale_heartbeat_is_taken_over_and_old_owner_notices(tmp_path):
    root = str(tmp_path)
    old = _lock(root, "old", lease_s=0.3)
    old.acquire()
    with pytest.raises(OutputLockedError):
        _lock(root, "new", lease_s=0.3).acquire()
    time.sleep(0.4)
    new = _lock(root, "new", lease_s=0.3)
    new.acquire()
    with pytest.raises(OutputLockedError, match="lost its lock"):
        old.refresh()  # a conditional write on the version it last wrote: refused
    old.release()  # not the owner any more: must not release the new owner's lock
    assert _stored(root)["run_id"] == "new" and not _stored(root).get("released")


def test_lock_wait_takes_over_once_the_holder_goes_stale(tmp_path):
    root = str(tmp_path)
    _lock(root, "killed", lease_s=1.0).acquire()  # never refreshed again, like a SIGKILLed run
    with pytest.raises(OutputLockedError):
        _lock(root, "retry", lease_s=1.0).acquire(wait_s=0.2, poll_s=0.05)
    start = time.time()
    _lock(root, "retry", lease_s=1.0).acquire(wait_s=5.0, poll_s=0.05)
    assert 0.5 < time.time() - start < 3.0
    assert _stored(root)["run_id"] == "retry"


def test_lock_of_a_dead_pid_is_stale_only_in_the_same_pid_namespace(tmp_path):
    """A dead pid means a dead run only on the same host, boot and PID namespace: containers that share a host name
    (host networking) have PID namespaces of their own."""
    from pipeline.lock import host_identity

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_url = storage.join(str(tmp_path), "_state/lock.json")
    record = {**host_identity(), "pid": int(proc.stdout), "run_id": "crashed", "token": "t", "epoch": 3,
              "lease_s": 120.0, "heartbeat": time.time()}
    for other in ({"host": "some-other-host"}, {"pidns": "4026531999"}):
        storage.write_json(lock_url, {**record, **other})
        with pytest.raises(OutputLockedError, match="crashed"):  # cannot tell: the heartbeat is fresh
            _lock(str(tmp_path), "new").acquire()
    storage.write_json(lock_url, record)
    _lock(str(tmp_path), "new").acquire()
    assert (_stored(str(tmp_path))["run_id"], _stored(str(tmp_path))["epoch"]) == ("new", 4)


def test_lock_force_overrides_live_lock(tmp_path):
    _lock(str(tmp_path), "a").acquire()
    _lock(str(tmp_path), "b").acquire(force=True)
    assert _stored(str(tmp_path))["run_id"] == "b"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_racing_runs_take_a_stale_lock_exactly_once(tmp_path, where, request):
    """Eight runs take over one stale lock at the same moment: conditional writes (flock on local disk, If-Match on
    S3) let exactly one of them win, with the next epoch."""
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        root, so = f"s3://{server['bucket']}/{uuid.uuid4().hex}", server["storage_options"]
    else:
        root, so = str(tmp_path), None
    _lock(root, "killed", so, lease_s=0.2).acquire()
    time.sleep(0.3)
    barrier, outcome = threading.Barrier(8), []

    def take(i: int) -> None:
        lock = _lock(root, f"r{i}", so)
        barrier.wait()
        try:
            lock.acquire()
            outcome.append(lock)
        except OutputLockedError:
            pass

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    (winner,) = outcome
    assert winner.epoch == 2 and _stored(root, so)["run_id"] == winner.run_id


def test_conditional_writes_on_s3(s3_server, s3_url):
    so = s3_server["storage_options"]
    url = f"{s3_url}/x.json"
    first = storage.write_if(url, b"1", None, so)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_if(url, b"2", None, so)  # exists
    second = storage.write_if(url, b"2", first, so)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_if(url, b"3", first, so)  # changed since
    assert storage.read_versioned(url, so) == (b"2", second)


def test_lock_on_s3(s3_server, s3_url):
    so = s3_server["storage_options"]
    with _lock(s3_url, "run-1", so):
        with pytest.raises(OutputLockedError, match="run-1"):
            _lock(s3_url, "run-2", so).acquire()
        raw = json.loads(_raw_s3(s3_server).cat_file(storage.join(s3_url, "_state/lock.json")))
        assert raw["run_id"] == "run-1"
    assert json.loads(_raw_s3(s3_server).cat_file(storage.join(s3_url, "_state/lock.json")))["released"] is True
