"""``mimi-tokenize dedup OUTPUT``: exact and near duplicates, containment and repeated segments across an output,
from the ``pcm_hash`` and ``fingerprint`` columns that the decode pass writes (no audio is read again).

Work happens in stages over Parquet under ``_dedup/work/``, each file written atomically and skipped on a rerun, so
an interrupted dedup resumes. Memory per step is bounded by one chunk, one hash partition or
:data:`VOTES_PER_STEP` votes, not by the output (chance votes grow with the square of the landmarks until
:data:`pipeline.matching.STOP_OCCURRENCES` caps them, so pair partitions are sized by the votes, not fixed):

1. **prints** (per chunk of :data:`CHUNK_FILES` data files): each clip's triplet landmarks (hash, clip, frame) in
   one file with a row group per hash partition, and the clip table (key, id, file, duration, bandwidth, pcm_hash,
   fingerprint and its extent). Clip keys number the clips in file order.
2. **counts**: the votes each hash partition's join will cast (:func:`pipeline.matching.vote_count`), which set
   the number of pair partitions: ``max(partitions, votes / VOTES_PER_STEP)`` (``votes.json``).
3. **votes** (per hash partition): the hash join (:func:`pipeline.matching.vote_batches`) of the partition's
   triplet landmarks from every chunk, leaving out all but one clip of each set of exact duplicates, a batch of at
   most :data:`VOTES_PER_STEP` votes at a time; per batch, one row group per pair partition (row group
   ``batch * pair_partitions + q``).
4. **pairs** (per pair partition): the votes of the partition's clip pairs from every hash partition; pairs with
   :data:`pipeline.matching.CANDIDATE_MATCHES` at one offset are verified on both clips' pair hashes
   (:func:`pipeline.matching.verify`).
5. **final**: relations, groups and repeated segments (:mod:`pipeline.matching`) from the scored pairs, written as

::

    _dedup/clips/{shard_id}.parquet   per data file, its rows in order: id, group (the kept clip's id), relation
                                      (null for a kept clip, else exact / near / contained), kept (bool)
    _dedup/segments.parquet           segment, id, start_frame, end_frame (Mimi frames, 12.5 per second)
    _dedup/summary.json               what was done on which data (its digest), counts, duplicate hours; last

A rerun on an unchanged output finds ``summary.json`` for its data digest and does nothing; work left for another
digest (the output changed) is dropped. Dedup refuses to start while a live run holds the output's lock, and does
not write its tables if a run took the lock or the data changed meanwhile.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import fingerprint, manifest, matching, state, storage
from pipeline.export import data_digest
from pipeline.reading import open_parquet

log = logging.getLogger(__name__)

DEDUP_DIR = "_dedup"
SUMMARY = f"{DEDUP_DIR}/summary.json"
WORK = f"{DEDUP_DIR}/work"
FORMAT = "mimi-tokenize-dedup/1"
CHUNK_FILES = 16
PARTITIONS = 16
VOTES_PER_STEP = 1 << 22  # votes held at once by the votes and pairs stages (about 1 GB of working memory)
COLUMNS = ("id", "duration_s", "pcm_hash", "fingerprint")
MATCHING_PARAMS = ("STOP_OCCURRENCES", "PIVOTS", "CANDIDATE_MATCHES", "MIN_MATCHES", "MIN_DENSITY", "DENSE_MATCHES",
                   "DENSE_DENSITY", "COVER", "SEGMENT_S", "SEGMENT_MIN_CLIPS", "RUN_GAP")
PAIR_COLUMNS = ("a", "b", "offset", "matches", "a_start", "a_end", "b_start", "b_end")
CLIP_SCHEMA = (("key", pa.int64()), ("id", pa.string()), ("file", pa.string()), ("duration_s", pa.float64()),
               ("bandwidth_hz", pa.float64()), ("pcm_hash", pa.binary()), ("first", pa.int64()), ("last", pa.int64()),
               ("fingerprint", pa.binary()))


class DedupError(RuntimeError):
    """The output cannot be deduplicated (a live run, no fingerprints, nothing done)."""


def params(partitions: int) -> dict[str, Any]:
    """What the work depends on besides the data: a change redoes it."""
    return {"format": FORMAT, "partitions": partitions, "chunk_files": CHUNK_FILES, "votes_per_step": VOTES_PER_STEP,
            "fingerprint": {k: getattr(fingerprint, k) for k in ("VERSION", "N_FFT", "HOP", "FAN_OUT", "MAX_DT")},
            "matching": {k: getattr(matching, k) for k in MATCHING_PARAMS}}


def _write(url: str, table: pa.Table, storage_options: dict[str, Any] | None, groups: np.ndarray | None = None,
           partitions: int = 0) -> None:
    """Write ``table`` to ``url`` atomically; with ``groups`` (sorted partition of each row), one row group per
    partition, empty ones included, so that row group ``p`` is partition ``p``."""
    with storage.atomic_output(url, storage_options) as tmp:
        with pq.ParquetWriter(tmp, table.schema, compression="zstd") as writer:
            if groups is None:
                writer.write_table(table)
            else:
                _write_partitions(writer, table, groups, partitions)


def _write_partitions(writer: pq.ParquetWriter, table: pa.Table, groups: np.ndarray, partitions: int) -> None:
    """One row group per partition of ``table`` (``groups``: each row's partition, sorted), empty ones and ones over
    Parquet's default row group size (2^20 rows, which would split them and shift the groups after) included."""
    bounds = np.searchsorted(groups, np.arange(partitions + 1))
    for p in range(partitions):
        rows = int(bounds[p + 1] - bounds[p])
        writer.write_table(table.slice(bounds[p], rows), row_group_size=max(rows, 1))


def _read_group(url: str, group: int, storage_options: dict[str, Any] | None, columns: list[str] | None = None
                ) -> pa.Table:
    return open_parquet(url, storage_options).read_row_group(group, columns=columns)


def _read(url: str, storage_options: dict[str, Any] | None, **kwargs: Any) -> pa.Table:
    fs, path = storage.get_fs(url, storage_options)
    return pq.read_table(path, filesystem=fs, **kwargs)


def _fence(output_url: str, storage_options: dict[str, Any] | None) -> None:
    lock = state.live_lock(output_url, storage_options)
    if lock is not None:
        raise DedupError(f"{manifest.redact(output_url)}: a run is writing it (lock held by {lock.get('owner')}); "
                         "run dedup once it has finished")


def _entries(output_url: str, storage_options: dict[str, Any] | None) -> tuple[list[dict[str, Any]], str]:
    current = state.read_output(output_url, storage_options)
    entries = sorted((e for e in manifest.shard_entries(output_url, current, storage_options)
                      if e["status"] != "pending"), key=lambda e: e["file"])
    if not entries:
        raise DedupError(f"{manifest.redact(output_url)}: no shard is done; there is nothing to deduplicate")
    return entries, data_digest(entries)


# --- stages --------------------------------------------------------------------------------------------------------


def _prints(output_url: str, chunk: list[dict[str, Any]], first_key: int, partitions: int,
            storage_options: dict[str, Any] | None) -> tuple[pa.Table, pa.Table]:
    """Stage 1 for one chunk of data files: (landmarks sorted by partition, clips)."""
    lms, clips = [], []
    key = first_key
    for entry in chunk:
        parquet = open_parquet(storage.join(output_url, entry["file"]), storage_options)
        names = set(parquet.schema_arrow.names)
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise DedupError(f"{entry['file']} has no {', '.join(missing)} column: it was written before "
                             "fingerprints; rerun `mimi-tokenize run` with a version that writes them")
        wanted = [*COLUMNS, *(["bandwidth_hz"] if "bandwidth_hz" in names else [])]
        for group in range(parquet.metadata.num_row_groups):
            table = parquet.read_row_group(group, columns=wanted)
            prints = [matching.clip_print(fp) for fp in table.column("fingerprint").to_pylist()]
            keys = np.arange(key, key + table.num_rows, dtype=np.int64)
            key += table.num_rows
            lm = matching.many_landmarks(keys.tolist(), prints)
            lms.append(matching.Landmarks(lm.hashes, lm.keys, lm.times.astype(np.int32), lm.ends.astype(np.int32)))
            bandwidth = table.column("bandwidth_hz") if "bandwidth_hz" in wanted else pa.nulls(table.num_rows,
                                                                                               pa.float64())
            clips.append(pa.table({
                "key": pa.array(keys, pa.int64()), "id": table.column("id"),
                "file": pa.array([entry["file"]] * table.num_rows),
                "duration_s": table.column("duration_s"), "bandwidth_hz": bandwidth.cast(pa.float64()),
                "pcm_hash": table.column("pcm_hash").cast(pa.binary()),
                "first": np.array([cp.first for cp in prints], np.int64),
                "last": np.array([cp.last for cp in prints], np.int64),
                "fingerprint": table.column("fingerprint").cast(pa.binary())}))
    if not clips:
        clips.append(pa.table({name: pa.array([], type) for name, type in CLIP_SCHEMA}))
    lm = matching.Landmarks.concat(lms)
    del lms
    order = np.argsort(_hash_partition(lm.hashes, partitions), kind="stable")
    table = pa.table({"hash": lm.hashes[order], "key": lm.keys[order], "t": lm.times[order].astype(np.int32),
                      "end": lm.ends[order].astype(np.int32)})
    return table, pa.concat_tables(clips)


def _hash_partition(hashes: np.ndarray, partitions: int) -> np.ndarray:
    """The hash partition of triplet hashes: their bits mixed (Fibonacci hashing), since the low bits of a hash are
    a frame distance, which takes few values (``hash % partitions`` put a third of the landmarks in one of 16)."""
    return ((hashes.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)) % np.uint64(partitions)


def _exact(work: str, chunks: int, storage_options: dict[str, Any] | None) -> list[list[int]]:
    """Sets of clips with the same pcm_hash (keys in order), from the clip tables."""
    tables = [_read(storage.join(work, "clips", f"{c:05d}.parquet"), storage_options, columns=["key", "pcm_hash"])
              for c in range(chunks)]
    table = pa.concat_tables(tables)
    grouped = table.group_by("pcm_hash").aggregate([("key", "list"), ("key", "count")])
    many = grouped.filter(pc.greater(grouped.column("key_count"), 1))
    return sorted(sorted(keys) for keys in many.column("key_list").to_pylist())


def _pair_partitions(work: str, chunks: int, partitions: int, storage_options: dict[str, Any] | None) -> int:
    """Stage 2: the number of pair partitions, from the votes each hash partition will cast (``votes.json``)."""
    url = storage.join(work, "votes.json")
    try:
        return int(storage.read_json(url, storage_options)["pair_partitions"])
    except (FileNotFoundError, ValueError):
        pass
    votes = []
    for p in range(partitions):
        hashes = pa.concat_tables([_read_group(storage.join(work, "prints", f"{c:05d}.parquet"), p, storage_options,
                                               ["hash"]) for c in range(chunks)]).column("hash").to_numpy()
        votes.append(matching.vote_count(hashes))
        del hashes
    pair_partitions = max(partitions, -(-sum(votes) // VOTES_PER_STEP))
    storage.write_json(url, {"votes": votes, "pair_partitions": pair_partitions}, storage_options)
    return pair_partitions


def _pair_partition(a: np.ndarray, b: np.ndarray, pair_partitions: int) -> np.ndarray:
    """The pair partition of clip pairs (spread over both keys: a clip in many pairs does not fill one partition)."""
    return (a.astype(np.int64) * 2654435761 + b) % pair_partitions


VOTE_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("offset", pa.int32()), ("t", pa.int32()),
                         ("end", pa.int32())])


def _votes(work: str, chunks: int, p: int, partitions: int, pair_partitions: int, skip: np.ndarray, url: str,
           storage_options: dict[str, Any] | None) -> None:
    """Stage 3 for hash partition ``p``: its votes at ``url``, a batch at a time, each batch a row group per pair
    partition."""
    table = pa.concat_tables([_read_group(storage.join(work, "prints", f"{c:05d}.parquet"), p, storage_options)
                              for c in range(chunks)])
    lm = matching.Landmarks(*(table.column(name).to_numpy().astype(np.int64) for name in ("hash", "key", "t", "end")))
    del table
    if len(skip):
        keep = ~np.isin(lm.keys, skip)
        lm = matching.Landmarks(lm.hashes[keep], lm.keys[keep], lm.times[keep], lm.ends[keep])
    with storage.atomic_output(url, storage_options) as tmp:
        with pq.ParquetWriter(tmp, VOTE_SCHEMA, compression="zstd") as writer:
            for votes in matching.vote_batches(lm, VOTES_PER_STEP):
                part = _pair_partition(votes.a, votes.b, pair_partitions)
                order = np.argsort(part, kind="stable")
                batch = pa.table({name: getattr(votes, name)[order] for name in VOTE_SCHEMA.names}, schema=VOTE_SCHEMA)
                del votes
                _write_partitions(writer, batch, part[order], pair_partitions)


def _pairs(work: str, chunks: int, q: int, partitions: int, pair_partitions: int,
           storage_options: dict[str, Any] | None) -> pa.Table:
    """Stage 4 for pair partition ``q``: the candidate pairs (triplet votes), verified on their pair hashes."""
    tables = []
    for p in range(partitions):
        votes_file = open_parquet(storage.join(work, "votes", f"{p:03d}.parquet"), storage_options)
        tables.append(votes_file.read_row_groups(range(q, votes_file.metadata.num_row_groups, pair_partitions)))
    table = pa.concat_tables(tables)
    del tables
    votes = matching.Votes(*(table.column(n).to_numpy() for n in ("a", "b", "offset", "t", "end")))
    del table
    candidates = matching.score_pairs(votes, matching.CANDIDATE_MATCHES)
    keys = pa.array(sorted({int(k) for k in np.concatenate([candidates.a, candidates.b])}), pa.int64())
    prints = {}
    for c in range(chunks):
        clips = _read(storage.join(work, "clips", f"{c:05d}.parquet"), storage_options, columns=["key", "fingerprint"],
                      filters=pc.field("key").isin(keys))
        prints.update(zip(clips.column("key").to_pylist(),
                          map(matching.clip_print, clips.column("fingerprint").to_pylist())))
    pairs = matching.verify(candidates, prints)
    return pa.table({name: pa.array(getattr(pairs, name), pa.int64()) for name in PAIR_COLUMNS})


def _clip_info(work: str, chunks: int, keys: set[int], storage_options: dict[str, Any] | None
               ) -> dict[int, matching.ClipInfo]:
    wanted = pa.array(sorted(keys), pa.int64())
    info = {}
    for c in range(chunks):
        table = _read(storage.join(work, "clips", f"{c:05d}.parquet"), storage_options,
                      filters=pc.field("key").isin(wanted))
        for row in table.to_pylist():
            info[row["key"]] = matching.ClipInfo(row["id"], row["duration_s"], row["bandwidth_hz"], row["pcm_hash"],
                                                 row["first"], row["last"])
    return info


# --- the command ---------------------------------------------------------------------------------------------------


def dedup(output_url: str, *, partitions: int = PARTITIONS, storage_options: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    """Deduplicate ``output_url`` (see the module docstring); return ``summary.json``'s content."""
    where = manifest.redact(output_url)
    _fence(output_url, storage_options)
    entries, digest = _entries(output_url, storage_options)
    settings = params(partitions)
    try:
        done = storage.read_json(storage.join(output_url, SUMMARY), storage_options)
    except (FileNotFoundError, ValueError):
        done = None
    if done and done.get("data_digest") == digest and done.get("params") == settings:
        log.info("%s: dedup is up to date; nothing to do", where)
        return done
    started = time.time()
    work = storage.join(output_url, WORK)
    work_state = {"data_digest": digest, "params": settings}
    try:
        previous = storage.read_json(storage.join(work, "state.json"), storage_options)
    except (FileNotFoundError, ValueError):
        previous = None
    if previous != work_state:
        fs, path = storage.get_fs(work, storage_options)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        storage.write_json(storage.join(work, "state.json"), work_state, storage_options)
    chunks = [entries[i:i + CHUNK_FILES] for i in range(0, len(entries), CHUNK_FILES)]
    first_keys = np.cumsum([0] + [sum(e["rows"] for e in chunk) for chunk in chunks])
    for c, chunk in enumerate(chunks):
        prints_url = storage.join(work, "prints", f"{c:05d}.parquet")
        if not storage.exists(prints_url, storage_options):
            lm, clips = _prints(output_url, chunk, int(first_keys[c]), partitions, storage_options)
            _write(storage.join(work, "clips", f"{c:05d}.parquet"), clips, storage_options)
            _write(prints_url, lm, storage_options, _hash_partition(lm.column("hash").to_numpy(), partitions),
                   partitions)
    exact = _exact(work, len(chunks), storage_options)
    skip = np.array(sorted(k for keys in exact for k in keys[1:]), np.int64)
    pair_partitions = _pair_partitions(work, len(chunks), partitions, storage_options)
    for p in range(partitions):
        url = storage.join(work, "votes", f"{p:03d}.parquet")
        if not storage.exists(url, storage_options):
            _votes(work, len(chunks), p, partitions, pair_partitions, skip, url, storage_options)
    pair_tables = []
    for q in range(pair_partitions):
        url = storage.join(work, "pairs", f"{q:05d}.parquet")
        if not storage.exists(url, storage_options):
            _write(url, _pairs(work, len(chunks), q, partitions, pair_partitions, storage_options), storage_options)
        pair_tables.append(_read(url, storage_options))
    table = pa.concat_tables(pair_tables)
    pairs = matching.Pairs(*(table.column(n).to_numpy() for n in PAIR_COLUMNS))
    keys = {int(k) for k in np.concatenate([pairs.a, pairs.b])} | {k for keys in exact for k in keys}
    info = _clip_info(work, len(chunks), keys, storage_options)
    rels = matching.relations(pairs, info)
    members = {m.key: m for m in matching.group_clips(exact, rels, info)}
    occurrences = matching.repeated_segments(rels, info)

    _fence(output_url, storage_options)
    if _entries(output_url, storage_options)[1] != digest:
        raise DedupError(f"{where}: the output changed while dedup ran; run dedup again")
    summary = _write_tables(output_url, work, len(chunks), members, occurrences, info, storage_options)
    summary.update(data_digest=digest, params=settings, seconds=round(time.time() - started, 1),
                   relations={kind: sum(r.kind == kind for r in rels)
                              for kind in (matching.NEAR, matching.CONTAINED, matching.SEGMENT)})
    storage.write_json(storage.join(output_url, SUMMARY), summary, storage_options)
    log.info("%s: %d clips, %d in %d duplicate groups, %d removed (%.2f of %.2f h), %d repeated segments", where,
             summary["clips"], summary["grouped_clips"], summary["groups"], summary["removed_clips"],
             summary["removed_hours"], summary["hours"], summary["segments"])
    return summary


def _write_tables(output_url: str, work: str, chunks: int, members: dict[int, matching.Member],
                  occurrences: list[matching.Occurrence], info: dict[int, matching.ClipInfo],
                  storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """``_dedup/clips/*.parquet`` (one per data file) and ``_dedup/segments.parquet``; the summary's counts."""
    clips = removed = 0
    hours = removed_hours = 0.0
    for c in range(chunks):
        table = _read(storage.join(work, "clips", f"{c:05d}.parquet"), storage_options,
                      columns=["key", "id", "file", "duration_s"])
        keys = table.column("key").to_numpy()
        ids = table.column("id").to_pylist()
        group = [info[members[k].kept].id if k in members else i for k, i in zip(keys.tolist(), ids)]
        relation = [members[k].relation if k in members else None for k in keys.tolist()]
        kept = np.array([k not in members or members[k].relation is None for k in keys.tolist()])
        durations = table.column("duration_s").to_numpy()
        clips += len(keys)
        removed += int((~kept).sum())
        hours += float(durations.sum()) / 3600
        removed_hours += float(durations[~kept].sum()) / 3600
        files = table.column("file").to_numpy(zero_copy_only=False)
        for name in dict.fromkeys(files.tolist()):
            rows = np.flatnonzero(files == name)
            out = pa.table({"id": pa.array([ids[i] for i in rows], pa.string()),
                            "group": pa.array([group[i] for i in rows], pa.string()),
                            "relation": pa.array([relation[i] for i in rows], pa.string()),
                            "kept": pa.array(kept[rows])})
            _write(storage.join(output_url, DEDUP_DIR, "clips", name.rsplit("/", 1)[-1]), out, storage_options)
    frames = [matching.mimi_frames(o.start, o.end) for o in occurrences]
    segments = pa.table({"segment": pa.array([o.segment for o in occurrences], pa.int32()),
                         "id": pa.array([info[o.key].id for o in occurrences], pa.string()),
                         "start_frame": pa.array([f[0] for f in frames], pa.int64()),
                         "end_frame": pa.array([f[1] for f in frames], pa.int64())})
    _write(storage.join(output_url, DEDUP_DIR, "segments.parquet"), segments, storage_options)
    groups = len({m.kept for m in members.values()})
    return {"format": FORMAT, "clips": clips, "hours": round(hours, 4), "groups": groups,
            "grouped_clips": len(members), "removed_clips": removed, "removed_hours": round(removed_hours, 4),
            "segments": len({o.segment for o in occurrences}), "segment_occurrences": len(occurrences)}


# --- honouring it --------------------------------------------------------------------------------------------------


def read_summary(output_url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """``_dedup/summary.json`` of the output, or None."""
    try:
        return storage.read_json(storage.join(output_url, SUMMARY), storage_options)
    except (FileNotFoundError, ValueError):
        return None


def kept_mask(output_url: str, file_url: str, rows: int, storage_options: dict[str, Any] | None = None
              ) -> np.ndarray:
    """Which rows of the data file ``file_url`` dedup keeps (bool per row, in file order). Raises
    :class:`DedupError` when the output has no dedup for its current data (run ``mimi-tokenize dedup``)."""
    name = file_url.rstrip("/").rsplit("/", 1)[-1]
    try:
        table = _read(storage.join(output_url, DEDUP_DIR, "clips", name), storage_options, columns=["kept"])
    except FileNotFoundError:
        raise DedupError(f"{manifest.redact(output_url)} has no dedup table for {name}; run `mimi-tokenize dedup "
                         f"{manifest.redact(output_url)}` first") from None
    mask = table.column("kept").to_numpy(zero_copy_only=False)
    if len(mask) != rows:
        raise DedupError(f"{name}: the dedup table has {len(mask)} rows, the file {rows}; run `mimi-tokenize dedup` "
                         "again")
    return mask


def check_current(output_url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dedup summary, if it was made from the output's current data; else :class:`DedupError`."""
    summary = read_summary(output_url, storage_options)
    if summary is None or summary.get("data_digest") != _entries(output_url, storage_options)[1]:
        raise DedupError(f"{manifest.redact(output_url)} has no dedup of its current data; run `mimi-tokenize "
                         f"dedup {manifest.redact(output_url)}` first")
    return summary


def describe(summary: dict[str, Any]) -> str:
    """One line for ``status`` and ``report``."""
    share = 100 * summary["removed_hours"] / summary["hours"] if summary["hours"] else 0.0
    return (f"duplicates: {summary['removed_clips']:,} of {summary['clips']:,} clips, {summary['removed_hours']:.2f} "
            f"of {summary['hours']:.2f} h ({share:.1f}%) in {summary['groups']:,} groups; "
            f"{summary['segments']:,} repeated segments (mimi-tokenize dedup)")
