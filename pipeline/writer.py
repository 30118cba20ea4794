"""Write one shard's clips and Mimi codes to one Parquet file.

Columns, in order: ``id`` (string), ``source_uri`` (string), ``codes`` (``list<fixed_size_list<int16, K>>``,
time-major ``[F, K]``), ``n_frames`` (int32), ``duration_s`` (float64), ``orig_sample_rate`` (int32),
``orig_channels`` (int16), then the clips' passthrough metadata columns.

Metadata columns: the union of the ``Clip.metadata`` keys in first-seen order, null where a clip lacks the
key, types inferred by pyarrow (nested dicts and lists included). A column whose values pyarrow cannot give
one type (e.g. ``1`` and ``"a"``), or whose type Parquet cannot store (an empty dict), is written as JSON
strings instead. Types are inferred per shard, so a key should keep one type across the corpus. A key
that collides with a core column is written as ``meta_{key}``.

The file is zstd-compressed with dictionary encoding and a page index, split into row groups of about
``row_group_bytes`` of raw codes, and carries ``file_metadata`` (plus ``schema_version`` and
``num_codebooks``) as Arrow schema key-value metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mimi.checkpoint import sha256_file
from pipeline.storage import atomic_output
from pipeline.types import Clip

SCHEMA_VERSION = 1
CODEBOOK_SIZE = 2048
CORE_COLUMNS = ("id", "source_uri", "codes", "n_frames", "duration_s", "orig_sample_rate", "orig_channels")


@dataclass(frozen=True)
class ShardWriteResult:
    """What was written: rows (clips), frames and audio seconds (summed), file size and sha256, final URL."""

    rows: int
    frames: int
    duration_s: float
    bytes: int
    sha256: str
    path: str


def codes_type(num_codebooks: int) -> pa.DataType:
    """Arrow type of the ``codes`` column: ``list<fixed_size_list<int16, K>>``."""
    return pa.list_(pa.list_(pa.int16(), num_codebooks))


def codes_array(codes: list[np.ndarray], num_codebooks: int) -> pa.ListArray:
    """Pack ``[K, F]`` integer code arrays into one ``list<fixed_size_list<int16, K>>`` array of ``[F, K]`` rows."""
    for i, c in enumerate(codes):
        if c.ndim != 2 or c.shape[0] != num_codebooks or not np.issubdtype(c.dtype, np.integer):
            raise ValueError(f"codes[{i}]: expected an integer array [{num_codebooks}, F], got {c.dtype} {c.shape}")
        if c.size and (c.min() < 0 or c.max() >= CODEBOOK_SIZE):
            raise ValueError(f"codes[{i}]: values must be in [0, {CODEBOOK_SIZE}), got [{c.min()}, {c.max()}]")
    frames = np.array([c.shape[1] for c in codes], dtype=np.int64)
    offsets = np.zeros(len(codes) + 1, dtype=np.int32)
    np.cumsum(frames, out=offsets[1:])
    flat = np.concatenate([c.T.astype(np.int16).ravel() for c in codes]) if codes else np.zeros(0, np.int16)
    steps = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.int16()), num_codebooks)
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), steps)


def _parquet_storable(t: pa.DataType) -> bool:
    """False if ``t`` nests an empty struct (inferred from ``{}``), which Parquet cannot store."""
    if pa.types.is_struct(t) and t.num_fields == 0:
        return False
    return all(_parquet_storable(t.field(i).type) for i in range(t.num_fields))


def _metadata_columns(clips: list[Clip]) -> dict[str, pa.Array]:
    keys = list(dict.fromkeys(k for clip in clips for k in clip.metadata))
    columns = {}
    for key in keys:
        values = [clip.metadata.get(key) for clip in clips]
        try:
            array = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            array = None
        if array is None or not _parquet_storable(array.type):
            array = pa.array([None if v is None else json.dumps(v, default=str) for v in values], type=pa.string())
        columns[f"meta_{key}" if key in CORE_COLUMNS else key] = array
    return columns


def build_table(clips: list[Clip], codes: list[np.ndarray], *, num_codebooks: int,
                file_metadata: dict[str, str]) -> pa.Table:
    """The shard's Arrow table (see the module docstring for the schema)."""
    if len(clips) != len(codes):
        raise ValueError(f"{len(clips)} clips but {len(codes)} code arrays")
    core = {
        "id": pa.array([c.clip_id for c in clips], pa.string()),
        "source_uri": pa.array([c.source_uri for c in clips], pa.string()),
        "codes": codes_array(codes, num_codebooks),
        "n_frames": pa.array([c.shape[1] for c in codes], pa.int32()),
        "duration_s": pa.array([c.duration_s for c in clips], pa.float64()),
        "orig_sample_rate": pa.array([c.orig_sample_rate for c in clips], pa.int32()),
        "orig_channels": pa.array([c.orig_channels for c in clips], pa.int16()),
    }
    table = pa.table({**core, **_metadata_columns(clips)})
    metadata = {**file_metadata, "schema_version": str(SCHEMA_VERSION), "num_codebooks": str(num_codebooks)}
    return table.replace_schema_metadata(metadata)


