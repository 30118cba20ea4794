"""Done records held as columns: a plan over a million shards compares columns, and builds a record's dict only when
asked for it.

A record (:func:`pipeline.manifest.write_record`) is a small JSON object. Parsed, each costs about 1.5 KB of Python
objects and 15 µs; a million of them are what made a rerun's plan slow and large. :class:`RecordSet` keeps them in
one Arrow table: one typed column per field (a record of the usual shape, as the writer makes it), its failures and
kept ids as JSON only where they are not empty, and the whole record as JSON for any other shape (an older writer's,
one edited by hand), so that every record reads back exactly as it was written. The columns the plan compares
(shard id, digest, status, file, bytes, kept, run id, epoch) are filled for every record, whatever its shape.
"""

from __future__ import annotations

import json
from collections.abc import ItemsView, Iterable, Iterator, Mapping, ValuesView
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.storage import Lookup

# (key, type) of a record's fields in the writer's order; "shard" holds the first four
SHARD_FIELDS = (("shard_id", pa.string()), ("kind", pa.string()), ("uri", pa.string()), ("digest", pa.string()))
FIELDS = (("status", pa.string()), ("file", pa.string()), ("rows", pa.int64()), ("carried", pa.int64()),
          ("frames", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string()), ("clips", pa.int64()),
          ("failed", pa.int64()), ("hours", pa.float64()), ("started", pa.string()), ("finished", pa.string()),
          ("attempt", pa.int64()))
WRITER = (("run_id", pa.string()), ("epoch", pa.int64()))  # absent (both null) for a record without a writer
LISTS = ("failures", "kept_ids")
COLUMNS = pa.schema([("name", pa.string()), *SHARD_FIELDS, *FIELDS, *WRITER, ("kept", pa.int64()),
                     ("lists", pa.string()), ("record", pa.string()), ("schema", pa.string())])
DICTIONARY = ("kind", "uri", "status", "started", "finished", "run_id", "schema")  # repeated values: one copy each
_KEYS = {"shard", *(k for k, _ in FIELDS), *LISTS, "schema"}
_PY = {pa.string(): str, pa.int64(): int, pa.float64(): float}
BATCH = 10_000  # records built into dicts at a time


def return_freed_memory() -> None:
    """Make Arrow's default memory pool one that gives freed memory back to the system at once (jemalloc, no decay),
    for a driver process. A plan over 10^6 shards makes a few hundred MB of short-lived columns (keys, hash tables,
    takes), which the default pool (mimalloc) keeps mapped; measured on that plan, peak RSS 2,085 MB → 1,889 MB, same
    CPU time. Where pyarrow is built without jemalloc (Windows), the default pool stays."""
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:
        return
    pa.jemalloc_set_decay_ms(0)
    pa.set_memory_pool(pool)


def _typed(record: dict[str, Any]) -> bool:
    """Whether ``record`` has exactly the writer's shape, so that its columns give it back as it is."""
    keys = set(record)
    writer = {k for k, _ in WRITER}
    if keys != _KEYS and keys != _KEYS | writer:
        return False
    shard = record["shard"]
    if not isinstance(shard, dict) or set(shard) != {k for k, _ in SHARD_FIELDS}:
        return False
    values = [*((shard[k], t, k == "digest") for k, t in SHARD_FIELDS), *((record[k], t, False) for k, t in FIELDS),
              *((record[k], t, False) for k, t in WRITER if k in record)]
    if not all((v is None and nullable) or type(v) is _PY[t] for v, t, nullable in values):
        return False
    return all(isinstance(record[k], list) for k in LISTS) and isinstance(record["schema"], (dict, type(None)))


def _get(record: dict[str, Any], key: str, kind: type) -> Any:
    value = record.get(key)
    return value if type(value) is kind else None


def encode(named: Iterable[tuple[str, dict[str, Any]]]) -> pa.Table:
    """The table (:data:`COLUMNS`) of ``(file name, record)`` pairs."""
    columns: dict[str, list[Any]] = {name: [] for name in COLUMNS.names}
    for name, record in named:
        typed = _typed(record)
        shard = record.get("shard") if isinstance(record.get("shard"), dict) else {}
        columns["name"].append(name)
        for key, t in SHARD_FIELDS:
            columns[key].append(_get(shard, key, _PY[t]))
        for key, t in (*FIELDS, *WRITER):
            columns[key].append(_get(record, key, _PY[t]))
        kept = record.get("kept_ids")
        columns["kept"].append(len(kept) if isinstance(kept, list) else 0)
        lists = {k: record[k] for k in LISTS if record.get(k)}
        columns["lists"].append(json.dumps(lists, separators=(",", ":")) if typed and lists else None)
        body = {**record, "schema": None} if "schema" in record else record
        columns["record"].append(None if typed else json.dumps(body, separators=(",", ":")))
        schema = record.get("schema")
        columns["schema"].append(None if schema is None else json.dumps(schema, separators=(",", ":"),
                                                                         sort_keys=True))
    return pa.table(columns, schema=COLUMNS)


