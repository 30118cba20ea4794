"""``parquet`` input: Hugging Face Parquet shards with an ``Audio`` column, one output shard per file
(``parquet-{relative path}``).

The Audio column is the first declared ``Audio`` in the file's Hugging Face schema metadata, else the first struct
of ``bytes``/``path``. Clip id: ``{parquet relative path}/{Audio path}`` when every row of the file has a distinct,
non-empty Audio path, else ``{parquet relative path}/{row index:08d}``. Every non-audio column passes through as
metadata. Rows without bytes are read from their Audio path (relative to the Parquet file). Source URI of a row
with bytes: ``{parquet uri}#{row}``. Rows are read a row group at a time: memory is bounded by the file's row groups.
A row group that cannot be read (damage past the footer) is a read failure for each of its rows, and the other row
groups are read: no row the footer counts is lost from the accounting; a file whose footer or Audio paths cannot be read
is a ``container`` failure (its shard is not done and is read again by the next run).
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import retry
from pipeline.decode import check_read_errors
from pipeline.schema import MetadataSchemaError
from pipeline.sources.common import (ClipItem, container_failure, fetch_clip, get_fs, non_empty, open_stream,
                                     read_failure, relative, resolve)
from pipeline.types import ClipFailure, ClipSource, Shard

BATCH_ROWS = 64
FOOTER_THREADS = 16  # footers read at once


def iter_clips(shard: Shard, storage_options: dict, only: int | None = None) -> Iterator[ClipItem]:
    prefix = relative(shard.uri, shard.root)
    fs, path = get_fs(shard.uri, storage_options)
    index, raw = 0, None
    try:
        with open_stream(fs, path, shard.size, f"read {shard.uri}") as raw:
            parquet = pq.ParquetFile(raw)
            audio_column = audio_column_of(parquet.schema_arrow)
            audio_structs = parquet.read(columns=[f"{audio_column}.path"]).column(0).to_pylist()
            ids = _ids(prefix, [audio and audio["path"] for audio in audio_structs])
            for group in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if only is not None and not index <= only < index + rows:
                    index += rows
                    continue
                try:
                    table = parquet.read_row_group(group)
                except Exception as exc:  # a damaged row group: each of its rows is a failure of its own
                    failure = read_failure(prefix, shard.uri, _damage(exc, raw))
                    for i in range(index, index + rows) if only is None else [only]:
                        yield ClipFailure(ids[i], f"{shard.uri}#{i}", "read", failure.error_class,
                                          f"row {i} of {len(ids)} could not be read: {failure.message}")
                    index += rows
                    continue
                for batch in table.to_batches(max_chunksize=BATCH_ROWS):
                    for row in batch.to_pylist():
                        if only is None or index == only:
                            yield _clip(ids[index], row, audio_column, shard.uri, index, storage_options)
                        index += 1
    except Exception as exc:  # no footer, no Audio column: the file's rows are unknown
        yield container_failure(prefix, shard.uri, _damage(exc, raw), index)


def _damage(exc: Exception, raw) -> Exception:
    """pyarrow reports bytes it cannot parse as an ``OSError`` without errno, which would pass for a store error: a
    read error of the stream itself is raised as such (it carries an errno, or the stream recorded it), so what is
    left is damage to the file (a ``ValueError``, the clip's or container's own)."""
    check_read_errors(raw)
    if type(exc) is OSError and exc.errno is None:
        return ValueError(f"damaged Parquet file: {exc}")
    return exc


def list_items(shard: Shard, storage_options: dict) -> list[tuple[str, str]]:
    """(clip id, source URI) of the rows :func:`iter_clips` yields for the file (the Audio paths only)."""
    prefix = relative(shard.uri, shard.root)
    fs, path = get_fs(shard.uri, storage_options)
    with open_stream(fs, path, shard.size, f"read {shard.uri}") as raw:
        parquet = pq.ParquetFile(raw)
        paths = parquet.read(columns=[f"{audio_column_of(parquet.schema_arrow)}.path"]).column(0).to_pylist()
    return [(clip_id, f"{shard.uri}#{i}") for i, clip_id in enumerate(_ids(prefix, [a and a["path"] for a in paths]))]


@dataclass(frozen=True)
class Footer:
    """What the planner reads from a Parquet input's footer: its rows, and its non-audio columns (no field
    metadata)."""

    rows: int
    schema: pa.Schema


def read_footer(shard: Shard, storage_options: dict) -> Footer | None:
    """The footer of the shard's Parquet file; None for a file whose footer or Audio column cannot be read (it
    becomes a failure when its shard is decoded). Transient errors are raised."""
    fs, path = get_fs(shard.uri, storage_options)
    try:
        with open_stream(fs, path, shard.size, f"read {shard.uri}") as raw:
            metadata = pq.read_metadata(raw)
        schema = metadata.schema.to_arrow_schema()
        audio = audio_column_of(schema)
    except Exception as exc:
        if retry.is_transient(exc):
            raise
        return None
    return Footer(metadata.num_rows, pa.schema([f.remove_metadata() for f in schema if f.name != audio]))


def read_footers(shards: list[Shard], storage_options: dict) -> list[Footer | None]:
    """:func:`read_footer` of each shard, :data:`FOOTER_THREADS` at once."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=FOOTER_THREADS) as pool:
        return list(pool.map(lambda shard: read_footer(shard, storage_options), shards))


