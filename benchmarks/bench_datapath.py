"""The data path around the encoder: what feeding a GPU costs, and what the pipeline adds.

    python benchmarks/bench_datapath.py decode   [--seconds 60]        # CPU per audio hour, per format and rate
    python benchmarks/bench_datapath.py signals  [--seconds 60]        # the per-clip signals' CPU beside decoding
    python benchmarks/bench_datapath.py latency  [--files 160]         # S3 reads with +0 / +50 ms per GET
    python benchmarks/bench_datapath.py overhead [--minutes 30]        # run CPU beyond decode + encode
    python benchmarks/bench_datapath.py longform [--hours 2]           # peak memory, 2 long clips vs 2 short
    python benchmarks/bench_datapath.py retries  [--ops 2000]          # the retry layer on a healthy store

Each prints a Markdown table for BENCHMARKS.md. ``latency`` and ``retries`` use the tests' moto S3 server and
fault-injecting proxy (tests/fault_proxy.py); ``overhead`` and ``longform`` run ``mimi-tokenize run`` in a fresh
process with the tiny random model, so that the data path, not the codec, dominates.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

from procmem import PeakMemory  # noqa: E402

FORMATS = {  # name → (soundfile format, subtype, rates)
    "WAV 16-bit": ("WAV", "PCM_16", (16_000, 24_000, 44_100, 48_000)),
    "FLAC": ("FLAC", "PCM_16", (16_000, 24_000, 44_100, 48_000)),
    "MP3": ("MP3", "MPEG_LAYER_III", (16_000, 24_000, 44_100, 48_000)),
    "Opus": ("OGG", "OPUS", (16_000, 24_000, 48_000)),
    "AAC (m4a)": ("m4a", None, (16_000, 24_000, 44_100, 48_000)),
}


def speechlike(seconds: float, rate: int, channels: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    pitch = 120 + 60 * np.sin(2 * np.pi * 0.3 * t)
    voiced = np.sin(2 * np.pi * np.cumsum(pitch) / rate) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) ** 2
    mono = 0.3 * voiced + 0.03 * rng.standard_normal(t.shape)
    return np.stack([mono, 0.8 * mono][:channels], axis=1).astype(np.float32)


def encoded(name: str, samples: np.ndarray, rate: int) -> bytes:
    container, subtype, _ = FORMATS[name]
    if container == "m4a":
        from audio_fixtures import FORMATS as FIXTURES, encode

        return encode(FIXTURES["m4a_aac"], samples, rate)
    out = io.BytesIO()
    sf.write(out, samples, rate, format=container, subtype=subtype)
    return out.getvalue()


def header(title: str) -> str:
    import torch

    machine = platform.processor() or platform.machine()
    return (f"**{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC** · {machine}, {os.cpu_count()} cores · torch {torch.__version__} · `python benchmarks/bench_datapath.py "
            f"{' '.join(sys.argv[1:])}`\n\n{title}\n")


# --- decode ------------------------------------------------------------------------------------------------------


def best_cpu_s(fn, repeat: int) -> float:
    """The least CPU time (this process) of ``repeat`` calls of ``fn``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def best_cpu_s_each(fns: dict, repeat: int) -> dict:
    """The least CPU time of each of ``fns`` over ``repeat`` rounds that call every one in turn: a load that comes and
    goes weighs on all of them alike, so their ratios hold on a shared machine."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - start)
    return best


def drain(reader_class, data: bytes) -> list[np.ndarray]:
    """Every decoded block of ``data`` read by ``reader_class`` (a pipeline.decode reader)."""
    reader = reader_class(io.BytesIO(data))
    try:
        return list(reader.blocks())
    finally:
        reader.close()


def bench_decode(args: argparse.Namespace) -> None:
    """CPU seconds per audio hour to decode (soundfile, PyAV) and to mix + resample to 24 kHz (soxr HQ)."""
    from pipeline.decode import _PyAVReader, _SoundfileReader
    from pipeline.resample import MonoResampler

    def cpu(fn) -> float:
        return best_cpu_s(fn, args.repeat)

    rows = []
    for name, (_, _, rates) in FORMATS.items():
        for rate in rates:
            data = encoded(name, speechlike(args.seconds, rate), rate)
            per_hour = 3600 / args.seconds
            try:
                blocks = drain(_SoundfileReader, data)
                t_sf = cpu(lambda: drain(_SoundfileReader, data)) * per_hour
            except Exception:
                blocks, t_sf = drain(_PyAVReader, data), None
            t_av = cpu(lambda: drain(_PyAVReader, data)) * per_hour

            def resample() -> None:
                r = MonoResampler(rate, 2)
                [r.push(b) for b in blocks]
                r.flush()

            t_rs = cpu(resample) * per_hour
            best = min(t for t in (t_sf, t_av) if t is not None) + t_rs
            rows.append((name, rate, t_sf, t_av, t_rs, 3600 / best))
    print(header(f"Decode + mix + resample to 24 kHz mono, stereo input, {args.seconds:g} s clips held in memory, "
                 f"one thread, best of {args.repeat}; CPU seconds per audio hour (lower is better)"))
    print("| format | rate | soundfile | PyAV | soxr HQ (mix + resample) | x-realtime per core (best decoder + soxr) "
          "| cores per GPU at 5,000x | at 20,000x |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rate, t_sf, t_av, t_rs, speed in rows:
        sf_text = f"{t_sf:.1f}" if t_sf is not None else "—"
        print(f"| {name} | {rate / 1000:g} kHz | {sf_text} | {t_av:.1f} | {t_rs:.1f} | {speed:.0f} | "
              f"{5000 / speed:.1f} | {20000 / speed:.1f} |")


# --- signals -----------------------------------------------------------------------------------------------------


def bench_signals(args: argparse.Namespace) -> None:
    """CPU seconds per audio hour of the per-clip signals (pipeline/signals.py), next to decode + resample of the
    same audio, per source rate (stereo): the default signals (the fingerprint included), their parts, Silero VAD,
    and a time-domain K-weighting filter (scipy sosfilt) for comparison."""
    import scipy.signal
    import xxhash

    from pipeline.decode import _PyAVReader, _SoundfileReader
    from pipeline.fingerprint import Fingerprinter
    from pipeline.resample import MonoResampler
    from pipeline.signals import ClipSignals

    rows = []
    for rate in (16_000, 24_000, 44_100, 48_000):
        samples = speechlike(args.seconds, rate)
        readers = {"WAV 16-bit": _SoundfileReader, "FLAC": _SoundfileReader, "MP3": _SoundfileReader,
                   "AAC (m4a)": _PyAVReader}  # the decode table's better decoder of each
        decoded = {name: encoded(name, samples, rate) for name in readers}
        blocks = drain(_SoundfileReader, decoded["FLAC"])
        resampler = MonoResampler(rate, 2)
        mono = [m for m in [*(resampler.push(b) for b in blocks), resampler.flush()] if len(m)]

        def resample() -> None:
            r = MonoResampler(rate, 2)
            [r.push(b) for b in blocks]
            r.flush()

        def signals(vad: bool = False, original: bool = True) -> None:
            s = ClipSignals(vad)
            for b in blocks if original else ():
                s.original(b)
            for m in mono:
                s.mono(m)
            s.finish()

        def hashed() -> None:
            h = xxhash.xxh3_128()
            for m in mono:
                h.update(np.ascontiguousarray(m, "<f4"))
            h.digest()

        def fingerprinted() -> None:
            fp = Fingerprinter()
            for m in mono:
                fp.feed(m)
            fp.finish()

        shelf = np.concatenate(scipy.signal.iirfilter(2, 1500 / 12_000, btype="highpass", output="sos"))
        fns = {"resample": resample, "all": signals, "mono": lambda: signals(original=False), "hash": hashed,
               "fp": fingerprinted, "iir": lambda: [scipy.signal.sosfilt(np.stack([shelf, shelf]), m) for m in mono],
               **{name: lambda r=readers[name], d=data: drain(r, d) for name, data in decoded.items()}}
        if rate == 24_000:
            fns["vad"] = lambda: signals(vad=True)
        t = {k: v * 3600 / args.seconds for k, v in best_cpu_s_each(fns, args.repeat).items()}
        base = {name: t[name] + t["resample"] for name in decoded}
        rows.append((rate, t["all"], t["hash"], t["fp"], t["mono"] - t["hash"] - t["fp"], t["all"] - t["mono"],
                     t["iir"], t["vad"] - t["all"] if "vad" in t else None, base))
    print(header(f"Per-clip signals: stereo speech-like audio ({args.seconds:g} s, FLAC decoded once), one thread, "
                 f"best of {args.repeat} rounds timing every part in turn; CPU seconds per audio hour"))
    print("| source rate | signals (default, all) | pcm_hash | fingerprint | 24 kHz frames (FFT: loudness, silence, "
          "bandwidth) | peak + clipping (source samples) | share of decode + resample: WAV / FLAC / MP3 / AAC | "
          "time-domain K-weighting (sosfilt, for comparison) |")
    print("|---|---|---|---|---|---|---|---|")
    for rate, t_all, t_hash, t_fp, t_frames, t_orig, t_iir, t_vad, base in rows:
        shares = " / ".join(f"{100 * t_all / base[name]:.0f} % (of {base[name]:.1f})" for name in base)
        print(f"| {rate / 1000:g} kHz | {t_all:.2f} | {t_hash:.2f} | {t_fp:.2f} | {t_frames:.2f} | {t_orig:.2f} | "
              f"{shares} | {t_iir:.2f} |")
    vad = next(r[7] for r in rows if r[7] is not None)
    print(f"\nSilero VAD (`--vad`, speech_share), on top: {vad:.1f} CPU s per audio hour ({vad / 60:.1f} min).")


# --- S3 helpers (the tests' moto server and fault proxy) ------------------------------------------------------------


class S3:
    def __init__(self):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a log line per request slows the server down
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.options = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": self.endpoint}}
        import s3fs

        s3fs.S3FileSystem(**self.options).mkdir("bench")

    def proxied(self, **faults):
        from fault_proxy import FaultProxy

        proxy = FaultProxy(self.endpoint, **faults).start(faults=True)
        return proxy, {**self.options, "client_kwargs": {"endpoint_url": proxy.url}}


def bench_latency(args: argparse.Namespace) -> None:
    """A shard of small FLAC files decoded from S3 through a proxy adding 0 or 50 ms to every GET."""
    import fsspec

    from pipeline.prepare import iter_parts
    from pipeline.sources import discover_shards

    s3 = S3()
    fs = fsspec.filesystem("s3", **s3.options)
    for i in range(args.files):
        fs.pipe_file(f"bench/latency/{i:04d}.flac", encoded("FLAC", speechlike(args.clip_seconds, 16_000, 1, i),
                                                            16_000))
    print(header(f"{args.files} FLAC files of {args.clip_seconds:g} s (16 kHz mono) on S3 (moto), one shard, "
                 "decoded by one task (`pipeline.prepare.iter_parts`: reads run ahead on a thread pool)"))
    print("| added latency per GET | wall s | audio x-realtime | vs no latency |")
    print("|---|---|---|---|")
    base = None
    for latency in (0.0, 0.05):
        proxy, options = s3.proxied(latency_s=latency)
        (shard,) = discover_shards("s3://bench/latency", files_per_shard=100_000, storage_options=options)
        start = time.perf_counter()
        samples = sum(p.samples for p in iter_parts(shard, storage_options=options))
        wall = time.perf_counter() - start
        proxy.stop()
        base = base or wall
        print(f"| {latency * 1000:.0f} ms | {wall:.2f} | {samples / 24_000 / wall:.0f} | {base / wall:.2f} |")


def bench_retries(args: argparse.Namespace) -> None:
    """The cost of the retry layer when nothing fails: the same reads and writes with and without it."""
    import fsspec

    from pipeline import retry

    s3 = S3()
    fs = fsspec.filesystem("s3", **s3.options)
    payload = os.urandom(4096)
    fs.pipe_file("bench/r/x", payload)
    timings = {}
    for label, call in (("direct", lambda f, *a: f(*a)), ("through retry.call", lambda f, *a: retry.call(f, *a,
                                                                                                        what="op"))):
        start = time.perf_counter()
        for i in range(args.ops):
            call(fs.cat_file, "bench/r/x")
            call(fs.pipe_file, f"bench/r/{i % 10}", payload)
        timings[label] = (time.perf_counter() - start) / (2 * args.ops)
    start = time.perf_counter()
    for _ in range(100_000):
        retry.call(len, payload, what="op")
    wrapper = (time.perf_counter() - start) / 100_000
    print(header(f"{args.ops} reads and {args.ops} writes of 4 kB on S3 (moto on loopback), no faults"))
    print("| path | per operation |\n|---|---|")
    for label, seconds in timings.items():
        print(f"| {label} | {seconds * 1000:.2f} ms |")
    print(f"| the wrapper alone (`retry.call(len, ...)`) | {wrapper * 1e6:.2f} µs |")


# --- whole runs ------------------------------------------------------------------------------------------------


def run_cli(corpus: Path, out: Path, model: str, *flags: str) -> dict:
    """`mimi-tokenize run` in a fresh process: exit code, wall, peak summed PSS and CPU seconds of its tree."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--input", str(corpus), "--output",
                             str(out), "--model", model, "--device", "cpu", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    sampler = PeakMemory(proc.pid)
    start = time.perf_counter()
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    sampler.stop()
    if proc.returncode:
        sys.exit(err.decode()[-3000:])
    totals = json.loads((out / "manifest.json").read_text())["totals"]
    return {"wall": wall, "peak": sampler.peak, "cpu": sampler.cpu_seconds(), "hours": totals["hours"],
            "clips": totals["clips"]}