def compact_types(table: pa.Table) -> pa.Table:
    """``table`` with the columns of repeated values (:data:`DICTIONARY`) dictionary-encoded."""
    for key in DICTIONARY:
        i = table.schema.get_field_index(key)
        if not pa.types.is_dictionary(table.schema.field(i).type):
            table = table.set_column(i, key, pc.dictionary_encode(table.column(key)))
    return table


def plain_types(table: pa.Table) -> pa.Table:
    """``table`` with its dictionary-encoded columns decoded (undoes :func:`compact_types`)."""
    return table.cast(pa.schema([pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type)
                                 for f in table.schema]))


class RecordSet(Mapping):
    """Records by shard id, held as columns (:data:`COLUMNS`); each is built as a dict when read. Immutable.
    ``fetched``: how many were read from their own files rather than from a checkpoint (what a fold would save)."""

    def __init__(self, table: pa.Table, fetched: int = 0):
        self.table = compact_types(table)
        self.fetched = fetched
        self._schemas: dict[str, Any] = {}
        self._lookup: Lookup | None = None

    @classmethod
    def of(cls, records: Mapping[str, dict[str, Any]] | Iterable[tuple[str, dict[str, Any]]]) -> RecordSet:
        """A set of ``records`` given as ``(file name, record)`` pairs, or as a mapping of them."""
        return cls(encode(records.items() if isinstance(records, Mapping) else records))

    def column(self, key: str) -> pa.ChunkedArray:
        return self.table.column(key)

    def __len__(self) -> int:
        return self.table.num_rows

    def __iter__(self) -> Iterator[str]:
        return iter(self.table.column("shard_id").to_pylist())

    def __contains__(self, shard_id: object) -> bool:
        return isinstance(shard_id, str) and self._row(shard_id) is not None

    def __getitem__(self, shard_id: str) -> dict[str, Any]:
        row = self._row(shard_id) if isinstance(shard_id, str) else None
        if row is None:
            raise KeyError(shard_id)
        return self._build(self.table.slice(row, 1))[0]

    def items(self) -> ItemsView:
        return _Items(self)

    def values(self) -> ValuesView:
        return _Values(self)

    def batches(self) -> Iterator[tuple[list[str], list[dict[str, Any]]]]:
        """The shard ids and their records, :data:`BATCH` at a time."""
        for start in range(0, self.table.num_rows, BATCH):
            part = self.table.slice(start, BATCH)
            yield part.column("shard_id").to_pylist(), self._build(part)

    def filter(self, mask: pa.Array | np.ndarray) -> RecordSet:
        """The records where ``mask`` is true (the table itself when it is true everywhere)."""
        mask = pa.array(mask, pa.bool_())
        return self if pc.all(mask).as_py() is not False else RecordSet(self.table.filter(mask))

    def updated(self, records: Mapping[str, dict[str, Any]]) -> RecordSet:
        """These records with ``records`` (by shard id) added, or in place of those they name."""
        if not records:
            return self
        ids = pa.array(list(records), pa.string())
        others = self.table.filter(pc.invert(pc.is_in(self.table.column("shard_id"), value_set=ids)))
        return RecordSet(pa.concat_tables([plain_types(others),
                                           encode((f"{i}.json", r) for i, r in records.items())]))

    def _row(self, shard_id: str) -> int | None:
        if self._lookup is None:
            self._lookup = Lookup(self.table.column("shard_id"))
        return self._lookup.row(shard_id)

    def _schema(self, text: str | None) -> Any:
        if text is None:
            return None
        if text not in self._schemas:
            self._schemas[text] = json.loads(text)  # one parsed copy per distinct schema, shared (never changed)
        return self._schemas[text]

    def _build(self, part: pa.Table) -> list[dict[str, Any]]:
        columns = plain_types(part).to_pydict()
        out = []
        for i in range(part.num_rows):
            if columns["record"][i] is not None:
                record = json.loads(columns["record"][i])
            else:
                record = {"shard": {k: columns[k][i] for k, _ in SHARD_FIELDS},
                          **{k: columns[k][i] for k, _ in FIELDS}, "failures": [], "kept_ids": []}
                if columns["lists"][i] is not None:
                    record.update(json.loads(columns["lists"][i]))
                if columns["run_id"][i] is not None or columns["epoch"][i] is not None:
                    record.update((k, columns[k][i]) for k, _ in WRITER)
            if "schema" in record or columns["record"][i] is None:
                record["schema"] = self._schema(columns["schema"][i])
            out.append(record)
        return out


class _Items(ItemsView):
    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for ids, records in self._mapping.batches():
            yield from zip(ids, records)


class _Values(ValuesView):
    def __iter__(self) -> Iterator[dict[str, Any]]:
        for _, records in self._mapping.batches():
            yield from records
