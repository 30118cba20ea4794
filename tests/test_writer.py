"""pipeline.writer: Parquet shards read back with pyarrow and with 🤗 datasets."""

from __future__ import annotations

import hashlib
import os

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.signals import Signals
from pipeline.types import SAMPLE_RATE, ClipInfo, EncodedClip
from pipeline.writer import SCHEMA_VERSION, codes_type, read_codes, write_shard

SIGNALS = ["pcm_hash", "fingerprint", "loudness_lufs", "peak_dbfs", "clipping_share", "silence_share", "bandwidth_hz",
           "speech_share"]
FILE_METADATA = {"model_source": "kyutai/mimi", "weights_sha256": "ab" * 32, "frame_rate": "12.5"}


def make_clips(num_codebooks: int, frames: list[int], seed: int = 0) -> tuple[list[EncodedClip], list[np.ndarray]]:
    """Rows of random codes (and the codes, [K, F] each), clip i being f * 1920 samples long."""
    rng = np.random.default_rng(seed)
    rows, codes = [], []
    for i, f in enumerate(frames):
        codes.append(rng.integers(0, 2048, size=(num_codebooks, f), dtype=np.int64))
        info = ClipInfo(i, f"clip-{i}", f"s3://in/clip-{i}.flac", orig_sample_rate=44_100 if i % 2 else 16_000,
                        orig_channels=1 + i % 2)
        signals = Signals(bytes([i]) * 16, b"fp" * i, -20.0 - i, -1.5, 0.0, 0.25, 7000.0 + i, None) if i % 2 else None
        rows.append(EncodedClip(info, codes[-1], f * 1920, signals))
    return rows, codes


def ids(rows: list[EncodedClip]) -> list[str]:
    return [r.info.clip_id for r in rows]


@pytest.mark.parametrize("num_codebooks", [1, 8, 32])
def test_round_trip_pyarrow(tmp_path, num_codebooks):
    frames = [25, 0, 1, 130, 7]
    clips, codes = make_clips(num_codebooks, frames)
    codes[3][:, 0] = [2047] * num_codebooks  # extremes survive int16
    codes[3][:, 1] = 0
    url = str(tmp_path / "data" / "shard-0.parquet")
    result = write_shard(url, clips, num_codebooks=num_codebooks, file_metadata=FILE_METADATA)

    raw = open(url, "rb").read()
    assert (result.rows, result.frames, result.bytes, result.path) == (5, sum(frames), len(raw), url)
    assert result.sha256 == hashlib.sha256(raw).hexdigest()
    assert result.duration_s == pytest.approx(sum(frames) * 1920 / SAMPLE_RATE)

    table = pq.read_table(url)
    schema = table.schema
    assert schema.names == ["id", "source_uri", "codes", "n_frames", "duration_s", "orig_sample_rate",
                            "orig_channels", *SIGNALS]
    codes_t = schema.field("codes").type
    assert pa.types.is_list(codes_t) and pa.types.is_fixed_size_list(codes_t.value_type)
    assert codes_t.value_type.list_size == num_codebooks and codes_t.value_type.value_type == pa.int16()
    assert codes_t == codes_type(num_codebooks)
    assert [schema.field(n).type for n in schema.names[3:]] == [pa.int32(), pa.float64(), pa.int32(), pa.int16(),
                                                                pa.binary(16), pa.binary(), *[pa.float32()] * 6]
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert meta.items() >= {**FILE_METADATA, "schema_version": str(SCHEMA_VERSION),
                            "num_codebooks": str(num_codebooks)}.items()

    assert table.num_rows == 5
    assert table.column("id").to_pylist() == ids(clips)
    assert table.column("source_uri").to_pylist() == [c.info.source_uri for c in clips]
    assert table.column("n_frames").to_pylist() == frames
    assert table.column("duration_s").to_pylist() == [c.duration_s for c in clips]
    assert table.column("orig_sample_rate").to_pylist() == [c.info.orig_sample_rate for c in clips]
    assert table.column("orig_channels").to_pylist() == [c.info.orig_channels for c in clips]
    assert table.column("pcm_hash").to_pylist() == [None, b"\x01" * 16, None, b"\x03" * 16, None]
    assert table.column("loudness_lufs").to_pylist() == [None, -21.0, None, -23.0, None]
    assert table.column("speech_share").null_count == 5
    for i, c in enumerate(codes):
        got = read_codes(table, i)
        assert got.dtype == np.int16 and got.shape == (frames[i], num_codebooks)
        np.testing.assert_array_equal(got, c.T)
        np.testing.assert_array_equal(read_codes(table.column("codes")[i]), c.T)


