"""Input stage: list an input URL as content-defined shards, and stream a shard's clips as encoded audio.

Inputs (any fsspec URL: local path, ``file://``, ``s3://``, ``gs://``, ``hf://``, ``memory://``), pointing at a folder
(searched recursively), a glob, or one file, in one of four kinds, each read by its own module:

* :mod:`~pipeline.sources.files`: audio files;
* :mod:`~pipeline.sources.webdataset`: ``.tar`` shards with sidecars;
* :mod:`~pipeline.sources.parquet`: Hugging Face Parquet shards with an ``Audio`` column;
* :mod:`~pipeline.sources.manifests`: one ``.jsonl`` / ``.csv`` manifest of audio URIs.

Shard ids and clip ids come from the inputs' names, never from positions, so a growing corpus keeps them (see
:mod:`pipeline.sharding`). All URIs are full, scheme included (local files are ``file:///abs/path``). A clip that
cannot be read (missing, empty) yields a ``ClipFailure(stage="read")`` and iteration goes on; a storage error that
outlasts the retry window is raised (the attempt fails, not the clip).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

from pipeline import sharding
from pipeline.sources import files, manifests, parquet, webdataset
from pipeline.sources.common import ClipItem, relative, safe_id
from pipeline.sources.listing import Listing, list_input
from pipeline.types import Shard

_CONTAINERS = {"webdataset": ("wds", webdataset), "parquet": ("parquet", parquet)}


def discover_shards(input_url: str, *, files_per_shard: int = 256, max_shard_bytes: int | None = None,
                    storage_options: dict | None = None) -> list[Shard]:
    """List ``input_url`` and cut it into shards (same listing → same shards, in the same order).

    Audio files and manifest rows are grouped at most ``files_per_shard`` per shard and, for audio files, at most
    ``max_shard_bytes`` input bytes (a single larger file is a shard of its own); tars and Parquet files are one
    shard each.

    A million shards are millions of new objects, none in a reference cycle: the cyclic garbage collector is paused
    while they are made (it would scan them again and again: 10^6 manifest rows, 7 CPU s of 40).
    """
    if files_per_shard < 1:
        raise ValueError(f"files_per_shard must be >= 1, got {files_per_shard}")
    collecting = gc.isenabled()
    gc.disable()
    try:
        listing = list_input(input_url, storage_options)
        if listing.kind == "files":
            shards = files.discover(listing, files_per_shard, max_shard_bytes)
        elif listing.kind == "manifest":
            shards = manifests.discover(listing, files_per_shard, storage_options)
        else:
            shards = [_container_shard(listing, path, size, version)
                      for path, (size, version) in listing.files.items()]
    finally:
        if collecting:
            gc.enable()
    _check_unique_ids(shards)
    return shards


def _container_shard(listing: Listing, path: str, size: int, version: str) -> Shard:
    prefix = _CONTAINERS[listing.kind][0]
    rel = relative(listing.uri(path), listing.root_uri)
    return Shard(f"{prefix}-{safe_id(rel)}", listing.kind, listing.uri(path), listing.root_uri,
                 sharding.digest(listing.kind, rel, size, version), size=size, version=version)


def _check_unique_ids(shards: list[Shard]) -> None:
    seen: set[str] = set()
    for shard in shards:
        if shard.shard_id in seen:
            raise ValueError(f"two inputs map to shard id {shard.shard_id!r}; rename one of them")
        seen.add(shard.shard_id)


def iter_clips(shard: Shard, *, storage_options: dict | None = None, only: int | None = None) -> Iterator[ClipItem]:
    """Yield the shard's clips (or read failures) in a fixed order; ``only``: just the item at that index."""
    readers = {"files": files, "manifest": files, **{kind: module for kind, (_, module) in _CONTAINERS.items()}}
    if shard.kind not in readers:
        raise ValueError(f"unknown shard kind {shard.kind!r}")
    return readers[shard.kind].iter_clips(shard, storage_options or {}, only)


def list_items(shard: Shard, *, storage_options: dict | None = None) -> list[tuple[str, str]]:
    """(clip id, source URI) of each item :func:`iter_clips` yields for ``shard``, without reading audio (container
    headers only)."""
    if shard.kind in _CONTAINERS:
        return _CONTAINERS[shard.kind][1].list_items(shard, storage_options or {})
    return [(m.key, m.uri) for m in shard.members]


__all__ = ["ClipItem", "discover_shards", "iter_clips", "list_items"]
