"""Input stage: list an input URL as deterministic shards and stream a shard's clips as encoded bytes.

Supported inputs (any fsspec URL: local path, ``file://``, ``s3://``, ``gs://``, ``hf://``, ``memory://``),
pointing at a folder (searched recursively), a glob, or one file:

* ``files``: audio files, grouped in sorted order into shards of ``files_per_shard`` (``files-00000``, ...).
  Clip id: the file path relative to the input root, extension included.
* ``webdataset``: ``.tar`` shards, one shard per tar (``wds-{relative path}``). Clip id:
  ``{tar relative path}/{key}``; the key is the member name up to the first dot of its basename. The first
  audio member of a key is the audio; ``.json`` fields are merged into the metadata, ``.txt`` becomes
  ``text``, any other sidecar is stored as a string under its extension.
* ``parquet``: Hugging Face Parquet shards with an ``Audio`` column (struct of ``bytes``/``path``), one shard
  per file (``parquet-{relative path}``). Clip id: ``{parquet relative path}/{Audio path}`` when every row of
  the file has a distinct, non-empty Audio path, else ``{parquet relative path}/{row index:08d}``. Every
  non-audio column passes through as metadata. Rows without bytes are read from their Audio path.
* ``manifest``: one ``.jsonl`` or ``.csv`` file whose URI column is the first of ``audio``, ``path``, ``uri``,
  ``file``, ``audio_path``; split into row ranges of ``files_per_shard`` (``manifest-00000``, ...). Relative
  URIs resolve against the manifest's folder. Clip id: the ``id`` column if present, else the URI as written
  (``row-{index:08d}`` for a row without a URI, which fails).
  Every column but the URI column passes through as metadata (CSV values stay strings).

All URIs are full, scheme included (local files are ``file:///abs/path``). Shard ids are filesystem-safe:
relative paths lose their extension and ``/`` becomes ``__``.
Source URIs of tar members are ``{tar uri}#{key}.{ext}``, of Parquet rows with bytes ``{parquet uri}#{row}``.
A clip whose bytes cannot be read yields a ``ClipFailure(stage="read")`` and iteration goes on.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from pipeline.types import ClipFailure, ClipSource, Shard

AUDIO_EXTENSIONS = frozenset(
    {"wav", "flac", "mp3", "ogg", "oga", "opus", "m4a", "aac", "mp4", "webm", "aiff", "aif", "au"}
)
URI_COLUMNS = ("audio", "path", "uri", "file", "audio_path")
MANIFEST_EXTENSIONS = frozenset({"jsonl", "csv"})
_KIND_PREFIX = {"webdataset": "wds", "parquet": "parquet"}
_PARQUET_BATCH_ROWS = 64
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")

ClipItem = ClipSource | ClipFailure


# ---------------------------------------------------------------------------------------------- discovery


def discover_shards(
    input_url: str, *, files_per_shard: int = 256, max_shard_bytes: int | None = None,
    storage_options: dict | None = None,
) -> list[Shard]:
    """List ``input_url`` and cut it into deterministic shards (same input → same shards, same order).

    Audio files are grouped in sorted order, at most ``files_per_shard`` per shard and, when ``max_shard_bytes``
    is set, at most that many input bytes (a single larger file is a shard of its own): a shard is decoded in
    memory, so long-form audio needs fewer files per shard than short clips.
    """
    if files_per_shard < 1:
        raise ValueError(f"files_per_shard must be >= 1, got {files_per_shard}")
    fs, root, sizes = _list_input(input_url, storage_options or {})
    paths = sorted(sizes)
    kind = _detect_kind(input_url, paths)
    paths = [p for p in paths if _kind_of(p) == kind]
    root_uri = fs.unstrip_protocol(root)
    uris = [fs.unstrip_protocol(p) for p in paths]
    if kind == "files":
        groups = _group(list(zip(uris, (sizes[p] for p in paths))), files_per_shard, max_shard_bytes)
        shards = [Shard(f"files-{i:05d}", "files", root_uri, tuple(group), root=root_uri)
                  for i, group in enumerate(groups)]
    elif kind == "manifest":
        shards = _manifest_shards(fs, paths[0], uris[0], root_uri, files_per_shard)
    else:
        shards = [
            Shard(f"{_KIND_PREFIX[kind]}-{_safe_id(_relative(uri, root_uri))}", kind, uri, root=root_uri)
            for uri in uris
        ]
    _check_unique_ids(shards)
    return shards


def _group(items: list[tuple[str, int]], max_files: int, max_bytes: int | None) -> list[list[str]]:
    """Consecutive runs of ``(uri, size)`` items, each within ``max_files`` and ``max_bytes``."""
    groups: list[list[str]] = []
    total = 0
    for uri, size in items:
        if not groups or len(groups[-1]) == max_files or (max_bytes and total + size > max_bytes):
            groups.append([])
            total = 0
        groups[-1].append(uri)
        total += size
    return groups


def _list_input(input_url: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, str, dict[str, int]]:
    """Return the filesystem, the input root path and the size of every file under ``input_url``."""
    fs, path = url_to_fs(input_url, **storage_options)
    if fsspec.core.has_magic(path):
        root, found = _glob_root(path), {}
        for match, info in fs.glob(path, detail=True).items():
            found.update(fs.find(match, detail=True) if info["type"] == "directory" else {match: info})
    elif fs.isdir(path):
        root, found = path, fs.find(path, detail=True)
    elif fs.isfile(path):
        root, found = posixpath.dirname(path.rstrip("/")), {path: fs.info(path)}
    else:
        raise FileNotFoundError(f"input not found: {input_url}")
    return fs, root.rstrip("/") or "/", {p: int(info.get("size") or 0) for p, info in found.items()}


def _glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard component."""
    parts = pattern.split("/")
    first_magic = next(i for i, part in enumerate(parts) if fsspec.core.has_magic(part))
    return "/".join(parts[:first_magic])


