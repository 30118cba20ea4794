"""Commit steps on the output: a shard's file then its record; retiring a stale file; conforming a file to the schema.

Each step writes the Parquet file first (atomically: a crash never leaves a file that looks complete) and the
record second, so a record never describes a file that is not there. A step killed between the two is detected by
the next run (:mod:`pipeline.plan`: the file does not match its record) and redone.
"""

from __future__ import annotations

import concurrent.futures
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import manifest, retry, storage
from pipeline import schema as output_schema
from pipeline.lock import Fence
from pipeline.plan import Retire
from pipeline.types import ClipFailure, EncodedClip, Shard
from pipeline.writer import CORE_COLUMNS, write_shard, write_table


@dataclass(frozen=True)
class Output:
    """Where and how shards are written: the output URL, its storage options, K, the key-value metadata every file
    carries (model provenance; the shard id is added per file), and the run's :class:`~pipeline.lock.Fence`: every
    write first checks that the run still holds the output's lock (records name the run id and lock epoch)."""

    url: str
    num_codebooks: int
    file_metadata: dict[str, str]
    storage_options: dict[str, Any] = field(default_factory=dict)
    fence: Fence | None = None

    def writing(self) -> AbstractContextManager:
        """Writes that check the run still holds the output's lock, and retry only while it provably does."""
        return self.fence.writing() if self.fence is not None else nullcontext()

    @property
    def writer(self) -> tuple[str, int] | None:
        return None if self.fence is None else (self.fence.run_id, self.fence.epoch)

    def data_url(self, shard_id: str) -> str:
        return storage.join(self.url, manifest.shard_file(shard_id))

    def metadata_for(self, shard_id: str) -> dict[str, str]:
        return {"shard_id": shard_id, **self.file_metadata}

    def read_table(self, shard_id: str, columns: list[str] | None = None) -> pa.Table:
        url = self.data_url(shard_id)
        fs, path = storage.get_fs(url, self.storage_options)

        def read() -> pa.Table:
            fs.invalidate_cache(path)  # the file may have been rewritten since this process last saw it
            with fs.open(path, "rb") as f:
                return pq.ParquetFile(f).read(columns=columns)  # one file: not read_table's dataset machinery

        return retry.call(read, what=f"read {url}")

    def read_ids(self, shard_ids: list[str]) -> dict[str, list[str]]:
        """The clip ids in each of these shards' data files (read concurrently: one column each, made a list of ids by
        the thread that reads it, so that no table waits in a queue: 10^4 stale files are 10^4 tables)."""
        def ids(shard_id: str) -> list[str]:
            return self.read_table(shard_id, ["id"]).column("id").to_pylist()

        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            return dict(zip(shard_ids, pool.map(ids, shard_ids)))

    def commit(self, shard: Shard, rows: list[EncodedClip], failures: list[ClipFailure], *, schema: pa.Schema | None,
               kept: tuple[str, ...] | list[str], started: float, attempt: int) -> dict[str, Any]:
        """Write the shard's file (its encoded rows, then the rows ``kept`` from its retired file) and its record.

        ``kept`` are the ids the plan decided to carry over (inputs gone from the listing). They are read from the
        shard's file as it is now, whichever of the retired file or an earlier attempt's file it is, and only they:
        a retried commit writes the same file again, never an earlier attempt's rows twice."""
        carried = self.kept_rows(shard.shard_id, list(kept)) if kept else None
        with self.writing():
            result = write_shard(self.data_url(shard.shard_id), rows, num_codebooks=self.num_codebooks,
                                 file_metadata=self.metadata_for(shard.shard_id), schema=schema, carried=carried,
                                 storage_options=self.storage_options)
        status = "partial" if any(f.stage == "container" for f in failures) else "done"
        with self.writing():
            return manifest.write_record(self.url, shard, result, failures, started=started, finished=time.time(),
                                         attempt=attempt, status=status, kept_ids=list(kept), writer=self.writer,
                                         storage_options=self.storage_options)

    def kept_rows(self, shard_id: str, kept: list[str]) -> pa.Table:
        """The rows ``kept`` of the shard's file, each once (the first, should a damaged file hold one twice); raises
        if one is missing: a kept row is never dropped silently."""
        table = self.read_table(shard_id)
        first: dict[str, int] = {}
        for i, clip_id in enumerate(table.column("id").to_pylist()):
            first.setdefault(clip_id, i)
        missing = [clip_id for clip_id in kept if clip_id not in first]
        if missing:
            raise RuntimeError(f"shard {shard_id}: its file lacks {len(missing)} of the {len(kept)} row(s) the plan "
                               f"keeps for inputs gone from the listing (e.g. {missing[:3]}); not writing it")
        return table.take(pa.array(sorted(first[clip_id] for clip_id in set(kept)), pa.int64()))

    def retire(self, item: Retire) -> dict[str, Any] | None:
        """Rewrite a stale file with only the rows ``item.keep`` (record ``retained``), or delete file and record."""
        started = time.time()
        if not item.keep:
            with self.writing():
                storage.remove(self.data_url(item.shard_id), self.storage_options)
                storage.remove(manifest.record_url(self.url, item.shard_id), self.storage_options)
            return None
        table = self.kept_rows(item.shard_id, item.keep)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               b"shard_id": item.shard_id.encode()})
        return self._rewrite(Shard(item.shard_id, item.kind, item.uri, "", ""), table, "retained", started,
                             kept_ids=table.column("id").to_pylist())

    def conform(self, record: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
        """Rewrite a recorded file with the metadata columns of ``schema`` (the end-of-run unification)."""
        started = time.time()
        table = output_schema.conform(self.read_table(record["shard"]["shard_id"]), schema, len(CORE_COLUMNS))
        info = record["shard"]
        shard = Shard(info["shard_id"], info["kind"], info["uri"], "", info.get("digest") or "")
        failures = [ClipFailure(**f) for f in record["failures"]]
        return self._rewrite(shard, table, record["status"], started, failures, record.get("attempt", 1),
                             record["kept_ids"])

    def _rewrite(self, shard: Shard, table: pa.Table, status: str, started: float,
                 failures: list[ClipFailure] | None = None, attempt: int = 1,
                 kept_ids: list[str] | None = None) -> dict[str, Any]:
        with self.writing():
            result = write_table(self.data_url(shard.shard_id), table, storage_options=self.storage_options)
        with self.writing():
            return manifest.write_record(self.url, shard, result, failures or [], started=started,
                                         finished=time.time(), attempt=attempt, status=status, kept_ids=kept_ids,
                                         writer=self.writer, storage_options=self.storage_options)