def test_parquet_file_options(tmp_path):
    clips, codes = make_clips(8, [40] * 10)
    url = str(tmp_path / "s.parquet")
    write_shard(url, clips, num_codebooks=8, file_metadata={}, row_group_bytes=3 * 40 * 8 * 2)
    md = pq.ParquetFile(url).metadata
    assert md.num_rows == 10
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [3, 3, 3, 1]
    for g in range(md.num_row_groups):
        for c in range(md.num_columns):
            col = md.row_group(g).column(c)
            assert col.compression == "ZSTD"
            assert col.has_offset_index and col.has_column_index
    ids = md.row_group(0).column(0)
    assert "RLE_DICTIONARY" in ids.encodings or "PLAIN_DICTIONARY" in ids.encodings

    write_shard(url, clips, num_codebooks=8, file_metadata={})
    assert pq.ParquetFile(url).metadata.num_row_groups == 1


def test_round_trip_datasets(tmp_path):
    clips, codes = make_clips(8, [12, 0, 30])
    for i, clip in enumerate(clips):
        clip.info.metadata = {"speaker": f"spk{i}", "lang": "en"}
    paths = []
    for s in range(2):
        url = str(tmp_path / "data" / f"shard-{s}.parquet")
        write_shard(url, clips, num_codebooks=8, file_metadata=FILE_METADATA)
        paths.append(url)
    ds = datasets.load_dataset("parquet", data_files=paths, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 6
    assert ds.column_names == ["id", "source_uri", "codes", "n_frames", "duration_s", "orig_sample_rate",
                               "orig_channels", *SIGNALS, "speaker", "lang"]
    for i, row in enumerate(ds):
        np.testing.assert_array_equal(read_codes(row).reshape(-1, 8), codes[i % 3].T)
        assert row["n_frames"] == codes[i % 3].shape[1] and row["speaker"] == f"spk{i % 3}"
        assert row["pcm_hash"] == (b"\x01" * 16 if i % 3 == 1 else None)
    assert ds.data.table.schema.field("codes").type == codes_type(8)


def test_metadata_columns(tmp_path):
    clips, codes = make_clips(2, [3, 3, 3, 3])
    clips[0].info.metadata = {"speaker": "a", "tags": {"x": 1, "y": [1, 2]}, "mixed": 1, "id": "dup"}
    clips[1].info.metadata = {"score": 0.5, "mixed": "one"}
    clips[2].info.metadata = {"speaker": "c", "empty": {}}
    clips[3].info.metadata = {}
    url = str(tmp_path / "s.parquet")
    write_shard(url, clips, num_codebooks=2, file_metadata={})
    table = pq.read_table(url)
    assert table.schema.names[15:] == ["speaker", "tags", "mixed", "meta_id", "score", "empty"]
    assert table.column("speaker").to_pylist() == ["a", None, "c", None]
    assert pa.types.is_struct(table.schema.field("tags").type)
    assert table.column("tags").to_pylist()[0] == {"x": 1, "y": [1, 2]}
    assert table.column("score").type == pa.float64()
    assert table.column("mixed").to_pylist() == ["1", '"one"', None, None]  # no common type: JSON strings
    assert table.column("empty").to_pylist() == [None, None, "{}", None]  # Parquet has no empty struct
    assert table.column("meta_id").to_pylist() == ["dup", None, None, None]
    assert table.column("id").to_pylist() == ["clip-0", "clip-1", "clip-2", "clip-3"]


def test_empty_shard(tmp_path):
    """A shard whose clips all failed: a file with the schema and no row group, which `datasets` reads past (an empty
    row group would make `load_dataset` fail on the whole output)."""
    url = str(tmp_path / "data" / "s0.parquet")
    result = write_shard(url, [], num_codebooks=8, file_metadata={})
    table = pq.read_table(url)
    assert result.rows == table.num_rows == 0 and result.frames == 0
    assert table.schema.field("codes").type == codes_type(8)
    assert pq.ParquetFile(url).metadata.num_row_groups == 0
    write_shard(str(tmp_path / "data" / "s1.parquet"), make_clips(8, [4, 2])[0], num_codebooks=8, file_metadata={})
    ds = datasets.load_dataset("parquet", data_files=f"{tmp_path}/data/*.parquet", split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds["id"] == ["clip-0", "clip-1"]


@pytest.mark.parametrize("bad", [np.zeros((7, 5), np.int64), np.full((8, 5), 2048), np.full((8, 5), -1),
                                 np.zeros((8, 5), np.float32), np.zeros(5, np.int64)])
def test_rejects_bad_codes(tmp_path, bad):
    clips, _ = make_clips(8, [5])
    url = str(tmp_path / "s.parquet")
    clips[0].codes = bad
    with pytest.raises(ValueError):
        write_shard(url, clips, num_codebooks=8, file_metadata={})
    assert os.listdir(tmp_path) == []


def test_write_shard_to_s3(s3_server, s3_url):
    so = s3_server["storage_options"]
    clips, codes = make_clips(8, [20, 5])
    url = storage.join(s3_url, "data", "shard-0.parquet")
    result = write_shard(url, clips, num_codebooks=8, file_metadata=FILE_METADATA, storage_options=so)
    fs, path = storage.get_fs(url, so)
    raw = fs.cat_file(path)
    assert result.bytes == len(raw) and result.sha256 == hashlib.sha256(raw).hexdigest()
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    for i, c in enumerate(codes):
        np.testing.assert_array_equal(read_codes(table, i), c.T)
