"""Model behaviour beyond parity: input checks, padding frames, determinism across threads, autograd."""

from __future__ import annotations

import pytest
import torch

import mimi
from mimi_weights import audio


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return mimi.load_mimi(tiny_model_path)


def test_thread_count_does_not_change_codes(model):
    wav = audio(3 * 24_000 + 17, seed=4, batch=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = model.encode(wav, num_codebooks=32, chunk_frames=10)
        torch.set_num_threads(2)
        two = model.encode(wav, num_codebooks=32, chunk_frames=10)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_padding_frames_are_marked_and_decode_refuses_them(model):
    codes = model.encode(audio(5000, batch=2), lengths=[5000, 1920], num_codebooks=4)
    assert codes.shape == (2, 4, 3)
    assert (codes[0] >= 0).all() and (codes[1, :, 1:] == -1).all() and (codes[1, :, 0] >= 0).all()
    with pytest.raises(ValueError, match="-1 marks padding"):
        model.decode(codes)
    assert model.decode(codes[1:, :, :1]).shape == (1, 1, 1920)


@pytest.mark.parametrize("wav, kwargs, message", [
    (torch.zeros(1, 2, 100), {}, r"\[B, 1, T\]"),
    (torch.zeros(1, 1, 0), {}, "empty"),
    (torch.zeros(1, 1, 100, dtype=torch.int16), {}, "floating point"),
    (torch.zeros(1, 1, 100), {"num_codebooks": 33}, "num_codebooks"),
    (torch.zeros(2, 1, 100), {"lengths": [100]}, "lengths has 1 entries"),
    (torch.zeros(1, 1, 100), {"lengths": [101]}, "lengths must be in"),
])
def test_bad_input_is_refused(model, wav, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.encode(wav, **kwargs)


def test_gradients_reach_the_conv_weights_after_an_inference_encode(model):
    model.encode(audio(4000))  # fills the inference-mode caches of the packed GEMM weights
    model.zero_grad()
    latent = model._latent(audio(3840).view(1, -1, 1), {})
    latent.square().sum().backward()
    for conv in (model.encoder.model[0], model.encoder.model[3], model.downsample):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype, level0", [(torch.float16, 0.95), (torch.bfloat16, 0.9)])
def test_half_precision_models_encode_close_to_float32(tiny_model_path, dtype, level0, capsys):
    wav = audio(10 * 24_000, seed=3, batch=2)
    exact = mimi.load_mimi(tiny_model_path).encode(wav, num_codebooks=8)
    fast = mimi.load_mimi(tiny_model_path, dtype=dtype).encode(wav, num_codebooks=8)
    agreement = (fast == exact).float().mean(dim=(0, 2))
    with capsys.disabled():
        print(f"\n[{dtype} vs float32] agreement per level: {[round(a, 3) for a in agreement.tolist()]}")
    assert fast.shape == exact.shape and agreement[0] >= level0 and agreement.mean() >= 0.6


def test_half_precision_models_keep_the_quantizer_in_float32(tiny_model_path):
    """Casting the codebook buffers to float16 would underflow small cluster_usage / embedding_sum values: the split
    RVQ stays float32 (equal to the float32 model's), and so does the first conv; the rest takes the dtype; decode
    works across the boundary."""
    exact = mimi.load_mimi(tiny_model_path)
    half = mimi.load_mimi(tiny_model_path, dtype=torch.float16)
    assert {t.dtype for t in half.quantizer.state_dict().values()} == {torch.float32}
    for name, tensor in exact.quantizer.state_dict().items():
        assert torch.equal(half.quantizer.state_dict()[name], tensor), name
    assert half.encoder.model[0].weight.dtype == torch.float32  # the first conv takes the waveform in float32
    assert half.encoder.model[1].block[1].weight.dtype == torch.float16
    assert half.encoder_transformer.layers[0].linear1.weight.dtype == torch.float16
    codes = half.encode(audio(24_000, seed=1), num_codebooks=8)
    assert half.decode(codes).dtype == torch.float16
