"""One schema per output: the type of every metadata column, the same in every shard file.

The metadata columns of an output (manifest columns, Parquet input columns, WebDataset sidecar fields) get one Arrow
type each, for the whole output, stored in ``_state/schema.json``:

* decided before encoding where the inputs say it: a manifest's rows (read once anyway) and Parquet inputs' footers.
  Values that cannot share one type (``1`` and ``"a"`` in one column) are an error when the run starts, naming the
  column and examples;
* unified at commit where they cannot (WebDataset sidecars are only seen while decoding): each shard is written with
  the output's known types plus what its own new keys infer to, and at the end of the run every shard whose columns
  differ from the union is rewritten to it. Types that promote (int → float, null → anything) are promoted; types
  that cannot meet become JSON text (lossless: ``json.loads`` gives the values back), marked in the field's metadata.

Values pyarrow cannot store in Parquet (an empty dict) are JSON text too. Every shard file holds every column of the
schema (null where a clip lacks the key), so ``datasets.load_dataset`` reads the output as one split.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

JSON_ENCODING = {b"mimi_tokenize.encoding": b"json"}  # field metadata of a JSON-text column
SCHEMA_PATH = "_state/schema.json"


class MetadataSchemaError(ValueError):
    """Metadata values that cannot share one type in the output (decided before encoding)."""


def is_json(field: pa.Field) -> bool:
    return (field.metadata or {}).get(b"mimi_tokenize.encoding") == b"json"


def json_field(name: str) -> pa.Field:
    return pa.field(name, pa.string(), metadata=JSON_ENCODING)


def _storable(t: pa.DataType) -> bool:
    """False if ``t`` is or nests an empty struct (inferred from ``{}``) or the null type, which Parquet cannot type."""
    if pa.types.is_struct(t) and t.num_fields == 0:
        return False
    return all(_storable(t.field(i).type) for i in range(t.num_fields))


def _json_values(values: list[Any]) -> pa.Array:
    return pa.array([None if v is None else json.dumps(v, default=str, ensure_ascii=False) for v in values],
                    pa.string())


def column(name: str, values: list[Any], field: pa.Field | None = None) -> tuple[pa.Field, pa.Array]:
    """A metadata column: typed as ``field`` when given, else inferred; JSON text when marked so, or when the values
    cannot share a storable type. Never lossy: a value that ``field``'s type cannot hold exactly (12.75 in an int
    column, 7 in a string column) is a ``ValueError``; :func:`widen` gives the type that holds both."""
    inferred = _inferred(name, values)
    if field is None:
        return inferred
    if is_json(field):
        return field, _json_values(values)
    if not widen(field, inferred[0]).equals(field, check_metadata=True):
        raise ValueError(f"metadata column {name!r} is {field.type} in this output, but holds a value that is not "
                         f"(values of type {inferred[0].type}{' as JSON text' if is_json(inferred[0]) else ''})")
    return field, inferred[1].cast(field.type)


def _inferred(name: str, values: list[Any]) -> tuple[pa.Field, pa.Array]:
    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return json_field(name), _json_values(values)
    if not _storable(array.type):
        return json_field(name), _json_values(values)
    return pa.field(name, array.type), array


def widen(known: pa.Field, values_field: pa.Field) -> pa.Field:
    """The type of a column ``known`` to the output once it also holds values of ``values_field``'s type."""
    return unify([pa.schema([known]), pa.schema([values_field.with_name(known.name)])]).field(0)


def infer(rows: Iterable[dict[str, Any]], where: str) -> pa.Schema:
    """The metadata schema of ``rows`` (every row's keys, first-seen order), decided before encoding: a column whose
    values cannot share one type is a :class:`MetadataSchemaError` naming it and examples."""
    columns: dict[str, list[Any]] = {}
    n = 0
    for n, row in enumerate(rows, start=1):
        for key, value in row.items():
            values = columns.get(key)
            if values is None:
                values = columns[key] = [None] * (n - 1)
            values.append(value)
        if len(row) != len(columns):
            for values in columns.values():
                if len(values) < n:
                    values.append(None)
    fields = []
    for name, values in columns.items():
        try:
            pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            kinds: dict[str, Any] = {}
            for value in values:
                if value is not None:
                    kinds.setdefault(type(value).__name__, value)
            examples = ", ".join(f"{kind} {value!r:.40}" for kind, value in list(kinds.items())[:3])
            raise MetadataSchemaError(
                f"{where}: metadata column {name!r} holds values that cannot share one type ({examples}; {exc}). Give "
                "the column one type in every row (or drop it), so that the output loads as one dataset") from exc
        fields.append(column(name, values)[0])
    return pa.schema(fields)


def unify(schemas: Iterable[pa.Schema]) -> pa.Schema:
    """The union of metadata schemas: each column once (first-seen order), promoted where types can meet, JSON text
    where they cannot (or where any shard already has it as JSON text)."""
    by_name: dict[str, list[pa.Field]] = {}
    for schema in schemas:
        for field in schema:
            by_name.setdefault(field.name, []).append(field)
    fields = []
    for name, found in by_name.items():
        if any(is_json(f) for f in found):
            fields.append(json_field(name))
            continue
        try:
            merged = pa.unify_schemas([pa.schema([f.remove_metadata()]) for f in found], promote_options="permissive")
            fields.append(merged.field(0))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            fields.append(json_field(name))
    return pa.schema(fields)


def conform(table: pa.Table, schema: pa.Schema, first: int) -> pa.Table:
    """``table`` (core columns ``[:first]``, then metadata columns) with the metadata columns of ``schema``, in its
    order: cast, promoted, JSON-encoded, or filled with nulls. Raises ``ValueError`` if a value does not fit."""
    core = [table.column(i) for i in range(first)]
    fields = list(table.schema)[:first]
    present = {f.name: table.column(f.name) for f in list(table.schema)[first:]}
    for field in schema:
        if field.name not in present:
            array = pa.nulls(table.num_rows, field.type)
        elif table.schema.field(field.name).equals(field, check_metadata=True):
            array = present[field.name]
        else:
            array = column(field.name, present[field.name].to_pylist(), field)[1]
        core.append(array)
        fields.append(field)
    return pa.Table.from_arrays(core, schema=pa.schema(fields, metadata=table.schema.metadata))


def to_json(schema: pa.Schema) -> dict[str, Any]:
    """A JSON-able record of ``schema``: exact (Arrow IPC, base64) plus a readable column list."""
    return {"columns": [[f.name, str(f.type) + (" (JSON text)" if is_json(f) else "")] for f in schema],
            "arrow": base64.b64encode(schema.serialize().to_pybytes()).decode()}


def from_json(record: dict[str, Any]) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(record["arrow"])))
