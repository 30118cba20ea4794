"""Model shipping: the checkpoint's bytes travel to every encoder through Ray's object store, so that a local
``--model`` path works on a multi-node cluster and every encoder loads exactly the same weights (same sha256). The
driver holds only the file's path and hash: the bytes are read when the encoders start (:meth:`ModelFiles.shipped`)
and stay in the object store, not in the driver's memory, for the rest of the run."""

from __future__ import annotations

import dataclasses
import hashlib
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
    """The checkpoint (its local file, and its bytes once shipped) and its config.json, with their provenance."""

    source: str
    revision: str | None
    sha256: str
    name: str
    path: str  # the checked local file (the Hub cache's, or the user's)
    config_json: bytes | None
    untrained: bool = False  # generated random weights (labelled in their safetensors metadata)
    weights: bytes | None = None  # the file's bytes, in the copy shipped to the encoders only

    def shipped(self) -> ModelFiles:
        """This with the checkpoint's bytes, for ``ray.put``: read now, and refused if the file changed since it was
        checked (every encoder must load the weights the manifest names)."""
        weights = Path(self.path).read_bytes()
        if hashlib.sha256(weights).hexdigest() != self.sha256:
            raise RunError(f"the model file {self.path} changed during the run (its sha256 is no longer "
                           f"{self.sha256}); run again to use the new weights")
        return dataclasses.replace(self, weights=weights)

    def load(self, device: str, dtype: torch.dtype):
        if self.weights is None:
            raise ValueError("ModelFiles.load needs the shipped copy (ModelFiles.shipped())")
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
    return ModelFiles(source, revision, loaded.weights_sha256, path.name, str(path),
                      config_json.read_bytes() if config_json.is_file() else None, is_untrained(path))
