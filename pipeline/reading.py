"""Reading an output back: its Parquet files in a fixed order, and their rows a row group at a time as flat arrays
of codes (no Python object per frame), for ``export`` and the training loader.

Sources: an output folder of ``mimi-tokenize run`` (the files its manifest lists as written, done or retained), or
any folder with ``data/*.parquet`` or ``data/*/*.parquet`` in the same schema, e.g. a dataset published to the Hub
(``hf://datasets/ORG/NAME``) or its staging folder. Files are read in the order of their paths.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import index, manifest, retry, storage
from pipeline.rowfilter import RowFilter, group_mask


@dataclass
class CodesBatch:
    """Rows of one row group: ``codes`` int16 ``[frames, K]`` (all rows' frames, concatenated), ``offsets`` int64
    ``[rows + 1]`` (row i is ``codes[offsets[i]:offsets[i + 1]]``), and the rows' ids."""

    codes: np.ndarray
    offsets: np.ndarray
    ids: list[str]
    duration_s: float  # the rows' audio, summed

    @property
    def rows(self) -> int:
        return len(self.offsets) - 1


def data_files(url: str, storage_options: dict[str, Any] | None = None) -> tuple[list[str], dict[str, Any] | None]:
    """The URLs of the Parquet files of the output (or dataset folder) ``url``, sorted by name, and its manifest
    (None for a folder without one)."""
    try:
        current = manifest.read_manifest(url, storage_options)
    except FileNotFoundError:
        current = None
    if current is not None:
        files = manifest.shard_table(url, current, storage_options, statuses=index.WRITTEN, columns=["file"])
        return [storage.join(url, f) for f in files.column("file").to_pylist()], current
    fs, path = storage.get_fs(storage.join(url, manifest.DATA_DIR), storage_options)
    try:  # data/*.parquet, or data/*/*.parquet as publish lays them out
        names = [posixpath.relpath(p, path) for p in retry.call(fs.find, path, what=f"list {url}")
                 if p.endswith(".parquet")]
    except FileNotFoundError:
        names = []
    if not names:
        raise FileNotFoundError(f"{manifest.redact(url)} has no manifest.json and no data/*.parquet")
    return [storage.join(url, manifest.DATA_DIR, n) for n in sorted(names)], None


def open_parquet(url: str, storage_options: dict[str, Any] | None = None) -> pq.ParquetFile:
    fs, path = storage.get_fs(url, storage_options)
    return retry.call(lambda: pq.ParquetFile(fs.open(path, "rb")), what=f"read {url}")


def num_codebooks(parquet: pq.ParquetFile) -> int:
    return parquet.schema_arrow.field("codes").type.value_type.list_size


def flatten(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A ``codes`` column → (int16 ``[frames, K]``, int64 offsets ``[rows + 1]``), zero-copy where Arrow allows."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    k = array.type.value_type.list_size
    offsets = array.offsets.to_numpy().astype(np.int64)
    steps = array.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    flat = steps.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, k), offsets - offsets[0]


def iter_codes(parquet: pq.ParquetFile, row_filter: RowFilter | None = None) -> Iterator[CodesBatch]:
    """The file's rows (those ``row_filter`` selects) with their ids, one :class:`CodesBatch` per row group."""
    for group in range(parquet.metadata.num_row_groups):
        table = parquet.read_row_group(group, columns=["codes", "id", "duration_s"])
        mask = group_mask(parquet, group, row_filter)
        if mask is not None:
            table = table.filter(mask)
        codes, offsets = flatten(table.column("codes"))
        seconds = pc.sum(table.column("duration_s")).as_py() or 0.0
        yield CodesBatch(codes, offsets, table.column("id").to_pylist(), seconds)
