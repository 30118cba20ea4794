"""What the input readers share: URI helpers, opening a file for streaming, and reading audio members ahead.

Remote files are read through :mod:`pipeline.retry` (every request rides out transient errors). Small files are
fetched whole, several at once on a thread pool, ahead of the decoder, so object-store latency is hidden; files
over :data:`WHOLE_FILE_MAX` are streamed in large ranged reads, so memory does not grow with a file's size.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import posixpath
import re
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline import retry
from pipeline.storage import get_fs
from pipeline.types import ClipFailure, ClipSource, Member

AUDIO_EXTENSIONS = frozenset(
    {"wav", "flac", "mp3", "ogg", "oga", "opus", "m4a", "aac", "mp4", "webm", "aiff", "aif", "au"}
)
MANIFEST_EXTENSIONS = frozenset({"jsonl", "csv"})
WHOLE_FILE_MAX = 16 * 2**20  # files up to this size are fetched whole (ahead); larger ones are streamed
STREAM_BLOCK = 8 * 2**20  # bytes per ranged read of a streamed remote file
FETCH_AHEAD = 16  # audio files fetched ahead of the decoder, at most ...
FETCH_AHEAD_BYTES = 128 * 2**20  # ... and at most this many bytes (files of unknown size count as WHOLE_FILE_MAX)
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")

ClipItem = ClipSource | ClipFailure


def open_stream(fs: fsspec.AbstractFileSystem, path: str, size: int, what: str) -> BinaryIO:
    """A seekable binary stream of ``path``: the local file itself, or buffered ranged reads through the retry
    layer (see :class:`pipeline.retry.RetryingFile`)."""
    if isinstance(fs, LocalFileSystem):
        return open(path, "rb")
    return io.BufferedReader(retry.RetryingFile(fs, path, size, what), buffer_size=STREAM_BLOCK)


def non_empty(data: bytes | None) -> bytes:
    if not data:
        raise ValueError("no audio bytes (empty or missing)")
    return data


def read_failure(clip_id: str, uri: str, exc: Exception) -> ClipFailure:
    """A read failure of the clip for an error of its own; a transient error is raised instead (it fails the
    attempt, never the clip)."""
    if retry.is_transient(exc):
        raise exc
    return ClipFailure.from_exception(clip_id, uri, "read", exc)


def container_failure(name: str, uri: str, exc: Exception, after: int) -> ClipFailure:
    """The failure of a container (tar, Parquet) unreadable past its ``after``-th item; transient errors are raised
    instead (they fail the attempt)."""
    if retry.is_transient(exc):
        raise exc
    failure = ClipFailure.from_exception(name, uri, "container", exc)
    failure.message = f"unreadable after {after} item(s): {failure.message}"
    return failure


def fetch_clip(clip_id: str, uri: str, metadata: dict[str, Any], storage_options: dict, size: int = 0) -> ClipItem:
    """One audio file as a :class:`ClipSource`: bytes for a small file, a stream opener for a large one.

    A missing or empty file is a read failure of the clip; a transient error that outlasts the retry window is
    raised (:class:`pipeline.retry.StorageUnavailable`): it fails the attempt, not the clip.
    """
    try:
        fs, path = get_fs(uri, storage_options)
        if not size or isinstance(fs, LocalFileSystem):
            size = int(retry.call(fs.size, path, what=f"stat {uri}") or 0)
        if not size:
            raise ValueError("no audio bytes (empty file)")
        if size > WHOLE_FILE_MAX or isinstance(fs, LocalFileSystem):
            return ClipSource(clip_id, uri, None, metadata, lambda: open_stream(fs, path, size, f"read {uri}"))
        return ClipSource(clip_id, uri, non_empty(retry.call(fs.cat_file, path, what=f"read {uri}")), metadata)
    except Exception as exc:
        return read_failure(clip_id, uri, exc)


def read_ahead(jobs: list[tuple[Callable[[], ClipItem], int]]) -> Iterator[ClipItem]:
    """Run ``jobs`` (a fetch and its expected size in bytes, 0 if unknown) on a thread pool, a bounded window
    ahead of the consumer, and yield their results in order."""
    if not jobs:
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=FETCH_AHEAD, thread_name_prefix="fetch")
    window: deque[tuple[concurrent.futures.Future, int]] = deque()
    queued, ahead_bytes = 0, 0
    try:
        while queued < len(jobs) or window:
            while queued < len(jobs) and len(window) < FETCH_AHEAD and (not window or ahead_bytes < FETCH_AHEAD_BYTES):
                fetch, size = jobs[queued]
                cost = min(size or WHOLE_FILE_MAX, WHOLE_FILE_MAX)
                window.append((pool.submit(fetch), cost))
                ahead_bytes += cost
                queued += 1
            future, cost = window.popleft()
            ahead_bytes -= cost
            yield future.result()
    finally:
        for future, _ in window:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def read_members(members: tuple[Member, ...], storage_options: dict, only: int | None = None) -> Iterator[ClipItem]:
    """The audio of ``members`` (files or manifest rows), in order, fetched ahead; ``only``: just that index."""
    picked = list(enumerate(members)) if only is None else [(only, members[only])]

    def job(member: Member) -> Callable[[], ClipItem]:
        metadata = json.loads(member.row) if member.row else {}
        if member.error:  # known unreadable from the listing (a manifest row without a URI)
            return lambda: ClipFailure(member.key, member.uri, "read", "ValueError", member.error)
        return lambda: fetch_clip(member.key, member.uri, metadata, storage_options, member.size)

    yield from read_ahead([(job(m), m.size) for _, m in picked])


def resolve(uri: str, base_file_uri: str) -> str:
    """A URI as written next to ``base_file_uri``: kept when it has a scheme, else joined to its folder."""
    if "://" in uri:
        return uri
    scheme, _, base_path = base_file_uri.rpartition("://")
    folder = posixpath.dirname(base_path)
    if uri.startswith("/") or "./" in uri or "//" in uri or uri.endswith("."):
        return f"{scheme}://{posixpath.normpath(posixpath.join(folder, uri))}"
    return f"{scheme}://{folder}/{uri}"  # already normal: no need to normalise (a million-row manifest)


def relative(uri: str, root_uri: str) -> str:
    prefix = root_uri if root_uri.endswith("/") else root_uri + "/"
    if not uri.startswith(prefix):
        raise ValueError(f"{uri} is not under {root_uri}")
    return uri[len(prefix):]


def safe_id(relative_path: str) -> str:
    """Filesystem-safe id of a relative file path, without its extension; ``/`` becomes ``__``.

    Paths with other unsafe characters get a short hash of the path appended, so ids stay unique.
    """
    stem = relative_path.rsplit(".", 1)[0]
    safe = _UNSAFE_ID_CHARS.sub("_", stem.replace("/", "__"))
    if safe != stem.replace("/", "__"):
        safe += "-" + hashlib.sha1(relative_path.encode()).hexdigest()[:8]
    return safe


def extension(path: str) -> str:
    return posixpath.basename(path).rpartition(".")[2].lower()


def is_audio(name: str) -> bool:
    return extension(name) in AUDIO_EXTENSIONS
