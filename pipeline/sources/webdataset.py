"""``webdataset`` input: ``.tar`` shards, one output shard per tar (``wds-{relative path}``).

Clip id: ``{tar relative path}/{key}``; the key is the member name up to the first dot of its basename. The first
audio member of a key is the audio; ``.json`` fields are merged into the metadata, ``.txt`` becomes ``text``, any
other sidecar is stored as a string under its extension. A key that appears again later in the tar is a read
failure (it would otherwise be a duplicate row). Source URI: ``{tar uri}#{key}.{ext}``.

The tar is read in order, member headers first; sidecars and small audio members are read into memory, larger
audio members are decoded straight from the tar as streams, so memory does not grow with a member's size. A tar
that cannot be read to its end (corrupt, cut short) yields the clips before the damage, then a ``container`` failure:
a tar has no index, so what it held past the damage is unknown, and its shard is not done (it gates the exit code and
the next run reads the tar again).
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any

from pipeline.sources.common import (WHOLE_FILE_MAX, ClipItem, container_failure, get_fs, is_audio, non_empty,
                                     open_stream, read_failure, relative)
from pipeline.types import ClipSource, Shard


def iter_clips(shard: Shard, storage_options: dict, only: int | None = None) -> Iterator[ClipItem]:
    prefix = relative(shard.uri, shard.root)
    fs, path = get_fs(shard.uri, storage_options)
    seen: set[str] = set()
    index = -1
    try:
        with open_stream(fs, path, shard.size, f"read {shard.uri}") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for key, members in _group_by_key(tar):
                index += 1
                if only is not None and index != only:
                    continue
                yield _clip(prefix, key, shard.uri, members, tar, duplicate=key in seen)
                seen.add(key)
            _check_end(raw, tar.offset)
    except Exception as exc:  # unreadable or corrupt tar: keep what came before, and say the container is damaged
        yield container_failure(prefix, shard.uri, exc, index + 1)


def _check_end(raw, offset: int) -> None:
    """Raise unless the archive ends with its end-of-archive marker (a zero block) where the members stop: tarfile
    reads a tar cut short at a member boundary, or inside a header, as a complete one."""
    raw.seek(offset)
    block = raw.read(512)
    if len(block) < 512 or block.count(0) != 512:
        raise tarfile.ReadError(f"no end-of-archive marker at byte {offset}: the tar is cut short or damaged")


def list_items(shard: Shard, storage_options: dict) -> list[tuple[str, str]]:
    """(clip id, source URI) of the items :func:`iter_clips` yields for the tar (member headers only)."""
    prefix = relative(shard.uri, shard.root)
    fs, path = get_fs(shard.uri, storage_options)
    with open_stream(fs, path, shard.size, f"read {shard.uri}") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        return [(f"{prefix}/{key}", f"{shard.uri}#{key}") for key, _ in _group_by_key(tar)]


def _group_by_key(tar: tarfile.TarFile) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    """Consecutive file members sharing a WebDataset key, as ``(key, [TarInfo, ...])``."""
    key, members = None, []
    for info in tar:
        if not info.isfile():
            continue
        member_key = _key(info)[0]
        if member_key != key and members:
            yield key, members
            members = []
        key = member_key
        members.append(info)
    if members:
        yield key, members


def _key(info: tarfile.TarInfo) -> tuple[str, str]:
    """(key, lower-case extension) of a member: ``./a/b.seg.wav`` → (``a/b``, ``seg.wav``)."""
    directory, base = posixpath.split(posixpath.normpath(info.name))
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


def _clip(prefix: str, key: str, tar_uri: str, members: list[tarfile.TarInfo], tar: tarfile.TarFile,
          duplicate: bool) -> ClipItem:
    """The first audio member of a key with its sidecars as metadata; further audio members are ignored."""
    clip_id, source_uri = f"{prefix}/{key}", f"{tar_uri}#{key}"
    audio = [info for info in members if is_audio(_key(info)[1])]
    try:
        if duplicate:
            raise ValueError(f"key {key!r} appears again later in the tar (its members are not contiguous)")
        if not audio:
            raise ValueError(f"no audio member among extensions {sorted(_key(info)[1] for info in members)}")
        metadata: dict[str, Any] = {}
        for info in members:
            if not is_audio(_key(info)[1]):
                _add_sidecar(metadata, _key(info)[1], tar.extractfile(info).read())
        info = audio[0]
        uri = f"{source_uri}.{_key(info)[1]}"
        if info.size > WHOLE_FILE_MAX:
            return ClipSource(clip_id, uri, None, metadata, lambda: tar.extractfile(info))
        return ClipSource(clip_id, uri, non_empty(tar.extractfile(info).read()), metadata)
    except Exception as exc:
        return read_failure(clip_id, source_uri, exc)


def _add_sidecar(metadata: dict[str, Any], ext: str, data: bytes) -> None:
    if ext == "json":
        fields = json.loads(data)
        metadata.update(fields if isinstance(fields, dict) else {"json": fields})
    elif ext == "txt":
        metadata["text"] = data.decode("utf-8")
    else:
        metadata[ext] = data.decode("utf-8", errors="replace")
