"""Storage helpers over fsspec: URLs, atomic writes, JSON state files, and conditional writes (for the run lock).

Works with local paths, ``file://``, ``s3://``, ``gs://``, ``memory://`` and any other fsspec protocol. Every call to
the store goes through :func:`pipeline.retry.call`: transient errors (5xx, throttling, resets, timeouts) are retried
with backoff for the retry window before they fail the operation.

Atomic writes: every output is first written completely to a local file, then published in one step:

* filesystems with a real rename (local disk, and any non-object-store fsspec backend): the file is
  written as ``.{name}.tmp-{uuid}`` in the destination folder and renamed over the final name (on local disk the
  file is fsynced before the rename and its folder after, so a power loss never leaves a renamed empty file);
* object stores (S3, GCS, Azure, memory): the complete file is uploaded straight to the final key. A
  store publishes an object only when its (single or multipart) upload completes, so readers never see
  a partial object, and an interrupted upload leaves nothing behind, where a temporary key plus
  copy+delete would leave an orphan and copy every byte twice. A failed multipart upload is aborted by s3fs; the
  parts of one killed mid-upload stay until a bucket lifecycle rule (``AbortIncompleteMultipartUpload``) drops them.

A write that finds the output full, over quota, read-only or denied raises :class:`~pipeline.retry.OutputUnwritable`
(never retried): the run stops.

Clients' own retries are kept small (:func:`get_fs`), so that one call through :func:`pipeline.retry.call` never
outlasts the retry window by more than a few seconds: the window, not the client, decides.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from pipeline import retry

log = logging.getLogger(__name__)

OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})
# botocore's retries and timeouts for one call (a user's `config_kwargs` entries win): botocore's defaults (5 legacy
# attempts) times s3fs's 5 retries let one call run for tens of seconds past the retry window; and a connection pool
# above botocore's 10, for the many small requests made at once (listing pages, shard records, read-ahead GETs); 32,
# not more: the loopback S3 server of the tests (moto) starts refusing connections at 64 concurrent requests
S3_CLIENT_CONFIG = {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 5, "read_timeout": 30,
                    "max_pool_connections": 32}
S3FS_RETRIES = 2  # s3fs's own retry loop around each botocore call


def get_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path inside it (no protocol); on S3, with the client's retries bounded
    (:data:`S3_CLIENT_CONFIG`, :data:`S3FS_RETRIES`) so that :func:`pipeline.retry.call` decides."""
    options = dict(storage_options or {})
    s3 = url.split("://", 1)[0] in ("s3", "s3a")
    if s3:
        options["config_kwargs"] = {**S3_CLIENT_CONFIG, **options.get("config_kwargs", {})}
    fs, path = fsspec.core.url_to_fs(url, **options)
    if s3:
        fs.retries = S3FS_RETRIES
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join parts onto a URL or local path with ``/``, keeping its scheme (``memory://`` + ``a`` = ``memory://a``)."""
    tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
    if not tail:
        return url
    return (url if url.endswith("/") else url + "/") + tail


def _speaks(fs: fsspec.AbstractFileSystem, protocols: frozenset[str]) -> bool:
    """Whether ``fs`` is one of ``protocols``."""
    own = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool(protocols.intersection(own))


def _is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    return _speaks(fs, OBJECT_STORE_PROTOCOLS)


def _tmp_sibling(path: str) -> str:
    parent, name = posixpath.split(path)
    return posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")


@contextmanager
def _writing(url: str) -> Iterator[None]:
    """Raise :class:`~pipeline.retry.OutputUnwritable` for an error that says ``url`` cannot be written."""
    try:
        yield
    except retry.OutputUnwritable:
        raise
    except Exception as exc:
        if not retry.output_unwritable(exc):
            raise
        answer = retry.answer_of(exc)
        raise retry.OutputUnwritable(f"cannot write {url}: {retry.brief(exc)}"
                                     + (f" ({answer})" if answer else "")) from exc


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish_local(tmp: str, path: str) -> None:
    """Rename the complete local file ``tmp`` over ``path``, durably: the file is on disk before it gets its name,
    and the name is on disk when this returns."""
    _fsync_path(tmp)
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(path))


