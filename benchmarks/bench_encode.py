"""Encode benchmark: our Mimi against moshi and transformers.MimiModel, same random weights, same inputs.

Every (implementation, case) measurement runs in a fresh child process (this script with ``--worker``), so peak
memory is that measurement's alone: on CPU the peak RSS above the level after loading the model and the input
(VmHWM, reset through /proc/self/clear_refs), on CUDA ``torch.cuda.max_memory_allocated`` above the allocation
after loading. Timing: ``--warmup`` untimed calls, then ``--repeats`` timed calls (CUDA synchronised around each),
median reported. Exact mode is float32 with TF32 off for every implementation; ``--fast`` adds ``ours_fast``
(``--fast-dtype`` weights, TF32 on; float16 by default, which agrees with exact mode far better than bfloat16).
Code agreement is the fraction of equal codes over the frames both sides own (ceil(len / 1920) per clip) and over complete frames only (the partial last frame differs
from transformers by design: it pads per layer, moshi and we pad the waveform).

    PYTHONPATH=. python benchmarks/bench_encode.py                          # default cases for the device
    PYTHONPATH=. python benchmarks/bench_encode.py --cases b1_10s --repeats 1 --scale 0.2   # smoke test
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import mimi  # noqa: E402
from mimi.checkpoint import MOSHI_FILENAME  # noqa: E402

SAMPLE_RATE = 24_000
FRAME_SIZE = 1920
PEERS = ("moshi", "transformers")
REFERENCE_X_REALTIME = 10.0  # the guide: both peers run ~10x realtime on the 2-core dev CPU, fp32, 8 codebooks

Encoder = Callable[[torch.Tensor, list[int] | None], torch.Tensor]


@dataclass(frozen=True)
class Case:
    name: str
    seconds: tuple[float, ...]  # one duration per batch item
    cuda_only: bool = False
    ours_only: bool = False  # the peers' one-call attention mask alone would be T² (an hour: 90,000² steps)

    def num_samples(self, scale: float) -> list[int]:
        return [max(1, round(s * scale * SAMPLE_RATE)) for s in self.seconds]


CASES = {c.name: c for c in [
    Case("b1_10s", (10.0,)),
    Case("b8_10s", (10.0,) * 8),
    Case("1x5min", (300.0,)),
    Case("b32_10s", (10.0,) * 32, cuda_only=True),
    Case("b64_10s", (10.0,) * 64, cuda_only=True),
    Case("b128_10s", (10.0,) * 128, cuda_only=True),
    Case("mixed32", tuple(3.7 + 0.9 * i for i in range(32)), cuda_only=True),  # 3.7 s … 31.6 s, partial frames
    Case("1x10min", (600.0,), cuda_only=True),
    Case("1x1h", (3600.0,), cuda_only=True, ours_only=True),
]}


# --- inputs, weights, implementations --------------------------------------------------------------------

def make_audio(num_samples: list[int], seed: int) -> torch.Tensor:
    """Right-zero-padded batch [B, 1, max(n)]: 0.1·N(0, 1) noise plus a 0.3-amplitude chirp sweeping up every 10 s."""
    gen = torch.Generator().manual_seed(seed)
    wav = torch.zeros(len(num_samples), 1, max(num_samples))
    for i, n in enumerate(num_samples):
        t = torch.arange(n, dtype=torch.float64) / SAMPLE_RATE
        freq = 80.0 * (1 + i % 7) + 3000.0 * torch.remainder(t, 10.0) / 10.0
        chirp = 0.3 * torch.sin(2 * math.pi * torch.cumsum(freq, 0) / SAMPLE_RATE)
        wav[i, 0, :n] = (chirp + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)).float()
    return wav


def prepare_weights(folder: Path, seed: int) -> None:
    """Released-size random weights, written once in both layouts (reused when already there)."""
    moshi_file, hf_folder = folder / MOSHI_FILENAME, folder / "transformers"
    if moshi_file.is_file() and (hf_folder / "model.safetensors").is_file():
        print(f"reusing weights in {folder}", file=sys.stderr)
        return
    print(f"writing random released-size weights (seed {seed}) to {folder}", file=sys.stderr)
    state = mimi.random_state_dict(mimi.MimiConfig(), seed)
    mimi.save_checkpoint(state, moshi_file, "moshi")
    mimi.save_checkpoint(state, hf_folder, "transformers")


def load_ours(weights: Path, device: str, num_codebooks: int, dtype: torch.dtype = torch.float32,
              chunk_frames: int = 150) -> Encoder:
    model = mimi.load_mimi(weights / MOSHI_FILENAME, device=device, dtype=dtype)
    return lambda wav, lengths: model.encode(wav, lengths, num_codebooks, chunk_frames=chunk_frames)


def load_moshi(weights: Path, device: str, num_codebooks: int) -> Encoder:
    from moshi.models import loaders

    model = loaders.get_mimi(str(weights / MOSHI_FILENAME), device=device)
    model.set_num_codebooks(num_codebooks)

    def encode(wav: torch.Tensor, lengths: list[int] | None) -> torch.Tensor:
        with torch.no_grad():
            return model.encode(wav)
    return encode


def load_transformers(weights: Path, device: str, num_codebooks: int) -> Encoder:
    from transformers import MimiModel

    model = MimiModel.from_pretrained(str(weights / "transformers"), dtype=torch.float32).to(device).eval()

    def encode(wav: torch.Tensor, lengths: list[int] | None) -> torch.Tensor:
        with torch.no_grad():
            return model.encode(wav, num_quantizers=num_codebooks).audio_codes
    return encode


LOADERS: dict[str, Callable[[Path, str, int], Encoder]] = {
    "ours": load_ours, "moshi": load_moshi, "transformers": load_transformers}


# --- one measurement (runs in a child process) -----------------------------------------------------------

def _proc_status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M).group(1))


class PeakMemory:
    """Peak memory (MiB) above the level at construction: the CUDA allocator's, or the process's RSS."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = _proc_status_kb("VmRSS") * 1024

    def peak_mib(self) -> float:
        peak = torch.cuda.max_memory_allocated() if self.cuda else _proc_status_kb("VmHWM") * 1024
        return (peak - self.base) / 2**20


