"""Discovery and clip iteration over real inputs: audio folders, WebDataset tars, Hub Parquet, manifests;
local, ``memory://`` and S3 (moto on loopback)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import sharding
from pipeline.prepare import prepare_shard
from pipeline.sources import discover_shards, iter_clips
from pipeline.types import SAMPLE_RATE, ClipFailure, ClipSource, Shard
from tests.audio_fixtures import (
    FORMATS,
    corrupt_bytes,
    encode,
    signal,
    wav_bytes,
    write_audio,
    write_csv,
    write_hub_parquet,
    write_jsonl,
    write_tar,
)


def _wav(rate: int = 16_000, seconds: float = 0.3, seed: int = 0) -> bytes:
    return wav_bytes(signal(rate, seconds, seed=seed), rate)


def _flac(rate: int = 22_050, seconds: float = 0.3, channels: int = 2) -> bytes:
    return encode(FORMATS["flac"], signal(rate, seconds, channels), rate)


def _summary(items: list[ClipSource | ClipFailure]) -> list[tuple[str, str]]:
    """``(clip_id, "ok" | failure stage)`` per item, in order."""
    return [(i.clip_id, "ok" if isinstance(i, ClipSource) else i.stage) for i in items]


def _all_items(shards: list[Shard], storage_options: dict | None = None) -> list[ClipSource | ClipFailure]:
    return [item for shard in shards for item in iter_clips(shard, storage_options=storage_options)]


# --------------------------------------------------------------------------------------------- audio folders

FOLDER_FILES = {  # relative path → (format, sample rate, channels)
    "b/x.mp3": ("mp3", 44_100, 1),
    "a.wav": ("wav_pcm16", 16_000, 1),
    "b/y.flac": ("flac", 22_050, 2),
    "b/c/z.ogg": ("ogg_vorbis", 48_000, 2),
    "d.opus": ("opus", 48_000, 1),
    "e.m4a": ("m4a_aac", 44_100, 2),
    "f.aiff": ("aiff", 8_000, 1),
}


@pytest.fixture
def audio_folder(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    for rel, (fmt, rate, channels) in FOLDER_FILES.items():
        write_audio(root / rel, fmt, rate, seconds=0.4, channels=channels)
    (root / "README.md").write_text("not audio")
    (root / "b" / "x.txt").write_text("a transcript, ignored")
    return root


def test_discover_folder_groups_sorted_files(audio_folder: Path) -> None:
    shards = discover_shards(str(audio_folder), files_per_shard=3)
    root_uri = f"file://{audio_folder}"
    expected = sorted(FOLDER_FILES)
    assert [s.shard_id for s in shards] == [sharding.shard_id("files", s.members[0].key) for s in shards]
    assert all(s.kind == "files" and s.uri == s.root == root_uri for s in shards)
    assert [m.uri for s in shards for m in s.members] == [f"{root_uri}/{rel}" for rel in expected]
    assert [m.key for s in shards for m in s.members] == expected
    assert all(1 <= len(s.members) <= 3 for s in shards)
    sizes = {rel: (audio_folder / rel).stat().st_size for rel in expected}
    assert all(m.size == sizes[m.key] and m.version for s in shards for m in s.members)
    assert len({s.digest for s in shards}) == len(shards)
    assert discover_shards(f"file://{audio_folder}/", files_per_shard=3) == shards  # deterministic, any spelling


def test_folder_clips_are_relative_paths_with_the_file_bytes(audio_folder: Path) -> None:
    items = _all_items(discover_shards(str(audio_folder), files_per_shard=4))
    assert _summary(items) == [(rel, "ok") for rel in sorted(FOLDER_FILES)]
    for item in items:
        assert item.source_uri == f"file://{audio_folder}/{item.clip_id}"
        assert item.open().read() == (audio_folder / item.clip_id).read_bytes()
        assert item.metadata == {}


def test_prepare_folder_shard_decodes_every_format(audio_folder: Path) -> None:
    (shard,) = discover_shards(str(audio_folder))
    clips, failures = prepare_shard(shard)
    assert failures == []
    assert [c.clip_id for c in clips] == sorted(FOLDER_FILES)
    for clip in clips:
        _, rate, channels = FOLDER_FILES[clip.clip_id]
        assert (clip.orig_sample_rate, clip.orig_channels) == (rate, channels)
        assert clip.audio.dtype == np.float32 and clip.audio.ndim == 1
        frames = round(0.4 * rate) + (1024 if clip.clip_id.endswith(".m4a") else 0)  # AAC: frame padding
        assert round(0.4 * SAMPLE_RATE) - 1 <= len(clip.audio) <= round(frames * SAMPLE_RATE / rate) + 1


def test_glob_and_single_file_inputs(audio_folder: Path) -> None:
    (shard,) = discover_shards(f"{audio_folder}/b/**/*.*")  # also matches x.txt, which is not audio
    assert shard.uri == f"file://{audio_folder}/b"
    assert [c.clip_id for c in iter_clips(shard)] == ["c/z.ogg", "x.mp3", "y.flac"]
    (single,) = discover_shards(f"{audio_folder}/b/y.flac")
    assert (single.uri, [m.uri for m in single.members]) == (f"file://{audio_folder}/b",
                                                              [f"file://{audio_folder}/b/y.flac"])
    assert _summary(list(iter_clips(single))) == [("y.flac", "ok")]


def test_unreadable_files_are_recorded_and_iteration_goes_on(tmp_path: Path) -> None:
    (tmp_path / "1.wav").write_bytes(_wav())
    (tmp_path / "2.flac").write_bytes(b"")  # empty
    (tmp_path / "3.wav").write_bytes(corrupt_bytes())  # readable, not decodable
    (tmp_path / "4.wav").write_bytes(_wav(seed=1))  # deleted after discovery
    (tmp_path / "5.wav").write_bytes(_wav(seed=2))
    (shard,) = discover_shards(str(tmp_path))
    (tmp_path / "4.wav").unlink()

    assert _summary(list(iter_clips(shard))) == [
        ("1.wav", "ok"), ("2.flac", "read"), ("3.wav", "ok"), ("4.wav", "read"), ("5.wav", "ok"),
    ]
    clips, failures = prepare_shard(shard)
    assert [c.clip_id for c in clips] == ["1.wav", "5.wav"]
    assert [(f.clip_id, f.stage, f.error_class) for f in failures] == [
        ("2.flac", "read", "ValueError"), ("3.wav", "decode", "DecodeError"), ("4.wav", "read", "FileNotFoundError"),
    ]
    assert failures[0].source_uri == f"file://{tmp_path}/2.flac"


@pytest.mark.parametrize(
    ("layout", "error", "message"),
    [
        ({}, ValueError, "no audio, .tar, .parquet, .jsonl or .csv files"),
        ({"README.md": b"x"}, ValueError, r"\(1 files of other types\)"),
        ({"a.wav": b"x", "b.tar": b"x"}, ValueError, "mixed input kinds .*files: 1, webdataset: 1"),
        ({"a.jsonl": b"{}", "b.csv": b"x"}, ValueError, "2 manifests found"),
        ({"m.jsonl": b""}, ValueError, "has no rows"),
        ({"m.jsonl": b'{"text": "no uri"}\n'}, ValueError, "no row has any of the URI columns"),
        ({"m.jsonl": b'{"id": "a", "uri": "x.wav"}\n{"id": "a", "uri": "y.wav"}\n'}, ValueError,
         "1 clip id\\(s\\) appear more than once .*'a'"),
    ],
    ids=["empty-folder", "no-known-files", "mixed", "two-manifests", "empty-manifest", "no-uri-column",
         "duplicate-ids"],
)
def test_discovery_errors(tmp_path: Path, layout: dict[str, bytes], error: type, message: str) -> None:
    for name, data in layout.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(error, match=message):
        discover_shards(str(tmp_path))


def test_missing_input_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="input not found"):
        discover_shards(str(tmp_path / "nope"))


# --------------------------------------------------------------------------------------------- WebDataset

WDS_SAMPLES = [
    ("s0", {"flac": _flac(), "json": json.dumps({"speaker": "a", "n": 3}).encode(), "txt": b"hello", "cls": b"7"}),
    ("dir/s1", {"txt": "héllo".encode(), "wav": _wav()}),
    ("s2", {"json": b"{}"}),  # no audio member
    ("s3", {"wav": b""}),  # empty audio member
    ("s4", {"mp3": encode(FORMATS["mp3"], signal(16_000, 0.3), 16_000), "seg.txt": b"a b"}),
    ("./s5", {"wav": _wav()}),  # as written by `tar -C dir .`
]


@pytest.fixture
def wds_folder(tmp_path: Path) -> Path:
    write_tar(tmp_path / "wds" / "part-000.tar", WDS_SAMPLES)
    write_tar(tmp_path / "wds" / "sub" / "part-000.tar", [("k", {"wav": _wav()})])
    return tmp_path / "wds"


def test_discover_webdataset(wds_folder: Path) -> None:
    shards = discover_shards(str(wds_folder))
    assert [(s.shard_id, s.kind, s.uri, s.root) for s in shards] == [  # one shard per tar, named after it
        ("wds-part-000", "webdataset", f"file://{wds_folder}/part-000.tar", f"file://{wds_folder}"),
        ("wds-sub__part-000", "webdataset", f"file://{wds_folder}/sub/part-000.tar", f"file://{wds_folder}"),
    ]
    assert discover_shards(str(wds_folder)) == shards


def test_webdataset_clips_keys_and_sidecars(wds_folder: Path) -> None:
    shard = discover_shards(str(wds_folder))[0]
    items = list(iter_clips(shard))
    assert _summary(items) == [
        ("part-000.tar/s0", "ok"), ("part-000.tar/dir/s1", "ok"), ("part-000.tar/s2", "read"),
        ("part-000.tar/s3", "read"), ("part-000.tar/s4", "ok"), ("part-000.tar/s5", "ok"),
    ]
    s0, s1, s2, _, s4, _ = items
    assert s0.metadata == {"speaker": "a", "n": 3, "text": "hello", "cls": "7"}
    assert s0.open().read() == WDS_SAMPLES[0][1]["flac"]
    assert s0.source_uri == f"{shard.uri}#s0.flac"
    assert s1.metadata == {"text": "héllo"} and s1.source_uri == f"{shard.uri}#dir/s1.wav"
    assert "no audio member" in s2.message and s2.source_uri == f"{shard.uri}#s2"
    assert s4.metadata == {"seg.txt": "a b"}


def test_single_tar_and_corrupt_tar(tmp_path: Path, wds_folder: Path) -> None:
    (shard,) = discover_shards(f"{wds_folder}/sub/part-000.tar")
    assert (shard.shard_id, shard.root) == ("wds-part-000", f"file://{wds_folder}/sub")
    assert _summary(list(iter_clips(shard))) == [("part-000.tar/k", "ok")]

    (tmp_path / "bad.tar").write_bytes(corrupt_bytes(10_000))
    (bad,) = discover_shards(str(tmp_path / "bad.tar"))
    assert _summary(list(iter_clips(bad))) == [("bad.tar", "container")]


# --------------------------------------------------------------------------------------------- Hub Parquet


def test_hub_parquet_with_unique_audio_paths(tmp_path: Path) -> None:
    (tmp_path / "data" / "ref.wav").parent.mkdir(parents=True)
    (tmp_path / "data" / "ref.wav").write_bytes(_wav(seed=5))
    audio = [
        {"bytes": _flac(), "path": "x/a.flac"},
        {"bytes": b"", "path": "b.wav"},  # empty bytes
        {"bytes": None, "path": "ref.wav"},  # no bytes: read from the path, relative to the Parquet file
        {"bytes": None, "path": "gone.wav"},
        {"bytes": _wav(), "path": "c.wav"},
    ]
    write_hub_parquet(
        tmp_path / "data" / "train-000.parquet", audio,
        text=["t0", "t1", "t2", "t3", "t4"], speaker_id=[1, 2, 3, 4, 5], tags=[["a"], [], ["b", "c"], [], None],
    )
    (shard,) = discover_shards(str(tmp_path / "data" / "*.parquet"))  # ref.wav is not part of the input
    assert (shard.shard_id, shard.kind, shard.uri) == (
        "parquet-train-000", "parquet", f"file://{tmp_path}/data/train-000.parquet",
    )
    items = list(iter_clips(shard))
    prefix = "train-000.parquet/"
    assert _summary(items) == [
        (prefix + "x/a.flac", "ok"), (prefix + "b.wav", "read"), (prefix + "ref.wav", "ok"),
        (prefix + "gone.wav", "read"), (prefix + "c.wav", "ok"),
    ]
    assert items[0].data == audio[0]["bytes"] and items[0].source_uri == f"{shard.uri}#0"
    assert items[0].metadata == {"text": "t0", "speaker_id": 1, "tags": ["a"]}
    assert items[2].open().read() == (tmp_path / "data" / "ref.wav").read_bytes()
    assert items[2].source_uri == f"file://{tmp_path}/data/ref.wav"
    assert items[2].metadata == {"text": "t2", "speaker_id": 3, "tags": ["b", "c"]}
    assert items[4].metadata["tags"] is None


def test_hub_parquet_ids_fall_back_to_row_index_across_batches(tmp_path: Path) -> None:
    n = 70  # more than one read batch
    audio = [{"bytes": _wav(seconds=0.01, seed=i), "path": "same.wav" if i < 2 else f"{i}.wav"} for i in range(n)]
    write_hub_parquet(tmp_path / "p" / "sub" / "0.parquet", audio, idx=list(range(n)))
    plain = pa.table({"idx": [2, 3], "sound": audio[2:4]})  # no Hugging Face schema metadata: found by type
    pq.write_table(plain, tmp_path / "p" / "1.parquet")
    shards = discover_shards(f"{tmp_path}/p/**/*.parquet")
    assert [s.shard_id for s in shards] == ["parquet-1", "parquet-sub__0"]
    items = _all_items(shards)
    assert [i.clip_id for i in items] == ["1.parquet/2.wav", "1.parquet/3.wav"] + [
        f"sub/0.parquet/{i:08d}" for i in range(n)
    ]
    assert [i.metadata["idx"] for i in items] == [2, 3, *range(n)]
    assert [i.data for i in items[2:]] == [a["bytes"] for a in audio]


# --------------------------------------------------------------------------------------------- manifests


@pytest.fixture
def clip_files(tmp_path: Path) -> Path:
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.wav").write_bytes(_wav())
    (tmp_path / "clips" / "b.flac").write_bytes(_flac())
    (tmp_path / "elsewhere.wav").write_bytes(_wav(seed=3))
    return tmp_path


def test_jsonl_manifest(clip_files: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"id": "utt1", "audio": "clips/a.wav", "text": "hi", "speaker": 3},
        {"audio": "clips/b.flac", "text": "yo", "extra": {"x": [1, 2]}},
        {"id": "gone", "audio": "clips/missing.wav"},
        {"id": "abs", "path": f"file://{clip_files}/elsewhere.wav"},
        {"id": "no-uri", "text": "orphan"},
    ]
    write_jsonl(clip_files / "manifest.jsonl", rows)
    shards = discover_shards(str(clip_files / "manifest.jsonl"), files_per_shard=2)
    uri, root = f"file://{clip_files}/manifest.jsonl", f"file://{clip_files}"
    assert all(s.kind == "manifest" and (s.uri, s.root) == (uri, root) and len(s.members) <= 2 for s in shards)
    assert [m.key for s in shards for m in s.members] == ["abs", "clips/b.flac", "gone", "no-uri", "utt1"]  # by id
    (clip_files / "manifest.jsonl").unlink()  # shards carry their rows: the manifest is never read again
    items = _all_items(shards)
    assert _summary(items) == [
        ("abs", "ok"), ("clips/b.flac", "ok"), ("gone", "read"), ("no-uri", "read"), ("utt1", "ok"),
    ]
    abs_, b, gone, no_uri, utt1 = items
    assert utt1.source_uri == f"file://{clip_files}/clips/a.wav"
    assert utt1.open().read() == (clip_files / "clips" / "a.wav").read_bytes()
    assert utt1.metadata == {"text": "hi", "speaker": 3}
    assert b.metadata == {"text": "yo", "extra": {"x": [1, 2]}}
    assert gone.source_uri == f"file://{clip_files}/clips/missing.wav"
    assert abs_.open().read() == (clip_files / "elsewhere.wav").read_bytes()
    assert no_uri.source_uri == f"{uri}#4"


def test_files_are_grouped_by_count_and_by_bytes(tmp_path: Path) -> None:
    sizes = [300, 300, 300, 900, 100, 100, 100, 100, 250, 250, 40]
    for i, n in enumerate(sizes):
        (tmp_path / f"c{i:02d}.wav").write_bytes(b"x" * n)
    shards = discover_shards(str(tmp_path), files_per_shard=3, max_shard_bytes=700)
    # 700 bytes or 3 files at most; a file larger than the cap is a shard of its own
    assert [m.key for s in shards for m in s.members] == [f"c{i:02d}.wav" for i in range(len(sizes))]
    for shard in shards:
        total = sum(m.size for m in shard.members)
        assert len(shard.members) <= 3 and (total <= 700 or len(shard.members) == 1)
    assert [m.key for s in shards for m in s.members if m.size == 900] == ["c03.wav"]
    assert all(len(s.members) <= 3 for s in discover_shards(str(tmp_path), files_per_shard=3))  # no byte cap


def test_csv_manifest(clip_files: Path) -> None:
    write_csv(clip_files / "m.csv", [
        {"file": "clips/b.flac", "text": "two, with comma", "n": "2"},
        {"file": "", "text": "no uri", "n": "3"},
        {"file": "clips/a.wav", "text": "multi\nline", "n": "1"},
    ])
    (shard,) = discover_shards(f"file://{clip_files}/m.csv")
    assert len(shard.members) == 3
    items = list(iter_clips(shard))
    assert _summary(items) == [("clips/a.wav", "ok"), ("clips/b.flac", "ok"), ("row-00000001", "read")]
    assert items[1].metadata == {"text": "two, with comma", "n": "2"}  # CSV values stay strings
    assert items[0].metadata == {"text": "multi\nline", "n": "1"}
    clips, failures = prepare_shard(shard, channel_policy="channel:0")
    assert [(c.clip_id, c.orig_channels) for c in clips] == [("clips/a.wav", 1), ("clips/b.flac", 2)]
    assert [f.clip_id for f in failures] == ["row-00000001"]


# --------------------------------------------------------------------------------------------- remote


def test_memory_filesystem() -> None:
    base = f"memory://corpus-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe({f"{base}/s/a.wav": _wav(), f"{base}/b.wav": _wav(seed=1), f"{base}/notes.md": b"x"})
    try:
        (shard,) = discover_shards(base)
        assert shard.uri == base.replace("memory://", "memory:///")
        assert [m.uri for m in shard.members] == [f"{shard.uri}/b.wav", f"{shard.uri}/s/a.wav"]
        clips, failures = prepare_shard(shard)
        assert failures == [] and [c.clip_id for c in clips] == ["b.wav", "s/a.wav"]
        assert all(len(c.audio) == round(0.3 * SAMPLE_RATE) for c in clips)
    finally:
        fs.rm(base, recursive=True)


def test_s3_inputs(s3_server: dict[str, Any], s3_url: str, tmp_path: Path) -> None:
    options = s3_server["storage_options"]
    write_tar(tmp_path / "p.tar", WDS_SAMPLES[:2])
    fsspec.filesystem("s3", **options).pipe({
        f"{s3_url}/wds/x/p.tar": (tmp_path / "p.tar").read_bytes(),
        f"{s3_url}/m/clips/a.wav": _wav(),
        f"{s3_url}/m/list.jsonl": b'{"uri": "clips/a.wav", "lang": "en"}\n{"uri": "clips/nope.wav"}\n',
    })

    (tar_shard,) = discover_shards(f"{s3_url}/wds", storage_options=options)
    assert (tar_shard.shard_id, tar_shard.uri) == ("wds-x__p", f"{s3_url}/wds/x/p.tar")
    clips, failures = prepare_shard(tar_shard, storage_options=options)
    assert failures == []
    assert [(c.clip_id, c.orig_sample_rate) for c in clips] == [("x/p.tar/s0", 22_050), ("x/p.tar/dir/s1", 16_000)]

    (manifest,) = discover_shards(f"{s3_url}/m/list.jsonl", storage_options=options)
    items = list(iter_clips(manifest, storage_options=options))
    assert _summary(items) == [("clips/a.wav", "ok"), ("clips/nope.wav", "read")]
    assert items[0].source_uri == f"{s3_url}/m/clips/a.wav" and items[0].metadata == {"lang": "en"}
