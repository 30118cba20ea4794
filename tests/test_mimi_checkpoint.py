"""Loading the official checkpoint layouts through the real loading code, and its errors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import mimi
from mimi.checkpoint import MOSHI_FILENAME, read_safetensors
from mimi_weights import audio, checkpoint


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def moshi_file(root):
    return checkpoint(root, mimi.MimiConfig(), "moshi", seed=2)


def test_released_moshi_layout_has_the_official_keys(moshi_file):
    tensors = read_safetensors(moshi_file)
    assert len(tensors) == 318
    assert moshi_file.stat().st_size == 384_644_900  # the released file's exact size (spec §5.1)
    assert tensors["downsample.conv.conv.conv.weight"].shape == (512, 512, 4)
    assert tensors["encoder_transformer.transformer.layers.7.self_attn.in_proj_weight"].shape == (1536, 512)
    assert tensors["decoder.model.2.convtr.convtr.weight"].shape == (1024, 512, 16)


def test_transformers_layout_loads_into_identical_state(root, moshi_file):
    ours = mimi.load_mimi(moshi_file)
    folder = root / "kyutai-mimi"
    mimi.save_checkpoint(ours.state_dict(), folder, layout="transformers")
    hf = load_file(folder / "model.safetensors")
    assert len(hf) == 350 and "encoder_transformer.layers.0.self_attn.q_proj.weight" in hf
    assert json.loads((folder / "config.json").read_text())["sliding_window"] == 250
    again = mimi.load_mimi(folder)
    assert again.config == ours.config
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # q/k rows really are permuted in the file (a wrong mapping could not hide behind symmetric weights)
    fused = a["encoder_transformer.layers.0.attn.in_proj.weight"]
    assert not torch.equal(hf["encoder_transformer.layers.0.self_attn.q_proj.weight"], fused[:512])
    assert torch.equal(hf["encoder_transformer.layers.0.self_attn.v_proj.weight"], fused[1024:])


def test_config_is_read_off_the_tensors(root):
    cfg = mimi.MimiConfig.tiny(n_q=12)
    model = mimi.load_mimi(checkpoint(root, cfg, "moshi"))
    assert model.config == cfg
    assert model.encode(audio(4000), num_codebooks=12).shape == (1, 12, 3)
    with pytest.raises(ValueError, match="num_codebooks"):
        model.encode(audio(4000), num_codebooks=13)


def test_provenance_is_recorded(moshi_file):
    model = mimi.load_mimi(moshi_file)
    assert model.weights_sha256 == hashlib.sha256(moshi_file.read_bytes()).hexdigest()
    assert model.source == str(moshi_file)


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.pop("encoder.model.3.conv.conv.bias"), r"missing keys: \['encoder.model.3.conv.conv.bias'\]"),
    (lambda t: t.update(extra=torch.zeros(1)), r"unexpected keys: \['extra'\]"),
    (lambda t: t.update({"downsample.conv.conv.conv.weight": torch.zeros(512, 512, 3)}),
     r"downsample.conv.conv.conv.weight: shape \(512, 512, 3\), expected \(512, 512, 4\)"),
])
def test_bad_checkpoints_name_the_key(tmp_path, moshi_file, damage, message):
    tensors = read_safetensors(moshi_file)
    damage(tensors)
    save_file(tensors, tmp_path / MOSHI_FILENAME)
    with pytest.raises(mimi.CheckpointError, match=message):
        mimi.load_mimi(tmp_path)


def test_pickle_and_garbage_are_refused(tmp_path):
    pt = tmp_path / "model.pt"
    torch.save({"model": {}}, pt)
    with pytest.raises(mimi.CheckpointError, match="never pickle"):
        mimi.load_mimi(pt)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(mimi.CheckpointError, match="not a readable safetensors"):
        mimi.load_mimi(bad)


def test_unreachable_hub_says_how_to_pass_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(mimi.CheckpointError, match=r"pass the folder or the \.safetensors file"):
        mimi.load_mimi("kyutai/mimi")


def test_hub_repo_id_is_served_from_the_local_cache_when_offline(tmp_path, monkeypatch, root):
    """The Hub path (`load_mimi("org/name")`) resolves through huggingface_hub's cache layout when offline."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    snapshot = cache / "models--kyutai--mimi" / "snapshots" / ("a" * 40)
    mimi.write_random_checkpoint(snapshot, mimi.MimiConfig.tiny(), layout="transformers")
    (cache / "models--kyutai--mimi" / "refs").mkdir(parents=True)
    (cache / "models--kyutai--mimi" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    model = mimi.load_mimi("kyutai/mimi")
    assert model.config == mimi.MimiConfig.tiny() and model.source == "kyutai/mimi"
    assert model.weights_sha256 == hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()
