"""Per-shard records folded into Parquet checkpoints, so that a plan reads a few objects plus listing pages, not one
object per shard.

The records ``_state/shards/{shard_id}.json`` (:mod:`pipeline.manifest`) stay the unit of commit. A checkpoint
``_state/checkpoints/{seq:012d}.parquet`` is a cache of them, as Delta Lake folds its JSON log into Parquet: one row
per record file with the ``version`` its listing gave before it was read (ETag on S3; inode, size and times in ns on
local disk: `pipeline.storage.list_table`), its ``name``, and the record as columns
(:mod:`pipeline.records`): read back, it is an Arrow table, not a million parsed objects. A reader takes a
record from the newest readable checkpoint only where the listing still gives its file the same version, reads the
others, and ignores the rows of files no longer listed, so correctness never depends on a checkpoint: a damaged or
missing one costs reads, not results. Checkpoints are written atomically under the run's fence; the newest
:data:`KEEP` are kept.

Folded record files are not deleted: listing them is what tells a reader that a record was deleted (a retired
shard), rewritten (by this run, or late by a run whose lock was taken over: ``check_order`` dates it by its
listing), or written after the checkpoint. Deleting them would need tombstones and an order of writes that object
stores cannot give without a sequencer; listing costs one request per 1,000 records.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import records, retry, storage

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "_state/checkpoints"
KEEP = 2  # checkpoints kept: the newest, and the one before it (a reader that listed just before a new one landed)
ROW_GROUP = 50_000  # rows per row group and per batch read (bounds the memory of reading one)
READ_BATCH = 10_000  # record files read, parsed and made columns at a time (bounds a first fold's memory)
COLUMNS = pa.schema([("version", pa.string()), *records.COLUMNS])  # a record file's listed version, its record
_NAME = re.compile(r"\d{12}\.parquet")


def checkpoint_url(output_url: str, seq: int) -> str:
    return storage.join(output_url, CHECKPOINT_DIR, f"{seq:012d}.parquet")


def checkpoints(output_url: str, storage_options: dict[str, Any] | None = None) -> list[int]:
    """The sequence numbers of the output's checkpoints, newest first."""
    listed = storage.list_files(storage.join(output_url, CHECKPOINT_DIR), storage_options)
    return sorted((int(name.removesuffix(".parquet")) for name in listed if _NAME.fullmatch(name)), reverse=True)


class Listed:
    """The record files (``*.json``) of a listing (:func:`pipeline.storage.list_table`) that the store gives a version
    for (the others are always read), as two aligned columns."""

    def __init__(self, listed: pa.Table):
        named = pc.and_(pc.ends_with(listed.column("name"), ".json"), pc.is_valid(listed.column("version")))
        names, versions = listed.column("name"), listed.column("version")  # views (the usual case), not copies
        self.names, self.versions = (names, versions) if pc.all(named).as_py() else (names.filter(named),
                                                                                      versions.filter(named))

    def __len__(self) -> int:
        return len(self.names)

    def holds(self, names: pa.Array | pa.ChunkedArray, versions: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
        """Whether each ``(name, version)`` is listed: one hash table of the listed names, then the versions compared
        (no joined keys: at 10^6 records they would cost 80 MB each side)."""
        at = pc.index_in(names, value_set=self.names)
        return pc.fill_null(pc.equal(versions, pc.take(self.versions, at)), False)


def _json_names(listed: pa.Table) -> pa.ChunkedArray:
    return listed.column("name").filter(pc.ends_with(listed.column("name"), ".json"))


def _scan(url: str, storage_options: dict[str, Any] | None, wanted: Listed,
          take: Callable[[pa.RecordBatch], None]) -> None:
    """Pass each batch of the checkpoint at ``url``, cut to the rows ``wanted`` lists as they are, to ``take``."""
    fs, path = storage.get_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f, read_dictionary=records.DICTIONARY)
        if not records.plain_types(parquet.schema_arrow.empty_table()).schema.equals(COLUMNS):
            raise ValueError(f"not a checkpoint of this version (columns {parquet.schema_arrow.names})")
        keys = parquet.read(columns=["name", "version"])
        keep = wanted.holds(keys.column("name"), keys.column("version"))
        del keys
        pa.default_memory_pool().release_unused()  # the hash table's memory, back before the records are read
        start = 0
        for batch in parquet.iter_batches(batch_size=ROW_GROUP):
            kept = keep.slice(start, batch.num_rows)
            take(batch if pc.all(kept).as_py() else batch.filter(kept.combine_chunks()))  # no copy if all are kept
            start += batch.num_rows


def _read(url: str, storage_options: dict[str, Any] | None, wanted: Listed) -> pa.Table:
    batches: list[pa.RecordBatch] = []
    _scan(url, storage_options, wanted, batches.append)
    return pa.Table.from_batches(batches).drop_columns(["version"]) if batches else records.encode([])


def load(output_url: str, state_url: str, listed: pa.Table,
         storage_options: dict[str, Any] | None = None) -> records.RecordSet:
    """The records of the files ``listed`` (:func:`pipeline.storage.list_table`) in the folder ``state_url``
    (``*.json``), as columns: from the newest readable checkpoint where it holds the file's listed version, else read
    from the store."""
    wanted, table = Listed(listed), records.encode([])
    if len(wanted):
        for seq in checkpoints(output_url, storage_options):
            url = checkpoint_url(output_url, seq)
            try:
                table = retry.call(_read, url, storage_options, wanted, what=f"read {url}")
                break
            except Exception as exc:  # a cache: a checkpoint that cannot be read costs reads, not results
                log.warning("checkpoint %s cannot be read (%s); the records it holds are read one by one",
                            url, retry.brief(exc))
    del wanted
    names = _json_names(listed)
    missing = names.filter(pc.invert(pc.is_in(names, value_set=table.column("name"))))
    fetched = [table for _, table in _read_files(state_url, storage_options, missing)]
    pa.default_memory_pool().release_unused()  # the checkpoint's read buffers, back to the system
    if not fetched:
        return records.RecordSet(table)
    return records.RecordSet(pa.concat_tables([records.plain_types(table), *fetched]),
                             fetched=sum(t.num_rows for t in fetched))


