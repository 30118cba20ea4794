"""List an input URL: every file under it with its size and version (ETag, generation or mtime), and its kind."""

from __future__ import annotations

import concurrent.futures
import os
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline import retry
from pipeline.sources.common import MANIFEST_EXTENSIONS, extension, get_fs, is_audio

# info keys that identify a file's content, in order of preference (S3/Azure, GCS, Hub, local disk)
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "generation", "blob_id", "mtime", "LastModified", "last_modified",
                 "updated")
KINDS = ("files", "webdataset", "parquet", "manifest")
LIST_CONCURRENCY = 16  # S3 prefixes listed at once
LIST_PAGE_KEYS = 1000  # keys per ListObjectsV2 page (S3's maximum)
SPLIT_LEVELS = 2  # folder levels listed with a delimiter, at most, to find prefixes to list at once


@dataclass
class Listing:
    """The files of an input: filesystem, root folder (path and full URI), and ``{path: (size, version)}``."""

    fs: fsspec.AbstractFileSystem
    root: str
    root_uri: str
    files: dict[str, tuple[int, str]]
    kind: str

    def uri(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)


def version_of(info: dict[str, Any]) -> str:
    """The first content identifier a listing gives for a file ("" if none)."""
    for key in _VERSION_KEYS:
        if info.get(key) not in (None, ""):
            return str(info[key])
    return ""


def kind_of(path: str) -> str | None:
    ext = extension(path)
    if is_audio(path):
        return "files"
    return {"tar": "webdataset", "parquet": "parquet"}.get(ext) or ("manifest" if ext in MANIFEST_EXTENSIONS else None)


def list_input(input_url: str, storage_options: dict | None = None) -> Listing:
    """List ``input_url`` (a folder, searched recursively; a glob; or one file), through the retry layer.

    The listing is read page by page (:func:`walk`) and each entry is folded into ``(size, version)`` as it comes:
    neither fsspec's info dicts nor its directory cache are kept (the cache is dropped when the listing ends)."""
    fs, path = get_fs(input_url, storage_options)
    fs.invalidate_cache()  # a listing cached by an earlier run in this process would hide what changed since
    try:
        root, found, counts = _list(fs, path, input_url)
    finally:
        fs.invalidate_cache()  # what the existence checks and globs cached: a run lists the input once
    kind = _detect_kind(input_url, counts)  # one kind, or an error: every file found is of that kind
    root = root.rstrip("/") or "/"
    return Listing(fs, root, fs.unstrip_protocol(root), dict(sorted(found.items())), kind)


def _list(fs: fsspec.AbstractFileSystem, path: str, input_url: str
          ) -> tuple[str, dict[str, tuple[int, str]], dict[str | None, int]]:
    """The root folder, ``{path: (size, version)}`` of the input files found, and the count of files of each kind
    (None: not an input)."""
    what = f"list {input_url}"
    found: dict[str, tuple[int, str]] = {}
    counts: dict[str | None, int] = {}

    def add(entries: Iterable[tuple[str, int, str]]) -> None:
        for name, size, version in entries:
            kind = kind_of(name)
            if name not in found:
                counts[kind] = counts.get(kind, 0) + 1
            if kind is not None:
                found[name] = (size, version)

    if fsspec.core.has_magic(path):
        root = _glob_root(path)
        matches = retry.call(fs.glob, path, detail=True, what=what)
        for match, info in matches.items():
            if info["type"] == "directory":
                add(walk(fs, match, what))
            elif info.get("type", "file") == "file":
                add([(match, int(info.get("size") or 0), version_of(info))])
        del matches
    elif retry.call(fs.isdir, path, what=what):
        root = path
        add(walk(fs, path, what))
    elif retry.call(fs.isfile, path, what=what):
        root, info = posixpath.dirname(path.rstrip("/")), retry.call(fs.info, path, what=what)
        add([(path, int(info.get("size") or 0), version_of(info))])
    else:
        raise FileNotFoundError(f"input not found: {input_url}")
    return root, found, counts


