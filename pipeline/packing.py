"""Pack an output's many small shard files into few Parquet files of a target size, for the Hub and its readers.

Most shards are small (150 clips of 10 s at K = 8 is about 200 KB), while the Hub wants < 10,000 files per folder
and readers want files of 100 MB-1 GB. :func:`plan` cuts the shards, in the run's order and kept whole, into files
of at most ``target_bytes`` of shard files each (a shard larger than that is a file alone), named
``data/{i // files_per_folder:05d}/train-{i:06d}.parquet``. The plan is greedy in order, so shards appended to a
dataset change only its last file and add new ones; every other name and byte stays.

:func:`pack_file` writes one planned file: each shard file read whole, checked against the sha256 of its done
record, its rows conformed to the union schema of all shard files (:func:`union_schema`: metadata columns that only
some shards have are null elsewhere) and written in row groups of about ``row_group_bytes`` of raw codes (the rule of
the run's own writer): ``datasets`` streams and distributes a Parquet file a row group at a time, so a row group
bounds a streaming reader's memory. The same shards always give the same bytes (for one pyarrow version), which is
how a resumed publish recognises the files it uploaded already. Memory: one shard file and one row group.

The shard → file mapping (:func:`mapping_table`) gives each shard's packed file and row range there.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mimi.checkpoint import sha256_file
from pipeline import manifest, retry, schema, storage
from pipeline.writer import CORE_COLUMNS, metadata_schema

TARGET_FILE_BYTES = 500 * 2**20
ROW_GROUP_BYTES = 100 * 2**20
FILES_PER_FOLDER = 10_000
MAPPING_PATH = "_publish/shards.parquet"
DATA_GLOB = "data/*/train-*.parquet"


class PackingError(RuntimeError):
    """A shard file differs from its done record, or the shard files cannot share one schema."""


@dataclass(frozen=True)
class PackedFile:
    """One planned file: its path in the dataset and the done records of the shards it holds, in order."""

    path: str
    records: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class PackResult:
    """A written file: rows, in-memory Arrow bytes of its rows (what ``datasets`` counts when it reads them, give or
    take a validity bitmap per chunk), size, sha256, each shard's ``[start, stop)`` row range in it, and the frames
    and seconds of audio of its rows."""

    rows: int
    arrow_bytes: int
    size: int
    sha256: str
    ranges: tuple[tuple[int, int], ...]
    frames: int = 0
    seconds: float = 0.0


def packed_path(index: int, files_per_folder: int = FILES_PER_FOLDER) -> str:
    """Path of the ``index``-th packed file: ``data/00000/train-000000.parquet``."""
    return f"data/{index // files_per_folder:05d}/train-{index:06d}.parquet"


def plan(records: list[dict[str, Any]], target_bytes: int = TARGET_FILE_BYTES,
         files_per_folder: int = FILES_PER_FOLDER) -> list[PackedFile]:
    """The shards of ``records`` (in order, whole) cut greedily into files of at most ``target_bytes``."""
    groups: list[list[dict[str, Any]]] = []
    size = 0
    for record in records:
        if not groups or size + record["bytes"] > target_bytes:
            groups.append([])
            size = 0
        groups[-1].append(record)
        size += record["bytes"]
    return [PackedFile(packed_path(i, files_per_folder), tuple(g)) for i, g in enumerate(groups)]


def union_schema(output_url: str, records: list[dict[str, Any]],
                 storage_options: dict[str, Any] | None = None) -> pa.Schema:
    """The schema of every packed file: the shards' core columns (which must agree), then the union of their
    metadata columns; the key-value metadata of the first shard file without its ``shard_id``."""
    def footer(record: dict[str, Any]) -> pa.Schema:
        fs, path = storage.get_fs(storage.join(output_url, record["file"]), storage_options)
        return retry.call(lambda: pq.read_schema(fs.open(path, "rb")), what=f"read {record['file']}")

    with ThreadPoolExecutor(16) as pool:
        schemas = list(pool.map(footer, records))
    core = pa.schema(list(schemas[0])[:len(CORE_COLUMNS)])
    for record, this in zip(records, schemas):
        if not pa.schema(list(this)[:len(CORE_COLUMNS)]).equals(core):
            raise PackingError(f"{record['file']} has core columns {list(this)[:len(CORE_COLUMNS)]}, but "
                               f"{records[0]['file']} has {list(core)}: they cannot be packed into one dataset")
    meta = {k: v for k, v in (schemas[0].metadata or {}).items() if k != b"shard_id"}
    unified = schema.unify(metadata_schema(s) for s in schemas)
    return pa.schema(list(core) + list(unified), metadata=meta)


def _read_shard(output_url: str, record: dict[str, Any], storage_options: dict[str, Any] | None) -> pq.ParquetFile:
    """The shard file of ``record``, read whole and checked against the record's size and sha256."""
    url = storage.join(output_url, record["file"])
    fs, path = storage.get_fs(url, storage_options)
    data = retry.call(fs.cat_file, path, what=f"read {manifest.redact(url)}")
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != record["bytes"] or digest != record["sha256"]:
        raise PackingError(f"{manifest.redact(url)} has {len(data)} bytes and sha256 {digest}, but its done record "
                           f"says {record['bytes']} and {record['sha256']}: the file changed after the run wrote it; "
                           "rerun the shard")
    return pq.ParquetFile(pa.BufferReader(data))


