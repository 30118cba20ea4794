"""On a CUDA GPU (skipped without one; CI has none): exact mode (float32, TF32 off) agrees with the CPU's exact codes,
fast modes' per-level agreement is reported, the encode stage's pinned copies give the CPU's codes, and a whole run
encodes on the GPU (where Ray and the audio libraries are installed: a bare GPU image runs the rest)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mimi
from mimi_weights import SR, audio, checkpoint
from pipeline.encode import ShardEncoding
from pipeline.types import ClipInfo, Part, Piece

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp("weights"), mimi.MimiConfig(), "moshi", seed=2)


@pytest.fixture(scope="module")
def batch():
    return audio(10 * SR, seed=4, batch=8)


@pytest.fixture(scope="module")
def cpu_codes(weights, batch):
    return mimi.load_mimi(weights).encode(batch, num_codebooks=8)


def test_gpu_exact_mode_matches_cpu(weights, batch, cpu_codes, capsys):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    codes = mimi.load_mimi(weights, device="cuda").encode(batch, num_codebooks=8).cpu()
    agreement = (codes == cpu_codes).float().mean().item()
    with capsys.disabled():
        print(f"\n[GPU exact vs CPU exact] {agreement:.5f} of codes equal; per level "
              f"{[round(a, 4) for a in (codes == cpu_codes).float().mean(dim=(0, 2)).tolist()]}")
    assert agreement >= 0.999


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_fast_mode_agreement_per_level(weights, batch, cpu_codes, dtype, capsys):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    codes = mimi.load_mimi(weights, device="cuda", dtype=dtype).encode(batch, num_codebooks=8).cpu()
    per_level = (codes == cpu_codes).float().mean(dim=(0, 2))
    with capsys.disabled():
        print(f"\n[GPU {dtype} vs CPU exact] agreement per level: {[round(a, 3) for a in per_level.tolist()]}")
    assert per_level[0] >= 0.9


def test_the_encode_stage_on_the_gpu_gives_the_cpu_codes(tiny_model_path):
    """Whole clips in batches and a clip streamed over two parts, copied in through pinned memory."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    clips = [audio(n, seed=i)[0, 0].numpy() for i, n in enumerate([30_000, 24_000, 50_000, 90_001])]
    info = [ClipInfo(i, f"c{i}", f"file:///c{i}.wav", SR, 1) for i in range(len(clips))]
    cut = 40_000
    whole = [Piece(info[i], clips[i], 0, True) for i in range(3)]
    parts = [Part("s", 0, whole + [Piece(info[3], clips[3][:cut], 0, False)]),
             Part("s", 1, [Piece(info[3], clips[3][cut:], cut, True)], last=True)]
    rows = {}
    for device in ("cpu", "cuda"):
        encoding = ShardEncoding(mimi.load_mimi(tiny_model_path, device=device), num_codebooks=8, batch_max_seconds=10,
                                 max_pad_ratio=1.0, chunk_frames=10)
        for part in parts:
            prepared = encoding.prepare(part)
            assert all(wav.device.type == device for _, wav in prepared.batches + prepared.streamed)
            encoding.finish(part, encoding.encode(prepared))
        assert encoding.failures == []
        rows[device] = [row.codes for row in encoding.rows]
    assert [c.shape for c in rows["cuda"]] == [c.shape for c in rows["cpu"]]
    equal = sum(int((a == b).sum()) for a, b in zip(rows["cuda"], rows["cpu"])) / sum(c.size for c in rows["cpu"])
    assert equal >= 0.999


def test_a_run_encodes_on_the_gpu(tmp_path, tiny_model_path):
    ray = pytest.importorskip("ray")
    from audio_fixtures import write_audio
    from outputs import read_output, reference_codes
    from pipeline import manifest
    from pipeline.config import RunConfig
    from pipeline.runner import run

    for i in range(6):
        write_audio(tmp_path / "in" / f"c{i}.wav", "wav_pcm16", 16_000, 1.0 + 0.3 * i, seed=i)
    ray.init(num_cpus=4, num_gpus=torch.cuda.device_count(), include_dashboard=False)
    try:
        cfg = RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=tiny_model_path,
                        device="cuda", files_per_shard=2)
        assert run(cfg) == 0
    finally:
        ray.shutdown()
    final = manifest.read_manifest(cfg.output)
    assert final["precision"] == {"mode": "exact", "dtype": "float32", "tf32": False}
    rows, ref = read_output(cfg.output), reference_codes(cfg.input, tiny_model_path, 8, 2)
    assert sorted(rows) == sorted(ref)
    equal = sum(int((rows[k] == ref[k]).sum()) for k in ref) / sum(ref[k].size for k in ref)
    assert equal >= 0.999 and all(np.array_equal(rows[k].shape, ref[k].shape) for k in ref)
