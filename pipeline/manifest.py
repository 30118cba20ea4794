"""Run state and the manifest, kept on storage (never only in memory), so a run can resume after a crash.

Layout at the output root::

    data/{shard_id}.parquet        one Parquet file per shard (pipeline.writer)
    _state/shards/{shard_id}.json  done record, written only after the shard's Parquet file is committed
    _state/run.json                run identity: config snapshot, model provenance, K, schema version
    _state/schema.json             the metadata columns' types, one for the whole output (pipeline.schema)
    _state/lock.json               run lock and its epochs (pipeline.lock.RunLock)
    manifest.json                  summary of the whole output (tens of KB at any size), rewritten as the run goes
    _index/shards-*.parquet        one row per shard entry, pointed to by manifest.json (pipeline.index)

A record's ``status`` is ``done`` (the shard of the listing whose ``digest`` it names) or ``retained`` (rows of
inputs that are gone from the listing, kept until ``--prune``; see :mod:`pipeline.plan`). A record counts only if
its Parquet file exists with the recorded size (the sha256 is recorded but not re-read at resume; that would mean
reading the whole output back). Snapshots of configs are passed through :func:`redact` before they reach storage.
"""

from __future__ import annotations

import logging
import platform
import re
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import index, ledger, storage
from pipeline import schema as output_schema
from pipeline.lock import LOCK_PATH
from pipeline.records import RecordSet
from pipeline.types import ClipFailure, Shard
from pipeline.writer import SCHEMA_VERSION, ShardWriteResult

log = logging.getLogger(__name__)