def time_calls(fn: Callable[[], torch.Tensor], repeats: int, warmup: int,
               sync: Callable[[], None]) -> tuple[list[float], torch.Tensor]:
    """Wall seconds of ``repeats`` calls after ``warmup`` untimed ones, and the last call's result."""
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return times, out


def run_worker(spec: dict) -> dict:
    """Load one implementation, time it on one case, save its codes; returns the measurement."""
    device, impl, case = spec["device"], spec["impl"], CASES[spec["case"]]
    if device.startswith("cuda"):
        tf32 = impl == "ours_fast"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    loader = LOADERS[impl.removesuffix("_fast")]
    if impl.startswith("ours"):
        loader = partial(loader, chunk_frames=spec["chunk_frames"],
                         dtype=getattr(torch, spec["fast_dtype"]) if impl == "ours_fast" else torch.float32)
    try:
        encode = loader(Path(spec["weights"]), device, spec["num_codebooks"])
    except ImportError as exc:
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    num_samples = case.num_samples(spec["scale"])
    wav = make_audio(num_samples, spec["seed"]).to(device)
    lengths = num_samples if len(set(num_samples)) > 1 else None
    memory = PeakMemory(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times, codes = time_calls(lambda: encode(wav, lengths), spec["repeats"], spec["warmup"], sync)
    torch.save(codes.cpu(), spec["codes_out"])
    return {"times_s": times, "peak_mib": memory.peak_mib(), "threads": torch.get_num_threads()}


def measure(impl: str, case: Case, args: argparse.Namespace, weights: Path, scratch: Path) -> dict:
    """Run one measurement in a child process; errors come back as ``{"error": ...}``."""
    codes_out, result_out = scratch / f"{case.name}.{impl}.pt", scratch / f"{case.name}.{impl}.json"
    spec = {"impl": impl, "case": case.name, "device": args.device, "num_codebooks": args.num_codebooks,
            "repeats": args.repeats, "warmup": args.warmup, "scale": args.scale, "seed": args.seed,
            "fast_dtype": args.fast_dtype, "chunk_frames": args.chunk_frames, "weights": str(weights),
            "codes_out": str(codes_out),
            "result_out": str(result_out)}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0 or not result_out.is_file():
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}"}
    result = json.loads(result_out.read_text())
    if "times_s" in result:
        result["codes"] = torch.load(codes_out)
    return result


# --- analysis and reports --------------------------------------------------------------------------------

