"""``mimi-tokenize``: the command line. Each subcommand is one function registered with :func:`command`.

Exit codes: 0 success; 1 the run finished but left shards undone or too many failed clips; 2 the command could not
run (bad flags or config, output locked or incompatible, unreadable input, model not loadable).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable

from mimi import CheckpointError
from pipeline import manifest
from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.runner import RunError, run
from pipeline.storage import OutputLockedError

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
]


@command("run", "encode an audio corpus into a Parquet dataset of Mimi codes (resumes an unfinished output)",
         arg("--config", help="YAML config file (see configs/default.yaml); flags override it"), *_RUN_FLAGS)
def run_command(args: argparse.Namespace) -> int:
    keys = {f.name for f in dataclasses.fields(RunConfig)}
    return run(load_config(args.config, {k: v for k, v in vars(args).items() if k in keys}))


@command("status", "show the progress of an output (live while a run writes it)",
         arg("output", help="output folder URL"),
         arg("--config", help="YAML config file whose storage_options reach the output"),
         arg("--json", action="store_true", help="print the whole manifest.json"))
def status_command(args: argparse.Namespace) -> int:
    storage_options = load_config(args.config).storage_options
    try:
        current = manifest.read_manifest(args.output, storage_options)
    except FileNotFoundError as exc:
        raise ConfigError(f"{manifest.redact(args.output)} has no manifest.json (no run has written there)") from exc
    print(json.dumps(current, indent=2) if args.json else manifest.summarize(current))
    return 0


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except EXPECTED_ERRORS as exc:
        print(f"mimi-tokenize {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mimi-tokenize {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
