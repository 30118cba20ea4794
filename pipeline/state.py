"""What an output folder holds, read truthfully by the commands that inspect one (``status``, ``report``, ``export``,
``publish``, ``decode --id``) and checked by ``run`` before it writes anything.

* :func:`check_folder`: a missing path or a file is one clear error, never a traceback;
* :func:`read_output`: the manifest, validated, with its status made true to the moment: a manifest that says
  "running" while no live run holds the lock (Ctrl-C, kill, a lost node) is "interrupted"; a finished manifest under
  a live lock (a run resuming it) is "running". Before a run's first manifest write, the run identity, the shard
  records and the lock say whether a run is starting or stopped (:class:`NotWrittenYet`);
* :func:`foreign_entries`: what a folder holds that no run of this tool wrote, so that ``run`` never adopts a
  folder it did not create.
"""

from __future__ import annotations

import posixpath
from typing import Any

import pyarrow.compute as pc

from pipeline import manifest, retry, storage
from pipeline.config import ConfigError
from pipeline.lock import LOCK_PATH, is_live

MANIFEST_KEYS = ("status", "num_codebooks", "model", "totals", "timing")  # and "index" (or, older, "shards")
TOTALS_KEYS = ("shards", "shards_done", "clips", "failed_clips", "failed_by_class", "hours", "frames", "tokens")


class OutputError(ConfigError):
    """The path given is not an output that can be read: missing, a file, not ours, or a damaged manifest."""


class NotWrittenYet(OutputError):
    """A run has started on the output but has not written its manifest yet; ``status`` is "running" or
    "interrupted", and the message says what it committed so far."""

    def __init__(self, message: str, status: str):
        super().__init__(message)
        self.status = status


def check_folder(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Raise :class:`OutputError` if ``url`` does not exist or is a file."""
    fs, path = storage.get_fs(url, storage_options)
    where = manifest.redact(url)
    fs.invalidate_cache(path)
    if retry.call(fs.isfile, path, what=f"stat {where}"):
        raise OutputError(f"{where} is a file, not an output folder")
    if not retry.call(fs.isdir, path, what=f"stat {where}"):
        raise OutputError(f"{where} not found")


def live_lock(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The output's lock record if a live run holds it (:func:`pipeline.lock.is_live`), else None."""
    try:
        lock = storage.read_json(storage.join(url, LOCK_PATH), storage_options)
    except (FileNotFoundError, ValueError):
        return None
    return lock if is_live(lock) else None


def read_output(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The output's ``manifest.json``, its status made truthful (see the module docstring).

    Raises :class:`OutputError` (not found, a file, not an output, damaged manifest) or :class:`NotWrittenYet`.
    """
    check_folder(url, storage_options)
    where = manifest.redact(url)
    try:
        current = storage.read_json(storage.join(url, manifest.MANIFEST_PATH), storage_options)
    except FileNotFoundError:
        raise NotWrittenYet(*_before_manifest(url, storage_options)) from None
    except ValueError as exc:  # not JSON, or not text
        raise OutputError(f"{storage.join(where, manifest.MANIFEST_PATH)} is not valid JSON ({exc}); rerun "
                          "`mimi-tokenize run` on this output to rewrite it") from None
    missing = [k for k in MANIFEST_KEYS if not isinstance(current, dict) or k not in current]
    missing += [] if missing or "index" in current or "shards" in current else ["index"]
    missing += [f"totals.{k}" for k in TOTALS_KEYS
                if not missing and not (isinstance(current["totals"], dict) and k in current["totals"])]
    if missing:
        raise OutputError(f"{storage.join(where, manifest.MANIFEST_PATH)} is not a mimi-tokenize manifest (it lacks "
                          f"{', '.join(missing)})")
    running = live_lock(url, storage_options) is not None
    if running != (current["status"] == "running"):
        status = "running" if running else "interrupted"
        current = {**current, "status": status, "timing": {**current["timing"], "eta_s": None}}
    return current


def _before_manifest(url: str, storage_options: dict[str, Any] | None) -> tuple[str, str]:
    """The message and status of an output whose run has not written its manifest yet (or not even its identity:
    a run that just took the lock)."""
    where = manifest.redact(url)
    lock = live_lock(url, storage_options)
    try:
        run = storage.read_json(storage.join(url, manifest.RUN_PATH), storage_options)
    except (FileNotFoundError, ValueError):
        if lock is None:
            raise OutputError(f"{where} is not a mimi-tokenize output (no {manifest.MANIFEST_PATH} or "
                              f"{manifest.RUN_PATH})") from None
        run = {}
    done = manifest.load_done(url, storage_options)
    clips, hours = (pc.sum(done.column(key)).as_py() or 0 for key in ("rows", "hours"))
    if lock is not None:
        state, advice = "running", "its first progress update writes manifest.json"
    else:
        state, advice = "interrupted", "run the same command again to go on"
    started = f" at {run['created']}" if run.get("created") else ""
    return (f"{state} — {where}: a run started{started} and has not written {manifest.MANIFEST_PATH} yet; "
            f"{len(done)} shard(s) committed ({clips:,} clips, {hours:.2f} h); {advice}", state)


def foreign_entries(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """What the folder ``url`` holds that no run of this tool wrote (empty for a missing or empty folder, or an
    output: a folder with ``_state/run.json``). Top-level names, plus those under ``_state/`` but the lock and the
    temporary files of atomic writes (a run stopped before it wrote its identity)."""
    fs, path = storage.get_fs(url, storage_options)
    if storage.exists(storage.join(url, manifest.RUN_PATH), storage_options):
        return []
    try:
        top = retry.call(fs.ls, path, detail=False, what=f"list {manifest.redact(url)}")
    except FileNotFoundError:
        return []
    names = sorted(posixpath.basename(p.rstrip("/")) for p in top)
    found = [n for n in names if n != "_state"]
    if "_state" in names:
        inside = retry.call(fs.ls, posixpath.join(path, "_state"), detail=False, what=f"list {manifest.redact(url)}")
        found += [f"_state/{name}" for name in sorted(posixpath.basename(p.rstrip("/")) for p in inside)
                  if name != posixpath.basename(LOCK_PATH) and not name.startswith(".")]
    return found


__all__ = ["NotWrittenYet", "OutputError", "check_folder", "foreign_entries", "live_lock", "read_output"]