def tiny_model(work: Path) -> str:
    import mimi

    path = work / "tiny.safetensors"
    if not path.exists():
        mimi.write_random_checkpoint(path, mimi.MimiConfig.tiny())
    return str(path)


def bench_overhead(args: argparse.Namespace) -> None:
    """Run CPU beyond decode + encode, for two corpus sizes: a fixed cost (Ray, workers, the model) and a cost per
    audio hour (object store, scheduling, Parquet, commits)."""
    import torch

    import mimi
    from pipeline.encode import ShardEncoding
    from pipeline.prepare import iter_parts
    from pipeline.sources import discover_shards

    work = Path(args.workdir)
    model_path = tiny_model(work)
    torch.set_num_threads(os.cpu_count() or 1)  # as the run's single CPU encoder
    model = mimi.load_mimi(model_path)
    rows = []
    for minutes in (args.minutes, 3 * args.minutes):
        corpus = work / f"overhead-{minutes:g}min"
        if not corpus.exists():
            corpus.mkdir(parents=True)
            for i in range(round(minutes * 60 / 20)):
                sf.write(corpus / f"{i:04d}.flac", speechlike(20, 44_100, 2, i), 44_100, subtype="PCM_16")
        decode_cpu = encode_cpu = 0.0
        for shard in discover_shards(str(corpus), files_per_shard=16):
            encoding = ShardEncoding(model, num_codebooks=8, batch_max_seconds=120)
            parts = iter(iter_parts(shard))
            while True:
                start = time.process_time()
                part = next(parts, None)
                decode_cpu += time.process_time() - start
                if part is None:
                    break
                start = time.process_time()
                encoding.add(part)
                encode_cpu += time.process_time() - start
        result = run_cli(corpus, work / f"overhead-out-{minutes:g}", model_path, "--files-per-shard", "16")
        rows.append((result["hours"], decode_cpu, encode_cpu, result))
    print(header("44.1 kHz stereo FLAC (20 s clips), tiny random model, one CPU encoder; CPU seconds"))
    print("| audio | decode + resample (1 process) | encode (1 process) | whole run (all processes) | run beyond "
          "decode + encode | run wall | run x-realtime |")
    print("|---|---|---|---|---|---|---|")
    for hours, decode_cpu, encode_cpu, result in rows:
        print(f"| {hours * 60:.0f} min | {decode_cpu:.1f} | {encode_cpu:.1f} | {result['cpu']:.1f} | "
              f"{result['cpu'] - decode_cpu - encode_cpu:.1f} | {result['wall']:.1f} s | "
              f"{hours * 3600 / result['wall']:.1f} |")
    (h1, d1, e1, r1), (h2, d2, e2, r2) = rows
    marginal = ((r2["cpu"] - d2 - e2) - (r1["cpu"] - d1 - e1)) / (h2 - h1)
    fixed = (r1["cpu"] - d1 - e1) - marginal * h1
    print(f"\nPipeline overhead: about {fixed:.0f} CPU s per run (fixed: Ray, workers, loading the model) plus "
          f"{marginal:.0f} CPU s per audio hour (object store, scheduling, Parquet, commits), against "
          f"{(d2 + e2) / h2:.0f} CPU s per audio hour of decode + encode with this small model.")


