"""Model shipping: the checkpoint's bytes travel to every encoder through Ray's object store, so that a local
``--model`` path works on a multi-node cluster and every encoder loads exactly the same weights (same sha256)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mimi import load_mimi
from mimi.checkpoint import is_untrained, resolve_source


class RunError(RuntimeError):
    """An expected reason a run cannot start or go on (bad input, no GPU for ``device: cuda``, ...)."""


@dataclass(frozen=True)
class ModelFiles:
    """The checkpoint's bytes (and its config.json) with their provenance."""

    source: str
    revision: str | None
    sha256: str
    name: str
    weights: bytes
    config_json: bytes | None
    untrained: bool = False  # generated random weights (labelled in their safetensors metadata)

    def load(self, device: str, dtype: torch.dtype):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / self.name
            path.write_bytes(self.weights)
            if self.config_json is not None:
                (Path(folder) / "config.json").write_bytes(self.config_json)
            model = load_mimi(path, device=device, dtype=dtype)
        model.source, model.revision = self.source, self.revision
        return model

    def file_metadata(self) -> dict[str, str]:
        """Key-value metadata of every Parquet file (deterministic, so a redone shard is byte-identical)."""
        return {"model_source": self.source, "model_revision": self.revision or "", "model_sha256": self.sha256,
                "sample_rate": "24000", "frame_rate": "12.5", **({"model_untrained": "true"} if self.untrained else {})}

    def provenance(self) -> dict[str, object]:
        return {"source": self.source, "revision": self.revision, "sha256": self.sha256, "untrained": self.untrained}


def load_model_files(model: str, revision: str | None, num_codebooks: int) -> ModelFiles:
    """Resolve ``model`` (download from the Hub if needed), check it loads and has enough codebooks."""
    source = str(Path(model).resolve()) if Path(model).exists() else model
    path = resolve_source(source, revision)
    loaded = load_mimi(path)
    if num_codebooks > loaded.max_codebooks:
        raise RunError(f"num_codebooks is {num_codebooks} but {source} has only {loaded.max_codebooks} codebooks")
    config_json = path.parent / "config.json"
    return ModelFiles(source, revision, loaded.weights_sha256, path.name, path.read_bytes(),
                      config_json.read_bytes() if config_json.is_file() else None, is_untrained(path))