def agreement(ours: torch.Tensor, other: torch.Tensor, num_samples: list[int]) -> dict:
    """Fraction of equal codes over the frames each clip owns, overall and per level, and over complete frames."""
    frames = torch.arange(ours.shape[-1])
    n = torch.tensor(num_samples)
    owned = frames[None, :] < ((n + FRAME_SIZE - 1) // FRAME_SIZE)[:, None]
    complete = frames[None, :] < (n // FRAME_SIZE)[:, None]
    equal = ours == other

    def fraction(mask: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        weights = mask[:, None, :].expand_as(equal)
        return (equal & weights).sum(dims) / weights.sum(dims).clamp(min=1)

    return {"owned": fraction(owned, (0, 1, 2)).item(), "complete": fraction(complete, (0, 1, 2)).item()
            if complete.any() else None, "owned_per_level": fraction(owned, (0, 2)).tolist()}


def summarise(records: list[dict]) -> None:
    """Add x-realtime, ours ÷ peer speed and code agreement with ours (ours_fast: with exact ours) in place."""
    by_case: dict[str, dict[str, dict]] = {}
    for r in records:
        by_case.setdefault(r["case"], {})[r["impl"]] = r
        if "times_s" in r:
            r["median_s"] = statistics.median(r["times_s"])
            r["x_realtime"] = r["audio_s"] / r["median_s"]
    for impls in by_case.values():
        ours = impls.get("ours", {})
        for impl, r in impls.items():
            if impl == "ours" or "codes" not in r or "codes" not in ours:
                continue
            r["agreement_with_ours"] = agreement(ours["codes"], r["codes"], r["num_samples"])
            if impl in PEERS:
                r["ours_speedup"] = r["median_s"] / ours["median_s"]
    for r in records:
        r.pop("codes", None)


def _fmt(value: float | None, spec: str, factor: float = 1.0) -> str:
    return "—" if value is None else format(factor * value, spec)


def table_rows(records: list[dict]) -> list[list[str]]:
    header = ["case", "impl", "audio s", "median s", "x realtime", "peak MiB over load", "ours ÷ impl speed",
              "codes = ours (owned)", "codes = ours (complete frames)"]
    rows = [header]
    for r in records:
        status = r.get("skipped") or r.get("error")
        if status:
            rows.append([r["case"], r["impl"], f"{r['audio_s']:.1f}", status[:60]] + [""] * 5)
            continue
        agree = r.get("agreement_with_ours", {})
        rows.append([r["case"], r["impl"], f"{r['audio_s']:.1f}", f"{r['median_s']:.3f}", f"{r['x_realtime']:.1f}",
                     f"{r['peak_mib']:.0f}", _fmt(r.get("ours_speedup"), ".2f"),
                     _fmt(agree.get("owned"), ".2f", 100), _fmt(agree.get("complete"), ".2f", 100)])
    return rows


def per_level_lines(records: list[dict]) -> list[str]:
    return [f"{r['case']} {r['impl']} vs ours, agreement per level (%): "
            + " ".join(f"{100 * x:.1f}" for x in r["agreement_with_ours"]["owned_per_level"])
            for r in records if r["impl"] == "ours_fast" and "agreement_with_ours" in r]


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def render_markdown(rows: list[list[str]], meta: dict) -> str:
    lines = [f"**{meta['date']}** · {meta['machine']} · torch {meta['torch']} ({meta['threads']} threads) · "
             f"moshi {meta['moshi']} · transformers {meta['transformers']} · device {meta['device']} · "
             f"{meta['num_codebooks']} codebooks · median of {meta['repeats']} after {meta['warmup']} warm-up",
             "", f"`{meta['command']}`", ""]
    lines += ["| " + " | ".join(row) + " |" for row in rows[:1]]
    lines += ["|" + "|".join("---" for _ in rows[0]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def machine_meta(args: argparse.Namespace) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    machine = f"{cpu.group(1) if cpu else platform.processor()}, {os.cpu_count()} cores"
    if args.device.startswith("cuda"):
        machine += f", {torch.cuda.get_device_name(args.device)}"

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "moshi": version("moshi"),
            "transformers": version("transformers"), "device": args.device, "num_codebooks": args.num_codebooks,
            "repeats": args.repeats, "warmup": args.warmup, "scale": args.scale, "fast_dtype": args.fast_dtype,
            "chunk_frames": args.chunk_frames,
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}


def check_reference(records: list[dict], args: argparse.Namespace) -> bool:
    """The guide's reference: each peer ~10x realtime on the 2-core dev CPU (fp32, 8 codebooks), ±``--tolerance``×."""
    if args.device != "cpu" or args.num_codebooks != 8:
        print("check: the reference is for CPU with 8 codebooks; nothing checked")
        return True
    low, high = REFERENCE_X_REALTIME / args.tolerance, REFERENCE_X_REALTIME * args.tolerance
    ok = True
    for r in records:
        if r["impl"] in PEERS and "x_realtime" in r:
            inside = low <= r["x_realtime"] <= high
            ok &= inside
            print(f"check: {r['impl']} {r['case']}: {r['x_realtime']:.1f}x realtime, reference "
                  f"~{REFERENCE_X_REALTIME:g}x (band {low:g}–{high:g}x): {'ok' if inside else 'OUTSIDE'}")
    return ok


# --- command line ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", help=f"comma-separated, from {', '.join(CASES)} (default: every case the device "
                                   "runs; b1_10s with --check)")
    p.add_argument("--impls", default="ours,moshi,transformers", help="comma-separated: ours, moshi, transformers")
    p.add_argument("--fast", action="store_true", help="also time ours_fast (--fast-dtype weights, TF32 on)")
    p.add_argument("--fast-dtype", choices=["bfloat16", "float16", "float32"], default="float16",
                   help="ours_fast weights (float32: TF32 alone, CUDA)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--num-codebooks", type=int, default=8)
    p.add_argument("--chunk-frames", type=int, default=150, help="ours: frames per encode chunk (150 = 12 s)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every clip duration (e.g. 0.1 for smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the input audio")
    p.add_argument("--weights-dir", type=Path, help="keep (or reuse) the random weights here; default: a temp dir")
    p.add_argument("--json", type=Path, help="write every measurement and the machine description here")
    p.add_argument("--markdown", action="store_true", help="print a Markdown block for BENCHMARKS.md")
    p.add_argument("--check", action="store_true", help="check the peers against the ~10x-realtime CPU reference")
    p.add_argument("--tolerance", type=float, default=2.0, help="--check band: reference ÷/× this factor")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available() and not args.worker:
        p.error("--device cuda: CUDA is not available")
    unknown = [c for c in (args.cases or "").split(",") if c and c not in CASES]
    unknown += [i for i in args.impls.split(",") if i not in LOADERS]
    if unknown:
        p.error(f"unknown case or implementation: {unknown}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        Path(spec["result_out"]).write_text(json.dumps(run_worker(spec)))
        return 0
    if args.cases:
        cases = [CASES[c] for c in args.cases.split(",")]
    elif args.check:
        cases = [CASES["b1_10s"]]
    else:
        cases = [c for c in CASES.values() if args.device == "cuda" or not c.cuda_only]
    impls = args.impls.split(",") + (["ours_fast"] if args.fast else [])
    records, unavailable = [], {}
    with (nullcontext(args.weights_dir) if args.weights_dir else tempfile.TemporaryDirectory()) as weights, \
            tempfile.TemporaryDirectory() as scratch:
        weights = Path(weights)
        weights.mkdir(parents=True, exist_ok=True)
        prepare_weights(weights, args.seed)
        for case in cases:
            num_samples = case.num_samples(args.scale)
            for impl in [i for i in impls if i.startswith("ours") or not case.ours_only]:
                result = unavailable.get(impl) or measure(impl, case, args, weights, Path(scratch))
                if "skipped" in result:
                    unavailable[impl] = result
                record = {"case": case.name, "impl": impl, "batch": len(num_samples), "num_samples": num_samples,
                          "audio_s": sum(num_samples) / SAMPLE_RATE, **result}
                records.append(record)
                brief = {k: v for k, v in record.items() if k not in ("codes", "num_samples")}
                print(f"{case.name} {impl}: {brief}", file=sys.stderr)
    summarise(records)
    meta = machine_meta(args)
    rows = table_rows(records)
    print(render_markdown(rows, meta) if args.markdown else render_text(rows))
    levels = per_level_lines(records)
    if levels:
        print("\n" + "\n".join(("- " if args.markdown else "") + line for line in levels))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": records}, indent=1))
    return 0 if not args.check or check_reference(records, args) else 1


if __name__ == "__main__":
    sys.exit(main())
