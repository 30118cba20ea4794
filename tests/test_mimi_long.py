"""Full-length clips in bounded memory: chunked encoding equals moshi's one-call windowed encode."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from moshi.models import loaders

import mimi
from mimi_weights import SR, audio, checkpoint


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp("weights"), mimi.MimiConfig(), "moshi", seed=3)


def test_two_minute_clip_chunked_matches_moshi_one_call(weights, capsys):
    wav = audio(125 * SR + 777, seed=7)  # 3 126 frames: far past the 250-step window, several chunks
    ours = mimi.load_mimi(weights).encode(wav, num_codebooks=8)  # default: chunks of 150 frames
    ref = loaders.get_mimi(str(weights), device="cpu")
    ref.set_num_codebooks(8)
    with torch.no_grad():
        expected = ref.encode(wav)
    assert ours.shape == expected.shape == (1, 8, 1563)
    differing = int((ours != expected).sum())
    with capsys.disabled():
        print(f"\n[2-min chunked vs moshi one-call] {differing} of {expected.numel()} codes differ")
    assert differing <= 1e-4 * expected.numel()


def test_chunk_size_does_not_change_codes():
    model = mimi.load_mimi(checkpoint_tiny())
    wav = audio(40 * SR + 5, seed=9)
    one_call = model.encode(wav, num_codebooks=32, chunk_frames=None)
    for chunk in (1, 7, 128, 400):
        assert int((model.encode(wav, num_codebooks=32, chunk_frames=chunk) != one_call).sum()) <= 2


def checkpoint_tiny():
    import tempfile
    from pathlib import Path

    return checkpoint(Path(tempfile.mkdtemp()), mimi.MimiConfig.tiny(), "moshi")


def test_twelve_minute_clip_peak_memory_under_2gb(weights):
    script = textwrap.dedent(f"""
        import json, torch, mimi
        from mimi_weights import audio
        model = mimi.load_mimi({str(weights)!r})
        wav = audio(12 * 60 * 24000, seed=1)
        codes = model.encode(wav, num_codebooks=8)
        print(json.dumps({{"shape": list(codes.shape), "min": int(codes.min()),
                           "peak_kb": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": ":".join(sys.path)})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shape"] == [1, 8, 9000] and result["min"] >= 0
    peak_gb = result["peak_kb"] / 2**20
    print(f"\n[12-min clip] peak RSS {peak_gb:.2f} GiB")
    assert peak_gb < 2.0