def _shard_tables(output_url: str, packed: PackedFile, target: pa.Schema, ranges: list[tuple[int, int]],
                  storage_options: dict[str, Any] | None, keep: Callable[[dict[str, Any]], np.ndarray] | None
                  ) -> Iterator[pa.Table]:
    """The rows of ``packed``'s shards (those ``keep(record)`` selects, if given), a source row group at a time,
    conformed to ``target``; fills ``ranges``."""
    start = 0
    for record in packed.records:
        parquet = _read_shard(output_url, record, storage_options)
        mask = None if keep is None else keep(record)
        rows = kept = 0
        for group in range(parquet.metadata.num_row_groups):
            table = parquet.read_row_group(group).replace_schema_metadata(None)
            if mask is not None:
                table = table.filter(mask[rows:rows + table.num_rows])
            rows += parquet.metadata.row_group(group).num_rows
            kept += table.num_rows
            yield schema.conform(table, metadata_schema(target), len(CORE_COLUMNS))
        if rows != record["rows"]:
            raise PackingError(f"{record['file']} holds {rows} rows, its done record {record['rows']}")
        ranges.append((start, start + kept))
        start += kept


def pack_file(output_url: str, packed: PackedFile, target: pa.Schema, dest: str | os.PathLike, *,
              row_group_bytes: int = ROW_GROUP_BYTES, storage_options: dict[str, Any] | None = None,
              keep: Callable[[dict[str, Any]], np.ndarray] | None = None) -> PackResult:
    """Write ``packed`` to the local file ``dest`` (under a temporary name first) in the schema ``target``; with
    ``keep``, only the rows of each shard that ``keep(record)`` (bool per row) selects."""
    k = target.field("codes").type.value_type.list_size
    tmp = f"{dest}.tmp"
    ranges: list[tuple[int, int]] = []
    pending: list[pa.Table] = []
    rows = arrow_bytes = frames = 0
    seconds = 0.0
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    with pq.ParquetWriter(tmp, target, compression="zstd", use_dictionary=True, write_page_index=True) as writer:
        def write(table: pa.Table) -> None:
            nonlocal rows, arrow_bytes, frames, seconds
            writer.write_table(table, row_group_size=table.num_rows)
            rows += table.num_rows
            arrow_bytes += table.nbytes
            frames += pc.sum(table.column("n_frames")).as_py() or 0
            seconds += pc.sum(table.column("duration_s")).as_py() or 0.0

        for table in _shard_tables(output_url, packed, target, ranges, storage_options, keep):
            buffered = pa.concat_tables([*pending, table])
            ends = np.cumsum(buffered.column("n_frames").to_numpy().astype(np.int64) * k * 2)
            start = 0
            while True:  # cut where a row group's codes reach row_group_bytes: wherever the source row groups end
                stop = int(np.searchsorted(ends, (ends[start - 1] if start else 0) + row_group_bytes)) + 1
                if stop > len(ends):
                    break
                write(buffered.slice(start, stop - start))
                start = stop
            pending = [buffered.slice(start)] if start < buffered.num_rows else []
        if pending:
            write(pa.concat_tables(pending))
    os.replace(tmp, dest)
    return PackResult(rows, arrow_bytes, os.path.getsize(dest), sha256_file(dest), tuple(ranges), frames, seconds)


def mapping_table(files: list[PackedFile], results: list[PackResult]) -> pa.Table:
    """One row per shard: its packed file (path, sha256), the ``[row_start, row_stop)`` of its rows there, and the
    shard's id, file and sha256 in the output."""
    rows = [(f.path, res.sha256, record["shard"]["shard_id"], record["file"], record["sha256"], start, stop)
            for f, res in zip(files, results) for record, (start, stop) in zip(f.records, res.ranges)]
    names = ["packed_file", "packed_sha256", "shard_id", "shard_file", "shard_sha256", "row_start", "row_stop"]
    types = [pa.string()] * 5 + [pa.int64()] * 2
    columns = list(zip(*rows)) if rows else [[] for _ in names]
    return pa.table([pa.array(c, t) for c, t in zip(columns, types)], names=names)