def _row_group_bounds(row_bytes: np.ndarray, row_group_bytes: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, stop)`` row ranges of about ``row_group_bytes`` each (at least one row each)."""
    bounds, start, acc = [], 0, 0
    for i, b in enumerate(row_bytes):
        acc += int(b)
        if acc >= row_group_bytes:
            bounds.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(row_bytes) or not bounds:
        bounds.append((start, len(row_bytes)))
    return bounds


def write_shard(url: str, clips: list[Clip], codes: list[np.ndarray], *, num_codebooks: int,
                file_metadata: dict[str, str], storage_options: dict[str, Any] | None = None,
                row_group_bytes: int = 100 * 2**20) -> ShardWriteResult:
    """Write ``clips`` and their ``[K, F]`` ``codes`` to the Parquet file ``url``, atomically.

    The file is written to a local temporary file, hashed, then published (see
    :func:`pipeline.storage.atomic_output`); if anything fails, ``url`` is left untouched.
    """
    table = build_table(clips, codes, num_codebooks=num_codebooks, file_metadata=file_metadata)
    n_frames = table.column("n_frames").to_numpy()
    bounds = _row_group_bounds(n_frames.astype(np.int64) * num_codebooks * 2, row_group_bytes)
    with atomic_output(url, storage_options) as tmp:
        with pq.ParquetWriter(tmp, table.schema, compression="zstd", use_dictionary=True,
                              write_page_index=True) as writer:
            for start, stop in bounds:
                writer.write_table(table.slice(start, stop - start), row_group_size=max(stop - start, 1))
        size, digest = os.path.getsize(tmp), sha256_file(tmp)
    return ShardWriteResult(
        rows=table.num_rows,
        frames=int(n_frames.sum()),
        duration_s=float(sum(c.duration_s for c in clips)),
        bytes=size,
        sha256=digest,
        path=url,
    )


def read_codes(source: Any, index: int = 0) -> np.ndarray:
    """Codes of one row as an ``[F, K]`` int16 array.

    ``source`` is a pyarrow Table or RecordBatch (row ``index`` is read), a row dict (``datasets`` or
    ``to_pylist()`` row), a pyarrow list scalar, or the nested list of one row's codes.
    """
    if isinstance(source, (pa.Table, pa.RecordBatch)):
        source = source.column("codes")[index]
    elif isinstance(source, dict):
        source = source["codes"]
    if isinstance(source, pa.ListScalar):
        k = source.type.value_type.list_size
        steps = source.values
        flat = steps.flatten() if steps is not None else pa.array([], pa.int16())
        return flat.to_numpy(zero_copy_only=False).astype(np.int16, copy=False).reshape(-1, k)
    return np.asarray(source, dtype=np.int16)
