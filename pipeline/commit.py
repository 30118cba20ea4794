"""Commit steps on the output: a shard's file then its record; retiring a stale file; conforming a file to the schema.

Each step writes the Parquet file first (atomically: a crash never leaves a file that looks complete) and the
record second, so a record never describes a file that is not there. A step killed between the two is detected by
the next run (:mod:`pipeline.plan`: the file does not match its record) and redone.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import manifest, retry, storage
from pipeline import schema as output_schema
from pipeline.plan import Retire
from pipeline.types import ClipFailure, EncodedClip, Shard
from pipeline.writer import CORE_COLUMNS, write_shard, write_table


@dataclass(frozen=True)
class Output:
    """Where and how shards are written: the output URL, its storage options, K, and the key-value metadata every
    file carries (model provenance; the shard id is added per file)."""

    url: str
    num_codebooks: int
    file_metadata: dict[str, str]
    storage_options: dict[str, Any] = field(default_factory=dict)

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
                return pq.read_table(f, columns=columns)

        return retry.call(read, what=f"read {url}")

    def read_ids(self, shard_ids: list[str]) -> dict[str, list[str]]:
        """The clip ids in each of these shards' data files (read concurrently: one column each)."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            tables = pool.map(lambda shard_id: self.read_table(shard_id, ["id"]), shard_ids)
            return {shard_id: table.column("id").to_pylist() for shard_id, table in zip(shard_ids, tables)}

    def commit(self, shard: Shard, rows: list[EncodedClip], failures: list[ClipFailure], *, schema: pa.Schema | None,
               carry: bool, started: float, attempt: int) -> dict[str, Any]:
        """Write the shard's file (its encoded rows, then the rows carried from its retired file) and its record."""
        carried = self.read_table(shard.shard_id) if carry else None
        result = write_shard(self.data_url(shard.shard_id), rows, num_codebooks=self.num_codebooks,
                             file_metadata=self.metadata_for(shard.shard_id), schema=schema, carried=carried,
                             storage_options=self.storage_options)
        kept = carried.column("id").to_pylist() if carried is not None else []
        return manifest.write_done_record(self.url, shard, result, failures, started=started, finished=time.time(),
                                          attempt=attempt, kept_ids=kept, storage_options=self.storage_options)

    def retire(self, item: Retire) -> dict[str, Any] | None:
        """Rewrite a stale file with only the rows ``item.keep`` (record ``retained``), or delete file and record."""
        started = time.time()
        if not item.keep:
            storage.remove(self.data_url(item.shard_id), self.storage_options)
            storage.remove(manifest.record_url(self.url, item.shard_id), self.storage_options)
            return None
        table = self.read_table(item.shard_id)
        table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(item.keep, pa.string())))
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
        result = write_table(self.data_url(shard.shard_id), table, storage_options=self.storage_options)
        return manifest.write_done_record(self.url, shard, result, failures or [], started=started,
                                          finished=time.time(), attempt=attempt, status=status, kept_ids=kept_ids,
                                          storage_options=self.storage_options)
