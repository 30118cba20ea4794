"""Progress of a run, at a cost that does not grow with the output: running totals updated per finished shard, and
``manifest.json`` written off the scheduler's thread.

* :class:`Progress` starts from the session's first manifest (:func:`pipeline.manifest.build_manifest`, built once
  after the plan) and adds each shard the run commits in O(1); :meth:`Progress.snapshot` is the manifest of the
  moment (totals and timing; the entries stay in the index written at the start of the session);
* :class:`LatestWriter` writes the latest snapshot handed to it on a thread of its own: a snapshot not yet written
  is replaced by a newer one, a failed write is logged and tried again, and :meth:`LatestWriter.close` waits a
  bounded time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

from pipeline import manifest, retry
from pipeline.manifest import _iso

log = logging.getLogger(__name__)
T = TypeVar("T")


class Progress:
    """The running totals of a session (see the module docstring)."""

    def __init__(self, start: dict[str, Any], started: float):
        """``start``: the session's first manifest, with its entries (``shards``); ``started``: the session's start."""
        self.started, self.entries = started, start.get("shards")
        self.base = {k: v for k, v in start.items() if k not in ("shards", "totals", "timing")}
        self.totals = {k: v for k, v in start["totals"].items() if k != "failed_by_class"}
        self.failed_by_class = Counter(start["totals"]["failed_by_class"])
        self.session_hours, self.session_shards = 0.0, 0
        self.counted: dict[str, dict[str, Any]] = {}  # this session's records by shard id
        self.lock = threading.Lock()

    def add(self, record: dict[str, Any]) -> None:
        """Count a record this session committed for a shard of the listing (a recommitted shard replaces its
        earlier record)."""
        with self.lock:
            previous = self.counted.get(record["shard"]["shard_id"])
            if previous is not None:
                self._count(previous, -1)
            self.counted[record["shard"]["shard_id"]] = record
            self._count(record, 1)

    def _count(self, record: dict[str, Any], sign: int) -> None:
        t = self.totals
        t["shards_done"] += sign * (record["status"] == "done")
        t["partial_shards"] += sign * (record["status"] == "partial")
        for key, field in (("clips", "rows"), ("kept_clips", "carried"), ("failed_clips", "failed"),
                           ("hours", "hours"), ("frames", "frames")):
            t[key] += sign * record[field]
        t["tokens"] = t["frames"] * self.base["num_codebooks"]
        for failure in record["failures"]:
            self.failed_by_class[failure["error_class"]] += sign
        self.session_hours += sign * record["hours"]
        self.session_shards += sign

    def indexed(self, pointer: dict[str, Any]) -> None:
        """The session's index is written (``pointer``): snapshots name it instead of carrying the entries."""
        with self.lock:
            self.base["index"], self.entries = pointer, None

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """The manifest of the moment, status "running"; it carries the entries (``shards``) until the session's
        index is written."""
        now = time.time() if now is None else now
        with self.lock:
            wall_s = max(now - self.started, 0.0)
            remaining = self.totals["shards"] - self.totals["shards_done"]
            failed = {cls: n for cls, n in self.failed_by_class.most_common() if n > 0}
            current = {**self.base, "status": "running", "totals": {**self.totals, "failed_by_class": failed},
                       "timing": {"started": _iso(self.started), "updated": _iso(now), "finished": None,
                                  "wall_s": wall_s,
                                  "x_realtime": self.session_hours * 3600 / wall_s if wall_s > 0 else 0.0,
                                  "eta_s": remaining * wall_s / self.session_shards if self.session_shards else None}}
            if self.entries is not None:
                current["shards"] = self.entries
            return current


class LatestWriter(Generic[T]):
    """Calls ``write(value)`` on a thread of its own for the latest value submitted (see the module docstring);
    after a failed write, waits ``retry_s`` (or a newer value) and tries again. As a context manager, it is closed
    on exit, waiting at most ``close_s``."""

    def __init__(self, write: Callable[[T], None], *, name: str, retry_s: float, close_s: float):
        self.write, self.retry_s, self.close_s = write, retry_s, close_s
        self.pending: T | None = None
        self.closed = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, value: T) -> None:
        """Write ``value`` soon, instead of any value not written yet."""
        with self.cond:
            self.pending = value
            self.cond.notify()

    def close(self) -> None:
        """Stop: the write in progress (if any) ends, values not written yet are dropped (waits ``close_s`` at most,
        and says so if that was not enough)."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(self.close_s)
        if self.thread.is_alive():
            log.warning("%s: a write is still going on after %.0f s; what is written next may land before it",
                        self.thread.name, self.close_s)

    def __enter__(self) -> "LatestWriter[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while self.pending is None and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                value, self.pending = self.pending, None
            try:
                self.write(value)
            except Exception as exc:  # a thread's boundary: say so, and try again
                log.warning("%s: write failed (%s); will retry", self.thread.name, exc)
                with self.cond:
                    if self.pending is None:
                        self.pending = value
                    self.cond.wait(self.retry_s)


def manifest_writer(output_url: str, progress: Progress, writing: Callable[[], AbstractContextManager],
                    storage_options: dict[str, Any] | None, window_s: float) -> LatestWriter[dict[str, Any]]:
    """A :class:`LatestWriter` of ``progress``'s snapshots to the output's ``manifest.json``, each write fenced by
    ``writing`` (the run's lock) and retried by the store for at most ``window_s`` (then again by the writer); closing
    waits for the write in progress (``window_s``, plus a minute for the clients' own timeouts), and a write not yet
    begun is not made."""
    def write(current: dict[str, Any]) -> None:
        with writing(), retry.window(window_s):  # nothing written after close() points anywhere
            written = manifest.write_manifest(output_url, current, storage_options, wanted=lambda: not writer.closed)
        if written is not None and "shards" in current:
            progress.indexed(written["index"])

    writer = LatestWriter(write, name="manifest-writer", retry_s=window_s, close_s=window_s + 60)
    return writer