def bench_longform(args: argparse.Namespace) -> None:
    """Peak memory of a run on two long clips (Opus 48 kHz stereo 32 kbps; MP3 44.1 kHz stereo 64 kbps) against the
    same run on two 1-minute clips."""
    work = Path(args.workdir)
    model_path = tiny_model(work)
    rows = []
    for label, seconds in (("2 × 1 min", 60.0), (f"2 × {args.hours:g} h", args.hours * 3600)):
        corpus = work / f"longform-{seconds:g}s"
        if not corpus.exists():
            corpus.mkdir(parents=True)
            for name, rate, fmt, subtype, kbps in (("a.opus", 48_000, "OGG", "OPUS", 32), ("b.mp3", 44_100, "MP3",
                                                                                        "MPEG_LAYER_III", 64)):
                with sf.SoundFile(corpus / name, "w", rate, 2, format=fmt, subtype=subtype,
                                  compression_level=_compression(kbps)) as f:
                    for start in range(0, round(seconds), 60):
                        f.write(speechlike(min(60, seconds - start), rate, 2, start))
        result = run_cli(corpus, work / f"longform-out-{seconds:g}", model_path)
        rows.append((label, result, sum(p.stat().st_size for p in corpus.iterdir())))
    print(header("Peak memory of a whole run (driver, Ray, workers, object store: summed PSS), tiny random model, "
                 "CPU encoder, default part_seconds (300)"))
    print("| clips | input size | audio | peak PSS | over 2 × 1 min | wall | x-realtime |")
    print("|---|---|---|---|---|---|---|")
    base = rows[0][1]["peak"]
    for label, result, size in rows:
        print(f"| {label} | {size / 2**20:.1f} MiB | {result['hours']:.2f} h | {result['peak'] / 2**20:.0f} MiB | "
              f"{(result['peak'] - base) / 2**20:+.0f} MiB | {result['wall']:.0f} s | "
              f"{result['hours'] * 3600 / result['wall']:.1f} |")


def _compression(kbps: int) -> float:
    """libsndfile's compression level (0 best quality .. 1 smallest) for about ``kbps`` at these rates."""
    return {32: 0.8, 64: 0.6}[kbps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("decode", "signals", "latency", "overhead", "longform", "retries"))
    parser.add_argument("--seconds", type=float, default=60.0, help="decode: clip length")
    parser.add_argument("--repeat", type=int, default=3, help="decode: best of")
    parser.add_argument("--files", type=int, default=160, help="latency: files in the shard")
    parser.add_argument("--clip-seconds", type=float, default=5.0, help="latency: seconds per file")
    parser.add_argument("--minutes", type=float, default=30.0, help="overhead: minutes of audio")
    parser.add_argument("--hours", type=float, default=2.0, help="longform: hours per long clip")
    parser.add_argument("--ops", type=int, default=2000, help="retries: operations of each kind")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mimi-bench-datapath"))
    args = parser.parse_args()
    {"decode": bench_decode, "signals": bench_signals, "latency": bench_latency, "overhead": bench_overhead,
     "longform": bench_longform, "retries": bench_retries}[args.what](args)


if __name__ == "__main__":
    main()
