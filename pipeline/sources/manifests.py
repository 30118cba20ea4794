"""``manifest`` input: one ``.jsonl`` or ``.csv`` file listing audio URIs, read once when the run starts.

The URI column is the first of ``audio``, ``path``, ``uri``, ``file``, ``audio_path`` that a row fills; relative
URIs resolve against the manifest's folder. Clip id: the ``id`` column if present, else the URI as written
(``row-{index:08d}`` for a row with neither, which becomes a read failure). Ids must be unique. Every other column
passes through as metadata (CSV values stay strings).

Shards: the rows sorted by id, cut by :mod:`pipeline.sharding` into shards of at most ``files_per_shard`` rows
(``manifest-{hash of the first id}``). Each shard carries its rows, so the manifest is read once by the driver and
never again by the decode tasks; a row whose URI or metadata changes redoes its shard, and so does audio rewritten
in place under the same URI: the rows' files are looked up when the manifest is read (one listing per folder, or a
stat per file where a folder holds few of them, concurrently), and their sizes and versions (ETag, generation,
mtime) enter the shard's digest.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

from pipeline import retry, sharding
from pipeline.sources.common import extension, get_fs, resolve
from pipeline.sources.files import make_shard
from pipeline.sources.listing import Listing, version_of
from pipeline.types import Member, Shard

URI_COLUMNS = ("audio", "path", "uri", "file", "audio_path")


STAT_PER_FILE_MAX = 8  # a folder holding at most this many of the rows' files: a stat per file, else one listing
STAT_THREADS = 16


def discover(listing: Listing, rows_per_shard: int, storage_options: dict | None = None) -> list[Shard]:
    (path,) = listing.files
    uri = listing.uri(path)
    data = retry.call(listing.fs.cat_file, path, what=f"read {uri}")
    members = [_member(row, index, uri) for index, row in enumerate(parse_rows(data, extension(path)))]
    if not members:
        raise ValueError(f"manifest {uri} has no rows")
    if all(m.error for m in members):
        raise ValueError(f"manifest {uri}: no row has any of the URI columns {URI_COLUMNS}")
    duplicates = [key for key, n in Counter(m.key for m in members).items() if n > 1]
    if duplicates:
        raise ValueError(f"manifest {uri}: {len(duplicates)} clip id(s) appear more than once (e.g. "
                         f"{', '.join(map(repr, duplicates[:3]))}); ids (the id column, else the URI) must be unique")
    members = with_versions(members, storage_options)
    members.sort(key=lambda m: m.key)
    ranges = sharding.cut([m.key for m in members], [1] * len(members), max_items=rows_per_shard)
    return [make_shard("manifest", uri, tuple(members[a:b]), root=listing.root_uri) for a, b in ranges]


def with_versions(members: list[Member], storage_options: dict | None) -> list[Member]:
    """``members`` with the size and version the store gives for their files (unchanged where it gives none: a missing
    file stays unknown, and becomes a read failure when its shard is decoded)."""
    folders: dict[str, list[int]] = {}
    for i, m in enumerate(members):
        if m.uri and not m.error and not m.uri.startswith(("http://", "https://")):
            folders.setdefault(m.uri.rpartition("/")[0], []).append(i)

    def stat(folder: str) -> dict[str, tuple[int, str]]:
        fs, path = get_fs(folder, storage_options)
        names = {members[i].uri.rpartition("/")[2] for i in folders[folder]}
        try:
            if len(names) <= STAT_PER_FILE_MAX:
                infos = []
                for name in names:
                    try:
                        infos.append(retry.call(fs.info, f"{path}/{name}", what=f"stat {folder}/{name}"))
                    except FileNotFoundError:
                        pass
            else:
                fs.invalidate_cache(path)
                infos = retry.call(fs.ls, path, detail=True, what=f"list {folder}")
                fs.invalidate_cache(path)  # the run keeps no listing cache (a million rows: thousands of folders)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        found = {}
        for info in infos:
            name = info["name"].rstrip("/").rpartition("/")[2]
            if name in names and info.get("type", "file") == "file":
                found[name] = (int(info.get("size") or 0), version_of(info))
        return found

    out = list(members)
    with concurrent.futures.ThreadPoolExecutor(max_workers=STAT_THREADS) as pool:
        for folder, found in zip(folders, pool.map(stat, folders)):
            for i in folders[folder]:
                size, version = found.get(members[i].uri.rpartition("/")[2], (0, ""))
                if size or version:
                    out[i] = dataclasses.replace(members[i], size=size, version=version)
    return out


def parse_rows(data: bytes, ext: str) -> Iterator[dict[str, Any]]:
    """The rows of a JSONL or CSV manifest as dicts."""
    text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", newline="")
    if ext == "csv":
        yield from csv.DictReader(text)
    else:
        yield from (json.loads(line) for line in text if line.strip())


def _member(row: dict[str, Any], index: int, manifest_uri: str) -> Member:
    if not isinstance(row, dict):
        raise ValueError(f"manifest {manifest_uri}: row {index} is not an object: {row!r:.200}")
    given_id = row.pop("id", None)  # becomes the clip id (the `id` column), not a metadata column too
    column = next((c for c in URI_COLUMNS if row.get(c) not in (None, "")), None)
    if column is None:
        key = str(given_id) if given_id not in (None, "") else f"row-{index:08d}"
        return Member(key, f"{manifest_uri}#{index}", row=_compact(row),
                      error=f"manifest {manifest_uri}: row {index} has none of the URI columns {URI_COLUMNS}")
    written = str(row.pop(column))
    key = str(given_id) if given_id not in (None, "") else written
    return Member(key, resolve(written, manifest_uri), row=_compact(row))


def _compact(row: dict[str, Any]) -> str:
    return sharding.COMPACT_JSON.encode(row) if row else ""
