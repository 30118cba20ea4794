"""``mimi-tokenize``: the command line. Each subcommand is one function registered with :func:`command`.

Exit codes: 0 success; 1 the run finished but left shards undone or too many failed clips, or storage stayed
unavailable past the retry window mid-run; 2 the command could not run (bad flags or config, output locked or
incompatible, unreadable input, model not loadable).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable

from mimi import CheckpointError
from pipeline import manifest, state
from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.records import return_freed_memory
from pipeline.retry import OutputUnwritable, StorageUnavailable
from pipeline.runner import RunError, run
from pipeline.lock import OutputLockedError

EXPECTED_ERRORS = (ConfigError, RunError, OutputLockedError, manifest.IncompatibleOutputError, CheckpointError)

_COMMANDS: dict[str, tuple[str, list[tuple[tuple, dict]], Callable[[argparse.Namespace], int]]] = {}


def arg(*names: str, **kwargs) -> tuple[tuple, dict]:
    """An argparse argument, for :func:`command`."""
    return names, kwargs


def command(name: str, help: str, *args: tuple[tuple, dict]):
    """Register the decorated ``fn(args) -> exit code`` as subcommand ``name`` with the arguments ``args``."""
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        _COMMANDS[name] = (help, list(args), fn)
        return fn
    return register


# Flags of `run` that override config keys (flag --foo-bar → key foo_bar); None when not given.
_RUN_FLAGS = [
    arg("--input", help="input URL: folder, glob, .tar/.parquet shards, or a .jsonl/.csv manifest"),
    arg("--output", help="output folder URL"),
    arg("--model", help="Hub repo id, local folder or .safetensors file (default kyutai/mimi)"),
    arg("--revision", help="Hub revision of --model"),
    arg("--num-codebooks", type=int, help="codebooks kept per frame, 1..32 (default 8)"),
    arg("--device", choices=("auto", "cpu", "cuda"), help="encoder device (default auto)"),
    arg("--num-encoders", type=int, help="encoder actors (default: one per GPU, or 1)"),
    arg("--batch-max-seconds", type=float, help="padded audio seconds per encode batch"),
    arg("--files-per-shard", type=int, help="audio files (or manifest rows) per output shard"),
    arg("--max-failure-share", type=float, help="exit 1 above this share of failed clips (default 0.01)"),
    arg("--ray-address", help="Ray cluster to join (default: start a local one)"),
    arg("--channel-policy", help="'mix' or 'channel:K'"),
    arg("--lock-wait-s", type=float, help="wait this long for another run's lock to be released or go stale"),
    arg("--prune", action="store_true", default=None,
        help="drop the rows of inputs that are gone from the listing (default: keep them)"),
    arg("--max-clip-seconds", type=float, help="a longer clip is a recorded failure (default 86400)"),
    arg("--part-seconds", type=float, help="decoded audio per part from a decode task to its encoder (default 300)"),
    arg("--decode-tasks-per-encoder", type=int, help="shards decoding at once per encoder (default: CPUs/encoders)"),
    arg("--storage-retry-s", type=float, help="retry storage operations through transient errors this long (300)"),
    arg("--vad", action="store_true", default=None,
        help="fill speech_share with Silero VAD (pip install 'mimi-tokenize[vad]'; default off: its CPU cost)"),
]


@command("run", "encode an audio corpus into a Parquet dataset of Mimi codes (resumes an unfinished output)",
         arg("--config", help="YAML config file (see configs/default.yaml); flags override it"), *_RUN_FLAGS)
def run_command(args: argparse.Namespace) -> int:
    keys = {f.name for f in dataclasses.fields(RunConfig)}
    return run(load_config(args.config, {k: v for k, v in vars(args).items() if k in keys}))


@command("plan", "show what `run` would do with the same flags, without doing it: shards new, changed, removed and "
         "kept; files, bytes, clips and hours to encode; stale files to retire; what --prune would drop. Reads "
         "storage only (no lock, nothing written)",
         arg("--config", help="YAML config file (see configs/default.yaml); flags override it"), *_RUN_FLAGS,
         arg("--json", action="store_true", help="print the plan as JSON"))
def plan_command(args: argparse.Namespace) -> int:
    from pipeline.preview import preview, summarize

    keys = {f.name for f in dataclasses.fields(RunConfig)}
    result = preview(load_config(args.config, {k: v for k, v in vars(args).items() if k in keys}))
    print(json.dumps(result, indent=2) if args.json else summarize(result))
    return 0


@command("status", "show the progress of an output (live while a run writes it)",
         arg("output", help="output folder URL"),
         arg("--config", help="YAML config file whose storage_options reach the output"),
         arg("--json", action="store_true", help="print the whole manifest.json"))
def status_command(args: argparse.Namespace) -> int:
    storage_options = load_config(args.config).output_options()
    try:
        current = state.read_output(args.output, storage_options)
    except state.NotWrittenYet as exc:  # a run started: what its identity, records and lock say
        print(json.dumps({"status": exc.status, "detail": str(exc)}) if args.json else f"status: {exc}")
        return 0
    if args.json:
        print(json.dumps(current, indent=2))
        return 0
    from pipeline.dedup import describe, read_summary

    summary = read_summary(args.output, storage_options)
    print(manifest.summarize(current) + (f"\n{describe(summary)}" if summary else ""))
    return 0


@command("report", "summarize an output: totals, failures, throughput, code usage per codebook level",
         arg("output", help="output folder URL"),
         arg("--html", metavar="FILE", help="also write a self-contained HTML page with plots to FILE"),
         arg("--config", help="YAML config file whose storage_options reach the output"))
def report_command(args: argparse.Namespace) -> int:
    from pipeline.report import report  # matplotlib is imported only here

    report(args.output, args.html, load_config(args.config).output_options())
    return 0


from pipeline.publish import PublishError  # noqa: E402 (with its subcommand)

EXPECTED_ERRORS += (PublishError,)


@command("publish", "upload a finished output to the Hugging Face Hub as a dataset repo (its shards packed into "
         "data/*/train-*.parquet files of about --target-file-mb, a shard mapping and a dataset card); rerun to "
         "resume an interrupted upload",
         arg("output", help="output folder URL of a finished run"),
         arg("--repo", required=True, metavar="ORG/NAME", help="Hub dataset repo id (created if missing)"),
         arg("--private", action="store_true", help="create the repo private"),
         arg("--dry-run", action="store_true", help="pack the dataset and list what would be uploaded; no upload"),
         arg("--target-file-mb", type=float, default=500, metavar="MB",
             help="size of the packed Parquet files, in MiB (default 500; a shard bigger than that is a file alone)"),
         arg("--force", action="store_true", help="publish despite an incomplete run or too many failed clips"),
         arg("--dedup", action="store_true", help="publish only the clips `mimi-tokenize dedup` keeps (one per "
             "duplicate group), with its repeated segments' table; the card says what was left out"),
         arg("--staging", metavar="DIR", help="local folder to pack into, kept (default: a temporary one); a dry "
             "run leaves the packed files there, an upload deletes each once uploaded"),
         arg("--license", default="unknown", help="license id for the card (default unknown)"),
         arg("--config", help="YAML config file whose storage_options reach the output"))
def publish_command(args: argparse.Namespace) -> int:
    from pipeline.publish import run_publish

    return run_publish(args.output, args.repo, private=args.private, dry_run=args.dry_run, force=args.force,
                       staging=args.staging, license=args.license,
                       storage_options=load_config(args.config).output_options(), target_file_mb=args.target_file_mb,
                       dedup=args.dedup)


from pipeline.export import ExportError  # noqa: E402 (with its subcommand)

EXPECTED_ERRORS += (ExportError,)


@command("export", "write a flat, memory-mappable copy of an output's codes for LM training stacks: DIR/codes.u16 "
         "(uint16 [frames, K]), DIR/offsets.npy (int64 [clips + 1]), DIR/ids.txt, DIR/meta.json; a rerun into a "
         "finished DIR does nothing, a non-empty DIR that is not this export is refused (unless --force)",
         arg("output", help="output folder URL of a finished run"),
         arg("dest", metavar="DIR", help="local folder to write"),
         arg("--num-codebooks", type=int, help="keep the first K codebooks (default: all the output has)"),
         arg("--where", metavar="EXPR", help="keep only the rows this filter over numeric columns selects, e.g. "
             "\"silence_share < 0.5 and bandwidth_hz > 6000\" (comparisons, and/or/not, parentheses, is [not] null)"),
         arg("--dedup", action="store_true", help="only the clips `mimi-tokenize dedup` keeps (one per duplicate "
             "group); needs a dedup of the output's current data"),
         arg("--force", action="store_true", help="export an incomplete output (the shards that are done), or into a "
             "non-empty DIR that holds something else (its export files are replaced)"),
         arg("--config", help="YAML config file whose storage_options reach the output"))
def export_command(args: argparse.Namespace) -> int:
    from pipeline.export import export

    meta = export(args.output, args.dest, num_codebooks_out=args.num_codebooks, force=args.force,
                  where_text=args.where, dedup=args.dedup, storage_options=load_config(args.config).output_options())
    print(f"{args.dest}: {meta['clips']:,} clips, {meta['frames']:,} frames x {meta['num_codebooks']} codebooks "
          f"({meta['hours']:.2f} h)")
    return 0


from pipeline.dedup import DedupError  # noqa: E402 (with its subcommand)

EXPECTED_ERRORS += (DedupError,)


@command("dedup", "find exact and near duplicates, clips contained in longer ones and repeated segments (jingles, "
         "ads) across an output, from its fingerprints; writes OUTPUT/_dedup/ (per clip its group, relation and "
         "whether it is kept; per repeated segment its frame ranges), which export --dedup and the loader honour. "
         "Resumes; a rerun on an unchanged output does nothing",
         arg("output", help="output folder URL"),
         arg("--partitions", type=int, default=16, help="hash partitions: the join's memory is about 1/N of the "
             "output's landmarks (default 16)"),
         arg("--config", help="YAML config file whose storage_options reach the output"))
def dedup_command(args: argparse.Namespace) -> int:
    from pipeline.dedup import dedup, describe

    print(describe(dedup(args.output, partitions=args.partitions,
                         storage_options=load_config(args.config).output_options())))
    return 0


@command("encode", "encode one audio file (any supported format, resampled to 24 kHz, encoded whole) into a .npz "
         "of Mimi codes: audio_codes int16 [1, K, F], sample_rate, num_codebooks, num_frames, num_samples, "
         "model_sha256",
         arg("in_audio", metavar="IN_AUDIO", help="audio file path or URL"),
         arg("out", metavar="OUT.npz", help="the .npz file to write"),
         arg("--model", default="kyutai/mimi", help="Hub repo id, local folder or .safetensors file "
             "(default kyutai/mimi)"),
         arg("--revision", help="Hub revision of --model"),
         arg("--num-codebooks", type=int, default=8, help="codebooks kept per frame (default 8)"),
         arg("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto"),
         arg("--channel-policy", default="mix", help="'mix' (default) or 'channel:K'"))
def encode_command(args: argparse.Namespace) -> int:
    from pipeline.tools import encode_file

    info = encode_file(args.in_audio, args.out, model=args.model, revision=args.revision,
                       num_codebooks=args.num_codebooks, device=args.device, channel_policy=args.channel_policy)
    print(f"wrote {args.out}: {info['num_frames']} frames x {info['num_codebooks']} codebooks "
          f"({info['num_samples'] / info['sample_rate']:.2f} s of audio)")
    return 0


@command("decode", "decode Mimi codes to a 24 kHz WAV. Two forms: `decode IN.npz OUT.wav` decodes a .npz written "
         "by `encode`; `decode OUTPUT --id CLIP_ID OUT.wav` decodes one clip of a token dataset (the output "
         "folder of a run). The first argument is read as a .npz file if it ends in .npz, else as an output folder",
         arg("source", metavar="IN.npz|OUTPUT", help="a .npz of codes, or an output folder URL (with --id)"),
         arg("out", metavar="OUT.wav", help="the WAV file to write (24 kHz mono, trimmed to the clip's length)"),
         arg("--id", dest="clip_id", metavar="CLIP_ID", help="the clip's id (the 'id' column) in OUTPUT"),
         arg("--model", help="weights to decode with (default: those recorded in the .npz or the output's manifest)"),
         arg("--revision", help="Hub revision of --model"),
         arg("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto"),
         arg("--force", action="store_true", help="decode even if the weights differ from the recorded ones"),
         arg("--pcm16", action="store_true", help="write 16-bit PCM (default: 32-bit float, exact)"),
         arg("--config", help="YAML config file whose storage_options reach OUTPUT"))
def decode_command(args: argparse.Namespace) -> int:
    from pipeline.tools import decode_clip, decode_npz

    options = dict(model=args.model, revision=args.revision, device=args.device, force=args.force,
                   subtype="PCM_16" if args.pcm16 else "FLOAT")
    if args.source.lower().endswith(".npz"):
        if args.clip_id is not None:
            raise ConfigError("--id selects a clip of an output folder; a .npz file holds one clip (drop --id)")
        info = decode_npz(args.source, args.out, **options)
    elif args.clip_id is None:
        raise ConfigError(f"{args.source} is not a .npz file; to decode a clip of an output folder, pass "
                          f"--id CLIP_ID (its 'id' column)")
    else:
        info = decode_clip(args.source, args.clip_id, args.out,
                           storage_options=load_config(args.config).output_options(), **options)
    print(f"wrote {args.out}: {info['num_samples'] / 24_000:.2f} s at 24 kHz from {info['num_frames']} frames x "
          f"{info['num_codebooks']} codebooks")
    return 0


@command("sample-corpus", "write a small synthetic speech-like corpus (24 clips, ~2 min; WAV/FLAC/MP3/OGG at "
         "16-48 kHz, mono and stereo) to try the pipeline on",
         arg("folder", help="folder to create (pass it to `run --input`)"),
         arg("--clips", type=int, default=24, help="number of clips (default 24)"),
         arg("--seed", type=int, default=0, help="random seed (default 0)"),
         arg("--manifest", action="store_true", help="put the audio under FOLDER/audio and write "
             "FOLDER/metadata.jsonl (speaker, text, ...); pass the .jsonl to --input"))
def sample_corpus_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.sample_corpus import describe, make_sample_corpus

    try:
        input_url = make_sample_corpus(args.folder, n_clips=args.clips, seed=args.seed, manifest=args.manifest)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    print(f"wrote {describe(args.folder)} to {args.folder}. Tokenize it with:\n"
          f"  mimi-tokenize run --input {input_url} --output {Path(args.folder).name}-tokens")
    return 0


@command("demo", "the whole pipeline offline in about a minute: sample corpus + UNTRAINED generated weights "
         "(tiny architecture) → a real run on local Ray → status and the next commands to try",
         arg("--output", default="demo-output", help="output folder (default ./demo-output)"),
         arg("--workdir", default="demo-work", help="folder for the corpus and the weights (default ./demo-work)"),
         arg("--clips", type=int, default=24, help="clips in the sample corpus (default 24)"))
def demo_command(args: argparse.Namespace) -> int:
    from pipeline.demo import demo

    return demo(args.output, args.workdir, n_clips=args.clips, available_commands=set(_COMMANDS))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimi-tokenize", description="Turn audio corpora on any fsspec storage into "
                                     "Parquet datasets of Mimi codes, on Ray. Exit codes: 0 ok, 1 run incomplete or "
                                     "too many failed clips, 2 could not run.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help, args, fn) in _COMMANDS.items():
        sub = subparsers.add_parser(name, help=help, description=help)
        for names, kwargs in args:
            sub.add_argument(*names, **kwargs)
        sub.set_defaults(fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return_freed_memory()  # a driver: short-lived columns over a million shards go back to the system at once
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except EXPECTED_ERRORS as exc:
        print(f"mimi-tokenize {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OutputUnwritable as exc:  # full, read-only or denied: the run stopped at once, keeping what it committed
        print(f"mimi-tokenize {args.command}: error: {exc}; what was committed is kept: make room (or make the "
              "output writable) and run the same command again", file=sys.stderr)
        return 1
    except StorageUnavailable as exc:  # an outage longer than storage_retry_s, mid-run: nothing is lost
        print(f"mimi-tokenize {args.command}: error: {exc}; run the same command again once the store is back",
              file=sys.stderr)
        return 1
    except OSError as exc:  # a path that cannot be used (missing, a file for a folder, no permission)
        print(f"mimi-tokenize {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mimi-tokenize {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