def atomic_put_file(local_path: str, url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Publish a complete local file at ``url``: readers see either nothing (or the old file) or all of it."""
    fs, path = get_fs(url, storage_options)
    what = f"write {url}"
    with _writing(url):
        if _is_object_store(fs):
            retry.call(fs.put_file, local_path, path, what=what)  # one upload: the object appears only once complete
            return
        retry.call(fs.makedirs, posixpath.dirname(path), exist_ok=True, what=what)
        tmp = _tmp_sibling(path)
        try:
            retry.call(fs.put_file, local_path, tmp, what=what)
            if isinstance(fs, LocalFileSystem):
                _publish_local(tmp, path)
            else:
                retry.call(fs.mv, tmp, path, what=what)
        except BaseException:
            if fs.exists(tmp):
                fs.rm(tmp)
            raise


@contextmanager
def atomic_output(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """Yield a local path to write the whole output to; it is published at ``url`` only if the block exits cleanly.

    On local disk the path is a hidden temporary file next to the destination (published by rename, no
    copy); otherwise it is a local temporary file that is uploaded on exit. If the block raises, the
    temporary file is deleted and ``url`` is left untouched. A full, read-only or denied output raises
    :class:`~pipeline.retry.OutputUnwritable`, whether the block or the publishing found it.
    """
    fs, path = get_fs(url, storage_options)
    local_target = isinstance(fs, LocalFileSystem)
    with _writing(url):
        if local_target:
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = _tmp_sibling(path)
        else:
            tmp = os.path.join(tempfile.gettempdir(), f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            yield tmp
            if local_target:
                _publish_local(tmp, path)
            else:
                atomic_put_file(tmp, url, storage_options)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def atomic_write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``data`` to ``url`` atomically (see :func:`atomic_output`)."""
    with atomic_output(url, storage_options) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_json(url: str, obj: Any, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(url, json.dumps(obj, indent=2).encode(), storage_options)


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """Read a JSON file; raises ``FileNotFoundError`` if it does not exist."""
    fs, path = get_fs(url, storage_options)
    return json.loads(retry.call(fs.cat_file, path, what=f"read {url}", **_one_get(fs)))


def _one_get(fs: fsspec.AbstractFileSystem) -> dict[str, Any]:
    """``cat_file`` options that read a small file in one request: s3fs otherwise asks for its size first (a HEAD
    per read, a HEAD per record), to split a large object into parallel ranged GETs."""
    return {"max_concurrency": 1} if _is_s3(fs) else {}


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``url`` exists, asked of the store itself (not a cached listing)."""
    fs, path = get_fs(url, storage_options)
    fs.invalidate_cache(path)
    return retry.call(fs.exists, path, what=f"stat {url}")


def list_files(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """Names and sizes in bytes of the files directly under the folder ``url``; ``{}`` if it does not exist.

    Hidden files (temporaries of :func:`atomic_output`) are left out.
    """
    table = list_table(url, storage_options)
    return dict(zip(table.column("name").to_pylist(), table.column("size").to_pylist()))


LISTING = pa.schema([("name", pa.string()), ("size", pa.int64()), ("modified", pa.float64()), ("version", pa.string())])
_BATCH = 65_536  # local listing entries gathered as Python objects before they become columns


def list_table(url: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Like :func:`list_files`, as columns (:data:`LISTING`; a million files take about 100 MB): each file's name,
    size, modification time by the store's clock (null where unknown), and a version token that changes whenever
    the object is rewritten (null where the store gives none).

    Versions: the ETag (S3, Azure) or generation (GCS); on local disk the inode, size and modification time in ns
    (a rewrite is a new file renamed over the old one: a new inode, while the old one still exists). The listing is
    not left in fsspec's directory cache."""
    fs, path = get_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        return retry.call(_scan_local, path, what=f"list {url}")
    fs.invalidate_cache(path)
    try:
        entries = retry.call(fs.ls, path, detail=True, what=f"list {url}")
    except FileNotFoundError:
        return LISTING.empty_table()
    finally:
        fs.invalidate_cache(path)
    named = [(posixpath.basename(e["name"].rstrip("/")), e) for e in entries if e["type"] == "file"]
    named = [(name, e) for name, e in named if not name.startswith(".")]
    return pa.Table.from_batches([_batch([[name for name, _ in named], [int(e["size"]) for _, e in named],
                                          [_modified(e) for _, e in named], [_version(e) for _, e in named]])])


def _batch(columns: list[list[Any]]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array(c, t) for c, t in zip(columns, LISTING.types)], schema=LISTING)


def _scan_local(path: str) -> pa.Table:
    batches: list[pa.RecordBatch] = []
    names: list[str] = []
    sizes: list[int] = []
    times: list[float] = []
    versions: list[str] = []
    try:
        with os.scandir(path) as found:
            for entry in found:
                if entry.name[0] == "." or not entry.is_file():
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:  # deleted since listed
                    continue
                names.append(entry.name)
                sizes.append(st.st_size)
                times.append(st.st_mtime)
                versions.append(f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}")
                if len(names) == _BATCH:
                    batches.append(_batch([names, sizes, times, versions]))
                    names, sizes, times, versions = [], [], [], []
    except FileNotFoundError:
        return LISTING.empty_table()
    batches.append(_batch([names, sizes, times, versions]))
    return pa.Table.from_batches(batches, LISTING)


class Lookup:
    """The row of a value in a string column, by binary search over a sorted copy (about 40 bytes a value), built
    once: a million lookups without a million-entry dict."""

    def __init__(self, column: pa.Array | pa.ChunkedArray):
        keys = np.array([value.encode() for value in column.to_pylist()], dtype=bytes)
        self.order = np.argsort(keys, kind="stable")
        self.keys = keys[self.order]

    def row(self, value: str) -> int | None:
        key = value.encode()
        i = int(np.searchsorted(self.keys, key))
        return int(self.order[i]) if i < len(self.keys) and self.keys[i] == key else None


class Sizes(Mapping):
    """File name → size in bytes, over a listing's columns (:func:`list_table`), each made one array once (so that
    :meth:`columns` hands them out without a copy)."""

    def __init__(self, listing: pa.Table):
        self.listing = listing.combine_chunks()
        self._lookup: Lookup | None = None

    def __len__(self) -> int:
        return self.listing.num_rows

    def __iter__(self) -> Iterator[str]:
        return iter(self.listing.column("name").to_pylist())

    def columns(self) -> tuple[pa.Array, pa.Array]:
        """The names and the sizes."""
        return tuple(column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
                     for column in (self.listing.column("name"), self.listing.column("size")))

    def __getitem__(self, name: str) -> int:
        if self._lookup is None:
            self._lookup = Lookup(self.listing.column("name"))
        row = self._lookup.row(name) if isinstance(name, str) else None
        if row is None:
            raise KeyError(name)
        return self.listing.column("size")[row].as_py()


def _version(info: dict[str, Any]) -> str | None:
    """The version token an object store's listing gives (None where it gives none)."""
    for key in ("ETag", "etag", "generation"):
        if info.get(key) not in (None, ""):
            return str(info[key])
    return None


def _modified(info: dict[str, Any]) -> float | None:
    """A listing entry's modification time as unix seconds: ``mtime`` (local disk), ``LastModified`` (S3),
    ``updated`` (GCS), ``last_modified`` (Azure); None where the store gives none."""
    for key in ("mtime", "LastModified", "updated", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def modified_time(url: str, storage_options: dict[str, Any] | None = None) -> float | None:
    """The modification time of the object ``url`` by the store's clock (None where unknown)."""
    fs, path = get_fs(url, storage_options)
    fs.invalidate_cache(path)
    return _modified(retry.call(fs.info, path, what=f"stat {url}"))


def read_json_files(url: str, storage_options: dict[str, Any] | None = None, names: list[str] | None = None
                    ) -> dict[str, Any]:
    """The ``*.json`` files directly under the folder ``url`` (or those ``names`` of them), parsed, by file name;
    fetched concurrently where the store supports it (one ``cat`` call), a file that failed with a transient error is
    fetched again on its own."""
    fs, path = get_fs(url, storage_options)
    if names is None:
        names = [n for n in list_files(url, storage_options) if n.endswith(".json")]
    if not names:
        return {}
    what = f"read {url}"
    blobs = retry.call(fs.cat, [posixpath.join(path, n) for n in names], on_error="return", what=what,
                       **_one_get(fs))
    parsed = {}
    for full, blob in blobs.items():
        if isinstance(blob, FileNotFoundError):
            continue  # deleted since listed
        if isinstance(blob, BaseException):
            if not retry.is_transient(blob):
                raise blob
            try:
                blob = retry.call(fs.cat_file, full, what=what, **_one_get(fs))
            except FileNotFoundError:
                continue
        parsed[posixpath.basename(full)] = json.loads(blob)
    return parsed


def remove(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete the file ``url`` if it exists."""
    fs, path = get_fs(url, storage_options)
    try:
        retry.call(fs.rm_file, path, what=f"delete {url}")
    except FileNotFoundError:
        pass


class PreconditionFailed(ValueError):
    """A conditional write lost: the object exists (create) or is no longer the version it was read as (replace).
    Never retried (a ``ValueError``, like every error about the state of an object rather than the store's health)."""


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return _speaks(fs, frozenset({"s3", "s3a"}))


def _precondition_failed(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) is the store refusing a conditional write (HTTP 412 / 409)."""
    for e in retry.chain(exc):
        if isinstance(e, FileExistsError):
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            error = response.get("Error", {})
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if error.get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
    return False


def conditional_writes(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether :func:`write_if` is a true compare-and-swap at ``url`` (local disk, S3); elsewhere it is a read-compare
    then write, and racing writers are told apart by reading back after a pause."""
    fs, _ = get_fs(url, storage_options)
    return isinstance(fs, LocalFileSystem) or _is_s3(fs)


@contextmanager
def _guard(path: str) -> Iterator[None]:
    """An exclusive advisory lock between the processes of this host (and NFS clients) around a local CAS."""
    import fcntl

    os.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    with open(posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.guard"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _local_version(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None


def read_versioned(url: str, storage_options: dict[str, Any] | None = None) -> tuple[bytes, str] | None:
    """The object's bytes and a version token for :func:`write_if` (its ETag on S3); None if it does not exist."""
    fs, path = get_fs(url, storage_options)
    what = f"read {url}"
    try:
        if _is_s3(fs):
            fs.invalidate_cache(path)
            etag = retry.call(fs.info, path, what=what)["ETag"]
            return retry.call(fs.cat_file, path, what=what, **_one_get(fs)), etag
        data = retry.call(fs.cat_file, path, what=what)
    except FileNotFoundError:
        return None
    return data, hashlib.sha256(data).hexdigest()


def write_if(url: str, data: bytes, version: str | None, storage_options: dict[str, Any] | None = None) -> str:
    """Write ``data`` at ``url`` only if the object is still ``version`` (None: only if it does not exist); return
    the new version. Raises :class:`PreconditionFailed` when another writer got there first.

    S3: one PUT with ``If-None-Match: *`` / ``If-Match: ETag`` (the store decides). Local disk: read, compare and
    rename under an exclusive ``flock`` shared by every writer. Elsewhere: read and compare, then write; the caller
    reads back to tell racing writers apart."""
    fs, path = get_fs(url, storage_options)
    what = f"write {url}"
    if _is_s3(fs):
        condition = {"mode": "create"} if version is None else {"IfMatch": version}

        def put() -> dict[str, Any] | None:
            try:
                return fs.pipe_file(path, data, **condition)
            except Exception as exc:
                if _precondition_failed(exc):
                    raise PreconditionFailed(f"{url} was written by someone else") from exc
                raise

        response = retry.call(put, what=what)
        fs.invalidate_cache(path)
        return (response or {}).get("ETag") or retry.call(fs.info, path, what=what)["ETag"]
    if isinstance(fs, LocalFileSystem):
        with _writing(url), _guard(path):
            if _local_version(path) != version:
                raise PreconditionFailed(f"{url} was written by someone else")
            atomic_write_bytes(url, data, storage_options)
        return hashlib.sha256(data).hexdigest()
    current = read_versioned(url, storage_options)
    if (current and current[1]) != version:
        raise PreconditionFailed(f"{url} was written by someone else")
    atomic_write_bytes(url, data, storage_options)
    return hashlib.sha256(data).hexdigest()


def remove_if(url: str, version: str | None, storage_options: dict[str, Any] | None = None) -> None:
    """Delete ``url`` if it is still ``version`` (under the local ``flock``; elsewhere read, compare, delete)."""
    fs, path = get_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        with _writing(url), _guard(path):
            if _local_version(path) == version:
                os.unlink(path)
        return
    current = read_versioned(url, storage_options)
    if current is not None and current[1] == version:
        remove(url, storage_options)
