"""pipeline.storage: URLs, atomic writes on local disk and S3 (moto), JSON files, the run lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import s3fs

from pipeline import storage
from pipeline.storage import OutputLockedError, RunLock


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


def test_lock_refuses_second_live_run(tmp_path):
    root = str(tmp_path)
    first = _lock(root, "run-1")
    first.acquire()
    lock = storage.read_json(storage.join(root, "_state/lock.json"))
    assert (lock["host"], lock["pid"], lock["run_id"]) == (socket.gethostname(), os.getpid(), "run-1")
    with pytest.raises(OutputLockedError, match=r"run-1.*" + socket.gethostname()) as err:
        _lock(root, "run-2").acquire()
    assert "lock.json" in str(err.value) and "--lock-wait-s" in str(err.value)
    first.refresh()  # still ours
    first.release()
    assert not storage.exists(storage.join(root, "_state/lock.json"))
    with _lock(root, "run-2"):
        assert storage.read_json(storage.join(root, "_state/lock.json"))["run_id"] == "run-2"


def test_lock_stale_heartbeat_is_taken_over_and_old_owner_notices(tmp_path):
    root = str(tmp_path)
    old = _lock(root, "old", stale_after_s=0.3)
    old.acquire()
    with pytest.raises(OutputLockedError):
        _lock(root, "new", stale_after_s=0.3).acquire()
    time.sleep(0.4)
    new = _lock(root, "new", stale_after_s=0.3)
    new.acquire()
    with pytest.raises(OutputLockedError, match="lost its lock"):
        old.refresh()
    old.release()  # not the owner any more: must not delete the new owner's lock
    assert storage.read_json(storage.join(root, "_state/lock.json"))["run_id"] == "new"


def test_lock_wait_takes_over_once_the_holder_goes_stale(tmp_path):
    root = str(tmp_path)
    _lock(root, "killed", stale_after_s=1.0).acquire()  # never refreshed again, like a SIGKILLed run
    with pytest.raises(OutputLockedError):
        _lock(root, "retry", stale_after_s=1.0).acquire(wait_s=0.2, poll_s=0.05)
    start = time.time()
    _lock(root, "retry", stale_after_s=1.0).acquire(wait_s=5.0, poll_s=0.05)
    assert 0.5 < time.time() - start < 3.0
    assert storage.read_json(storage.join(root, "_state/lock.json"))["run_id"] == "retry"


def test_lock_dead_pid_on_same_host_is_stale(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    lock_url = storage.join(str(tmp_path), "_state/lock.json")
    record = {"host": socket.gethostname(), "pid": dead_pid, "run_id": "crashed", "token": "t",
              "heartbeat": time.time()}
    storage.write_json(lock_url, {**record, "host": "some-other-host"})
    with pytest.raises(OutputLockedError, match="crashed"):  # other host: cannot tell, heartbeat is fresh
        _lock(str(tmp_path), "new").acquire()
    storage.write_json(lock_url, record)
    _lock(str(tmp_path), "new").acquire()
    assert storage.read_json(lock_url)["run_id"] == "new"


def test_lock_force_overrides_live_lock(tmp_path):
    _lock(str(tmp_path), "a").acquire()
    _lock(str(tmp_path), "b").acquire(force=True)
    assert storage.read_json(storage.join(str(tmp_path), "_state/lock.json"))["run_id"] == "b"


def test_lock_acquire_loses_to_a_racing_writer(tmp_path):
    """Run B read "no lock" before run A wrote its lock, so B writes too, during A's settle time: A must give up."""
    lock_url = storage.join(str(tmp_path), "_state/lock.json")
    a = _lock(str(tmp_path), "a", settle_s=1.0)
    outcome: list[BaseException | None] = []

    def acquire() -> None:
        try:
            a.acquire()
            outcome.append(None)
        except OutputLockedError as e:
            outcome.append(e)

    thread = threading.Thread(target=acquire)
    thread.start()
    while not storage.exists(lock_url):
        time.sleep(0.01)
    storage.write_json(lock_url, {"host": "host-b", "pid": 1, "run_id": "b", "token": "b", "heartbeat": time.time()})
    thread.join()
    assert isinstance(outcome[0], OutputLockedError) and "lost the race" in str(outcome[0])
    assert "'b'" in str(outcome[0]) and "host-b" in str(outcome[0])


def test_lock_on_s3(s3_server, s3_url):
    so = s3_server["storage_options"]
    with _lock(s3_url, "run-1", so):
        with pytest.raises(OutputLockedError, match="run-1"):
            _lock(s3_url, "run-2", so).acquire()
        raw = json.loads(_raw_s3(s3_server).cat_file(storage.join(s3_url, "_state/lock.json")))
        assert raw["run_id"] == "run-1"
    assert not _raw_s3(s3_server).exists(storage.join(s3_url, "_state/lock.json"))