def walk(fs: fsspec.AbstractFileSystem, folder: str, what: str) -> Iterator[tuple[str, int, str]]:
    """Every file under ``folder`` (recursively) as ``(path, size, version)``, in no particular order, without
    filling fsspec's directory cache: ``os.scandir`` on local disk (symbolic links are skipped, as fsspec's ``find``
    skips them); ``ListObjectsV2`` pages on S3, :data:`LIST_CONCURRENCY` prefixes at once, each page through the
    retry layer; elsewhere fsspec's ``find``."""
    if isinstance(fs, LocalFileSystem):
        yield from _walk_local(folder.rstrip("/") or "/")
    elif _plain_s3(fs):
        yield from _walk_s3(fs, folder.strip("/"), what)
    else:
        for name, info in retry.call(fs.find, folder, detail=True, what=what).items():
            if info.get("type", "file") == "file":
                yield name, int(info.get("size") or 0), version_of(info)


def _walk_local(folder: str) -> Iterator[tuple[str, int, str]]:
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        stat = entry.stat(follow_symlinks=False)
                        yield entry.path, stat.st_size, str(stat.st_mtime)
                except FileNotFoundError:  # deleted while listed
                    continue


def _plain_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool({"s3", "s3a"} & set(protocols)) and not getattr(fs, "version_aware", False)


def _walk_s3(fs: fsspec.AbstractFileSystem, folder: str, what: str) -> Iterator[tuple[str, int, str]]:
    """The objects under ``folder`` (``bucket/key``): its first levels listed with a delimiter until there are
    :data:`LIST_CONCURRENCY` prefixes (or :data:`SPLIT_LEVELS` levels), then each prefix listed whole, several at
    once. S3 lists 1,000 keys per request, so this bounds the time of a wide listing by its widest prefix."""
    bucket, _, key = folder.partition("/")
    prefixes = [f"{key}/" if key else ""]
    for _ in range(SPLIT_LEVELS):
        if len(prefixes) >= LIST_CONCURRENCY:
            break
        deeper = []
        for prefix in prefixes:
            for page in _s3_pages(fs, bucket, prefix, "/", what):
                yield from _s3_objects(bucket, page)
                deeper += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        prefixes = deeper
    with concurrent.futures.ThreadPoolExecutor(max_workers=LIST_CONCURRENCY, thread_name_prefix="list") as pool:
        for objects in pool.map(lambda prefix: [o for page in _s3_pages(fs, bucket, prefix, "", what)
                                                for o in _s3_objects(bucket, page)], prefixes):
            yield from objects


def _s3_pages(fs: fsspec.AbstractFileSystem, bucket: str, prefix: str, delimiter: str, what: str
              ) -> Iterator[dict[str, Any]]:
    """The ``ListObjectsV2`` pages of ``prefix``, each request through the retry layer (s3fs translates the store's
    errors, e.g. ``NoSuchBucket`` to ``FileNotFoundError``)."""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "Delimiter": delimiter, "MaxKeys": LIST_PAGE_KEYS}
    while True:
        out = retry.call(fs.call_s3, "list_objects_v2", what=what, **kwargs)
        yield out
        if not out.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = out["NextContinuationToken"]


def _s3_objects(bucket: str, page: dict[str, Any]) -> Iterator[tuple[str, int, str]]:
    for obj in page.get("Contents", []):
        yield f"{bucket}/{obj['Key']}", int(obj.get("Size") or 0), version_of(obj)


def _glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard component."""
    parts = pattern.split("/")
    first_magic = next(i for i, part in enumerate(parts) if fsspec.core.has_magic(part))
    return "/".join(parts[:first_magic])


def _detect_kind(input_url: str, by_kind: dict[str | None, int]) -> str:
    others = by_kind.get(None, 0)
    counts = {kind: n for kind, n in by_kind.items() if kind is not None}
    if not counts:
        raise ValueError(
            f"no audio, .tar, .parquet, .jsonl or .csv files found at {input_url} ({others} files of other types)"
        )
    if len(counts) > 1:
        found = ", ".join(f"{kind}: {n}" for kind, n in sorted(counts.items()))
        raise ValueError(f"mixed input kinds at {input_url} ({found}); point the input at one kind, e.g. a glob")
    kind = next(iter(counts))
    if kind == "manifest" and counts[kind] > 1:
        raise ValueError(f"{counts[kind]} manifests found at {input_url}; point the input at a single manifest")
    return kind
