"""Reconcile the listing with the output on storage: which shards are done, which to encode, which files to retire.

The output is a set of rows keyed by clip id, in files named by shard. When the listing changes between runs (inputs
added, removed, rewritten), a shard's members change, or its id leaves the listing. The plan, made from storage
alone (done records, data files, and the ids inside the files that changed), keeps every clip id in exactly one
file, and loses no row without being asked:

* a done shard whose record names the listing's digest (same members, sizes, versions) is kept as is, unless it holds
  rows kept for gone inputs that ``prune`` drops, or whose inputs are listed again;
* every other file is *stale*: before anything is encoded, it is retired: rewritten to hold only the rows of inputs
  that are gone from the listing (``retained``), or deleted when there are none (or with ``prune``). Users often
  delete raw audio after tokenizing it; its tokens are kept until ``--prune`` asks otherwise. After this step no
  file holds a clip of the listing except the done shards that own it;
* the listing's shards that are not done are encoded; a shard whose own file was retired carries its retained rows
  over into its new file: exactly the ids decided here (:attr:`Plan.kept`), so a commit retried after a first attempt
  wrote its file but not its record writes the same file again, never the new rows twice.

Every step writes the file first and its record second, and every decision is re-derived from storage on the next
run, so a run killed at any step leaves an output that the next run completes, with each clip once. A file without a
record (a run killed between the two writes) is stale like any other. For WebDataset and Parquet inputs the unit is
the container file: its rows are gone when the file is gone from the listing, and redone when it changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.manifest import file_columns, file_matches, files_match, is_done
from pipeline.records import RecordSet
from pipeline.storage import Lookup
from pipeline.types import Shard

CONTAINER_KINDS = ("webdataset", "parquet")
SHARD_PREFIXES = ("files-", "manifest-", "wds-", "parquet-")  # shard ids (pipeline.sources) start with one of these


@dataclass
class Retire:
    """A stale file to rewrite with only the rows ``keep`` (clip ids of gone inputs), or to delete (``keep`` empty)."""

    shard_id: str
    kind: str
    uri: str
    keep: list[str]


@dataclass
class Plan:
    shards: list[Shard]  # the listing
    done: Mapping[str, dict[str, Any]]  # shard id → record: done and unchanged (a RecordSet: columns)
    retained: dict[str, dict[str, Any]]  # shard id → record: retained rows that stay as they are
    pending: list[Shard]  # to encode
    retire: list[Retire]  # to rewrite or delete before encoding
    kept: dict[str, list[str]] = field(default_factory=dict)  # pending shard id → the ids of its retired file's rows
    # (inputs gone from the listing) that go into its new file: decided here, shipped with the job, never re-derived
    changes: dict[str, Any] = field(default_factory=dict)  # for the manifest and `status`
    change: Mapping[str, str] = field(default_factory=dict)  # shard id → added / changed / removed / unchanged
    warnings: list[str] = field(default_factory=list)
    unfolded: int = 0  # records read one by one, not from a checkpoint: a fold at the end saves the next plan these

    def release_done(self) -> None:
        """Let go of the done records (10^6 shards: about 340 MB) once the run's first manifest is built: the end of
        the run reads them again from storage, the truth, and :attr:`change` keeps only their ids."""
        self.done = RecordSet(self.done.table.schema.empty_table())

    @property
    def removed(self) -> list[Retire]:
        """The files of shards gone from the listing, retired by this run (kept as retained rows, or deleted)."""
        return [r for r in self.retire if self.change.get(r.shard_id) == "removed"]


def make_plan(shards: list[Shard], records: Mapping[str, dict[str, Any]], files: dict[str, int], *, prune: bool,
              read_ids: Callable[[list[str]], dict[str, list[str]]]) -> Plan:
    """The plan for ``shards`` given the output's ``records`` (a :class:`~pipeline.records.RecordSet`, or records by
    shard id) and data ``files`` (name → size); ``read_ids(shard_ids)`` returns the clip ids in those shards' data
    files (called once, for the stale files).

    The usual case, a done record whose file is there and whose digest the listing still gives, is decided on
    columns; only the other records (and the files that no record names) are read as dicts."""
    if not isinstance(records, RecordSet):
        records = RecordSet.of((f"{shard_id}.json", record) for shard_id, record in records.items())
    by_id = {s.shard_id: s for s in shards}
    kind = shards[0].kind if shards else "files"
    listed_ids = pa.array([s.shard_id for s in shards], pa.string())
    usual = _done_as_listed(records, listed_ids, shards, files)
    record_ids = records.column("shard_id")
    file_names = file_columns(files)[0]
    others = dict(records.filter(pc.invert(usual)).items())  # not done, changed, retained, kept rows, damaged
    file_ids = pc.replace_substring_regex(file_names.filter(pc.ends_with(file_names, ".parquet")),
                                          pattern=r"\.parquet$", replacement="")
    unnamed = file_ids.filter(pc.invert(pc.is_in(file_ids, value_set=record_ids))).to_pylist()
    foreign = sorted(i for i in unnamed if i not in by_id and not i.startswith(SHARD_PREFIXES))
    # a file whose name this tool does not write, and which no record names: someone else's file, left alone

    listed: set[str] | None = None

    def listed_keys() -> set[str]:  # every clip id of the listing, built only where a record or a stale file needs it
        nonlocal listed
        if listed is None:
            listed = {m.key for s in shards for m in s.members}
        return listed

    done_others, retained, stale = [], {}, []
    for shard_id in sorted(set(others) | set(unnamed) - set(foreign)):
        record = others.get(shard_id)
        valid = record is not None and file_matches(record, files)
        shard = by_id.get(shard_id)
        kept = record.get("kept_ids", []) if record else []
        keeps_rightly = not kept or (not prune and not any(key in listed_keys() for key in kept))
        if valid and shard is not None and is_done(record, shard) and keeps_rightly:
            done_others.append(shard_id)
        elif valid and shard is None and record.get("status") == "retained" and keeps_rightly:
            retained[shard_id] = record
        else:
            stale.append(shard_id)
    done = records.filter(pc.or_(usual, pc.is_in(record_ids, value_set=pa.array(done_others, pa.string()))))

    warnings = [f"data/{i}.parquet is not a file of this output (no record names it); it is left alone, and "
                "readers of data/*.parquet will see it" for i in foreign]
    gone: dict[str, list[str]] = {}
    stale_ids: set[str] = set()
    retire = []
    ids_of = read_ids([s for s in stale if f"{s}.parquet" in files]) if stale else {}
    for shard_id in stale:
        record, shard = others.get(shard_id), by_id.get(shard_id)
        ids = ids_of.get(shard_id, [])
        if f"{shard_id}.parquet" not in files:
            if record is not None and record.get("rows"):
                warnings.append(f"shard {shard_id}: its data file is missing; its {record['rows']} row(s) cannot be "
                                "kept if their inputs are gone (the others are encoded again)")
        stale_ids.update(ids)
        if kind in CONTAINER_KINDS:
            gone[shard_id] = [] if shard is not None else ids
        else:
            gone[shard_id] = [i for i in ids if i not in listed_keys()]
        uri = shard.uri if shard is not None else record["shard"]["uri"] if record else ""
        retire.append(Retire(shard_id, kind, uri, [] if prune else gone[shard_id]))

    is_done_now = pc.is_in(listed_ids, value_set=done.column("shard_id")).to_numpy(False)
    pending = [s for s, d in zip(shards, is_done_now) if not d]
    kept = {r.shard_id: r.keep for r in retire if r.keep and r.shard_id in by_id}
    pending_keys = {m.key for s in pending for m in s.members}
    gone_ids = {i for ids in gone.values() for i in ids}
    old_records = {s for s in stale if s in others}
    has_record = pc.is_in(listed_ids, value_set=record_ids).to_numpy(False)
    changes = {
        "shards": {
            "added": int(np.sum(~is_done_now & ~has_record)),
            "changed": sum(s.shard_id in old_records for s in pending),
            "removed": sum(s not in by_id for s in old_records),
            "unchanged": len(done),
        },
        "clips": {
            "encoded_before": len(pending_keys & stale_ids),
            "new": len(pending_keys - stale_ids),
            "gone": len(gone_ids),
            "kept": 0 if prune else len(gone_ids),
            "pruned": len(gone_ids) if prune else 0,
            "retained_before": sum(r["rows"] for r in retained.values()),
        },
        "prune": prune,
    }
    change = Changes({**dict.fromkeys(retained, "unchanged"), **{s: "removed" for s in old_records if s not in by_id},
                      **{s.shard_id: "changed" if s.shard_id in old_records else "added" for s in pending}}, done)
    return Plan(shards, done, retained, pending, retire, kept, changes, change, warnings, records.fetched)


def _done_as_listed(records: RecordSet, listed_ids: pa.Array, shards: list[Shard], files: Mapping[str, int]
                    ) -> pa.Array:
    """Per record: whether it is done as the listing (``shards``, whose ids are ``listed_ids``) has its shard now (same
    digest), with its data file there at the recorded size, and no kept rows (those are decided one by one). One
    step after another, so that the columns each makes (10^6 shards: about 100 MB) are not held at once."""
    column = records.column
    usual = pc.and_(files_match(records, files),
                    pc.and_(pc.equal(column("status").cast(pa.string()), "done"), pc.equal(column("kept"), 0)))
    at = pc.index_in(column("shard_id"), value_set=listed_ids)
    digests = pa.array([s.digest for s in shards], pa.string())
    usual = pc.and_(usual, pc.equal(column("digest"), pc.take(digests, at)))
    return usual.fill_null(False).combine_chunks()


class Changes(Mapping):
    """Shard id → ``added`` / ``changed`` / ``removed`` / ``unchanged``: the shards ``done`` (a million, as columns)
    are ``unchanged`` without an entry each."""

    def __init__(self, explicit: dict[str, str], done: RecordSet):
        self.explicit, self.done_ids = explicit, done.column("shard_id")  # the done ids only: not the records' columns
        self._lookup: Lookup | None = None

    def column(self, ids: pa.Array) -> pa.Array:
        """The change of each shard id in ``ids`` (null where there is none)."""
        unchanged = pc.if_else(pc.is_in(ids, value_set=self.done_ids), "unchanged", pa.scalar(None, pa.string()))
        if not self.explicit:
            return unchanged
        at = pc.index_in(ids, value_set=pa.array(list(self.explicit), pa.string()))
        return pc.coalesce(pc.take(pa.array(list(self.explicit.values()), pa.string()), at), unchanged)

    def __getitem__(self, shard_id: str) -> str:
        if shard_id in self.explicit:
            return self.explicit[shard_id]
        if self._lookup is None:
            self._lookup = Lookup(self.done_ids)
        if self._lookup.row(shard_id) is not None:
            return "unchanged"
        raise KeyError(shard_id)

    def __iter__(self) -> Iterator[str]:
        yield from self.explicit
        yield from (s for s in self.done_ids.to_pylist() if s not in self.explicit)

    def __len__(self) -> int:
        return len(self.explicit) + sum(1 for s in self.done_ids.to_pylist() if s not in self.explicit)