DATA_DIR = "data"
SHARDS_STATE_DIR = "_state/shards"
RUN_PATH = "_state/run.json"
MANIFEST_PATH = "manifest.json"
REDACTED = "***"
# "token" but not "tokens"/"tokenizer" (config sizes and paths, not credentials)
_SECRET_KEY = re.compile(r"token(?!s|iz)|secret|passw(?:or)?d|key|credential|authorization", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_DISTRIBUTIONS = ("torch", "ray", "pyarrow", "mimi-tokenize")
UNTRAINED_NOTE = ("UNTRAINED: generated random weights (mimi-tokenize demo / tests), not a trained Mimi. The codes "
                  "carry no meaning; use them only to try the pipeline, never to train a model.")


class IncompatibleOutputError(RuntimeError):
    """The output folder was written by a run whose codes cannot be mixed with this run's."""


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _unix(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def shard_file(shard_id: str) -> str:
    """Path of a shard's Parquet file, relative to the output root."""
    return f"{DATA_DIR}/{shard_id}.parquet"


def redact(config: Any) -> Any:
    """A copy of ``config`` with secrets masked: values under keys that look like credentials (token, secret,
    password, key, credential, authorization; case-insensitive, anywhere in the key) and the user-info
    part of URLs (``s3://user:pass@host`` → ``s3://***@host``). Recurses into dicts and lists."""
    if isinstance(config, dict):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) and v is not None else redact(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [redact(v) for v in config]
    if isinstance(config, str):
        return _URL_USERINFO.sub(REDACTED + "@", config)
    return config


def make_run(config: dict[str, Any], model: dict[str, Any], num_codebooks: int,
             created: float | None = None) -> dict[str, Any]:
    """The run identity stored in ``_state/run.json``; ``model`` is ``{source, revision, sha256}``, plus
    ``untrained: True`` for generated random weights (recorded with a note; absent for real weights)."""
    model_record = {k: model.get(k) for k in ("source", "revision", "sha256")}
    if model.get("untrained"):
        model_record.update(untrained=True, note=UNTRAINED_NOTE)
    dtype = config.get("dtype", "float32")
    return {
        "config": redact(config),
        "model": model_record,
        # exact mode: float32 with TF32 off (the reference codes); fast mode: half precision, TF32 on (on CUDA)
        "precision": {"mode": "exact" if dtype == "float32" else "fast", "dtype": dtype, "tf32": dtype != "float32"},
        "num_codebooks": num_codebooks,
        "schema_version": SCHEMA_VERSION,
        "created": _iso(time.time() if created is None else created),
    }


def check_compatible(existing_run: dict[str, Any], new_run: dict[str, Any]) -> None:
    """Raise :class:`IncompatibleOutputError` if ``new_run`` would write codes that differ from ``existing_run``'s:
    another model (source or weights sha256), number of codebooks or schema version. Other config
    (batch size, workers, ...) may change between runs."""
    checks = {
        "model sha256": (existing_run["model"].get("sha256"), new_run["model"].get("sha256")),
        "model source": (existing_run["model"].get("source"), new_run["model"].get("source")),
        "num_codebooks": (existing_run["num_codebooks"], new_run["num_codebooks"]),
        "schema version": (existing_run["schema_version"], new_run["schema_version"]),
    }
    diffs = [f"{name}: output has {old!r}, this run has {new!r}" for name, (old, new) in checks.items() if old != new]
    if diffs:
        raise IncompatibleOutputError(
            "the output folder holds codes from an incompatible run (" + "; ".join(diffs) + "). "
            "Write to a new output folder, or use the same model and settings to resume."
        )


def init_run(output_url: str, run: dict[str, Any], storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check ``run`` against the output's ``_state/run.json`` (written here on first use); return the stored run."""
    url = storage.join(output_url, RUN_PATH)
    try:
        existing = storage.read_json(url, storage_options)
    except FileNotFoundError:
        storage.write_json(url, run, storage_options)
        return run
    check_compatible(existing, run)
    return existing


def record_url(output_url: str, shard_id: str) -> str:
    return storage.join(output_url, SHARDS_STATE_DIR, f"{shard_id}.json")


def write_record(output_url: str, shard: Shard, result: ShardWriteResult, failures: list[ClipFailure], *,
                 started: float, finished: float, attempt: int, status: str = "done",
                 kept_ids: list[str] | None = None, writer: tuple[str, int] | None = None,
                 storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record ``shard``'s file in ``_state/shards/{shard_id}.json``; call only after its Parquet file is committed.

    ``status`` is ``done``; ``partial`` for a shard whose tar or Parquet input could not be read to its end (its rows
    are written, but it is not done: the next run redoes it); or ``retained`` for a file that holds only rows of gone
    inputs. ``kept_ids`` are the clip
    ids of such rows in the file (carried over into a done shard, or all of a retained file's). ``started`` /
    ``finished`` are unix times; ``attempt`` counts from 1; ``writer`` is the run id and lock epoch of the run that
    writes it (see :func:`load_records`). Returns the record.
    """
    record = {
        "shard": {"shard_id": shard.shard_id, "kind": shard.kind, "uri": shard.uri,
                  "digest": shard.digest if status != "retained" else None},
        "status": status,
        "file": shard_file(shard.shard_id),
        "rows": result.rows,
        "carried": len(kept_ids or []),
        "frames": result.frames,
        "bytes": result.bytes,
        "sha256": result.sha256,
        "clips": result.rows + len(failures),
        "failed": len(failures),
        "failures": [asdict(f) for f in failures],
        "hours": result.duration_s / 3600,
        "schema": output_schema.to_json(result.metadata_schema),
        "started": _iso(started),
        "finished": _iso(finished),
        "attempt": attempt,
        "kept_ids": kept_ids or [],
        **({"run_id": writer[0], "epoch": writer[1]} if writer else {}),
    }
    storage.write_json(record_url(output_url, shard.shard_id), record, storage_options)
    return record


def load_records(output_url: str, storage_options: dict[str, Any] | None = None, *, check_order: bool = False
                 ) -> tuple[RecordSet, storage.Sizes]:
    """Every record by shard id (held as columns), and the data files by name with their sizes. The records come
    from the newest checkpoint where it holds them as listed now, the others from their files
    (:mod:`pipeline.ledger`).

    ``check_order`` (a run's plan and its final manifest): a record that a run whose lock was taken over may have
    written late is left out, as if it had never been written (its file is then stale, and redone): one written
    after the takeover by the run taken over, or one whose data file was written after it and after a takeover
    (both by the store's clock; the lock's history says when each epoch began). An output copied elsewhere gets new
    modification times: there, the shards of runs that were taken over are redone once."""
    state, data = storage.join(output_url, SHARDS_STATE_DIR), storage.join(output_url, DATA_DIR)
    listed = storage.list_table(state, storage_options)
    records = ledger.load(output_url, state, listed, storage_options)
    files = storage.list_table(data, storage_options)
    try:
        history = storage.read_json(storage.join(output_url, LOCK_PATH), storage_options).get("history", [])
    except FileNotFoundError:
        history = []
    takeovers = [h for h in history if h.get("took_over") and h.get("began") is not None] if check_order else []
    if takeovers:  # rare: only records written after a run's lock was taken over can be out of order
        record_times, file_times = (dict(zip(t.column("name").to_pylist(), t.column("modified").to_pylist()))
                                    for t in (listed, files))
        trusted = []
        for name, shard_id, file, epoch, run_id in zip(*(records.column(k).to_pylist() for k in
                                                         ("name", "shard_id", "file", "epoch", "run_id"))):
            why = _out_of_order({"epoch": epoch, "run_id": run_id}, record_times[name],
                                file_times.get(file.rsplit("/", 1)[-1]), history)
            if why:
                log.warning("shard %s: its record is not trusted (%s); the shard will be redone", shard_id, why)
            trusted.append(not why)
        records = records.filter(trusted)
    return records, storage.Sizes(files.select(["name", "size"]))


def fold_records(output_url: str, storage_options: dict[str, Any] | None = None,
                 writing: Callable[[], AbstractContextManager] | None = None) -> int | None:
    """Fold the records into a new checkpoint for :func:`load_records`, inside ``writing()`` (the run's fence):
    :func:`pipeline.ledger.compact`."""
    return ledger.compact(output_url, storage.join(output_url, SHARDS_STATE_DIR), storage_options, writing)


def _out_of_order(record: dict[str, Any], record_time: float | None, file_time: float | None,
                  history: list[dict[str, Any]]) -> str | None:
    takeovers = [h for h in history if h.get("took_over") and h.get("began") is not None]
    if record_time is None or not takeovers:
        return None
    epoch = record.get("epoch")
    later = [h for h in takeovers if epoch is not None and h["epoch"] > epoch]
    if later and record_time >= min(later, key=lambda h: h["epoch"])["began"]:
        successor = min(later, key=lambda h: h["epoch"])
        return (f"run {record.get('run_id')!r} (epoch {epoch}) wrote it after run {successor.get('run_id')!r} "
                f"(epoch {successor['epoch']}) had taken the output's lock over")
    if file_time is not None and file_time > record_time and file_time >= min(h["began"] for h in takeovers):
        return "its data file was written after it, and after a run's lock was taken over"
    return None


def file_matches(record: dict[str, Any], files: dict[str, int]) -> bool:
    """Whether the record's Parquet file exists with the recorded size."""
    return files.get(record["file"].rsplit("/", 1)[-1]) == record["bytes"]


def file_columns(files: Mapping[str, int]) -> tuple[pa.Array, pa.Array]:
    """The data files' names and sizes (``files``: name → size) as columns."""
    if isinstance(files, storage.Sizes):
        return files.columns()
    return pa.array(list(files), pa.string()), pa.array(list(files.values()), pa.int64())


def files_match(records: RecordSet, files: Mapping[str, int]) -> pa.Array:
    """:func:`file_matches` for every record, as a column (false where the file is missing or another size)."""
    names, sizes = file_columns(files)
    recorded = pc.replace_substring_regex(records.column("file"), pattern="^.*/", replacement="")
    found = pc.take(sizes, pc.index_in(recorded, value_set=names))
    return pc.fill_null(pc.equal(found, records.column("bytes")), False).combine_chunks()


def load_done(output_url: str, storage_options: dict[str, Any] | None = None, *, check_order: bool = False
              ) -> RecordSet:
    """Records (done and retained) by shard id, held as columns, keeping only those whose Parquet file exists with
    the recorded size (and, with ``check_order``, that no displaced run may have written late: :func:`load_records`)."""
    records, files = load_records(output_url, storage_options, check_order=check_order)
    matches = files_match(records, files)
    for shard_id, record in records.filter(pc.invert(matches)).items():
        size = files.get(record["file"].rsplit("/", 1)[-1])
        log.warning("shard %s has a record but its file %s is %s; it will be redone", shard_id, record["file"],
                    "missing" if size is None else f"{size} bytes, not {record['bytes']}")
    return records.filter(matches)


def _software_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in _DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def is_done(record: dict[str, Any] | None, shard: Shard) -> bool:
    """Whether ``record`` says ``shard`` is done as the listing has it now (same digest)."""
    return record is not None and record.get("status") == "done" and record["shard"].get("digest") == shard.digest


def is_partial(record: dict[str, Any] | None, shard: Shard) -> bool:
    """Whether ``record`` holds the rows of ``shard`` (same digest) read before its container's damage."""
    return record is not None and record.get("status") == "partial" and record["shard"].get("digest") == shard.digest


def build_manifest(output_url: str, run: dict[str, Any], shards: list[Shard], done: Mapping[str, dict[str, Any]], *,
                   started: float, finished: float | None = None, changes: dict[str, Any] | None = None,
                   change: Mapping[str, str] | None = None, removed: Sequence[Any] = ()) -> dict[str, Any]:
    """The manifest of an output: run identity, software versions, totals, what changed in the listing, timing, and
    under ``shards`` the index table (:data:`pipeline.index.SCHEMA`, in index order): one entry per input shard,
    per retained file and per removed shard (:func:`write_manifest` writes it as the index). Built on columns: at a
    million shards, no dict per record.

    ``done`` holds the valid records (:func:`load_done`: a :class:`~pipeline.records.RecordSet`, or records by shard
    id). ``started`` is when this session began (unix time); ``finished`` is set when it ended, and makes the status
    "complete" (every shard of the listing done) or "incomplete"; without it the status is "running". Speed
    (``x_realtime``) counts only the shards finished during this session, so a resumed run is not credited with
    earlier sessions' work. ``change`` gives each shard's change in this run's listing
    (:attr:`pipeline.plan.Plan.change`); ``removed`` the retired files of shards gone from it (with ``shard_id``,
    ``kind``, ``uri``), listed as ``removed`` unless they are retained.
    """
    if not isinstance(done, RecordSet):
        done = RecordSet.of((f"{shard_id}.json", record) for shard_id, record in done.items())
    now = time.time() if finished is None else finished
    wall_s = max(now - started, 0.0)
    ids = pa.array([s.shard_id for s in shards], pa.string())
    done_ids = done.column("shard_id").combine_chunks()
    recorded = done.column("status").cast(pa.string()).combine_chunks()

    # the listed shards: written where the record is done or partial for the shard as listed now, else pending
    at = pc.index_in(ids, value_set=done_ids)
    listed_status = pc.take(recorded, at)
    written = pc.fill_null(pc.and_(pc.is_in(listed_status, value_set=pa.array(["done", "partial"])),
                                   pc.equal(pc.take(done.column("digest").combine_chunks(), at),
                                            pa.array([s.digest for s in shards], pa.string()))), False)
    rows = pc.if_else(written, at, pa.scalar(None, at.type))  # the record of each written entry
    listed = _entries(done, rows, ids, pa.array([s.kind for s in shards], pa.string()),
                      pa.array([s.uri for s in shards], pa.string()),
                      pc.if_else(written, listed_status, "pending"), _changes(change, ids))
    # the files of shards gone from the listing that are kept, by shard id
    retained_rows = pc.indices_nonzero(pc.and_(pc.invert(pc.is_in(done_ids, value_set=ids)),
                                               pc.equal(recorded, "retained")))
    retained_rows = pc.take(retained_rows, pc.sort_indices(pc.take(done_ids, retained_rows)))
    retained_ids = pc.take(done_ids, retained_rows)
    retained = _entries(done, retained_rows, retained_ids,
                        *(pc.take(done.column(k).cast(pa.string()).combine_chunks(), retained_rows)
                          for k in ("kind", "uri", "status")), _changes(change, retained_ids))
    gone = [r for r in removed if r.shard_id not in done]
    entries = pa.concat_tables([listed, retained, pa.Table.from_pylist(
        [{"shard_id": r.shard_id, "kind": r.kind, "uri": r.uri, "status": "removed", "change": "removed"}
         for r in gone], index.SCHEMA)])

    counted = np.zeros(len(done), bool)  # the records of the written entries, where their failures may be listed
    counted[rows.filter(written).to_numpy()] = counted[retained_rows.to_numpy()] = True
    counted &= pc.or_(pc.is_valid(done.column("lists")), pc.is_valid(done.column("record"))).to_numpy()
    failed_by_class = Counter(f["error_class"] for r in done.filter(counted).values() for f in r["failures"])
    finished_at = pc.take(done.column("finished").cast(pa.string()).combine_chunks(), rows.filter(written))
    times = pc.unique(finished_at)
    recent = pa.array([t is not None and _unix(t) >= started for t in times.to_pylist()], pa.bool_())
    in_session = pc.take(recent, pc.index_in(finished_at, value_set=times))
    session_shards = pc.sum(in_session).as_py() or 0
    session_hours = sum(listed.column("hours").filter(written).filter(in_session).to_pylist())

    written_entries = entries.filter(pc.is_in(entries.column("status"), value_set=pa.array(index.WRITTEN)))
    frames = _total(written_entries, "frames")
    shards_done = _count(entries, "done")
    partial = _count(entries, "partial")
    remaining = len(shards) - shards_done
    if finished is not None:
        status = "complete" if remaining == 0 else "incomplete"
    else:
        status = "running"
    return {
        "status": status,
        "output_url": redact(output_url),
        "schema_version": run["schema_version"],
        "num_codebooks": run["num_codebooks"],
        "model": run["model"],
        "precision": run.get("precision"),
        "config": redact(run["config"]),
        "run_created": run["created"],
        "software": _software_versions(),
        "totals": {
            "shards": len(shards),
            "shards_done": shards_done,
            "partial_shards": partial,
            "retained_files": retained.num_rows,
            "clips": _total(written_entries, "rows"),
            "kept_clips": _total(written_entries, "carried"),
            "failed_clips": _total(written_entries, "failed"),
            "failed_by_class": dict(failed_by_class.most_common()),
            "hours": sum(written_entries.column("hours").to_pylist()),
            "frames": frames,
            "tokens": frames * run["num_codebooks"],
        },
        "listing": changes or {},
        "timing": {
            "started": _iso(started),
            "updated": _iso(now),
            "finished": _iso(finished) if finished is not None else None,
            "wall_s": wall_s,
            "x_realtime": session_hours * 3600 / wall_s if wall_s > 0 else 0.0,
            "eta_s": remaining * wall_s / session_shards if status == "running" and session_shards else None,
        },
        "shards": index.to_table(entries),
    }


def _entries(done: RecordSet, rows: pa.Array, ids: pa.Array, kinds: pa.Array, uris: pa.Array, statuses: pa.Array,
             changes: pa.Array) -> pa.Table:
    """Index entries (:data:`pipeline.index.SCHEMA`): those with a record row (``rows``) take its file's fields,
    the others (a null row) leave them null."""
    fields = [pc.take(done.column(k).combine_chunks(), rows).cast(index.SCHEMA.field(k).type)
              for k in index.SCHEMA.names[5:]]  # file, rows, ..., attempt
    return pa.Table.from_arrays([ids, kinds, uris, statuses, changes, *fields], schema=index.SCHEMA)


def _changes(change: Mapping[str, str] | None, ids: pa.Array) -> pa.Array:
    """The change of each shard id (null where ``change`` has none): on columns where ``change`` offers them
    (:class:`pipeline.plan.Changes`)."""
    if hasattr(change, "column"):
        return change.column(ids)
    change = change or {}
    return pa.array([change.get(i) for i in ids.to_pylist()], pa.string())


def _total(entries: pa.Table, key: str) -> int:
    return pc.sum(entries.column(key)).as_py() or 0


def _count(entries: pa.Table, status: str) -> int:
    return pc.sum(pc.equal(entries.column("status"), status)).as_py() or 0


def write_manifest(output_url: str, manifest: dict[str, Any], storage_options: dict[str, Any] | None = None, *,
                   wanted: Callable[[], bool] = lambda: True) -> dict[str, Any] | None:
    """Write ``manifest.json`` at the output root, atomically, and return what it holds. A manifest with ``shards``
    entries (:func:`build_manifest`) has them written to a new index first; ``manifest.json`` then points to it
    (``index``), and the older indexes are deleted last: a reader never finds a manifest whose index is missing or
    half-written. Without ``shards``, the manifest (a progress update) keeps the index it names. ``wanted`` is asked
    just before ``manifest.json`` is written; if it says no, that is not written and None is returned."""
    pointer = None
    if "shards" in manifest:
        shards_done = manifest["totals"]["shards_done"]
        pointer = index.write(output_url, manifest["shards"], storage_options, shards_done=shards_done)
        manifest = {**{k: v for k, v in manifest.items() if k != "shards"}, "index": pointer}
    if not wanted():
        return None
    storage.write_json(storage.join(output_url, MANIFEST_PATH), manifest, storage_options)
    if pointer is not None:
        index.remove_others(output_url, pointer["path"], storage_options)
    return manifest


def shard_table(output_url: str, current: dict[str, Any], storage_options: dict[str, Any] | None = None, *,
                statuses: Collection[str] | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """The output's entries (:data:`pipeline.index.SCHEMA`), only ``columns`` of those whose status is in
    ``statuses`` (default: all), read from the index ``current`` (the manifest) points to: the entries with a data
    file first, by file name, then the others. If the index was replaced since ``current`` was read (a run rewrote
    the manifest), the manifest is read again. An older output whose ``manifest.json`` holds the entries itself
    (``shards``) is read from there."""
    for _ in range(3):
        if "index" not in current:
            table = index.to_table(current["shards"])
            if statuses is not None:
                table = table.filter(pc.is_in(table.column("status"), pa.array(list(statuses), pa.string())))
            return table.select(list(columns or index.SCHEMA.names))
        try:
            return index.read(output_url, current["index"], storage_options, columns=columns, statuses=statuses)
        except index.IndexMissing as exc:
            latest = read_manifest(output_url, storage_options)
            if latest.get("index") == current["index"]:
                raise index.IndexMissing(f"{exc}; rerun `mimi-tokenize run` on the output to rewrite its index") \
                    from exc
            log.info("%s was rewritten while it was read; reading its new index", MANIFEST_PATH)
            current = latest
    raise index.IndexMissing(f"the index of {redact(output_url)} kept changing while it was read; try again")


def shard_entries(output_url: str, current: dict[str, Any], storage_options: dict[str, Any] | None = None, *,
                  statuses: Collection[str] | None = None, columns: Sequence[str] | None = None
                  ) -> list[dict[str, Any]]:
    """:func:`shard_table` as dicts: each with ``shard_id``, ``kind``, ``uri``, ``status``, ``change`` and, once
    written, ``file``, ``rows``, ``carried``, ``frames``, ``bytes``, ``sha256``, ``clips``, ``failed``, ``hours``,
    ``attempt`` (None before). Readers go through here, not ``manifest.json``."""
    return shard_table(output_url, current, storage_options, statuses=statuses, columns=columns).to_pylist()


def index_lag(current: dict[str, Any]) -> str | None:
    """What the index leaves out, when the manifest is a progress update written after it (a run that is going on or
    was interrupted): the index lists the entries as they were when this session wrote it."""
    pointer = current.get("index") or {}
    later = current["totals"]["shards_done"] - pointer.get("shards_done", current["totals"]["shards_done"])
    if later <= 0:
        return None
    return (f"the index lists the shards written by {pointer.get('written')}; {later} more were done after it and "
            "are left out until a run rewrites the index (`mimi-tokenize run` on the output)")


def read_manifest(output_url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read ``manifest.json``; raises ``FileNotFoundError`` if the output has none."""
    return storage.read_json(storage.join(output_url, MANIFEST_PATH), storage_options)


def failure_share(manifest: dict[str, Any]) -> float:
    """Failed clips over attempted clips (written + failed) in the finished shards; 0.0 if none."""
    totals = manifest["totals"]
    attempted = totals["clips"] + totals["failed_clips"]
    return totals["failed_clips"] / attempted if attempted else 0.0


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}"


def summarize(manifest: dict[str, Any]) -> str:
    """A short human status of an output, for ``mimi-tokenize status OUTPUT``."""
    totals, timing = manifest["totals"], manifest["timing"]
    share = 100 * totals["shards_done"] / totals["shards"] if totals["shards"] else 100.0
    lines = [
        f"status: {manifest['status']} — {totals['shards_done']}/{totals['shards']} shards done ({share:.1f}%)",
        f"audio: {totals['hours']:.2f} h in {totals['clips']:,} clips; "
        f"{totals['failed_clips']:,} failed ({100 * failure_share(manifest):.2f}%)",
    ]
    if manifest["model"].get("untrained"):
        lines.append(f"model: {manifest['model'].get('note') or UNTRAINED_NOTE}")
    if totals.get("kept_clips"):
        lines.append(f"kept: {totals['kept_clips']:,} clips whose inputs are gone from the listing "
                     f"(in {totals['retained_files']:,} retained file(s) and in redone shards; --prune drops them)")
    listing = manifest.get("listing") or {}
    if listing and (listing["clips"]["new"] or listing["clips"]["gone"] or listing["shards"]["changed"]):
        clips, shards = listing["clips"], listing["shards"]
        fate = "pruned" if listing["prune"] else f"kept {clips['kept']:,}"
        lines.append(f"listing: {clips['new']:,} new clip(s), {clips['gone']:,} gone ({fate}); shards: "
                     f"{shards['added']:,} added, {shards['changed']:,} changed, {shards['removed']:,} removed, "
                     f"{shards['unchanged']:,} unchanged")
    if totals["failed_by_class"]:
        lines.append("failures: " + ", ".join(f"{cls} {n:,}" for cls, n in totals["failed_by_class"].items()))
    lines.append(f"codes: {totals['frames']:,} frames × {manifest['num_codebooks']} codebooks = "
                 f"{totals['tokens']:,} tokens")
    speed = (f"speed: {timing['x_realtime']:.1f}x realtime over {_duration(timing['wall_s'])} wall "
             f"(updated {timing['updated']})")
    if timing["eta_s"] is not None:
        speed += f"; ETA {_duration(timing['eta_s'])}"
    lines.append(speed)
    return "\n".join(lines)
