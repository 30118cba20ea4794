"""The output's cache of its Parquet inputs' footers (``_state/inputs/parquet_footers.parquet``), so that a rerun
does not read every input's footer again to decide the metadata schema and count rows.

One row per input file: ``uri``, ``size``, ``version`` (the listing's ETag, generation or mtime: the key), ``rows``
and ``schema`` (the non-audio columns, as an Arrow IPC schema). A file whose size or version changed is read again.
A run (under the output's lock) writes the cache when it differs, holding only the files of its listing; ``plan``
only reads it. Unreadable footers are not cached (the file may become readable with the same version: permissions).
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import retry, storage
from pipeline.sources.parquet import Footer, read_footers
from pipeline.types import Shard

log = logging.getLogger(__name__)

FOOTERS_PATH = "_state/inputs/parquet_footers.parquet"

Key = tuple[str, int, str]  # uri, size, version


def key_of(shard: Shard) -> Key:
    return shard.uri, shard.size, shard.version


def load(output_url: str, storage_options: dict | None = None) -> dict[Key, Footer]:
    """The cached footers by key (empty when there is no cache, or it cannot be read: it is only a cache)."""
    fs, path = storage.get_fs(storage.join(output_url, FOOTERS_PATH), storage_options)
    try:
        table = pq.read_table(pa.BufferReader(retry.call(fs.cat_file, path, what=f"read {FOOTERS_PATH}")))
    except FileNotFoundError:
        return {}
    except (pa.ArrowInvalid, ValueError) as exc:  # damaged: read the footers again (a run rewrites it)
        log.warning("%s cannot be read (%s); the inputs' footers are read again", FOOTERS_PATH, exc)
        return {}
    return {(uri, size, version): Footer(rows, pa.ipc.read_schema(pa.py_buffer(schema)))
            for uri, size, version, rows, schema in zip(*(table.column(c).to_pylist() for c in table.column_names))}


def parquet_footers(shards: list[Shard], output_url: str, *, input_options: dict | None,
                    output_options: dict | None, save: bool) -> dict[str, Footer | None]:
    """``{uri: footer}`` of the Parquet input ``shards`` (None: unreadable), reading only those the output's cache
    lacks; ``save`` (a run, under its lock): write the cache when it changed."""
    cached = load(output_url, output_options)
    missing = [s for s in shards if key_of(s) not in cached]
    read = dict(zip(map(key_of, missing), read_footers(missing, input_options or {})))
    footers = {key_of(s): cached.get(key_of(s)) or read.get(key_of(s)) for s in shards}
    if save and set(cached) != {k for k, f in footers.items() if f is not None}:
        _write(output_url, {k: f for k, f in footers.items() if f is not None}, output_options)
    return {uri: footer for (uri, _, _), footer in footers.items()}


def _write(output_url: str, footers: dict[Key, Footer], storage_options: dict | None) -> None:
    keys = sorted(footers)
    table = pa.table({
        "uri": [k[0] for k in keys], "size": pa.array([k[1] for k in keys], pa.int64()),
        "version": [k[2] for k in keys], "rows": pa.array([footers[k].rows for k in keys], pa.int64()),
        "schema": pa.array([footers[k].schema.serialize().to_pybytes() for k in keys], pa.binary()),
    })
    with storage.atomic_output(storage.join(output_url, FOOTERS_PATH), storage_options) as tmp:
        pq.write_table(table, tmp, compression="zstd")