def _kind_of(path: str) -> str | None:
    ext = _extension(path)
    if _is_audio(path):
        return "files"
    if ext == "tar":
        return "webdataset"
    if ext == "parquet":
        return "parquet"
    if ext in MANIFEST_EXTENSIONS:
        return "manifest"
    return None


def _detect_kind(input_url: str, paths: list[str]) -> str:
    counts: dict[str, int] = {}
    for path in paths:
        kind = _kind_of(path)
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
    if not counts:
        raise ValueError(
            f"no audio, .tar, .parquet, .jsonl or .csv files found at {input_url} "
            f"({len(paths)} files of other types)"
        )
    if len(counts) > 1:
        found = ", ".join(f"{kind}: {n}" for kind, n in sorted(counts.items()))
        raise ValueError(f"mixed input kinds at {input_url} ({found}); point the input at one kind, e.g. a glob")
    kind = next(iter(counts))
    if kind == "manifest" and counts[kind] > 1:
        raise ValueError(f"{counts[kind]} manifests found at {input_url}; point the input at a single manifest")
    return kind


def _manifest_shards(
    fs: fsspec.AbstractFileSystem, path: str, uri: str, root_uri: str, rows_per_shard: int
) -> list[Shard]:
    rows = _manifest_rows(fs, path)
    first = next(rows, None)
    if first is None:
        raise ValueError(f"manifest {uri} has no rows")
    _uri_column(first, uri)
    n_rows = 1 + sum(1 for _ in rows)
    return [
        Shard(f"manifest-{i:05d}", "manifest", uri, rows=(start, min(start + rows_per_shard, n_rows)), root=root_uri)
        for i, start in enumerate(range(0, n_rows, rows_per_shard))
    ]


def _check_unique_ids(shards: list[Shard]) -> None:
    seen: set[str] = set()
    for shard in shards:
        if shard.shard_id in seen:
            raise ValueError(f"two input files map to shard id {shard.shard_id!r}; rename one of them")
        seen.add(shard.shard_id)


def _safe_id(relative_path: str) -> str:
    """Filesystem-safe id of a relative file path, without its extension; ``/`` becomes ``__``.

    Paths with other unsafe characters get a short hash of the path appended, so ids stay unique.
    """
    stem = relative_path.rsplit(".", 1)[0]
    safe = _UNSAFE_ID_CHARS.sub("_", stem.replace("/", "__"))
    if safe != stem.replace("/", "__"):
        safe += "-" + hashlib.sha1(relative_path.encode()).hexdigest()[:8]
    return safe


# ---------------------------------------------------------------------------------------------- iteration


