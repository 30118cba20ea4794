"""`mimi-tokenize encode` / `decode IN.npz`, the sample corpus and the fast offline failure of `run`, on real files
with a real (tiny, random) Mimi loaded through `load_mimi`. No Ray here (see test_demo.py for `decode --id`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

import mimi
from audio_fixtures import corrupt_bytes, write_audio
from mimi.checkpoint import is_untrained, sha256_file
from pipeline.cli import main
from pipeline.decode import decode_audio
from pipeline.resample import parse_channel_policy, to_mono
from pipeline.sample_corpus import FORMATS, LONG_SECONDS, make_sample_corpus
from pipeline.sources import discover_shards, iter_clips
from pipeline.types import SAMPLE_RATE
from pipeline.tools import NPZ_KEYS


@pytest.fixture(scope="module")
def ckpt(tiny_model_path) -> str:
    return tiny_model_path


@pytest.fixture(scope="module")
def model(ckpt):
    return mimi.load_mimi(ckpt)


def pipeline_audio(path: Path, policy: str = "mix") -> np.ndarray:
    """The file as the pipeline prepares it: decoded, mono, 24 kHz."""
    samples, sr = decode_audio(path.read_bytes(), path.name)
    mono = to_mono(samples, parse_channel_policy(policy, samples.shape[0]))
    return mono if sr == SAMPLE_RATE else soxr.resample(mono, sr, SAMPLE_RATE, quality="HQ")


def test_encode_decode_round_trip(tmp_path, ckpt, model, capsys):
    src = tmp_path / "in.wav"
    write_audio(src, "wav_pcm16", 16_000, 2.3, seed=3)
    npz = tmp_path / "codes.npz"
    assert main(["encode", str(src), str(npz), "--model", ckpt, "--num-codebooks", "6"]) == 0
    assert "wrote" in capsys.readouterr().out

    with np.load(npz, allow_pickle=False) as z:
        assert set(z.files) == set(NPZ_KEYS)
        codes, fields = z["audio_codes"], {k: z[k].item() for k in z.files if k != "audio_codes"}
    audio = pipeline_audio(src)
    assert codes.dtype == np.int16 and codes.shape == (1, 6, int(np.ceil(len(audio) / 1920)))
    assert fields["sample_rate"] == 24_000 and fields["frame_rate"] == 12.5
    assert (fields["num_codebooks"], fields["num_frames"], fields["num_samples"]) == (6, codes.shape[2], len(audio))
    assert fields["num_samples"] == round(2.3 * 16_000 * 1.5)  # 16 kHz → 24 kHz
    assert (fields["orig_sample_rate"], fields["orig_channels"]) == (16_000, 1)
    assert fields["model_sha256"] == sha256_file(ckpt) and fields["model_source"] == ckpt
    assert fields["model_untrained"] is True  # generated weights are labelled untrained
    expected = model.encode(torch.from_numpy(audio)[None, None], num_codebooks=6).numpy()
    np.testing.assert_array_equal(codes, expected)

    wav = tmp_path / "out.wav"
    assert main(["decode", str(npz), str(wav)]) == 0  # model: the one recorded in the .npz
    decoded, sr = sf.read(wav, dtype="float32")
    assert sr == 24_000 and sf.info(str(wav)).subtype == "FLOAT"
    assert decoded.shape == (len(audio),)
    reference = model.decode(torch.from_numpy(codes.astype(np.int64)))[0, 0, :len(audio)].numpy()
    np.testing.assert_allclose(decoded, reference, atol=1e-6)

    assert main(["decode", str(npz), str(tmp_path / "pcm.wav"), "--model", ckpt, "--pcm16"]) == 0
    pcm, _ = sf.read(tmp_path / "pcm.wav", dtype="float32")
    assert sf.info(str(tmp_path / "pcm.wav")).subtype == "PCM_16"
    np.testing.assert_allclose(pcm, np.clip(reference, -1, 1), atol=1 / 2**15 + 1e-6)


def test_stereo_flac_is_mixed_and_resampled(tmp_path, ckpt, model):
    src = tmp_path / "in.flac"
    write_audio(src, "flac", 44_100, 1.7, channels=2, seed=5)
    for policy in ("mix", "channel:1"):
        npz = tmp_path / f"{policy.replace(':', '')}.npz"
        assert main(["encode", str(src), str(npz), "--model", ckpt, "--channel-policy", policy]) == 0
        with np.load(npz) as z:
            assert (int(z["orig_sample_rate"]), int(z["orig_channels"])) == (44_100, 2)
            audio = pipeline_audio(src, policy)
            assert int(z["num_samples"]) == len(audio) == round(1.7 * 44_100 * 24_000 / 44_100)
            expected = model.encode(torch.from_numpy(audio)[None, None], num_codebooks=8).numpy()
            np.testing.assert_array_equal(z["audio_codes"], expected)
    with np.load(tmp_path / "mix.npz") as a, np.load(tmp_path / "channel1.npz") as b:
        assert not np.array_equal(a["audio_codes"], b["audio_codes"])


def test_long_file_is_encoded_whole(tmp_path, ckpt, model):
    src = tmp_path / "long.wav"
    write_audio(src, "wav_pcm16", 24_000, 13.0, seed=1)  # 163 frames: more than one 150-frame chunk
    npz = tmp_path / "long.npz"
    assert main(["encode", str(src), str(npz), "--model", ckpt, "--num-codebooks", "2"]) == 0
    with np.load(npz) as z:
        assert z["audio_codes"].shape == (1, 2, 163)
        expected = model.encode(torch.from_numpy(pipeline_audio(src))[None, None], num_codebooks=2).numpy()
        np.testing.assert_array_equal(z["audio_codes"], expected)


def test_decode_refuses_other_weights(tmp_path, ckpt, capsys):
    src = tmp_path / "in.wav"
    write_audio(src, "wav_pcm16", 24_000, 0.5)
    npz = tmp_path / "c.npz"
    assert main(["encode", str(src), str(npz), "--model", ckpt]) == 0
    other = str(mimi.write_random_checkpoint(tmp_path / "other.safetensors", mimi.MimiConfig.tiny(), seed=1))
    capsys.readouterr()
    assert main(["decode", str(npz), str(tmp_path / "o.wav"), "--model", other]) == 2
    err = capsys.readouterr().err
    assert "not the one that made the codes" in err and "--force" in err and "Traceback" not in err
    assert not (tmp_path / "o.wav").exists()
    assert main(["decode", str(npz), str(tmp_path / "o.wav"), "--model", other, "--force"]) == 0
    assert sf.info(str(tmp_path / "o.wav")).frames == 12_000


def test_decode_form_errors(tmp_path, ckpt, capsys):
    assert main(["decode", str(tmp_path / "x.npz"), "o.wav", "--id", "a"]) == 2
    assert "drop --id" in capsys.readouterr().err
    assert main(["decode", str(tmp_path), "o.wav"]) == 2
    assert "pass --id CLIP_ID" in capsys.readouterr().err
    assert main(["decode", str(tmp_path / "missing.npz"), "o.wav"]) == 2
    assert "not a readable .npz" in capsys.readouterr().err
    assert main(["decode", str(tmp_path), "o.wav", "--id", "a"]) == 2
    assert "is not a mimi-tokenize output" in capsys.readouterr().err


def test_encode_errors_are_one_line(tmp_path, ckpt, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(corrupt_bytes())
    assert main(["encode", str(bad), str(tmp_path / "b.npz"), "--model", ckpt]) == 2
    assert main(["encode", str(tmp_path / "nope.wav"), str(tmp_path / "b.npz"), "--model", ckpt]) == 2
    assert main(["encode", str(bad), str(tmp_path / "b.npz"), "--model", ckpt, "--num-codebooks", "40"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "decode failed" in err[0] and "cannot read" in err[1] and "num_codebooks" in err[2]
    assert not (tmp_path / "b.npz").exists()


def test_untrained_label(tmp_path, ckpt):
    cfg = mimi.MimiConfig.tiny()
    saved = mimi.save_checkpoint(mimi.random_state_dict(cfg), tmp_path / "saved.safetensors", cfg=cfg)
    assert is_untrained(ckpt) and not is_untrained(saved)  # write_random_checkpoint labels; save_checkpoint not
    assert is_untrained(mimi.write_random_checkpoint(tmp_path / "hf", cfg, layout="transformers"))
    src = tmp_path / "in.wav"
    write_audio(src, "wav_pcm16", 24_000, 0.5)
    for model, untrained in ((ckpt, True), (saved, False)):
        assert main(["encode", str(src), str(tmp_path / "u.npz"), "--model", str(model)]) == 0
        with np.load(tmp_path / "u.npz") as z:
            assert z["model_untrained"].item() is untrained


def test_run_fails_fast_and_clearly_without_the_hub(tmp_path, monkeypatch, capsys):
    """The default model (kyutai/mimi) with no reachable Hub and an empty cache: exit 2 at once, before Ray or the
    output, with the message that says how to pass local weights."""
    import huggingface_hub.constants as hf_constants
    import ray

    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: connection refused
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    corpus = make_sample_corpus(tmp_path / "sample", n_clips=2)
    started = time.monotonic()
    assert main(["run", "--input", str(corpus), "--output", str(tmp_path / "out")]) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert "could not fetch Mimi weights 'kyutai/mimi'" in err and "--model mimi-weights" in err
    assert "hf download kyutai/mimi" in err
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


def test_sample_corpus(tmp_path):
    folder = make_sample_corpus(tmp_path / "a", n_clips=6)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert [p.relative_to(folder).as_posix() for p in files] == [
        "spk0/utt000.wav", "spk0/utt005.flac", "spk1/utt001.flac", "spk2/utt002.mp3", "spk3/utt003.ogg",
        "spk4/utt004.wav"]
    for path in files:
        index = int(path.stem[-3:])
        fmt, info = FORMATS[index % len(FORMATS)], sf.info(str(path))
        assert (info.samplerate, info.channels) == (fmt.sample_rate, fmt.channels)
        assert 1.0 <= info.duration <= 20.0
        samples, _ = decode_audio(path.read_bytes(), path.name)
        assert 0.2 < np.abs(samples).max() <= 1.0 and samples.std() > 0.02
    assert sf.info(str(folder / "spk0/utt005.flac")).duration == pytest.approx(LONG_SECONDS, abs=0.01)

    # deterministic: the same files (the OGG's decoded samples: its stream serial number is random)
    again = make_sample_corpus(tmp_path / "b", n_clips=6)
    for path in files:
        twin = again / path.relative_to(folder)
        if path.suffix == ".ogg":
            np.testing.assert_array_equal(decode_audio(path.read_bytes())[0], decode_audio(twin.read_bytes())[0])
        else:
            assert path.read_bytes() == twin.read_bytes()

    # rewrites its own folder, never another one
    assert make_sample_corpus(folder, n_clips=2) == folder
    assert len([p for p in folder.rglob("*.*") if not p.name.startswith(".")]) == 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.wav").write_bytes(b"x")
    with pytest.raises(ValueError, match="not written by sample-corpus"):
        make_sample_corpus(tmp_path / "mine")


def test_sample_corpus_manifest_variant(tmp_path, capsys):
    assert main(["sample-corpus", str(tmp_path / "s"), "--clips", "3", "--manifest"]) == 0
    assert f"--input {tmp_path / 's' / 'metadata.jsonl'}" in capsys.readouterr().out
    manifest_path = tmp_path / "s" / "metadata.jsonl"
    rows = [json.loads(line) for line in manifest_path.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["spk0/utt000", "spk1/utt001", "spk2/utt002"]
    [shard] = discover_shards(str(manifest_path))
    clips = list(iter_clips(shard))
    assert [c.clip_id for c in clips] == ["spk0/utt000", "spk1/utt001", "spk2/utt002"]
    assert clips[1].metadata["speaker"] == "spk1" and clips[1].metadata["text"]
