"""One run at a time per output: a lease in ``_state/lock.json``, taken and renewed with conditional writes, and a
fence that keeps a run which may have lost it from committing.

The lock holds the owner (host, pid, run id, a random token), an ``epoch`` that grows by one with every run that takes
it, the lease length, a heartbeat, and the history of recent epochs (when each began, by the store's clock). Every
change is a compare-and-swap (:func:`pipeline.storage.write_if`: ``If-None-Match`` / ``If-Match`` on S3, an ``flock``
on local disk), so of two runs taking a stale or released lock exactly one wins, and a heartbeat never overwrites a
lock another run has taken. Where the store has no conditional writes (GCS, Azure, memory through fsspec), the
writer reads the lock back after ``settle_s`` to tell racing writers apart.

A lease is ``lease_s`` long (120 s); the owner renews it every ``lease_s / 4``, each renewal retried only while the
lease lasts, and it stops the run (:meth:`RunLock.check` raises) once it could not renew for ``lease_s`` less a
margin of ``lease_s / 4``, before another run may take the lock over. Commits run in encoder actors on other hosts:
each checks the lease through a :class:`Fence` (the lock as stored, read at most every few seconds) before it writes,
and refuses to write once the lease is not provably its own. Another run takes a lock over only when its heartbeat
is older than the lease, or its process is gone from this host (same host, boot and PID namespace), or it was
released. A run ends by marking the lock released (not by deleting it), so epochs keep growing across runs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pipeline import retry, storage

log = logging.getLogger(__name__)

LOCK_PATH = "_state/lock.json"
HISTORY = 32  # epochs kept in the lock: when each began, for telling a displaced run's late writes apart
FENCE_CHECK_S = 5.0  # a fence re-reads the lock at most this often


class OutputLockedError(RuntimeError):
    """Another live run holds the output folder, or this run lost its lock."""


def host_identity() -> dict[str, Any]:
    """Host name plus boot id and PID namespace: a pid means the same process only where all three match."""
    def read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return ""
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pidns = ""
    return {"host": socket.gethostname(), "boot_id": read("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_live(lock: dict[str, Any] | None, now: float | None = None) -> bool:
    """Whether ``lock`` (as stored) belongs to a run that may still be writing: not released, heartbeat within its
    lease, and not a process known dead on this host."""
    if not lock or lock.get("released"):
        return False
    now = time.time() if now is None else now
    if now - lock.get("heartbeat", 0) > lock.get("lease_s", 120.0):
        return False
    here = host_identity()
    same_process_space = all(lock.get(k) == here[k] and here[k] for k in ("host", "boot_id", "pidns"))
    return not (same_process_space and not _pid_alive(lock["pid"]))


@dataclass
class RunLock:
    """The output's lock, held by one run (see the module docstring)."""

    output_url: str
    run_id: str
    storage_options: dict[str, Any] | None = None
    lease_s: float = 120.0
    settle_s: float = 1.0
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        self.epoch = 0
        self.version: str | None = None
        self.held: dict[str, Any] | None = None
        self.renewed = 0.0  # when the lease was last renewed (this host's clock)
        self.lost: OutputLockedError | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._write = threading.Lock()  # one writer of the lock at a time (heartbeat vs release)

    @property
    def url(self) -> str:
        return storage.join(self.output_url, LOCK_PATH)

    @property
    def margin_s(self) -> float:
        return self.lease_s / 4

    def _read(self) -> tuple[dict[str, Any], str] | None:
        found = storage.read_versioned(self.url, self.storage_options)
        return None if found is None else (json.loads(found[0]), found[1])

    def _locked_error(self, lock: dict[str, Any], what: str) -> OutputLockedError:
        age = time.time() - lock["heartbeat"]
        return OutputLockedError(
            f"{what}: {self.output_url} is locked by run {lock['run_id']!r} on host {lock['host']} "
            f"(pid {lock['pid']}), last heartbeat {age:.0f} s ago. If that run is dead, its lock goes stale "
            f"{lock.get('lease_s', self.lease_s):.0f} s after its last heartbeat: run again then, or pass "
            f"--lock-wait-s {lock.get('lease_s', self.lease_s) + 30:.0f} to wait for it."
        )

    def _record(self, epoch: int, history: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {**host_identity(), "pid": os.getpid(), "run_id": self.run_id, "token": self.token, "epoch": epoch,
                "lease_s": self.lease_s, "heartbeat": time.time(), "history": history[-HISTORY:], **extra}

    def acquire(self, force: bool = False, wait_s: float = 0.0, poll_s: float = 5.0) -> None:
        """Take the lock; raise :class:`OutputLockedError` if a live run holds it (unless ``force``). ``wait_s`` > 0
        waits that long for the holder to release it or go stale (a retried job whose killed predecessor's heartbeat
        is still fresh)."""
        deadline = time.time() + wait_s
        while True:
            found = self._read()
            current, version = found if found else ({}, None)
            if found is None or force or not is_live(current):
                epoch = int(current.get("epoch", 0)) + 1
                took_over = found is not None and not current.get("released")  # its run may still be writing
                history = [*current.get("history", []), {"epoch": epoch, "run_id": self.run_id, "took_over": took_over}]
                record = self._record(epoch, history)
                try:
                    self.version = storage.write_if(self.url, json.dumps(record).encode(), version,
                                                    self.storage_options)
                except storage.PreconditionFailed:
                    continue  # another run wrote the lock since we read it: look again
                self.held, self.epoch, self.renewed = record, epoch, time.time()
                if not storage.conditional_writes(self.url, self.storage_options):
                    time.sleep(self.settle_s)
                    self._ensure_ours("lost the race for the lock")
                self._stamp_epoch_start()
                return
            if time.time() >= deadline:
                raise self._locked_error(current, "cannot start")
            log.info("waiting for the output's lock (run %r, heartbeat %.0f s ago; %.0f s left of --lock-wait-s)",
                     current.get("run_id"), time.time() - current.get("heartbeat", 0), deadline - time.time())
            time.sleep(min(poll_s, max(0.0, deadline - time.time())))

    def _stamp_epoch_start(self) -> None:
        """Record in the history when this epoch began by the store's clock (the lock object's modification time),
        the clock that dates every record and data file."""
        began = storage.modified_time(self.url, self.storage_options)
        if began is not None:
            self.held["history"][-1]["began"] = began
            self._replace(self.held)

    def _replace(self, record: dict[str, Any]) -> None:
        """Rewrite our lock (compare-and-swap on our last version); :class:`OutputLockedError` if it is not ours."""
        record = {**record, "heartbeat": time.time()}
        try:
            self.version = storage.write_if(self.url, json.dumps(record).encode(), self.version, self.storage_options)
        except storage.PreconditionFailed:
            found = self._read()  # our own write may have landed with its answer lost: then it is ours still
            if found is None or found[0].get("token") != self.token or found[0].get("heartbeat") != record["heartbeat"]:
                raise self._locked_error(found[0] if found else {**record, "run_id": "?", "host": "?", "pid": "?"},
                                         "this run lost its lock") from None
            self.version = found[1]
        self.held = record

    def refresh(self) -> None:
        """Renew the lease; raise :class:`OutputLockedError` if another run has taken the lock over."""
        with self._write:
            self._replace(self.held)
            self.renewed = time.time()

    def _ensure_ours(self, what: str) -> None:
        found = self._read()
        if found is None:
            raise OutputLockedError(f"{what}: the lock {self.url} was deleted by someone else")
        if found[0].get("token") != self.token:
            raise self._locked_error(found[0], what)
        self.version = found[1]

    def release(self) -> None:
        """Stop the heartbeat; mark the lock released if this run still holds it."""
        self.stop_heartbeat()
        if self.held is None or self.lost is not None:
            return
        with self._write:
            try:
                self._replace({**self.held, "released": True})
            except OutputLockedError:
                pass  # taken over meanwhile: it is not ours to release
            except OSError as exc:  # cannot be rewritten (a full disk): delete it, if it is still ours
                log.warning("could not mark the output's lock released (%s); deleting it", retry.brief(exc))
                storage.remove_if(self.url, self.version, self.storage_options)
        self.held = None

    def start_heartbeat(self) -> None:
        """Renew the lease every ``lease_s / 4`` in a background thread; :meth:`check` raises once the lock was
        taken over, or once it could not be renewed for ``lease_s`` less the margin (another run may take it)."""
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.lease_s / 4):
                expires = self.renewed + self.lease_s - self.margin_s
                try:
                    with retry.window(max(0.5, expires - time.time())):
                        self.refresh()
                except OutputLockedError as exc:
                    self.lost = exc
                except Exception as exc:
                    if time.time() < expires:
                        log.warning("could not renew the output's lock (%s); trying again", retry.brief(exc))
                        continue
                    self.lost = OutputLockedError(
                        f"this run could not renew its lock on {self.output_url} for {time.time() - self.renewed:.0f} s "
                        f"({retry.brief(exc)}); another run may take the output over, so this one stops writing")
                if self.lost is not None:
                    log.error("%s", self.lost)
                    return

        self._thread = threading.Thread(target=beat, name="lock-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=self.lease_s)
            self._thread = None

    def check(self) -> None:
        """Raise :class:`OutputLockedError` if the lock was lost (taken over, or the lease could not be renewed)."""
        if self.lost is not None:
            raise self.lost

    def fence(self) -> "Fence":
        return Fence(self.url, self.token, self.epoch, self.run_id, self.storage_options)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class Fence:
    """What a committing process checks before it writes: the lock as stored still names this run, is not released,
    and its heartbeat is within the lease less its margin (after which the owner stops, and before another run may
    take over). The lock is read at most every :data:`FENCE_CHECK_S`."""

    url: str
    token: str
    epoch: int
    run_id: str
    storage_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._valid_until = self._expires = 0.0
        self._guard = threading.Lock()

    def check(self) -> float:
        """Seconds the lease provably lasts (a write started now may be retried that long, no longer); raise
        :class:`OutputLockedError` unless this run still holds it."""
        with self._guard:
            now = time.time()
            if now >= self._valid_until:  # no other run can take the lock before the lease last read expires:
                with retry.window(max(FENCE_CHECK_S, self._expires - now)):  # an outage is ridden out until then
                    lock = storage.read_json(self.url, self.storage_options)
                lease = lock.get("lease_s", 120.0)
                self._expires = lock.get("heartbeat", 0) + lease - lease / 4
                if lock.get("token") != self.token or lock.get("released") or now >= self._expires:
                    raise OutputLockedError(f"run {self.run_id} no longer holds the lock on this output (held by "
                                            f"run {lock.get('run_id')!r}, epoch {lock.get('epoch')}); not writing")
                self._valid_until = min(self._expires, now + FENCE_CHECK_S)
            return self._expires - now

    @contextmanager
    def writing(self) -> Iterator[None]:
        """A block of writes that checks the lease first and retries only while it provably lasts."""
        with retry.window(self.check()):
            yield

    def __getstate__(self) -> dict[str, Any]:  # the lease's known end travels: it only ever moves later
        return {k: v for k, v in self.__dict__.items() if k not in ("_guard", "_valid_until")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._valid_until, self._guard = 0.0, threading.Lock()
