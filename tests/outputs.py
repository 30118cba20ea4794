"""Helpers to check a run's output against the model: reference codes of an input, and the rows of an output."""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch

import mimi
from pipeline.prepare import prepare_shard
from pipeline.sources import discover_shards
from pipeline.writer import read_codes


def reference_codes(input_url: str, tiny_model_path: str, k: int, files_per_shard: int, storage_options=None):
    """id → [F, K] codes of each clip decoded by the pipeline's own functions and encoded alone."""
    model = mimi.load_mimi(tiny_model_path)
    ref = {}
    for shard in discover_shards(input_url, files_per_shard=files_per_shard, storage_options=storage_options):
        for clip in prepare_shard(shard, storage_options=storage_options)[0]:
            codes = model.encode(torch.from_numpy(clip.audio)[None, None], num_codebooks=k)[0].numpy()
            ref[clip.clip_id] = codes.T.astype(np.int16)
    return ref


def assert_codes_equal(rows: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    """The output's rows are the reference's clips, each of the same shape, with the same codes but for rounding ties:
    an encoder with another thread count may round a latent to the other side of a tie between two codebook entries,
    which changes that frame's codes from that level down and nothing else. At most one frame in a thousand of the
    output (at least one) may differ; a wrong clip, a shifted or padded piece, or a lost chunk differs in many."""
    assert sorted(rows) == sorted(ref), (f"missing {sorted(set(ref) - set(rows))[:5]}, "
                                         f"unexpected {sorted(set(rows) - set(ref))[:5]}")
    shapes = {i: (rows[i].shape, ref[i].shape) for i in ref if rows[i].shape != ref[i].shape}
    assert not shapes, f"clips of another length than the model's own (clip: (output, reference)): {shapes}"
    frames = {i: int((rows[i] != ref[i]).any(axis=1).sum()) for i in ref}  # [F, K] each
    mismatched = {i: n for i, n in frames.items() if n}
    total = sum(len(codes) for codes in ref.values())
    assert sum(mismatched.values()) <= max(1, total // 1000), (
        f"codes differ from the model's own in more frames than rounding ties explain (clip: frames, of {total}): "
        f"{mismatched}")


def read_output(output: str, storage_options=None) -> dict[str, np.ndarray]:
    fs, path = fsspec.core.url_to_fs(output, **(storage_options or {}))
    fs.invalidate_cache()
    rows = {}
    for file in sorted(fs.glob(f"{path}/data/*.parquet")):
        with fs.open(file, "rb") as f:
            table = pq.read_table(f)
        for i, clip_id in enumerate(table.column("id").to_pylist()):
            assert clip_id not in rows, f"duplicate row {clip_id}"
            rows[clip_id] = read_codes(table, i)
    return rows
