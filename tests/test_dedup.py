"""Dedup: the streaming fingerprint, accuracy on a planted corpus of real speech (espeak-ng), and the ``dedup``
command on an output folder honoured by export and the loader."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

from pipeline import dedup as dd
from pipeline import fingerprint as fpm
from pipeline import manifest as mf
from pipeline import matching, storage
from pipeline.cli import main
from pipeline.export import export
from pipeline.loader import MimiCodes
from pipeline.publish import PublishError, publish
from pipeline.signals import Signals
from pipeline.types import ClipInfo, EncodedClip, Shard
from pipeline.writer import write_shard
from tests.planted import TRANSFORMS, Planted, evaluate, planted_corpus

RATE = 24_000


def test_fingerprint_streams_to_the_same_bytes_and_round_trips():
    rng = np.random.default_rng(3)
    audio = (np.sin(np.cumsum(rng.uniform(0.01, 0.2, 7 * RATE + 1234))) * rng.uniform(0, 1, 7 * RATE + 1234)
             ).astype(np.float32)
    whole = fpm.fingerprint(audio)
    for sizes in ([1, 5, 6, 7, 255, 256, 1535, 1536, 1537], [RATE], [3 * RATE + 5]):
        fp, pos = fpm.Fingerprinter(), 0
        while pos < len(audio):
            n = sizes[pos % len(sizes)]
            fp.feed(audio[pos:pos + n])
            pos += n
        assert fp.finish() == whole, sizes
    times, bins = fpm.decode(whole)
    assert len(times) > 20 and np.all(np.diff(times) >= 0) and fpm.encode(times, bins) == whole
    assert times[-1] <= (len(audio) / 6 - fpm.N_FFT) / fpm.HOP + 1
    assert fpm.decode(fpm.fingerprint(np.zeros(0, np.float32)))[0].size == 0
    assert fpm.decode(fpm.fingerprint(np.zeros(RATE, np.float32)))[0].size == 0  # silence has no peaks
    big = np.array([0, 127, 128, 2**14, 2**40], np.int64)
    assert np.array_equal(fpm.decode(fpm.encode(np.cumsum(big), np.arange(5)))[0], np.cumsum(big))


@pytest.fixture(scope="module")
def planted() -> Planted:
    return planted_corpus(seed=0, per_voice=40, per_transform=20, recordings=1, jingle_recordings=20)


def _prints(p: Planted) -> tuple[dict[int, matching.ClipPrint], dict[int, matching.ClipInfo], list[str]]:
    names = sorted(p.clips)
    prints, info = {}, {}
    for key, name in enumerate(names):
        audio = p.clips[name]
        fp = fpm.Fingerprinter()
        for start in range(0, len(audio), 48_000):  # as the decoder hands blocks
            fp.feed(audio[start:start + 48_000])
        cp = matching.clip_print(fp.finish())
        prints[key] = cp
        info[key] = matching.ClipInfo(name, len(audio) / RATE, None, xxhash.xxh3_128_digest(audio.tobytes()),
                                      cp.first, cp.last)
    return prints, info, names


def test_planted_corpus_accuracy(planted):
    """Per transform recall ≥ 95 %, pair precision ≥ 99 %, no distinct pair grouped, the jingle found in its 20
    recordings within 1 s, the kept clip of each group the longest."""
    prints, info, names = _prints(planted)
    assert len([n for n in names if n.startswith("v")]) >= 230
    members, occurrences, _ = matching.match_clips(prints, info)
    kept_of = {info[m.key].id: info[m.kept].id for m in members}
    recall, precision, wrong = evaluate(planted, kept_of)
    assert set(recall) == {*TRANSFORMS, "inside_5min"}
    assert all(r >= 0.95 for r in recall.values()), recall
    assert precision >= 0.99 and not wrong, wrong[:5]
    relation = {info[m.key].id: m.relation for m in members}
    for copy, original, transform in planted.copies:
        if transform in ("exact", "flac"):
            assert relation[copy] == "exact" or relation[original] == "exact"
    for m in members:
        group = [info[x.key] for x in members if x.kept == m.kept]
        assert info[m.kept].rank() == min(c.rank() for c in group)
    segments = {}
    for o in occurrences:
        segments.setdefault(o.segment, []).append(o)
    jingle = [s for s in segments.values() if {info[o.key].id for o in s} & set(planted.jingle)]
    assert len(jingle) == 1 and {info[o.key].id for o in jingle[0]} == set(planted.jingle)
    for o in jingle[0]:
        start, end = (x / RATE * fpm.FRAME_RATE for x in planted.jingle[info[o.key].id])
        assert abs(o.start - start) < fpm.FRAME_RATE and abs(o.end - end) < fpm.FRAME_RATE, (o, start, end)
    frames = matching.mimi_frames(jingle[0][0].start, jingle[0][0].end)
    assert 55 <= frames[1] - frames[0] <= 80  # 5 s at 12.5 frames/s, within the tolerance above


def test_votes_cast_in_bounded_batches_and_counted_without_casting():
    rng = np.random.default_rng(5)
    n = 20_000
    lm = matching.Landmarks(rng.integers(0, 3_000, n), np.arange(n), rng.integers(0, 900, n), rng.integers(0, 900, n))
    lm.hashes[:600] = 7  # over STOP_OCCURRENCES: a star on PIVOTS pivots
    whole = matching.join_votes(lm)
    batches = list(matching.vote_batches(lm, 1_000))
    assert len(batches) > 10
    assert all(len(b.a) <= 1_000 or len(set(b.a.tolist()) & set(range(600))) for b in batches)

    def rows(v: matching.Votes) -> list[tuple[int, ...]]:
        return sorted(zip(*(x.tolist() for x in (v.a, v.b, v.offset, v.t, v.end))))

    assert rows(matching.Votes.concat(batches)) == rows(whole)
    assert matching.vote_count(lm.hashes) == len(whole.a) == sum(len(b.a) for b in batches)


def test_a_partition_over_parquets_row_group_size_keeps_its_row_group(tmp_path):
    """Row group p is partition p, even past 2^20 rows (Parquet's default would split it and shift the rest)."""
    groups = np.repeat([0, 2], [5, (1 << 20) + 1])
    dd._write(str(tmp_path / "parts.parquet"), pa.table({"x": np.zeros(len(groups), np.int8)}), None, groups, 4)
    meta = pq.ParquetFile(tmp_path / "parts.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [5, 0, (1 << 20) + 1, 0]


# --- the command on an output folder -------------------------------------------------------------------------------


def _fabricate(root: str, clips: list[tuple[str, np.ndarray, float]]) -> None:
    """An output folder as a run writes it (data files through the writer, records, manifest), with the columns the
    decode pass adds: pcm_hash, fingerprint, bandwidth_hz. Two shards."""
    run = mf.init_run(root, mf.make_run({}, {"source": "test", "sha256": "ab" * 32}, 2, created=time.time()))
    shards, done = [], {}
    for s, part in enumerate((clips[::2], clips[1::2])):
        shard = Shard(f"files-{s:04d}", "files", "/in", "/in", f"digest{s}")
        rows = [EncodedClip(ClipInfo(i, name, f"/in/{name}", RATE, 1),
                            np.full((2, -(-len(audio) // 1920)), i, np.int16), len(audio),
                            Signals(xxhash.xxh3_128_digest(audio.tobytes()), fpm.fingerprint(audio),
                                    None, None, None, None, bandwidth))
                for i, (name, audio, bandwidth) in enumerate(part)]
        result = write_shard(storage.join(root, mf.shard_file(shard.shard_id)), rows, num_codebooks=2,
                             file_metadata={})
        done[shard.shard_id] = mf.write_record(root, shard, result, [], started=time.time() - 1,
                                               finished=time.time(), attempt=1)
        shards.append(shard)
    mf.write_manifest(root, mf.build_manifest(root, run, shards, done, started=time.time() - 5,
                                              finished=time.time()))


def test_dedup_command_export_and_loader(planted, tmp_path, capsys, monkeypatch):
    p = planted
    mp3 = next(c for c, _, t in p.copies if t == "mp3_64k")
    original = next(o for c, o, _ in p.copies if c == mp3)
    exact = next(c for c, _, t in p.copies if t == "exact")
    exact_of = next(o for c, o, _ in p.copies if c == exact)
    jingled = sorted(p.jingle)[:4]
    others = [n for n in sorted(p.clips) if n.startswith("v5/")][:6]
    chosen = [mp3, original, exact, exact_of, *jingled, *others]
    clips = [(name, p.clips[name], 8000.0 if name == original else 6000.0) for name in chosen]
    root = str(tmp_path / "out")
    _fabricate(root, clips)

    assert main(["dedup", root, "--partitions", "3"]) == 0
    summary = json.loads((tmp_path / "out/_dedup/summary.json").read_text())
    assert (summary["clips"], summary["groups"], summary["removed_clips"], summary["segments"]) == (14, 2, 2, 1)
    tables = {f.name: pq.read_table(f).to_pylist() for f in sorted((tmp_path / "out/_dedup/clips").iterdir())}
    assert sorted(tables) == ["files-0000.parquet", "files-0001.parquet"]
    rows = {r["id"]: r for t in tables.values() for r in t}
    assert [r["id"] for r in tables["files-0000.parquet"]] == [n for n, _, _ in clips[::2]]  # file order
    # the longest is kept, then the highest bandwidth; of exact copies, the smaller id
    keep, drop = sorted([original, mp3], key=lambda n: (-len(p.clips[n]), n != original))
    assert rows[drop] == {"id": drop, "group": keep, "relation": "near", "kept": False}
    assert rows[keep]["kept"] and rows[keep]["relation"] is None
    first, second = sorted([exact, exact_of])
    assert rows[second] == {"id": second, "group": first, "relation": "exact", "kept": False}
    assert sum(not r["kept"] for r in rows.values()) == 2
    segments = pq.read_table(tmp_path / "out/_dedup/segments.parquet").to_pylist()
    assert sorted(s["id"] for s in segments) == jingled and {s["segment"] for s in segments} == {0}
    for s in segments:
        start, end = (x / RATE * 12.5 for x in p.jingle[s["id"]])
        assert abs(s["start_frame"] - start) <= 13 and abs(s["end_frame"] - end) <= 13

    # a rerun on the unchanged output does nothing; status shows the duplicate share
    before = {f: f.stat().st_mtime_ns for f in (tmp_path / "out/_dedup").rglob("*") if f.is_file()}
    assert main(["dedup", root, "--partitions", "3"]) == 0
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "out/_dedup").rglob("*") if f.is_file()} == before
    # votes cast and scored a few at a time, over many pair partitions: the same tables
    monkeypatch.setattr(dd, "VOTES_PER_STEP", 200)
    dd.dedup(root, partitions=3)
    assert json.loads((tmp_path / "out/_dedup/work/votes.json").read_text())["pair_partitions"] > 3
    assert {f.name: pq.read_table(f).to_pylist() for f in (tmp_path / "out/_dedup/clips").iterdir()} == tables
    assert pq.read_table(tmp_path / "out/_dedup/segments.parquet").to_pylist() == segments
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["status", root]) == 0
    assert "duplicates: 2 of 14 clips" in capsys.readouterr().out

    # export and the loader keep one clip per group
    meta = export(root, tmp_path / "flat", dedup=True)
    ids = (tmp_path / "flat/ids.txt").read_text().split()
    assert meta["clips"] == 12 and meta["dedup"] and sorted(ids) == sorted(r for r in rows if rows[r]["kept"])
    offsets = np.load(tmp_path / "flat/offsets.npy")
    codes = np.memmap(tmp_path / "flat/codes.u16", np.uint16, "r").reshape(-1, 2)
    lengths = {name: -(-len(audio) // 1920) for name, audio, _ in clips}
    assert [offsets[i + 1] - offsets[i] for i in range(12)] == [lengths[i] for i in ids]
    assert len(codes) == offsets[-1]
    loaded = MimiCodes(root, seq_len=10**6, shuffle=False, dedup=True)
    assert int((next(iter(loaded))["doc_ids"] >= 0).sum()) == offsets[-1]
    assert int((next(iter(MimiCodes(root, seq_len=10**6, shuffle=False)))["doc_ids"] >= 0).sum()) == \
        sum(lengths.values())

    # publish --dedup packs only the kept clips, ships the segments' table, and the card says what was left out
    staging = tmp_path / "staging"
    result = publish(root, "org/name", dry_run=True, staging=staging, dedup=True)
    packed = pq.read_table([staging / f.path for f in result.files if f.path.startswith("data/")][0])
    assert sorted(packed.column("id").to_pylist()) == sorted(r for r in rows if rows[r]["kept"])
    assert pq.read_table(staging / "_dedup/segments.parquet").to_pylist() == segments
    card = (staging / "README.md").read_text()
    assert "## Duplicates left out" in card and "2 of 14 clips" in card and "12 audio clips" in card

    # refused while a live run holds the output's lock; stale once the data changes
    monkeypatch.setattr(dd.state, "live_lock", lambda url, so=None: {"owner": "host:1"})
    with pytest.raises(dd.DedupError, match="a run is writing it"):
        dd.dedup(root)
    monkeypatch.undo()
    _fabricate(root, clips[:-1])
    with pytest.raises(dd.DedupError, match="no dedup of its current data"):
        export(root, tmp_path / "flat2", dedup=True)
    with pytest.raises(PublishError, match="no dedup of its current data"):
        publish(root, "org/name", dry_run=True, dedup=True)
