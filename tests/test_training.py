"""Training data: `mimi-tokenize export` (flat codes.u16 + offsets) and the `MimiCodes` loader (packing, delays,
shuffling, sharding over ranks and workers, exact mid-epoch resume), on a real run's output, on S3 (moto) and on a
Hub-layout folder with small row groups."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from audio_fixtures import write_audio
from pipeline import export as export_module
from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.export import ExportError, export
from pipeline.loader import MimiCodes, apply_delays, delay_pattern
from pipeline.prepare import open_clip
from pipeline.rowfilter import WhereError
from pipeline.signals import ClipSignals
from pipeline.types import ClipSource
from pipeline.runner import run
from pipeline.writer import read_codes

K = 8


@pytest.fixture(scope="module")
def output(tmp_path_factory, tiny_model_path) -> Path:
    root = tmp_path_factory.mktemp("training")
    for i in range(40):
        write_audio(root / "in" / f"spk{i % 4}" / f"utt{i:03d}.wav", "wav_pcm16", 16_000, 0.3 + 0.11 * (i % 13),
                    seed=i)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        assert run(RunConfig(input=str(root / "in"), output=str(root / "out"), model=tiny_model_path,
                             files_per_shard=6, device="cpu", num_codebooks=K)) == 0
    finally:
        ray.shutdown()
    return root / "out"


def clips_in_order(out: Path) -> list[tuple[str, np.ndarray]]:
    """(id, [F, K] int16) of every row: files by name, rows in file order (the export's order)."""
    rows = []
    for path in sorted((out / "data").glob("*.parquet")):
        table = pq.read_table(path)
        rows += [(clip_id, read_codes(table, i)) for i, clip_id in enumerate(table.column("id").to_pylist())]
    return rows


@pytest.fixture(scope="module")
def hub_layout(output, tmp_path_factory) -> Path:
    """The output as a published dataset looks: data/train-i-of-n.parquet, no manifest, row groups of 3 rows."""
    root = tmp_path_factory.mktemp("hub")
    files = sorted((output / "data").glob("*.parquet"))
    for i, path in enumerate(files):
        (root / "data").mkdir(exist_ok=True)
        pq.write_table(pq.read_table(path), root / "data" / f"train-{i:05d}-of-{len(files):05d}.parquet",
                       row_group_size=3)
    (root / "README.md").write_text("---\nconfigs: []\n---\n")
    return root


def test_export_equals_parquet(output, tmp_path, capsys):
    dest = tmp_path / "flat"
    assert main(["export", str(output), str(dest)]) == 0
    assert "40 clips" in capsys.readouterr().out
    meta = json.loads((dest / "meta.json").read_text())
    codes = np.memmap(dest / "codes.u16", np.uint16, "r").reshape(-1, meta["num_codebooks"])
    offsets = np.load(dest / "offsets.npy")
    ids = (dest / "ids.txt").read_text().splitlines()
    rows = clips_in_order(output)
    assert ids == [clip_id for clip_id, _ in rows] and len(offsets) == 41 and offsets[-1] == len(codes)
    for i, (_, expected) in enumerate(rows):
        np.testing.assert_array_equal(codes[offsets[i]:offsets[i + 1]], expected.astype(np.uint16))
    assert (meta["num_codebooks"], meta["clips"], meta["frames"]) == (K, 40, len(codes))
    assert meta["model"]["sha256"] and meta["manifest_sha256"] and meta["data_digest"]

    # a rerun into the finished folder does nothing; fewer codebooks keep the first K
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    export(str(output), dest)
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == before
    meta3 = export(str(output), tmp_path / "flat3", num_codebooks_out=3)
    codes3 = np.memmap(tmp_path / "flat3" / "codes.u16", np.uint16, "r").reshape(-1, 3)
    np.testing.assert_array_equal(codes3, codes[:, :3])
    assert meta3["num_codebooks"] == 3 and meta3["source_num_codebooks"] == K


def test_interrupted_export_leaves_nothing_that_looks_complete(output, tmp_path, monkeypatch):
    dest = tmp_path / "flat"
    export(str(output), dest)
    calls = []

    def broken(parquet, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise OSError("disk full")
        return real(parquet, **kwargs)

    real = export_module.iter_codes
    monkeypatch.setattr(export_module, "iter_codes", broken)
    with pytest.raises(OSError, match="disk full"):
        export(str(output), dest, num_codebooks_out=4, force=True)  # another K: a new export into the same folder
    assert not (dest / "meta.json").exists()  # the old export's marker is gone, the new one never landed


def test_incomplete_output_refused_unless_forced(output, tmp_path):
    out = Path(shutil.copytree(output, tmp_path / "out"))
    current = json.loads((out / "manifest.json").read_text())
    current["status"] = "incomplete"
    (out / "manifest.json").write_text(json.dumps(current))
    with pytest.raises(ExportError, match="incomplete.*--force"):
        export(str(out), tmp_path / "flat")
    assert export(str(out), tmp_path / "flat", force=True)["source_status"] == "incomplete"


def test_the_run_writes_each_clip_signals(output):
    """End to end on Ray: every row carries the signals of its input, computed in the decode pass."""
    tables = [pq.read_table(path) for path in sorted((output / "data").glob("*.parquet"))]
    rows = [row for table in tables for row in table.drop_columns(["codes"]).to_pylist()]
    assert len(rows) == 40 and all(row["speech_share"] is None for row in rows)
    for row in rows:
        signals = ClipSignals()
        _, _, blocks = open_clip(ClipSource(row["id"], "", (output.parent / "in" / row["id"]).read_bytes()),
                                 signals=signals)
        for _ in blocks:
            pass
        expected = signals.finish()
        assert row["pcm_hash"] == expected.pcm_hash and len(row["pcm_hash"]) == 16
        assert row["fingerprint"] == expected.fingerprint
        assert (row["loudness_lufs"] is None) == (row["duration_s"] < 0.4)
        for name in ("loudness_lufs", "peak_dbfs", "clipping_share", "silence_share", "bandwidth_hz"):
            value = getattr(expected, name)
            assert row[name] == (None if value is None else pytest.approx(value, rel=1e-6)), name


WHERE = "loudness_lufs is not null and not (duration_s > 1.2 or bandwidth_hz < 100)"


def test_where_selects_rows_in_export_and_loader(output, hub_layout, tmp_path, capsys):
    tables = [pq.read_table(path) for path in sorted((output / "data").glob("*.parquet"))]
    selected = [(row["id"], read_codes(table, i), row["duration_s"]) for table in tables
                for i, row in enumerate(table.select(["id", "loudness_lufs", "duration_s", "bandwidth_hz"]).to_pylist())
                if row["loudness_lufs"] is not None and not (row["duration_s"] > 1.2 or row["bandwidth_hz"] < 100)]
    assert 5 < len(selected) < 30

    dest = tmp_path / "flat"
    assert main(["export", str(output), str(dest), "--where", WHERE]) == 0
    meta = json.loads((dest / "meta.json").read_text())
    assert (meta["where"], meta["clips"], meta["source_clips"]) == (WHERE, len(selected), 40)
    codes = np.memmap(dest / "codes.u16", np.uint16, "r").reshape(-1, K)
    offsets = np.load(dest / "offsets.npy")
    assert (dest / "ids.txt").read_text().splitlines() == [clip_id for clip_id, _, _ in selected]
    assert len(offsets) == len(selected) + 1 and offsets[-1] == len(codes) == meta["frames"]
    for i, (_, expected, _) in enumerate(selected):
        np.testing.assert_array_equal(codes[offsets[i]:offsets[i + 1]], expected.astype(np.uint16))
    assert meta["hours"] == pytest.approx(sum(seconds for _, _, seconds in selected) / 3600)
    with pytest.raises(ExportError, match="another export.*where"):  # without the filter: another export
        export(str(output), dest)

    for source in (output, hub_layout):
        dataset = MimiCodes(str(source), seq_len=37, shuffle=False, where=WHERE)
        np.testing.assert_array_equal(frames_of(list(dataset)), np.concatenate([c for _, c, _ in selected]))

    capsys.readouterr()
    assert main(["export", str(output), str(tmp_path / "bad"), "--where", "loudness > -20"]) == 2
    error = capsys.readouterr().err.strip()
    assert "'loudness' is not a column" in error and "\n" not in error and not (tmp_path / "bad").exists()
    with pytest.raises(WhereError, match="expected"):
        MimiCodes(str(output), seq_len=8, where="silence_share < ")
    with pytest.raises(WhereError, match="is an export"):
        MimiCodes(str(dest), seq_len=8, where=WHERE)


def frames_of(sequences: list[dict]) -> np.ndarray:
    """The valid frames of sequences, [n, K], in order."""
    return np.concatenate([s["codes"].numpy().T[s["doc_ids"].numpy() >= 0] for s in sequences])


@pytest.mark.parametrize("source", ["output", "export", "hub"])
def test_packing_without_delays_reproduces_the_stream(source, output, hub_layout, tmp_path):
    path = {"output": output, "hub": hub_layout}.get(source) or export(str(output), tmp_path / "f") and tmp_path / "f"
    dataset = MimiCodes(str(path), seq_len=37, shuffle=False)
    sequences = list(dataset)
    clips = [codes for _, codes in clips_in_order(output)]
    stream = np.concatenate(clips)
    assert all(s["codes"].shape == (K, 37) and s["codes"].dtype == torch.int64 for s in sequences)
    np.testing.assert_array_equal(frames_of(sequences), stream)
    assert len(sequences) == -(-len(stream) // 37)
    # doc_ids restart at 0 in every sequence and change exactly at clip boundaries; padding is -1 and pad_value
    boundaries = np.cumsum([len(c) for c in clips])[:-1]
    ids = np.concatenate([s["doc_ids"].numpy() for s in sequences])
    assert (ids[:len(stream)] >= 0).all() and (ids[len(stream):] == -1).all()
    changes = np.flatnonzero(np.diff(ids[:len(stream)]) != 0) + 1
    starts = set(range(37, len(ids), 37))
    assert set(changes) - starts <= set(boundaries) and set(boundaries) - starts <= set(changes)
    assert all(s["doc_ids"][0] in (0, -1) for s in sequences)
    last = sequences[-1]
    assert (last["codes"][:, last["doc_ids"] < 0] == 2048).all()


def test_delays_as_documented():
    clip = np.array([[1, 2, 3], [4, 5, 6]], np.int16)  # T = 2 frames, K = 3 codebooks
    assert delay_pattern("moshi", 3) == [0, 1, 1] and delay_pattern("musicgen", 3) == [0, 1, 2]
    # worked by hand: level k holds the clip's frame t - delays[k], pad (2048) outside the clip
    np.testing.assert_array_equal(apply_delays(clip, [0, 1, 2], 2048), [[1, 2048, 2048],
                                                                          [4, 2, 2048],
                                                                          [2048, 5, 3],
                                                                          [2048, 2048, 6]])
    np.testing.assert_array_equal(apply_delays(clip, [0, 1, 1], 2048), [[1, 2048, 2048],
                                                                          [4, 2, 3],
                                                                          [2048, 5, 6]])
    with pytest.raises(ValueError, match="3 non-negative"):
        delay_pattern([0, 1], 3)


def test_delays_in_sequences(output):
    dataset = MimiCodes(str(output), seq_len=64, shuffle=False, delays="musicgen", num_codebooks=4)
    clips = [codes[:, :4] for _, codes in clips_in_order(output)]
    expected = np.concatenate([apply_delays(c, [0, 1, 2, 3], 2048) for c in clips])
    got = np.concatenate([s["codes"].numpy().T for s in dataset])
    np.testing.assert_array_equal(got[:len(expected)], expected)
    assert (got[len(expected):] == 2048).all()


def all_frames(dataset_kwargs: dict, world_size: int, workers: int) -> np.ndarray:
    frames = []
    for rank in range(world_size):
        dataset = MimiCodes(**dataset_kwargs, rank=rank, world_size=world_size)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers)
        frames.append(frames_of(list(loader)))
    return np.concatenate(frames)


def sorted_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


def test_ranks_and_workers_cover_every_frame_once(output):
    stream = np.concatenate([codes for _, codes in clips_in_order(output)])
    got = all_frames({"source": str(output), "seq_len": 50, "seed": 3}, world_size=2, workers=2)
    assert got.shape == stream.shape
    np.testing.assert_array_equal(sorted_rows(got), sorted_rows(stream))


def test_a_loader_over_the_index_equals_one_over_the_files(output, hub_layout):
    pointer = json.loads((output / "manifest.json").read_text())["index"]
    assert pointer["files"] == len(list((output / "data").glob("*.parquet"))) > 3
    for rank in range(3):  # same rows, same order, per rank
        kwargs = {"seq_len": 31, "seed": 7, "shuffle_window": 5, "rank": rank, "world_size": 3}
        over_index, over_files = MimiCodes(str(output), **kwargs), MimiCodes(str(hub_layout), **kwargs)
        assert over_index.source.files is None  # opened from the manifest alone: each rank reads its own units
        assert len(over_index.units()) == len(over_files.units()) == len(range(rank, pointer["files"], 3))
        np.testing.assert_array_equal(frames_of(list(over_index)), frames_of(list(over_files)))


def test_shuffling_is_deterministic_and_per_epoch(output):
    def order(epoch: int, seed: int = 1) -> np.ndarray:
        dataset = MimiCodes(str(output), seq_len=40, seed=seed, shuffle_window=8)
        dataset.set_epoch(epoch)
        return frames_of(list(dataset))

    assert np.array_equal(order(0), order(0))
    assert not np.array_equal(order(0), order(1)) and not np.array_equal(order(0), order(0, seed=2))
    np.testing.assert_array_equal(sorted_rows(order(0)), sorted_rows(order(1)))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_remaining_sequences(output, workers):
    kwargs = {"source": str(output), "seq_len": 29, "seed": 5, "shuffle_window": 6, "delays": "moshi"}

    def loader(dataset):
        return StatefulDataLoader(dataset, batch_size=2, num_workers=workers)

    reference = [b["codes"] for b in loader(MimiCodes(**kwargs))]
    first = loader(MimiCodes(**kwargs))
    seen = []
    for batch in first:
        seen.append(batch["codes"])
        if len(seen) == 7:
            state = first.state_dict()
            break
    resumed = loader(MimiCodes(**kwargs))
    resumed.load_state_dict(state)
    rest = [b["codes"] for b in resumed]
    assert len(seen) + len(rest) == len(reference)
    for got, expected in zip(seen + rest, reference):
        assert torch.equal(got, expected)


def test_loader_and_export_from_s3(output, s3_server, s3_url, tmp_path):
    options = s3_server["storage_options"]
    fsspec.filesystem("s3", **options).put(f"{output}/", f"{s3_url}/out/", recursive=True)
    remote = frames_of(list(MimiCodes(f"{s3_url}/out", seq_len=33, shuffle=False, storage_options=options)))
    local = frames_of(list(MimiCodes(str(output), seq_len=33, shuffle=False)))
    np.testing.assert_array_equal(remote, local)
    meta = export(f"{s3_url}/out", tmp_path / "flat", storage_options=options)
    assert meta["clips"] == 40 and (tmp_path / "flat" / "codes.u16").stat().st_size == meta["frames"] * K * 2
