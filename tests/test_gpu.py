"""On a CUDA GPU (skipped without one; CI has none): exact mode (float32, TF32 off) agrees with the CPU's exact codes,
fast modes' per-level agreement is reported, and a whole run encodes on the GPU."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

import mimi
from audio_fixtures import write_audio
from mimi_weights import SR, audio, checkpoint
from outputs import read_output, reference_codes
from pipeline import manifest
from pipeline.config import RunConfig
from pipeline.runner import run

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


def test_a_run_encodes_on_the_gpu(tmp_path, tiny_model_path):
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
