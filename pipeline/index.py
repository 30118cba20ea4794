"""The output's index: one Parquet row per shard entry (a shard of the listing, a retained file, a removed shard),
so that ``manifest.json`` stays small at any size and readers fetch only the columns and rows they need.

Rows come in a fixed order: the entries with a data file (``done``, ``partial``, ``retained``) first, by file name
(the order readers read the data in), then the others (``pending``, ``removed``) by shard id; row ``i < files`` is
the ``i``-th data file. Each write goes to a new name (``_index/shards-{time}-{random}.parquet``), published whole;
``manifest.json`` then points to it (:mod:`pipeline.manifest`), and only after that are older indexes deleted, so a
manifest never points to a half-written index.
"""

from __future__ import annotations

import hashlib
import posixpath
import uuid
from collections.abc import Collection, Sequence
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import retry, storage

INDEX_DIR = "_index"
WRITTEN = ("done", "partial", "retained")  # the statuses of entries with a data file
ROW_GROUP_ROWS = 65_536
SCHEMA = pa.schema([
    ("shard_id", pa.string()), ("kind", pa.string()), ("uri", pa.string()),
    ("status", pa.string()),  # done / partial / retained / pending / removed (its file retired and deleted)
    ("change", pa.string()),  # in this run's listing: added / changed / removed / unchanged (null: not known)
    ("file", pa.string()), ("rows", pa.int64()), ("carried", pa.int64()), ("frames", pa.int64()),
    ("bytes", pa.int64()), ("sha256", pa.string()), ("clips", pa.int64()), ("failed", pa.int64()),
    ("hours", pa.float64()), ("attempt", pa.int32()),
])


class IndexMissing(FileNotFoundError):
    """The index a manifest points to is missing, or is not the file it names (another size)."""


def to_table(entries: Sequence[dict[str, Any]] | pa.Table) -> pa.Table:
    """The entries (dicts, or a table of :data:`SCHEMA`) as an index table, in index order (see the module
    docstring)."""
    if not isinstance(entries, pa.Table):
        entries = pa.Table.from_struct_array(pa.array(list(entries), pa.struct(list(SCHEMA))))  # missing keys: null
    written = pc.is_in(entries.column("status"), pa.array(WRITTEN))
    first, then = pc.indices_nonzero(written), pc.indices_nonzero(pc.invert(written))
    order = pa.concat_arrays([pc.take(first, pc.sort_indices(pc.take(entries.column("file"), first))),
                              pc.take(then, pc.sort_indices(pc.take(entries.column("shard_id"), then)))])
    return entries.take(order)  # one copy


def write(output_url: str, entries: Sequence[dict[str, Any]] | pa.Table,
          storage_options: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """Write ``entries`` (:func:`to_table`) to a new index file; return its pointer for ``manifest.json``: ``path``
    (relative to the output), ``rows``, ``files`` (entries with a data file), ``bytes``, ``sha256``, ``written`` and
    ``extra``."""
    table = to_table(entries)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = f"{INDEX_DIR}/shards-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
    with storage.atomic_output(storage.join(output_url, path), storage_options) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, compression="zstd")
        digest, size = hashlib.sha256(), 0
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
    files = int(pc.sum(pc.is_in(table.column("status"), pa.array(WRITTEN))).as_py() or 0)
    return {"path": path, "rows": table.num_rows, "files": files, "bytes": size, "sha256": digest.hexdigest(),
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra}


def remove_others(output_url: str, keep: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete the index files other than ``keep`` (older indexes, and those of writes cut short)."""
    folder = storage.join(output_url, INDEX_DIR)
    for name in storage.list_files(folder, storage_options):
        if name != posixpath.basename(keep):
            storage.remove(storage.join(folder, name), storage_options)


def read(output_url: str, pointer: dict[str, Any], storage_options: dict[str, Any] | None = None, *,
         columns: Sequence[str] | None = None, statuses: Collection[str] | None = None) -> pa.Table:
    """The index ``pointer`` names, with only ``columns`` (all by default) and the rows whose status is in
    ``statuses`` (all by default). Entries with a data file are read without the others' row groups. Raises
    :class:`IndexMissing` if the file is missing or not the size the pointer records."""
    url = storage.join(output_url, pointer["path"])
    fs, path = storage.get_fs(url, storage_options)

    def load() -> pa.Table:
        fs.invalidate_cache(path)
        with fs.open(path, "rb") as f:
            size = f.seek(0, 2)
            if size != pointer["bytes"]:
                raise IndexMissing(f"{url} is {size} bytes, the manifest says {pointer['bytes']}")
            f.seek(0)
            parquet = pq.ParquetFile(f)
            wanted = list(SCHEMA.names if columns is None else columns)
            read_columns = wanted if statuses is None or "status" in wanted else [*wanted, "status"]
            groups = range(parquet.num_row_groups)
            if statuses is not None and set(statuses) <= set(WRITTEN):  # written rows come first
                groups = range(min(parquet.num_row_groups, -(-pointer["files"] // max(_group_rows(parquet), 1))))
            table = parquet.read_row_groups(list(groups), columns=read_columns) if groups else \
                parquet.schema_arrow.empty_table().select(read_columns)
        if statuses is not None:
            table = table.filter(pc.is_in(table.column("status"), pa.array(list(statuses), pa.string())))
        return table.select(wanted)

    try:
        return retry.call(load, what=f"read {url}")
    except IndexMissing:
        raise
    except FileNotFoundError as exc:
        raise IndexMissing(f"{url} is missing") from exc


def _group_rows(parquet: pq.ParquetFile) -> int:
    return parquet.metadata.row_group(0).num_rows if parquet.num_row_groups else 0

