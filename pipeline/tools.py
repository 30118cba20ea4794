"""Single-file tools around the pipeline: ``mimi-tokenize encode`` / ``decode``.

* :func:`encode_file`: one audio file (any format the pipeline reads) → a ``.npz`` of its Mimi codes. The audio
  goes through the pipeline's own decode → mono → 24 kHz path (:func:`pipeline.prepare.prepare_clip`) and is
  encoded whole, in the model's chunked path for long audio, so its codes equal those a run would write.
* :func:`decode_npz`: the inverse, codes → 24 kHz WAV.
* :func:`decode_clip`: one row of a token dataset (a run's output folder), found by its ``id``, → 24 kHz WAV.

The ``.npz`` holds (names follow transformers' ``MimiModel.encode`` output, ``audio_codes``):

==================  ======================================================================================
``audio_codes``     int16 ``[1, K, F]`` (codes are < 2048; int16 as in the Parquet output; cast to int64 for
                    transformers)
``sample_rate``     24000 (the codes' audio rate)
``frame_rate``      12.5
``num_codebooks``   K
``num_frames``      F = ceil(num_samples / 1920)
``num_samples``     the source's length in 24 kHz samples (decode trims to it)
``orig_sample_rate``, ``orig_channels``   of the source file
``model_source``, ``model_revision``, ``model_sha256``   the weights that made the codes (sha256 of the file)
``model_untrained`` True for generated random weights (see :func:`mimi.is_untrained`)
==================  ======================================================================================

Generated (random) weights are labelled in their safetensors metadata (``mimi.checkpoint.UNTRAINED_KEY``, written by
:func:`mimi.write_random_checkpoint`); the runner records the label in the output's manifest and Parquet metadata.
"""

from __future__ import annotations

import logging
import posixpath
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from mimi import load_mimi
from mimi.checkpoint import is_untrained, resolve_source
from pipeline import manifest, state, storage
from pipeline.config import ConfigError
from pipeline.prepare import prepare_clip
from pipeline.types import SAMPLE_RATE, Clip, ClipFailure, ClipSource

log = logging.getLogger(__name__)

DEFAULT_MODEL = "kyutai/mimi"
NPZ_KEYS = ("audio_codes", "sample_rate", "frame_rate", "num_codebooks", "num_frames", "num_samples",
            "orig_sample_rate", "orig_channels", "model_source", "model_revision", "model_sha256", "model_untrained")
WAV_SUBTYPES = ("FLOAT", "PCM_16")


class ToolError(ConfigError):
    """An expected reason ``encode``/``decode`` cannot go on (unreadable input, unknown id, model mismatch)."""


# --- model -------------------------------------------------------------------------------------------------------


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ToolError("--device cuda but CUDA is not available")
    if device not in ("cpu", "cuda"):
        raise ToolError(f"device must be auto, cpu or cuda, got {device!r}")
    return device


def load_model(source: str, revision: str | None = None, device: str = "auto"):
    """Load Mimi from a Hub id, folder or file; ``model.untrained`` tells whether the weights are generated."""
    source = str(Path(source).resolve()) if Path(source).exists() else source
    path = resolve_source(source, revision)
    model = load_mimi(path, device=pick_device(device))
    model.source, model.revision, model.untrained = source, revision, is_untrained(path)
    if model.untrained:
        log.warning("model %s holds UNTRAINED generated weights: its codes and audio carry no meaning", source)
    return model


def check_model(model, expected_sha256: str | None, where: str, force: bool) -> None:
    """Refuse (unless ``force``) a model whose weights differ from those that made the codes."""
    if not expected_sha256 or expected_sha256 == model.weights_sha256:
        return
    message = (f"the model {model.source} (sha256 {model.weights_sha256[:12]}…) is not the one that made the codes "
               f"in {where} (sha256 {expected_sha256[:12]}…)")
    if not force:
        raise ToolError(message + "; pass the same --model, or --force to decode anyway")
    log.warning("%s; decoding anyway (--force)", message)


# --- audio files -------------------------------------------------------------------------------------------------