def _read_files(state_url: str, storage_options: dict[str, Any] | None, names: pa.Array | pa.ChunkedArray
                ) -> Iterator[tuple[int, pa.Table]]:
    """The record files ``names`` in the folder ``state_url``, read and made columns :data:`READ_BATCH` at a time,
    each with the position in ``names`` of its batch's first (a file deleted since it was listed is left out)."""
    for start in range(0, len(names), READ_BATCH):
        part = names.slice(start, READ_BATCH).to_pylist()
        table = records.encode(storage.read_json_files(state_url, storage_options, part).items())
        if table.num_rows:
            yield start, table


def compact(output_url: str, state_url: str, storage_options: dict[str, Any] | None = None,
            writing: Callable[[], AbstractContextManager] | None = None) -> int | None:
    """Fold the records now in the folder ``state_url`` into a new checkpoint, unless the newest one holds exactly
    them; then delete all but the newest :data:`KEEP`. Writes and deletions run inside ``writing()`` (the run's
    fence). Returns the new checkpoint's sequence number, or None when nothing changed."""
    wanted = Listed(storage.list_table(state_url, storage_options))
    seqs = checkpoints(output_url, storage_options)
    for base in [*seqs[:1], None]:
        try:
            seq = _fold(output_url, state_url, storage_options, writing, wanted, base, seqs)
        except Exception as exc:
            if base is None:
                raise
            log.warning("checkpoint %s cannot be read (%s); folding the records without it",
                        checkpoint_url(output_url, base), retry.brief(exc))
            continue
        if seq is not None:
            with (writing or nullcontext)():
                for old in seqs[KEEP - 1:]:
                    storage.remove(checkpoint_url(output_url, old), storage_options)
        return seq
    return None


def _fold(output_url: str, state_url: str, storage_options: dict[str, Any] | None,
          writing: Callable[[], AbstractContextManager] | None, wanted: Listed, base: int | None,
          seqs: list[int]) -> int | None:
    held = pa.array([], pa.string())  # the names of the records the base checkpoint holds as listed now
    if base is None and not len(wanted):
        return None  # no records, no checkpoint
    if base is not None:
        url = checkpoint_url(output_url, base)
        fs, path = storage.get_fs(url, storage_options)
        table = retry.call(pq.read_table, path, columns=["name", "version"], filesystem=fs, what=f"read {url}")
        names = table.column("name")
        held = names.filter(wanted.holds(names, table.column("version")))
        if len(held) == len(names) == len(wanted):
            return None  # the newest checkpoint holds exactly the records listed now
    new = pc.invert(pc.is_in(wanted.names, value_set=held))
    new_names, new_versions = wanted.names.filter(new), wanted.versions.filter(new)
    added = 0
    seq = (seqs[0] if seqs else 0) + 1
    url = checkpoint_url(output_url, seq)
    with (writing or nullcontext)():
        with storage.atomic_output(url, storage_options) as tmp:
            with pq.ParquetWriter(tmp, COLUMNS, compression="zstd") as writer:
                if base is not None:
                    _scan(checkpoint_url(output_url, base), storage_options, wanted,
                          lambda batch: batch.num_rows and writer.write_table(
                              records.plain_types(pa.Table.from_batches([batch])), row_group_size=ROW_GROUP))
                for start, read in _read_files(state_url, storage_options, new_names):
                    # the version each file was listed with (a file is read after it was listed: a record rewritten
                    # in between is read again by the next reader, whose listing gives a newer version)
                    at = pc.index_in(read.column("name"), value_set=new_names.slice(start, READ_BATCH))
                    versions = pc.take(new_versions.slice(start, READ_BATCH), at)
                    writer.write_table(read.add_column(0, "version", versions),
                                       row_group_size=ROW_GROUP)
                    added += read.num_rows
    log.info("folded %d record(s) into checkpoint %s (%d new)", len(held) + added, url, added)
    return seq


class Compactor:
    """Runs ``fold`` (:func:`compact` on the output) every ``every`` new records, in a background thread (one fold at
    a time, so the scheduler's loop never waits for one), and once more when the run ends (:meth:`finish`)."""

    def __init__(self, fold: Callable[[], object], every: int):
        self.fold, self.every, self.count = fold, every, 0
        self.thread: threading.Thread | None = None

    def added(self, n: int = 1) -> None:
        """Count ``n`` new records; start a fold in the background once ``every`` have come since the last."""
        self.count += n
        if self.count >= self.every and not (self.thread and self.thread.is_alive()):
            self.count = 0
            self.thread = threading.Thread(target=self._fold, name="ledger-fold", daemon=True)
            self.thread.start()

    def finish(self, fold: bool = True) -> None:
        """Wait for a fold in progress; then fold what is there now (``fold``)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if fold:
            self._fold()

    def _fold(self) -> None:
        try:
            self.fold()
        except Exception as exc:  # a cache: the next run reads the records it lacks one by one
            log.warning("could not fold the records into a checkpoint (%s); the next plan reads them one by one",
                        retry.brief(exc))
