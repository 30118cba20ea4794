"""Listing and planning inputs at scale, without Ray: the S3 listing streamed in ListObjectsV2 pages (no directory
cache kept), the Parquet footers cached in the output's state, and `plan` on a fresh output (reads only)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from audio_fixtures import signal, wav_bytes, write_hub_parquet, write_jsonl
from pipeline import footers, storage
from pipeline.cli import main
from pipeline.sources import discover_shards, parquet
from pipeline.sources import listing
from pipeline.sources.listing import version_of


def test_s3_listing_streams_pages_in_parallel_and_keeps_no_directory_cache(s3_server: dict[str, Any], s3_url: str,
                                                                           monkeypatch):
    """Pages of 25 keys (S3 gives 1,000) over 4 folders and the root, plus files of other kinds: the listing equals
    s3fs's own find, is cut into the same shards, and fsspec's directory cache is empty afterwards."""
    options = s3_server["storage_options"]
    monkeypatch.setattr(listing, "LIST_PAGE_KEYS", 25)
    fs, root = storage.get_fs(s3_url, options)
    keys = {f"{root}/{folder}/{i:04d}.wav": b"x" * (i % 7 + 1) for folder, n in (("a", 101), ("b", 30), ("c/d", 20),
                                                                                 ("e", 2)) for i in range(n)}
    keys.update({f"{root}/top.wav": b"t", f"{root}/a/notes.txt": b"n"})
    fs.pipe(keys)
    fs.invalidate_cache()
    expected = {name: (info["size"], version_of(info)) for name, info in fs.find(root, detail=True).items()
                if name.endswith(".wav")}
    fs.invalidate_cache()

    found = listing.list_input(s3_url, options)
    assert found.kind == "files" and found.files == dict(sorted(expected.items())) and len(found.files) == 154
    assert not found.fs.dircache, f"directory cache kept: {list(found.fs.dircache)[:3]}"
    assert found.fs.s3.meta.config.max_pool_connections == storage.S3_CLIENT_CONFIG["max_pool_connections"] > 10
    shards = discover_shards(s3_url, files_per_shard=16, storage_options=options)
    assert [m.key for s in shards for m in s.members] == sorted(k.removeprefix(root + "/") for k in expected)


def _hub_parquet(path: Path, n: int, seed: int) -> None:
    write_hub_parquet(path, [{"bytes": wav_bytes(signal(16_000, 0.05, seed=seed + i), 16_000), "path": f"{i}.wav"}
                             for i in range(n)], speaker=[f"s{i}" for i in range(n)])


def test_parquet_footers_are_read_once_then_from_the_outputs_cache(tmp_path: Path, monkeypatch):
    for i in range(3):
        _hub_parquet(tmp_path / "in" / f"train-{i}.parquet", 2 + i, seed=10 * i)
    out = str(tmp_path / "out")
    reads: list[str] = []
    real = parquet.read_footer
    monkeypatch.setattr(parquet, "read_footer", lambda shard, opts: reads.append(shard.uri) or real(shard, opts))

    def footers_now(save: bool) -> dict[str, parquet.Footer | None]:
        return footers.parquet_footers(discover_shards(str(tmp_path / "in")), out, input_options={},
                                       output_options={}, save=save)

    peek = footers_now(save=False)  # `plan`: reads every footer, writes nothing
    assert len(reads) == 3 and not (tmp_path / "out").exists()
    first = footers_now(save=True)  # a run: reads them, and caches them
    assert len(reads) == 6 and first == peek
    assert [f.rows for f in first.values()] == [2, 3, 4]
    assert parquet.metadata_schema(first) == pa.schema([("speaker", pa.string())])
    cache = tmp_path / "out" / footers.FOOTERS_PATH
    written = cache.stat().st_mtime_ns
    assert footers_now(save=True) == first and len(reads) == 6  # a rerun reads no footer
    assert cache.stat().st_mtime_ns == written  # and rewrites nothing

    _hub_parquet(tmp_path / "in" / "train-1.parquet", 5, seed=99)  # rewritten: new size and mtime
    again = footers_now(save=True)
    assert reads[6:] == [f"file://{tmp_path}/in/train-1.parquet"] and again[reads[-1]].rows == 5
    assert footers_now(save=True) == again and len(reads) == 7


def test_plan_of_a_new_output_counts_what_to_encode_and_writes_nothing(tmp_path: Path, capsys):
    audio = tmp_path / "audio"
    audio.mkdir()
    rows = []
    for i in range(5):
        (audio / f"{i}.wav").write_bytes(wav_bytes(signal(16_000, 0.1 * (i + 1), seed=i), 16_000))
        rows.append({"id": f"u{i}", "audio": f"audio/{i}.wav", "duration_s": 0.1 * (i + 1)})
    write_jsonl(tmp_path / "m.jsonl", rows)
    before = sorted(os.listdir(tmp_path))
    assert main(["plan", "--input", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "out"),
                 "--files-per-shard", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert sorted(os.listdir(tmp_path)) == before  # no output folder made
    assert plan["shards"]["new"] == plan["shards"]["listed"] == plan["encode"]["shards"] >= 3
    size = sum(p.stat().st_size for p in audio.iterdir())
    assert (plan["encode"]["files"], plan["encode"]["bytes"], plan["encode"]["clips"]) == (5, size, 5)
    assert abs(plan["encode"]["hours"] - 1.5 / 3600) < 1e-9
    assert plan["retire"]["files"] == plan["prune_drops"]["clips"] == 0
    assert main(["plan", "--input", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "out"),
                 "--files-per-shard", "2"]) == 0
    assert f"to encode: {plan['encode']['shards']} shard(s), 5 file(s)" in capsys.readouterr().out