def load_audio(url: str, channel_policy: str = "mix", storage_options: dict | None = None) -> Clip:
    """Read and prepare one audio file exactly as a run does: decode, to mono, resample to 24 kHz."""
    try:
        fs, path = storage.get_fs(url, storage_options)
        data = fs.cat_file(path)
        uri = fs.unstrip_protocol(path)
    except (OSError, ValueError) as exc:
        raise ToolError(f"cannot read {manifest.redact(url)}: {exc}") from exc
    result = prepare_clip(ClipSource(posixpath.basename(path), uri, data), channel_policy=channel_policy)
    if isinstance(result, ClipFailure):
        raise ToolError(f"cannot use {manifest.redact(url)} ({result.stage} failed): {result.message}")
    return result


def write_wav(path: str | Path, audio: np.ndarray, subtype: str = "FLOAT") -> None:
    """Write mono 24 kHz ``audio``: 32-bit float WAV (exact) or 16-bit PCM (clipped to [-1, 1])."""
    if subtype not in WAV_SUBTYPES:
        raise ToolError(f"WAV subtype must be one of {WAV_SUBTYPES}, got {subtype!r}")
    audio = np.asarray(audio, dtype=np.float32)
    if subtype == "PCM_16":
        audio = np.clip(audio, -1.0, 1.0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, SAMPLE_RATE, subtype=subtype, format="WAV")


def decode_codes(model, codes: np.ndarray, num_samples: int | None = None) -> np.ndarray:
    """Codes ``[K, F]`` → mono float32 audio at 24 kHz, trimmed to ``num_samples`` when given."""
    try:
        wav = model.decode(torch.from_numpy(np.asarray(codes, dtype=np.int64))[None])
    except ValueError as exc:
        raise ToolError(f"cannot decode these codes with {model.source}: {exc}") from exc
    audio = wav[0, 0].float().cpu().numpy()
    return audio[:num_samples] if num_samples is not None else audio


# --- encode / decode a .npz --------------------------------------------------------------------------------------


def encode_file(in_audio: str, out_npz: str | Path, *, model: str = DEFAULT_MODEL, revision: str | None = None,
                num_codebooks: int = 8, device: str = "auto", channel_policy: str = "mix", chunk_frames: int = 150,
                storage_options: dict | None = None) -> dict[str, Any]:
    """Encode one audio file into ``out_npz`` (see the module docstring); returns the scalar fields written."""
    mimi = load_model(model, revision, device)  # first: a model that cannot load fails before any work
    if not 1 <= num_codebooks <= mimi.max_codebooks:
        raise ToolError(f"num_codebooks must be in [1, {mimi.max_codebooks}], got {num_codebooks}")
    clip = load_audio(in_audio, channel_policy, storage_options)
    codes = mimi.encode(torch.from_numpy(clip.audio)[None, None], num_codebooks=num_codebooks,
                        chunk_frames=chunk_frames)
    fields = {"sample_rate": SAMPLE_RATE, "frame_rate": float(mimi.frame_rate), "num_codebooks": num_codebooks,
              "num_frames": int(codes.shape[-1]), "num_samples": len(clip.audio),
              "orig_sample_rate": clip.orig_sample_rate, "orig_channels": clip.orig_channels,
              "model_source": mimi.source, "model_revision": mimi.revision or "",
              "model_sha256": mimi.weights_sha256, "model_untrained": bool(mimi.untrained)}
    Path(out_npz).parent.mkdir(parents=True, exist_ok=True)
    with open(out_npz, "wb") as f:  # a file object: np.savez would append ".npz" to other names
        np.savez_compressed(f, audio_codes=codes.cpu().numpy().astype(np.int16),
                            **{k: np.asarray(v) for k, v in fields.items()})
    return fields


