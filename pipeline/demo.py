"""``mimi-tokenize demo``: the whole pipeline offline, in about a minute on a laptop.

1. makes the sample corpus (:mod:`pipeline.sample_corpus`, manifest variant: its speaker/text columns pass
   through) in ``WORKDIR/corpus``;
2. writes generated Mimi weights in ``WORKDIR/weights``: random, calibrated, **untrained**, in the small
   ``MimiConfig.tiny()`` architecture (the released size, 80M parameters, would take several minutes on 2
   CPU cores for the same corpus and still be untrained). The file is labelled untrained in its safetensors
   metadata, so the run records ``model.untrained = true`` (with a note) in ``manifest.json`` and
   ``model_untrained`` in every Parquet file, and labels its log lines;
3. runs the real pipeline (:func:`pipeline.runner.run`: local Ray, decode tasks, an encoder actor, Parquet shards,
   manifest) into ``OUTPUT``;
4. prints the output's status and the commands to try next.

Rerunning it reuses the corpus and weights in ``WORKDIR`` and resumes (or finds finished) the same output.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from mimi import MimiConfig, is_untrained, write_random_checkpoint
from pipeline import manifest
from pipeline.config import RunConfig
from pipeline.runner import run
from pipeline.sample_corpus import MARKER, make_sample_corpus

WEIGHTS_NAME = "mimi-untrained-tiny.safetensors"
FILES_PER_SHARD = 8


def prepare_corpus(workdir: Path, n_clips: int, seed: int = 0) -> Path:
    """The sample corpus (manifest variant) in ``workdir/corpus``, reused if already there; its manifest path."""
    folder = workdir / "corpus"
    marker = folder / MARKER
    wanted = {"n_clips": n_clips, "seed": seed, "manifest": True}
    if marker.is_file() and json.loads(marker.read_text()) == wanted and (folder / "metadata.jsonl").is_file():
        return folder / "metadata.jsonl"
    return make_sample_corpus(folder, n_clips=n_clips, seed=seed, manifest=True)


def prepare_weights(workdir: Path, seed: int = 0) -> Path:
    """Generated tiny Mimi weights labelled untrained, in ``workdir/weights``, reused if already there."""
    path = workdir / "weights" / WEIGHTS_NAME
    if not (path.is_file() and is_untrained(path)):
        write_random_checkpoint(path, MimiConfig.tiny(), seed=seed)  # labelled untrained in its metadata
    return path


def next_commands(output: str, clip_id: str, available: set[str] | None = None) -> list[str]:
    """Commands to try on the demo output (only those the CLI has, when ``available`` is given)."""
    out, name = shlex.quote(output), clip_id.rsplit("/", 1)[-1]
    commands = {
        "status": f"mimi-tokenize status {out}",
        "decode": f"mimi-tokenize decode {out} --id {shlex.quote(clip_id)} {shlex.quote(name + '.wav')}",
        "report": f"mimi-tokenize report {out} --html {shlex.quote(str(Path(output) / 'report.html'))}",
        "publish": f"mimi-tokenize publish {out} --repo YOUR_NAME/mimi-demo --dry-run",
    }
    return [c for name, c in commands.items() if available is None or name in available]


def demo(output: str = "demo-output", workdir: str = "demo-work", *, n_clips: int = 24, seed: int = 0,
         available_commands: set[str] | None = None, print_fn=print) -> int:
    """Run the demo (see the module docstring); returns the run's exit code."""
    work = Path(workdir)
    input_url = prepare_corpus(work, n_clips, seed)
    weights = prepare_weights(work, seed)
    print_fn(f"demo: sample corpus of {n_clips} clips in {input_url.parent}; UNTRAINED generated weights "
             f"(MimiConfig.tiny) in {weights}")
    cfg = RunConfig(input=str(input_url), output=output, model=str(weights), num_codebooks=8,
                    files_per_shard=FILES_PER_SHARD, device="cpu", progress_interval_s=5.0)
    code = run(cfg)
    current = manifest.read_manifest(str(Path(output).resolve()))
    first_id = json.loads(input_url.read_text().splitlines()[0])["id"]
    lines = ["", manifest.summarize(current), "",
             "These codes come from UNTRAINED generated weights: they show how the pipeline works, nothing more.",
             "Next, try:"]
    lines += [f"  {c}" for c in next_commands(output, first_id, available_commands)]
    lines += ["Tokenize your own audio with the real weights (downloaded from the Hugging Face Hub):",
              "  mimi-tokenize run --input YOUR_AUDIO_FOLDER --output tokens"]
    print_fn("\n".join(lines))
    return code
