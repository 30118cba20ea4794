"""Reading an output back: its Parquet files in a fixed order, and their rows a row group at a time as flat arrays
of codes (no Python object per frame), for ``export`` and the training loader.

Sources: an output folder of ``mimi-tokenize run`` (the files its manifest lists as written, done or retained), or
any folder with ``data/*.parquet`` in the same schema, e.g. a dataset published to the Hub (``hf://datasets/ORG/NAME``)
or its staging folder. Files are read in the order of their names.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import manifest, retry, storage


@dataclass
class CodesBatch:
    """Rows of one row group: ``codes`` int16 ``[frames, K]`` (all rows' frames, concatenated), ``offsets`` int64
    ``[rows + 1]`` (row i is ``codes[offsets[i]:offsets[i + 1]]``), and the rows' ids."""

    codes: np.ndarray
    offsets: np.ndarray
    ids: list[str]

    @property
    def rows(self) -> int:
        return len(self.offsets) - 1

    def select(self, mask: np.ndarray) -> CodesBatch:
        """The rows where ``mask`` (bool per row) is true."""
        if mask.all():
            return self
        rows = np.flatnonzero(mask)
        lengths = np.diff(self.offsets)[rows]
        frames = np.concatenate([np.arange(self.offsets[r], self.offsets[r + 1]) for r in rows]) if len(rows) else \
            np.zeros(0, np.int64)
        return CodesBatch(self.codes[frames], np.r_[0, np.cumsum(lengths)], [self.ids[r] for r in rows])


def data_files(url: str, storage_options: dict[str, Any] | None = None) -> tuple[list[str], dict[str, Any] | None]:
    """The URLs of the Parquet files of the output (or dataset folder) ``url``, sorted by name, and its manifest
    (None for a folder without one)."""
    try:
        current = manifest.read_manifest(url, storage_options)
    except FileNotFoundError:
        current = None
    if current is not None:
        files = sorted(e["file"] for e in manifest.shard_entries(url, current, storage_options)
                       if e["status"] != "pending")
        return [storage.join(url, f) for f in files], current
    names = [n for n in storage.list_files(storage.join(url, manifest.DATA_DIR), storage_options)
             if n.endswith(".parquet")]
    if not names:
        raise FileNotFoundError(f"{manifest.redact(url)} has no manifest.json and no data/*.parquet")
    return [storage.join(url, manifest.DATA_DIR, n) for n in sorted(names)], None


def row_filter(output_url: str, file_url: str, rows: int, *, dedup: bool = False,
               storage_options: dict[str, Any] | None = None) -> np.ndarray | None:
    """The rows of the data file ``file_url`` that a reader keeps (bool per row, in file order), or None for all:
    with ``dedup``, the clips ``mimi-tokenize dedup`` keeps (:func:`pipeline.dedup.kept_mask`). Every reader that
    filters (export, the loader) asks here, so filters compose."""
    if not dedup:
        return None
    from pipeline.dedup import kept_mask

    return kept_mask(output_url, file_url, rows, storage_options)


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


def iter_codes(parquet: pq.ParquetFile) -> Iterator[CodesBatch]:
    """The file's rows with their ids, one :class:`CodesBatch` per row group."""
    for group in range(parquet.metadata.num_row_groups):
        table = parquet.read_row_group(group, columns=["codes", "id"])
        codes, offsets = flatten(table.column("codes"))
        yield CodesBatch(codes, offsets, table.column("id").to_pylist())
