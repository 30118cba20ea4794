"""Write one shard's rows (clips and their Mimi codes) to one Parquet file.

Columns, in order: ``id`` (string), ``source_uri`` (string), ``codes`` (``list<fixed_size_list<int16, K>>``,
time-major ``[F, K]``), ``n_frames`` (int32), ``duration_s`` (float64), ``orig_sample_rate`` (int32),
``orig_channels`` (int16), the clip's signals (:data:`pipeline.signals.COLUMNS`: ``pcm_hash``, ``fingerprint``,
``loudness_lufs``, ``peak_dbfs``, ``clipping_share``, ``silence_share``, ``bandwidth_hz``, ``speech_share``; null
where undefined), then the metadata columns.

Metadata columns: those of the output's schema (:mod:`pipeline.schema`), in its order, typed as it says (null where
a clip lacks the key), then any key the output does not know yet, typed by inference (the end of the run unifies
them across shards). A key that collides with a core column is written as ``meta_{key}``.

Rows carried over from the shard's previous file (clips whose inputs are gone, see :mod:`pipeline.plan`) follow the
encoded rows, as they were.

The file is zstd-compressed with dictionary encoding and a page index, split into row groups of about
``row_group_bytes`` of raw codes, and carries ``file_metadata`` (plus ``schema_version`` and ``num_codebooks``) as
Arrow schema key-value metadata.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mimi.checkpoint import sha256_file
from pipeline import schema as output_schema
from pipeline.signals import COLUMNS as SIGNAL_COLUMNS
from pipeline.signals import signal_arrays
from pipeline.storage import atomic_output
from pipeline.types import EncodedClip

# 3: the signal columns (issue 17). A run refuses an output that holds rows of another version (check_compatible),
# so no output mixes schemas.
SCHEMA_VERSION = 3
CODEBOOK_SIZE = 2048
CORE_COLUMNS = ("id", "source_uri", "codes", "n_frames", "duration_s", "orig_sample_rate", "orig_channels",
                *SIGNAL_COLUMNS)


@dataclass(frozen=True)
class ShardWriteResult:
    """What was written: rows (clips), frames and audio seconds (summed), file size and sha256, final URL, and the
    file's metadata schema."""

    rows: int
    frames: int
    duration_s: float
    bytes: int
    sha256: str
    path: str
    metadata_schema: pa.Schema


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


def _metadata(rows: list[EncodedClip], schema: pa.Schema | None) -> tuple[list[pa.Field], list[pa.Array]]:
    """The metadata columns of ``rows``: the output's known columns, widened where this shard's values need it (the
    end of the run brings every file to the widened type), then the keys the output does not know yet."""
    known = {f.name: f for f in schema or []}
    keys = [*known, *dict.fromkeys(k for row in rows for k in row.info.metadata if k not in known)]
    fields, arrays = [], []
    for key in keys:
        name = f"meta_{key}" if key in CORE_COLUMNS else key
        values = [row.info.metadata.get(key) for row in rows]
        field = known.get(key)
        if field is not None:
            field = output_schema.widen(field, output_schema.column(name, values)[0])
        field, array = output_schema.column(name, values, field)
        fields.append(field.with_name(name))
        arrays.append(array)
    return fields, arrays


