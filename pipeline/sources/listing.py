"""List an input URL: every file under it with its size and version (ETag, generation or mtime), and its kind."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline import retry
from pipeline.sources.common import MANIFEST_EXTENSIONS, extension, get_fs, is_audio

# info keys that identify a file's content, in order of preference (S3/Azure, GCS, Hub, local disk)
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "generation", "blob_id", "mtime", "LastModified", "last_modified",
                 "updated")
KINDS = ("files", "webdataset", "parquet", "manifest")


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
    """List ``input_url`` (a folder, searched recursively; a glob; or one file), through the retry layer."""
    fs, path = get_fs(input_url, storage_options)
    fs.invalidate_cache()  # a listing cached by an earlier run in this process would hide what changed since
    what = f"list {input_url}"
    if fsspec.core.has_magic(path):
        root, found = _glob_root(path), {}
        for match, info in retry.call(fs.glob, path, detail=True, what=what).items():
            found.update(retry.call(fs.find, match, detail=True, what=what) if info["type"] == "directory"
                         else {match: info})
    elif retry.call(fs.isdir, path, what=what):
        root, found = path, retry.call(fs.find, path, detail=True, what=what)
    elif retry.call(fs.isfile, path, what=what):
        root, found = posixpath.dirname(path.rstrip("/")), {path: retry.call(fs.info, path, what=what)}
    else:
        raise FileNotFoundError(f"input not found: {input_url}")
    files = {p: (int(info.get("size") or 0), version_of(info)) for p, info in found.items()
             if info.get("type", "file") == "file"}
    kind = _detect_kind(input_url, files)
    root = root.rstrip("/") or "/"
    return Listing(fs, root, fs.unstrip_protocol(root), {p: v for p, v in sorted(files.items()) if kind_of(p) == kind},
                   kind)


def _glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard component."""
    parts = pattern.split("/")
    first_magic = next(i for i, part in enumerate(parts) if fsspec.core.has_magic(part))
    return "/".join(parts[:first_magic])


def _detect_kind(input_url: str, paths: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for path in paths:
        kind = kind_of(path)
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
    if not counts:
        raise ValueError(
            f"no audio, .tar, .parquet, .jsonl or .csv files found at {input_url} ({len(paths)} files of other types)"
        )
    if len(counts) > 1:
        found = ", ".join(f"{kind}: {n}" for kind, n in sorted(counts.items()))
        raise ValueError(f"mixed input kinds at {input_url} ({found}); point the input at one kind, e.g. a glob")
    kind = next(iter(counts))
    if kind == "manifest" and counts[kind] > 1:
        raise ValueError(f"{counts[kind]} manifests found at {input_url}; point the input at a single manifest")
    return kind
