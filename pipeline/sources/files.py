"""``files`` input: a folder (or glob) of audio files.

Shards: the files sorted by path relative to the input root, cut by :mod:`pipeline.sharding` into shards of at most
``files_per_shard`` files and ``max_shard_bytes`` input bytes (``files-{hash of the first path}``). Clip id: the
path relative to the input root, extension included. A shard's digest covers each member's path, size and version
(ETag, generation or mtime), so a file rewritten in place redoes its shard.
"""

from __future__ import annotations

from collections.abc import Iterator

from pipeline import sharding
from pipeline.sources.common import ClipItem, read_members, relative
from pipeline.sources.listing import Listing
from pipeline.types import Member, Shard


def discover(listing: Listing, files_per_shard: int, max_shard_bytes: int | None) -> list[Shard]:
    members = [Member(relative(listing.uri(path), listing.root_uri), listing.uri(path), size, version)
               for path, (size, version) in listing.files.items()]
    members.sort(key=lambda m: m.key)
    ranges = sharding.cut([m.key for m in members], [m.size for m in members], max_items=files_per_shard,
                          max_bytes=max_shard_bytes)
    return [make_shard("files", listing.root_uri, tuple(members[a:b])) for a, b in ranges]


def make_shard(kind: str, uri: str, members: tuple[Member, ...], root: str | None = None) -> Shard:
    """A shard of ``members`` (files or manifest rows): id from its first key, digest from all of them."""
    digest = sharding.digest(kind, [(m.key, m.uri, m.size, m.version, m.row, m.error) for m in members])
    return Shard(sharding.shard_id(kind, members[0].key), kind, uri, root or uri, digest, members)


def iter_clips(shard: Shard, storage_options: dict, only: int | None = None) -> Iterator[ClipItem]:
    return read_members(shard.members, storage_options, only)
