"""Exact parity with the official implementation (moshi 0.2.13) at the released size, on random weights."""

from __future__ import annotations

import pytest
import torch
from moshi.models import loaders

import mimi
from mimi_weights import SR, audio, checkpoint

LENGTHS = [1, 1919, 1920, 1921, 24_000, 312_077]  # the last crosses the 250-step attention window


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp("weights"), mimi.MimiConfig(), "moshi", seed=1)


@pytest.fixture(scope="module")
def ours(weights):
    return mimi.load_mimi(weights)


@pytest.fixture(scope="module")
def moshi(weights):
    return loaders.get_mimi(str(weights), device="cpu")


def moshi_codes(model, wav: torch.Tensor, k: int) -> torch.Tensor:
    model.set_num_codebooks(k)
    with torch.no_grad():
        return model.encode(wav)


@pytest.mark.parametrize("k", [1, 8, 32])
@pytest.mark.parametrize("length", LENGTHS)
def test_single_clip_codes_identical_to_moshi(ours, moshi, length, k):
    wav = audio(length, seed=length)
    expected = moshi_codes(moshi, wav, k)
    one_call = ours.encode(wav, num_codebooks=k, chunk_frames=None)
    assert one_call.shape == expected.shape == (1, k, -(-length // 1920))
    assert torch.equal(one_call, expected)
    chunked = ours.encode(wav, num_codebooks=k, chunk_frames=40)  # crosses chunk boundaries for the long clip
    assert torch.equal(chunked, expected)


def test_codes_are_not_degenerate(ours):
    codes = ours.encode(audio(10 * SR), num_codebooks=32)
    distinct = [len(torch.unique(codes[0, j])) for j in range(32)]
    assert min(distinct) > 60, distinct  # 125 frames: a degenerate model would give a handful


@pytest.mark.parametrize("k, allowed", [(8, 1e-4), (32, 1e-3)])
def test_clip_in_padded_batch_matches_clip_alone(ours, moshi, k, allowed, capsys):
    lengths = [312_077, 24_000, 1921, 61_234, 1]
    clips = [audio(n, seed=i) for i, n in enumerate(lengths)]
    batch = torch.zeros(len(clips), 1, max(lengths))
    for i, clip in enumerate(clips):
        batch[i, :, : clip.shape[-1]] = clip
    codes = ours.encode(batch, lengths=lengths, num_codebooks=k)
    differing = total = 0
    for i, (clip, n) in enumerate(zip(clips, lengths)):
        owned = -(-n // 1920)
        alone = moshi_codes(moshi, clip, k)[0]
        differing += int((codes[i, :, :owned] != alone).sum())
        total += alone.numel()
        assert (codes[i, :, owned:] == -1).all()
    with capsys.disabled():
        print(f"\n[batched vs alone] K={k}: {differing} of {total} codes differ ({differing / total:.2e})")
    assert differing <= allowed * total


def test_decode_matches_moshi(ours, moshi):
    codes = ours.encode(audio(2 * SR), num_codebooks=8)
    moshi.set_num_codebooks(8)
    with torch.no_grad():
        expected = moshi.decode(codes)
    wav = ours.decode(codes)
    assert wav.shape == expected.shape == (1, 1, 1920 * codes.shape[-1])
    torch.testing.assert_close(wav, expected, rtol=1e-4, atol=1e-5)