def read_npz(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """``([K, F]`` int64 codes, the scalar fields``)`` of a codes ``.npz`` (ours, or any with ``audio_codes``)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            fields = {k: npz[k].item() for k in npz.files if k != "audio_codes" and npz[k].ndim == 0}
            codes = npz["audio_codes"] if "audio_codes" in npz.files else None
    except (OSError, ValueError) as exc:
        raise ToolError(f"{path}: not a readable .npz file ({exc})") from exc
    if codes is None:
        raise ToolError(f"{path} has no 'audio_codes' array")
    if codes.ndim == 3 and codes.shape[0] == 1:
        codes = codes[0]
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ToolError(f"{path}: audio_codes must be integer [1, K, F] or [K, F], got {codes.dtype} {codes.shape}")
    return codes.astype(np.int64), fields


def decode_npz(in_npz: str | Path, out_wav: str | Path, *, model: str | None = None, revision: str | None = None,
               device: str = "auto", force: bool = False, subtype: str = "FLOAT") -> dict[str, Any]:
    """Decode a codes ``.npz`` to a 24 kHz WAV, trimmed to its ``num_samples``. The model defaults to the one
    recorded in the file (else kyutai/mimi); other weights than those recorded are refused unless ``force``."""
    codes, fields = read_npz(in_npz)
    source = model or fields.get("model_source") or DEFAULT_MODEL
    mimi = load_model(source, revision if model else (revision or fields.get("model_revision") or None), device)
    check_model(mimi, fields.get("model_sha256"), str(in_npz), force)
    audio = decode_codes(mimi, codes, fields.get("num_samples"))
    write_wav(out_wav, audio, subtype)
    return {"num_samples": len(audio), "num_frames": codes.shape[1], "num_codebooks": codes.shape[0],
            "model_source": mimi.source}


# --- a row of a token dataset ------------------------------------------------------------------------------------


def read_run_identity(output: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The output's manifest.json (or, while a first run has not written one yet, ``_state/run.json``)."""
    state.check_folder(output, storage_options)
    for path in (manifest.MANIFEST_PATH, manifest.RUN_PATH):
        try:
            return storage.read_json(storage.join(output, path), storage_options)
        except FileNotFoundError:
            continue
    raise ToolError(f"{manifest.redact(output)} is not a mimi-tokenize output "
                    f"(no {manifest.MANIFEST_PATH} or {manifest.RUN_PATH})")


def find_clip(output: str, clip_id: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The row ``clip_id`` of the output's Parquet files: ``{"id", "codes" [F, K] int16, "n_frames",
    "duration_s", "source_uri", "file"}``. Reads only the row groups whose ``id`` statistics may hold it, and
    only those columns."""
    import pyarrow.dataset as ds

    fs, root = storage.get_fs(output, storage_options)
    files = sorted(fs.glob(posixpath.join(root, manifest.DATA_DIR, "*.parquet")))
    if not files:
        raise ToolError(f"{manifest.redact(output)} has no Parquet files under {manifest.DATA_DIR}/ yet")
    dataset = ds.dataset(files, format="parquet", filesystem=fs)
    columns = ["id", "codes", "n_frames", "duration_s", "source_uri"]
    found = dataset.to_table(columns=columns + ["__filename"], filter=ds.field("id") == clip_id)
    if found.num_rows == 0:
        sample = dataset.head(3, columns=["id"]).column("id").to_pylist()
        raise ToolError(f"no clip with id {clip_id!r} in {manifest.redact(output)} ({dataset.count_rows():,} clips "
                        f"in {len(files)} file(s)); ids look like {sample}")
    if found.num_rows > 1:
        raise ToolError(f"id {clip_id!r} occurs {found.num_rows} times in {manifest.redact(output)} (files "
                        f"{sorted(set(found.column('__filename').to_pylist()))})")
    from pipeline.writer import read_codes

    row = {c: found.column(c)[0].as_py() for c in columns if c != "codes"}
    return {**row, "codes": read_codes(found, 0), "file": found.column("__filename")[0].as_py()}


def decode_clip(output: str, clip_id: str, out_wav: str | Path, *, model: str | None = None,
                revision: str | None = None, device: str = "auto", force: bool = False, subtype: str = "FLOAT",
                storage_options: dict | None = None) -> dict[str, Any]:
    """Decode the row ``clip_id`` of a token dataset to a 24 kHz WAV of the clip's length.

    The model defaults to the one recorded in the output's manifest; other weights than those recorded are
    refused unless ``force``."""
    identity = read_run_identity(output, storage_options)
    recorded = identity.get("model") or {}
    row = find_clip(output, clip_id, storage_options)
    source = model or recorded.get("source") or DEFAULT_MODEL
    mimi = load_model(source, revision if model else (revision or recorded.get("revision")), device)
    check_model(mimi, recorded.get("sha256"), manifest.redact(output), force)
    num_samples = round(row["duration_s"] * SAMPLE_RATE)
    audio = decode_codes(mimi, row["codes"].T, num_samples)
    write_wav(out_wav, audio, subtype)
    return {"num_samples": len(audio), "num_frames": row["n_frames"], "num_codebooks": row["codes"].shape[1],
            "source_uri": row["source_uri"], "file": row["file"], "model_source": mimi.source,
            "untrained": bool(recorded.get("untrained"))}
