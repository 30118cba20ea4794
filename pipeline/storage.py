"""Storage helpers over fsspec: URLs, atomic writes, JSON state files and the run lock.

Works with local paths, ``file://``, ``s3://``, ``gs://``, ``memory://`` and any other fsspec protocol. Every call to
the store goes through :func:`pipeline.retry.call`: transient errors (5xx, throttling, resets, timeouts) are retried
with backoff for the retry window before they fail the operation.

Atomic writes: every output is first written completely to a local file, then published in one step:

* filesystems with a real rename (local disk, and any non-object-store fsspec backend): the file is
  written as ``.{name}.tmp-{uuid}`` in the destination folder and renamed over the final name;
* object stores (S3, GCS, Azure, memory): the complete file is uploaded straight to the final key. A
  store publishes an object only when its (single or multipart) upload completes, so readers never see
  a partial object, and an interrupted upload leaves nothing behind, where a temporary key plus
  copy+delete would leave an orphan and copy every byte twice.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline import retry

log = logging.getLogger(__name__)

OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})
LOCK_PATH = "_state/lock.json"


def get_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path inside it (no protocol)."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def join(url: str, *parts: str) -> str:
    """Join parts onto a URL or local path with ``/``, keeping its scheme (``memory://`` + ``a`` = ``memory://a``)."""
    tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
    if not tail:
        return url
    return (url if url.endswith("/") else url + "/") + tail


def _is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool(OBJECT_STORE_PROTOCOLS.intersection(protocols))


def _tmp_sibling(path: str) -> str:
    parent, name = posixpath.split(path)
    return posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")


def atomic_put_file(local_path: str, url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Publish a complete local file at ``url``: readers see either nothing (or the old file) or all of it."""
    fs, path = get_fs(url, storage_options)
    what = f"write {url}"
    if _is_object_store(fs):
        retry.call(fs.put_file, local_path, path, what=what)  # one upload: the object appears only once complete
        return
    retry.call(fs.makedirs, posixpath.dirname(path), exist_ok=True, what=what)
    tmp = _tmp_sibling(path)
    try:
        retry.call(fs.put_file, local_path, tmp, what=what)
        retry.call(fs.mv, tmp, path, what=what)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


@contextmanager
def atomic_output(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """Yield a local path to write the whole output to; it is published at ``url`` only if the block exits cleanly.

    On local disk the path is a hidden temporary file next to the destination (published by rename, no
    copy); otherwise it is a local temporary file that is uploaded on exit. If the block raises, the
    temporary file is deleted and ``url`` is left untouched.
    """
    fs, path = get_fs(url, storage_options)
    local_target = isinstance(fs, LocalFileSystem)
    if local_target:
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = _tmp_sibling(path)
    else:
        tmp = os.path.join(tempfile.gettempdir(), f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        yield tmp
        if local_target:
            os.replace(tmp, path)
        else:
            atomic_put_file(tmp, url, storage_options)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``data`` to ``url`` atomically (see :func:`atomic_output`)."""
    with atomic_output(url, storage_options) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_json(url: str, obj: Any, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(url, json.dumps(obj, indent=2).encode(), storage_options)


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """Read a JSON file; raises ``FileNotFoundError`` if it does not exist."""
    fs, path = get_fs(url, storage_options)
    return json.loads(retry.call(fs.cat_file, path, what=f"read {url}"))


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``url`` exists, asked of the store itself (not a cached listing)."""
    fs, path = get_fs(url, storage_options)
    fs.invalidate_cache(path)
    return retry.call(fs.exists, path, what=f"stat {url}")


def list_files(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """Names and sizes in bytes of the files directly under the folder ``url``; ``{}`` if it does not exist.

    Hidden files (temporaries of :func:`atomic_output`) are left out.
    """
    fs, path = get_fs(url, storage_options)
    fs.invalidate_cache(path)
    try:
        entries = retry.call(fs.ls, path, detail=True, what=f"list {url}")
    except FileNotFoundError:
        return {}
    files = {posixpath.basename(e["name"].rstrip("/")): int(e["size"]) for e in entries if e["type"] == "file"}
    return {name: size for name, size in files.items() if not name.startswith(".")}


def read_json_files(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """All ``*.json`` files directly under the folder ``url``, parsed, by file name; fetched concurrently where the
    store supports it (one ``cat`` call), a file that failed with a transient error is fetched again on its own."""
    fs, path = get_fs(url, storage_options)
    names = [n for n in list_files(url, storage_options) if n.endswith(".json")]
    if not names:
        return {}
    what = f"read {url}"
    blobs = retry.call(fs.cat, [posixpath.join(path, n) for n in names], on_error="return", what=what)
    parsed = {}
    for full, blob in blobs.items():
        if isinstance(blob, FileNotFoundError):
            continue  # deleted since listed
        if isinstance(blob, BaseException):
            if not retry.is_transient(blob):
                raise blob
            try:
                blob = retry.call(fs.cat_file, full, what=what)
            except FileNotFoundError:
                continue
        parsed[posixpath.basename(full)] = json.loads(blob)
    return parsed


def remove(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete the file ``url`` if it exists."""
    fs, path = get_fs(url, storage_options)
    try:
        retry.call(fs.rm_file, path, what=f"delete {url}")
    except FileNotFoundError:
        pass


class OutputLockedError(RuntimeError):
    """Another live run holds the output folder, or this run lost its lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunLock:
    """One run at a time per output folder, via ``{output_url}/_state/lock.json``.

    The lock file holds the owner (host, pid, run id, a random token) and a heartbeat timestamp that the
    owner renews with :meth:`refresh` (call it well within ``stale_after_s``). A lock is stale, and may
    be taken over, when its heartbeat is older than ``stale_after_s`` (clock of the reader against the
    owner's clock: keep hosts roughly in sync) or when it belongs to a dead pid on this same host.

    Race window: plain fsspec has no create-if-absent, so :meth:`acquire` writes the lock, waits
    ``settle_s`` and reads it back; of two runs racing, the one whose write landed last keeps the lock
    and the other gets :class:`OutputLockedError`. Both can still win only if one run's read-check-write
    takes longer than the other's write plus ``settle_s`` — make ``settle_s`` exceed one store round trip.
    :meth:`refresh` re-checks ownership, so a run that lost the lock finds out at its next heartbeat.
    """

    output_url: str
    run_id: str
    storage_options: dict[str, Any] | None = None
    stale_after_s: float = 120.0
    settle_s: float = 1.0
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def url(self) -> str:
        return join(self.output_url, LOCK_PATH)

    def _record(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "run_id": self.run_id,
            "token": self.token,
            "heartbeat": time.time(),
        }

    def _read(self) -> dict[str, Any] | None:
        try:
            return read_json(self.url, self.storage_options)
        except FileNotFoundError:
            return None

    def _is_stale(self, lock: dict[str, Any]) -> bool:
        if time.time() - lock["heartbeat"] > self.stale_after_s:
            return True
        return lock["host"] == socket.gethostname() and not _pid_alive(lock["pid"])

    def _locked_error(self, lock: dict[str, Any], what: str) -> OutputLockedError:
        age = time.time() - lock["heartbeat"]
        return OutputLockedError(
            f"{what}: {self.output_url} is locked by run {lock['run_id']!r} on host {lock['host']} "
            f"(pid {lock['pid']}), last heartbeat {age:.0f} s ago. If that run is dead, wait until the "
            f"heartbeat is {self.stale_after_s:.0f} s old (--lock-wait-s {self.stale_after_s:.0f} waits for that), "
            f"or override by deleting {self.url}."
        )

    def acquire(self, force: bool = False, wait_s: float = 0.0, poll_s: float = 5.0) -> None:
        """Take the lock; raise :class:`OutputLockedError` if a live run holds it (unless ``force``).

        ``wait_s`` > 0 waits that long for the holder to release the lock or for it to go stale (a retried job
        whose killed predecessor's heartbeat is still fresh) before giving up.
        """
        deadline = time.time() + wait_s
        while True:
            current = self._read()
            if current is None or current["token"] == self.token or force or self._is_stale(current):
                break
            if time.time() >= deadline:
                raise self._locked_error(current, "cannot start")
            time.sleep(min(poll_s, max(0.0, deadline - time.time())))
        write_json(self.url, self._record(), self.storage_options)
        time.sleep(self.settle_s)
        self._ensure_ours("lost the race for the lock")

    def refresh(self) -> None:
        """Renew the heartbeat; raise :class:`OutputLockedError` if another run has taken the lock over."""
        self._ensure_ours("this run lost its lock")
        write_json(self.url, self._record(), self.storage_options)

    def _ensure_ours(self, what: str) -> None:
        current = self._read()
        if current is None:
            raise OutputLockedError(f"{what}: the lock {self.url} was deleted by someone else")
        if current["token"] != self.token:
            raise self._locked_error(current, what)

    def release(self) -> None:
        """Stop the heartbeat; delete the lock if this run still holds it."""
        self.stop_heartbeat()
        current = self._read()
        if current is not None and current["token"] == self.token:
            remove(self.url, self.storage_options)

    def start_heartbeat(self, interval_s: float = 30.0) -> None:
        """Renew the heartbeat every ``interval_s`` in a background thread, so that long listings and long waits
        never let the lock go stale; :meth:`check` raises once the thread finds that another run took it."""
        self._stop = threading.Event()
        self.lost: OutputLockedError | None = None

        def beat() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.refresh()
                except OutputLockedError as exc:
                    self.lost = exc
                    log.error("%s", exc)
                    return
                except Exception as exc:  # the store is down beyond the retry window: keep trying
                    log.warning("could not renew the lock's heartbeat (%s); trying again", retry.brief(exc))

        self._thread = threading.Thread(target=beat, name="lock-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        if getattr(self, "_thread", None) is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None

    def check(self) -> None:
        """Raise :class:`OutputLockedError` if the heartbeat found the lock taken over by another run."""
        if getattr(self, "lost", None) is not None:
            raise self.lost

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