def metadata_schema(footers: dict[str, Footer | None]) -> pa.Schema:
    """The non-audio columns of the Parquet inputs (``{uri: footer}``), one type each (decided before encoding); a
    column two files type incompatibly is a :class:`pipeline.schema.MetadataSchemaError`. An unreadable file (None)
    is skipped here."""
    fields: dict[str, tuple[pa.Field, str]] = {}
    for uri, footer in footers.items():
        for field in footer.schema if footer is not None else []:
            if field.name not in fields:
                fields[field.name] = (field, uri)
                continue
            known, where = fields[field.name]
            try:
                merged = pa.unify_schemas([pa.schema([known]), pa.schema([field])], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise MetadataSchemaError(
                    f"column {field.name!r} is {known.type} in {where} but {field.type} in {uri}; give it "
                    f"one type in every input file ({exc})") from exc
            fields[field.name] = (merged.field(0), where)
    return pa.schema([field for field, _ in fields.values()])


def audio_column_of(schema: pa.Schema) -> str:
    """The first column declared ``Audio`` in the Hugging Face schema metadata, else the first bytes/path struct."""
    hf_info = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
    features = hf_info.get("info", {}).get("features", {})
    declared = [name for name, feature in features.items() if feature.get("_type") == "Audio"]
    structs = [f.name for f in schema if pa.types.is_struct(f.type) and {"bytes", "path"} <= set(f.type.names)]
    for name in declared + structs:
        if name in schema.names:
            return name
    raise ValueError(f"no Audio column (struct of bytes/path) in columns {schema.names}")


def _ids(prefix: str, audio_paths: list[str | None]) -> list[str]:
    if all(audio_paths) and len(set(audio_paths)) == len(audio_paths):
        return [f"{prefix}/{p}" for p in audio_paths]
    return [f"{prefix}/{i:08d}" for i in range(len(audio_paths))]


def _clip(clip_id: str, row: dict[str, Any], audio_column: str, parquet_uri: str, index: int,
          storage_options: dict) -> ClipItem:
    audio = row.pop(audio_column) or {}
    if audio.get("bytes") is None and audio.get("path"):
        return fetch_clip(clip_id, resolve(audio["path"], parquet_uri), row, storage_options)
    source_uri = f"{parquet_uri}#{index}"
    try:
        return ClipSource(clip_id, source_uri, non_empty(audio.get("bytes")), row)
    except ValueError as exc:
        return ClipFailure.from_exception(clip_id, source_uri, "read", exc)