def iter_clips(shard: Shard, *, storage_options: dict | None = None) -> Iterator[ClipItem]:
    """Yield the shard's clips (or read failures) in a fixed order."""
    readers = {
        "files": _iter_files,
        "webdataset": _iter_webdataset,
        "parquet": _iter_parquet,
        "manifest": _iter_manifest,
    }
    if shard.kind not in readers:
        raise ValueError(f"unknown shard kind {shard.kind!r}")
    return readers[shard.kind](shard, storage_options or {})


def _iter_files(shard: Shard, storage_options: dict) -> Iterator[ClipItem]:
    for uri in shard.members:
        yield _read_clip(_relative(uri, shard.uri), uri, {}, storage_options)


def _iter_webdataset(shard: Shard, storage_options: dict) -> Iterator[ClipItem]:
    prefix = _relative(shard.uri, shard.root)
    fs, path = url_to_fs(shard.uri, **storage_options)
    try:
        with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for key, members in _group_by_key(tar):
                yield _webdataset_clip(prefix, key, shard.uri, members)
    except Exception as exc:  # unreadable or corrupt tar: record it, keep what came before
        yield ClipFailure.from_exception(prefix, shard.uri, "read", exc)


def _group_by_key(tar: tarfile.TarFile) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """Consecutive file members sharing a WebDataset key, as ``(key, [(extension, bytes), ...])``."""
    key, members = None, []
    for info in tar:
        if not info.isfile():
            continue
        directory, base = posixpath.split(posixpath.normpath(info.name))  # "./a/b.wav" → "a", "b.wav"
        stem, _, ext = base.partition(".")
        member_key = posixpath.join(directory, stem)
        if member_key != key and members:
            yield key, members
            members = []
        key = member_key
        members.append((ext.lower(), tar.extractfile(info).read()))
    if members:
        yield key, members


def _webdataset_clip(prefix: str, key: str, tar_uri: str, members: list[tuple[str, bytes]]) -> ClipItem:
    """The first audio member of a key with its sidecars as metadata; further audio members are ignored."""
    clip_id, source_uri = f"{prefix}/{key}", f"{tar_uri}#{key}"
    audio = [(ext, data) for ext, data in members if _is_audio(ext)]
    try:
        if not audio:
            raise ValueError(f"no audio member among extensions {sorted(ext for ext, _ in members)}")
        metadata: dict[str, Any] = {}
        for ext, data in members:
            if not _is_audio(ext):
                _add_sidecar(metadata, ext, data)
        ext, data = audio[0]
        return ClipSource(clip_id, f"{source_uri}.{ext}", _non_empty(data), metadata)
    except Exception as exc:
        return ClipFailure.from_exception(clip_id, source_uri, "read", exc)


def _add_sidecar(metadata: dict[str, Any], ext: str, data: bytes) -> None:
    if ext == "json":
        fields = json.loads(data)
        metadata.update(fields if isinstance(fields, dict) else {"json": fields})
    elif ext == "txt":
        metadata["text"] = data.decode("utf-8")
    else:
        metadata[ext] = data.decode("utf-8", errors="replace")


def _iter_parquet(shard: Shard, storage_options: dict) -> Iterator[ClipItem]:
    prefix = _relative(shard.uri, shard.root)
    fs, path = url_to_fs(shard.uri, **storage_options)
    try:
        with fs.open(path, "rb") as raw:
            parquet = pq.ParquetFile(raw)
            audio_column = _audio_column(parquet)
            audio_structs = parquet.read(columns=[f"{audio_column}.path"]).column(0).to_pylist()
            ids = _parquet_ids(prefix, [audio and audio["path"] for audio in audio_structs])
            index = 0
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
                for row in batch.to_pylist():
                    yield _parquet_clip(ids[index], row, audio_column, shard.uri, index, storage_options)
                    index += 1
    except Exception as exc:  # unreadable file or no audio column: record it, keep what came before
        yield ClipFailure.from_exception(prefix, shard.uri, "read", exc)


def _audio_column(parquet: pq.ParquetFile) -> str:
    """The first column declared ``Audio`` in the Hugging Face schema metadata, else the first bytes/path struct."""
    schema = parquet.schema_arrow
    hf_info = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
    features = hf_info.get("info", {}).get("features", {})
    declared = [name for name, feature in features.items() if feature.get("_type") == "Audio"]
    structs = [f.name for f in schema if pa.types.is_struct(f.type) and {"bytes", "path"} <= set(f.type.names)]
    for name in declared + structs:
        if name in schema.names:
            return name
    raise ValueError(f"no Audio column (struct of bytes/path) in columns {schema.names}")