def build_table(rows: list[EncodedClip], *, num_codebooks: int, file_metadata: dict[str, str],
                schema: pa.Schema | None = None, carried: pa.Table | None = None) -> pa.Table:
    """The shard's Arrow table (see the module docstring for the schema)."""
    codes = [row.codes for row in rows]
    core = {
        "id": pa.array([r.info.clip_id for r in rows], pa.string()),
        "source_uri": pa.array([r.info.source_uri for r in rows], pa.string()),
        "codes": codes_array(codes, num_codebooks),
        "n_frames": pa.array([c.shape[1] for c in codes], pa.int32()),
        "duration_s": pa.array([r.duration_s for r in rows], pa.float64()),
        "orig_sample_rate": pa.array([r.info.orig_sample_rate for r in rows], pa.int32()),
        "orig_channels": pa.array([r.info.orig_channels for r in rows], pa.int16()),
        **signal_arrays([r.signals for r in rows]),
    }
    fields, arrays = _metadata(rows, schema)
    core_fields = [pa.field(name, array.type) for name, array in core.items()]
    metadata = {**file_metadata, "schema_version": str(SCHEMA_VERSION), "num_codebooks": str(num_codebooks)}
    table = pa.Table.from_arrays([*core.values(), *arrays], schema=pa.schema(core_fields + fields, metadata=metadata))
    if carried is not None and carried.num_rows:
        unified = output_schema.unify([metadata_schema(table), metadata_schema(carried)])
        table = pa.concat_tables([output_schema.conform(t, unified, len(CORE_COLUMNS)) for t in (table, carried)])
    return table


def metadata_schema(table: pa.Table | pa.Schema) -> pa.Schema:
    """The metadata columns of a shard table or file schema (without the core columns and key-value metadata)."""
    schema = table if isinstance(table, pa.Schema) else table.schema
    return pa.schema(list(schema)[len(CORE_COLUMNS):])


def _row_group_bounds(row_bytes: np.ndarray, row_group_bytes: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, stop)`` row ranges of about ``row_group_bytes`` each (at least one row each; none for no
    rows: a file without row groups, which ``datasets`` skips, where an empty row group makes it fail)."""
    bounds, start, acc = [], 0, 0
    for i, b in enumerate(row_bytes):
        acc += int(b)
        if acc >= row_group_bytes:
            bounds.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(row_bytes):
        bounds.append((start, len(row_bytes)))
    return bounds


def write_table(url: str, table: pa.Table, *, storage_options: dict[str, Any] | None = None,
                row_group_bytes: int = 100 * 2**20) -> ShardWriteResult:
    """Write a shard ``table`` to the Parquet file ``url`` atomically (see :func:`pipeline.storage.atomic_output`):
    if anything fails, ``url`` is left untouched. A table holding a clip id twice is refused before anything is
    written (every write of the output goes through here)."""
    if pc.count_distinct(table.column("id")).as_py() != table.num_rows:
        twice = sorted(i for i, n in Counter(table.column("id").to_pylist()).items() if n > 1)
        raise ValueError(f"refusing to write {url}: clip id(s) {twice[:5]} would appear more than once")
    num_codebooks = table.schema.field("codes").type.value_type.list_size
    n_frames = table.column("n_frames").to_numpy()
    bounds = _row_group_bounds(n_frames.astype(np.int64) * num_codebooks * 2, row_group_bytes)
    with atomic_output(url, storage_options) as tmp:
        with pq.ParquetWriter(tmp, table.schema, compression="zstd", use_dictionary=True,
                              write_page_index=True) as writer:
            for start, stop in bounds:
                writer.write_table(table.slice(start, stop - start), row_group_size=stop - start)
        size, digest = os.path.getsize(tmp), sha256_file(tmp)
    return ShardWriteResult(
        rows=table.num_rows,
        frames=int(n_frames.sum()),
        duration_s=float(pc.sum(table.column("duration_s")).as_py() or 0.0),
        bytes=size,
        sha256=digest,
        path=url,
        metadata_schema=metadata_schema(table),
    )


def write_shard(url: str, rows: list[EncodedClip], *, num_codebooks: int, file_metadata: dict[str, str],
                schema: pa.Schema | None = None, carried: pa.Table | None = None,
                storage_options: dict[str, Any] | None = None, row_group_bytes: int = 100 * 2**20
                ) -> ShardWriteResult:
    """Write ``rows`` (then the ``carried`` rows) to the Parquet file ``url``, atomically."""
    table = build_table(rows, num_codebooks=num_codebooks, file_metadata=file_metadata, schema=schema,
                        carried=carried)
    return write_table(url, table, storage_options=storage_options, row_group_bytes=row_group_bytes)


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
