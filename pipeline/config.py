"""Run settings: one dataclass, filled from an optional YAML file, then from the command-line flags actually given.

Every key is documented in ``configs/default.yaml``. Unknown keys and ill-typed values are errors, never ignored.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
_CHANNEL_POLICY = re.compile(r"mix|channel:\d+")


class ConfigError(ValueError):
    """A config file or flag that cannot be used: unknown key, wrong type, value out of range."""


@dataclass
class RunConfig:
    """Every setting of ``mimi-tokenize run``."""

    input: str | None = None  # input URL (folder, glob, tar/parquet shards, or a .jsonl/.csv manifest)
    output: str | None = None  # output folder URL
    model: str = "kyutai/mimi"  # Hub repo id, local folder, or local .safetensors file
    revision: str | None = None  # Hub revision (branch, tag or commit) of ``model``
    num_codebooks: int = 8  # K codebooks kept per frame (1..32)
    channel_policy: str = "mix"  # "mix" (average the channels) or "channel:K" (keep channel K)
    files_per_shard: int = 256  # at most this many audio files (or manifest rows) per output shard
    max_shard_bytes: int | None = 2**30  # and at most this many input bytes per shard of audio files (None: no cap)
    prune: bool = False  # drop the rows of inputs that are gone from the listing (default: keep them)
    part_seconds: float = 300.0  # decoded audio per part between a decode task and its encoder (bounds memory)
    max_clip_seconds: float = 86_400.0  # a longer clip is a recorded failure (stops decompression bombs)
    batch_max_seconds: float = 120.0  # padded audio seconds per encode batch (B × longest clip), per encoder
    max_pad_ratio: float = 0.25  # start a new batch before padding exceeds this share of the batch's true audio
    chunk_frames: int = 150  # frames per encode chunk of long audio (150 frames = 12 s): bounds memory
    device: str = "auto"  # "auto" (GPU encoders when the Ray cluster has GPUs), "cpu" or "cuda"
    dtype: str = "float32"  # encoder weights/activations: float32, bfloat16 or float16
    num_encoders: int | None = None  # encoder actors; default: one per GPU in the cluster (follows it), or 1
    decode_tasks_per_encoder: int | None = None  # shards decoding at once per encoder; default: CPUs / encoders
    shard_retries: int = 2  # retries of a shard (decode worker death, failed attempt); bounded
    max_failure_share: float = 0.01  # exit non-zero when failed clips / attempted clips exceeds this
    storage_retry_s: float = 300.0  # retry a storage operation through transient errors this long (rides outages)
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for input and output
    input_storage_options: dict[str, Any] | None = None  # for the input only (default: storage_options)
    output_storage_options: dict[str, Any] | None = None  # for the output only (default: storage_options)
    ray_address: str | None = None  # Ray cluster to join ("auto", "ray://host:10001"); None: start a local one
    progress_interval_s: float = 30.0  # seconds between progress logs / manifest.json updates
    checkpoint_every: int = 10_000  # fold the shard records into a checkpoint every this many new ones (and at the end)
    lock_wait_s: float = 0.0  # wait this long for another run's lock to be released or go stale; 0: refuse at once
    lock_lease_s: float = 120.0  # the output lock's lease: renewed every quarter of it; a run stops writing when it
    # could not renew it for three quarters of it, and another run may take a lock not renewed for all of it
    encoder_wait_s: float = 600.0  # give up the pending shards when no encoder can be placed for this long
    stall_timeout_s: float = 1800.0  # an encoder that gets no decoded audio for this long retries the shard
    vad: bool = False  # speech_share from Silero VAD (pip install 'mimi-tokenize[vad]'; about 1 CPU min per hour)

    def input_options(self) -> dict[str, Any]:
        return self.storage_options if self.input_storage_options is None else self.input_storage_options

    def output_options(self) -> dict[str, Any]:
        return self.storage_options if self.output_storage_options is None else self.output_storage_options

    def to_dict(self) -> dict[str, Any]:
        """All settings as plain data (for the run snapshot; redact before storing)."""
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        """Raise :class:`ConfigError` on a value out of range; return ``self``."""
        checks = [
            (1 <= self.num_codebooks <= 32, f"num_codebooks must be in [1, 32], got {self.num_codebooks}"),
            (_CHANNEL_POLICY.fullmatch(self.channel_policy),
             f"channel_policy must be 'mix' or 'channel:K', got {self.channel_policy!r}"),
            (self.files_per_shard >= 1, f"files_per_shard must be >= 1, got {self.files_per_shard}"),
            (self.batch_max_seconds > 0, f"batch_max_seconds must be > 0, got {self.batch_max_seconds}"),
            (self.max_pad_ratio >= 0, f"max_pad_ratio must be >= 0, got {self.max_pad_ratio}"),
            (self.chunk_frames >= 1, f"chunk_frames must be >= 1, got {self.chunk_frames}"),
            (self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}"),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}"),
            (self.num_encoders is None or self.num_encoders >= 1,
             f"num_encoders must be >= 1, got {self.num_encoders}"),
            (self.decode_tasks_per_encoder is None or self.decode_tasks_per_encoder >= 1,
             f"decode_tasks_per_encoder must be >= 1, got {self.decode_tasks_per_encoder}"),
            (0 <= self.shard_retries <= 10, f"shard_retries must be in [0, 10], got {self.shard_retries}"),
            (0 <= self.max_failure_share <= 1, f"max_failure_share must be in [0, 1], got {self.max_failure_share}"),
            (self.progress_interval_s > 0, f"progress_interval_s must be > 0, got {self.progress_interval_s}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.lock_wait_s >= 0, f"lock_wait_s must be >= 0, got {self.lock_wait_s}"),
            (self.lock_lease_s >= 4, f"lock_lease_s must be >= 4, got {self.lock_lease_s}"),
            (self.max_shard_bytes is None or self.max_shard_bytes >= 1,
             f"max_shard_bytes must be >= 1 or null, got {self.max_shard_bytes}"),
            (self.part_seconds > 0, f"part_seconds must be > 0, got {self.part_seconds}"),
            (self.max_clip_seconds > 0, f"max_clip_seconds must be > 0, got {self.max_clip_seconds}"),
            (self.storage_retry_s >= 0, f"storage_retry_s must be >= 0, got {self.storage_retry_s}"),
            (self.encoder_wait_s > 0, f"encoder_wait_s must be > 0, got {self.encoder_wait_s}"),
            (self.stall_timeout_s > 0, f"stall_timeout_s must be > 0, got {self.stall_timeout_s}"),
        ]
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise ConfigError("; ".join(errors))
        return self


def _type_ok(value: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(hint) or hint)


def _type_name(hint: Any) -> str:
    """``int``, ``float or null``, ``dict``: a type hint as a config file's author reads it."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(typing.get_origin(hint) or hint, "__name__", str(hint))


def _check_keys(values: dict[str, Any], where: str) -> None:
    hints = typing.get_type_hints(RunConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}; known keys: {', '.join(hints)}")
    for key, value in values.items():
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{where}: {key} must be {_type_name(hints[key])}, got {value!r}")


def from_dict(values: dict[str, Any], where: str = "config") -> RunConfig:
    """A validated :class:`RunConfig` from plain values; unknown keys and wrong types raise :class:`ConfigError`."""
    _check_keys(values, where)
    return RunConfig(**values).validate()


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Settings from the YAML file ``path`` (optional), then ``overrides`` (the flags actually given; None = unset)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"cannot read config file {path}: not UTF-8 text (a YAML file is expected)") from exc
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(loaded).__name__}")
        values = loaded or {}
        _check_keys(values, str(path))
    values = {**values, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    return from_dict(values, where="flags")