def _parquet_ids(prefix: str, audio_paths: list[str | None]) -> list[str]:
    if all(audio_paths) and len(set(audio_paths)) == len(audio_paths):
        return [f"{prefix}/{p}" for p in audio_paths]
    return [f"{prefix}/{i:08d}" for i in range(len(audio_paths))]


def _parquet_clip(
    clip_id: str, row: dict[str, Any], audio_column: str, parquet_uri: str, index: int, storage_options: dict
) -> ClipItem:
    audio = row.pop(audio_column) or {}
    if audio.get("bytes") is None and audio.get("path"):
        return _read_clip(clip_id, _resolve(audio["path"], parquet_uri), row, storage_options)
    source_uri = f"{parquet_uri}#{index}"
    try:
        return ClipSource(clip_id, source_uri, _non_empty(audio.get("bytes")), row)
    except ValueError as exc:
        return ClipFailure.from_exception(clip_id, source_uri, "read", exc)


def _iter_manifest(shard: Shard, storage_options: dict) -> Iterator[ClipItem]:
    start, stop = shard.rows
    fs, path = url_to_fs(shard.uri, **storage_options)
    with contextlib.closing(_manifest_rows(fs, path)) as rows:
        for index, row in enumerate(itertools.islice(rows, start, stop), start=start):
            yield _manifest_clip(row, index, shard.uri, storage_options)


def _manifest_clip(row: dict[str, Any], index: int, manifest_uri: str, storage_options: dict) -> ClipItem:
    given_id = row.pop("id", None)  # becomes the clip id (the `id` column), not a metadata column too
    has_id = given_id not in (None, "")
    try:
        written = row.pop(_uri_column(row, manifest_uri))
    except ValueError as exc:
        clip_id = str(given_id) if has_id else f"row-{index:08d}"
        return ClipFailure.from_exception(clip_id, f"{manifest_uri}#{index}", "read", exc)
    return _read_clip(str(given_id) if has_id else written, _resolve(written, manifest_uri), row, storage_options)


def _manifest_rows(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[dict[str, Any]]:
    """Stream the rows of a JSONL or CSV manifest as dicts."""
    with fs.open(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
        if _extension(path) == "csv":
            yield from csv.DictReader(text)
        else:
            yield from (json.loads(line) for line in text if line.strip())


def _uri_column(row: dict[str, Any], manifest_uri: str) -> str:
    column = next((c for c in URI_COLUMNS if row.get(c) not in (None, "")), None)
    if column is None:
        raise ValueError(f"manifest {manifest_uri}: row has none of the URI columns {URI_COLUMNS}: {row}")
    return column


# ---------------------------------------------------------------------------------------------- helpers


def _read_clip(clip_id: str, uri: str, metadata: dict[str, Any], storage_options: dict) -> ClipItem:
    """Read one audio file; a missing or empty file becomes a read failure."""
    try:
        fs, path = url_to_fs(uri, **storage_options)
        return ClipSource(clip_id, uri, _non_empty(fs.cat_file(path)), metadata)
    except Exception as exc:
        return ClipFailure.from_exception(clip_id, uri, "read", exc)


def _non_empty(data: bytes | None) -> bytes:
    if not data:
        raise ValueError("no audio bytes (empty or missing)")
    return data


def _resolve(uri: str, base_file_uri: str) -> str:
    """A URI as written next to ``base_file_uri``: kept when it has a scheme, else joined to its folder."""
    if "://" in uri:
        return uri
    scheme, _, base_path = base_file_uri.rpartition("://")
    return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(base_path), uri))}"


def _relative(uri: str, root_uri: str) -> str:
    prefix = root_uri if root_uri.endswith("/") else root_uri + "/"
    if not uri.startswith(prefix):
        raise ValueError(f"{uri} is not under {root_uri}")
    return uri[len(prefix) :]


def _is_audio(name: str) -> bool:
    return _extension(name) in AUDIO_EXTENSIONS


def _extension(path: str) -> str:
    return posixpath.basename(path).rpartition(".")[2].lower()
