"""Scale benchmark: what the driver pays, in time, storage requests and memory, as the shard count grows.

Outputs are fabricated through the project's own code, without encoding: a JSONL manifest input of N rows with
``files_per_shard=1`` (N shards; the audio files need not exist, the plan never reads them), one tiny Parquet file
written by :func:`pipeline.writer.write_shard` and hard-linked as every shard's data file, and one record per shard by
:func:`pipeline.manifest.write_record` (fsync off while fabricating: setup, not measured). Each measurement runs in
a fresh process, so its peak RSS is its own.

Measurements (``--measure``, several allowed):

* ``plan``: what ``runner.run`` does before encoding — listing the input, ``manifest.load_records(check_order=True)``,
  ``plan.make_plan`` — on a finished output: without a checkpoint (every record read, as before checkpoints), after
  a fold (``manifest.fold_records``), the end of a run (records, final manifest and index: ``finish_once``), and
  after 1 % of the inputs changed. Requests are counted on local disk:
  file reads (``open``) and folder listings, during ``load_records`` and ``make_plan``.

    python benchmarks/bench_scale.py --sizes 10000 100000 --markdown

* ``cli``: ``mimi-tokenize run`` itself, on a finished output (fabricated as for ``plan``, folded, its manifest
  complete, its run identity that of the command's config, full-size random weights): a rerun with nothing to do, in
  its own process. Wall time, CPU time and peak RSS of the whole command.

    python benchmarks/bench_scale.py --measure cli --sizes 10000 100000 1000000 --markdown

* ``s3run``: a real ``runner.run`` of ``2 n`` one-second WAV files (``files_per_shard=2``: at most 2 per shard; the
  shard count reported is what the sharding makes of them), input and output on a moto S3 server on loopback,
  through the counting proxy of ``tests/fault_proxy.py``, the tiny random-weight model on CPU, a local Ray instance
  of 2 CPUs, progress every second, a fold every 10 records; then the same run again (a no-op). Every request
  the proxy forwards is classified by method and key (:func:`classify`).
* ``s3plan``: a finished output of ``n`` shards fabricated on local disk (as for ``plan``) and uploaded to the S3
  server, a fold, then the no-op plan through the counting proxy: requests by class, wall time, peak RSS.

    python benchmarks/bench_scale.py --measure s3run --sizes 15 45 --markdown
    python benchmarks/bench_scale.py --measure s3plan --sizes 10000 --markdown
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pipeline import storage  # noqa: E402

FILES_PER_SHARD = 1


def fabricate(workdir: Path, n: int) -> tuple[str, str]:
    """A JSONL input of ``n`` rows and a finished output of its ``n`` shards; returns (input, output)."""
    import numpy as np

    from pipeline import manifest
    from pipeline.sources import discover_shards
    from pipeline.types import ClipInfo, EncodedClip
    from pipeline.writer import write_shard

    folder = workdir / f"n{n}"
    inp, out = folder / "in" / "clips.jsonl", folder / "out"
    if (folder / "done").exists():
        return str(inp), str(out)
    shutil.rmtree(folder, ignore_errors=True)
    inp.parent.mkdir(parents=True)
    inp.write_text("".join(json.dumps({"id": f"c{i:07d}", "audio": f"audio/c{i:07d}.wav", "speaker": i % 97}) + "\n"
                           for i in range(n)))
    storage._fsync_path = lambda path: None  # setup only
    shards = discover_shards(str(inp), files_per_shard=FILES_PER_SHARD)
    clip = EncodedClip(ClipInfo(0, "c", "file:///c.wav", 16_000, 1), np.ones((8, 125), np.int64), 125 * 1920)
    template = str(folder / "template.parquet")
    result = write_shard(template, [clip], num_codebooks=8, file_metadata={})
    (out / "data").mkdir(parents=True)
    now = time.time()

    links = 50_000  # under ext4's 65,000 links per inode
    for k in range(1, (len(shards) - 1) // links + 1):
        shutil.copyfile(template, f"{template}.{k}")

    def commit(indexed: tuple[int, Any]) -> None:
        i, shard = indexed
        source = template if i < links else f"{template}.{i // links}"
        os.link(source, out / "data" / f"{shard.shard_id}.parquet")  # 10^6 files in minutes, one inode per 50,000
        manifest.write_record(str(out), shard, result, [], started=now - 10, finished=now, attempt=1,
                              writer=("bench", 1))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # file system calls release the GIL
        for _ in pool.map(commit, enumerate(shards)):
            pass
    (folder / "done").touch()
    return str(inp), str(out)


def change_inputs(inp: str, share: float) -> int:
    """Give ``share`` of the manifest's rows a new metadata value (their shards' digests change); returns how many."""
    lines = Path(inp).read_text().splitlines()
    step = max(1, round(1 / share))
    for i in range(0, len(lines), step):
        row = json.loads(lines[i])
        row["speaker"] = -1
        lines[i] = json.dumps(row)
    Path(inp).write_text("\n".join(lines) + "\n")
    return len(range(0, len(lines), step))


def _count_requests() -> dict[str, int]:
    """Count file reads and folder listings on local disk from now on."""
    from fsspec.implementations.local import LocalFileSystem

    counts = {"reads": 0, "listings": 0}

    def wrap(owner: Any, name: str, kind: str) -> None:
        original = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[kind] += 1
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    wrap(LocalFileSystem, "_open", "reads")  # every read (cat_file opens too)
    wrap(LocalFileSystem, "ls", "listings")
    wrap(storage, "_scan_local", "listings")
    return counts


def plan_once(inp: str, out: str, options_json: str = "{}") -> dict[str, Any]:
    """In this process: list, load the records, plan (``options_json``: the output's storage options); times,
    requests and peak RSS."""
    from pipeline import manifest
    from pipeline.commit import Output
    from pipeline.plan import make_plan
    from pipeline.sources import discover_shards

    from pipeline.records import return_freed_memory

    return_freed_memory()  # as the command line does
    options = json.loads(options_json)
    t0 = time.perf_counter()
    shards = discover_shards(inp, files_per_shard=FILES_PER_SHARD)
    t1 = time.perf_counter()
    counts = _count_requests()
    records, files = manifest.load_records(out, options, check_order=True)
    t2 = time.perf_counter()
    plan = make_plan(shards, records, files, prune=False, read_ids=Output(out, 8, {}, options).read_ids)
    t3 = time.perf_counter()
    return {"shards": len(shards), "pending": len(plan.pending), "done": len(plan.done), "retire": len(plan.retire),
            "listing_s": t1 - t0, "load_records_s": t2 - t1, "make_plan_s": t3 - t2, "plan_s": t3 - t0, **counts,
            "cpu_s": _cpu_s(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def finish_once(inp: str, out: str) -> dict[str, Any]:
    """In this process: the plan, then what ``runner.run`` does once the work is done: the records as storage holds
    them (``manifest.load_done``), their distinct metadata schemas, the final manifest and its index (written)."""
    from pipeline import manifest
    from pipeline import schema as output_schema
    from pipeline.commit import Output
    from pipeline.plan import make_plan
    from pipeline.records import return_freed_memory
    from pipeline.sources import discover_shards

    return_freed_memory()
    records, files = manifest.load_records(out, check_order=True)
    plan = make_plan(discover_shards(inp, files_per_shard=FILES_PER_SHARD), records, files, prune=False,
                     read_ids=Output(out, 8, {}, {}).read_ids)
    del records, files
    plan.release_done()  # as runner._work does once its first manifest is built
    cpu0, rss0, t0 = _cpu_s(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter()
    done = manifest.load_done(out, check_order=True)
    texts = done.column("schema").cast("string").unique().drop_null().to_pylist()
    [output_schema.from_json(json.loads(text)) for text in texts]
    run = {"schema_version": 1, "num_codebooks": 8, "model": {}, "config": {}, "created": "fabricated"}
    final = manifest.build_manifest(out, run, plan.shards, done, started=time.time() - 60, finished=time.time(),
                                    changes=plan.changes, change=plan.change, removed=plan.removed)
    written = manifest.write_manifest(out, final)
    return {"finish_s": time.perf_counter() - t0, "finish_cpu_s": _cpu_s() - cpu0, "plan_peak_rss_mb": rss0,
            "shards_done": written["totals"]["shards_done"], "index_mb": written["index"]["bytes"] / 2**20,
            "manifest_kb": len(json.dumps(written)) / 1024, "cpu_s": _cpu_s(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fold_once(out: str) -> dict[str, Any]:
    from pipeline import manifest
    from pipeline.records import return_freed_memory

    return_freed_memory()  # as the command line does
    t0 = time.perf_counter()
    seq = manifest.fold_records(out)
    return {"fold_s": time.perf_counter() - t0, "checkpoint": seq, "cpu_s": _cpu_s(),
            "checkpoint_mb": sum(f.stat().st_size for f in Path(out, "_state/checkpoints").glob("*.parquet")) / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(what: str, *args: str) -> dict[str, Any]:
    """Run ``what`` in a fresh process (its own peak RSS)."""
    code = f"import json, sys; sys.path.insert(0, {str(REPO_ROOT / 'benchmarks')!r}); import bench_scale; " \
           f"print(json.dumps(bench_scale.{what}(*sys.argv[1:])))"
    done = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_plan(workdir: Path, n: int) -> list[dict[str, Any]]:
    """No-op plan without and with a checkpoint, the fold, and a plan after 1 % of the inputs changed."""
    inp, out = fabricate(workdir, n)
    checkpoints = Path(out, "_state/checkpoints")
    shutil.rmtree(checkpoints, ignore_errors=True)
    rows = [{"case": "no-op, no checkpoint (before)", **_child("plan_once", inp, out)}]
    rows.append({"case": "fold (first checkpoint)", **_child("fold_once", out)})
    rows.append({"case": "no-op, checkpoint", **_child("plan_once", inp, out)})
    rows.append({"case": "end of a run (records, final manifest, index)", **_child("finish_once", inp, out)})
    changed = change_inputs(inp, 0.01)
    rows.append({"case": f"1% changed ({changed} inputs), checkpoint", **_child("plan_once", inp, out)})
    shutil.rmtree(Path(workdir, f"n{n}"))  # the manifest changed: fabricate afresh next time
    return [{"n": n, **row} for row in rows]


BUCKET = "bench"
OUTPUT_CLASSES = {"data/": "data", "_state/shards/": "records", "_state/checkpoints/": "checkpoints",
                  "_state/lock.json": "lock", "manifest.json": "manifest+index", "_index/": "manifest+index"}


def classify(method: str, path: str) -> tuple[str, str]:
    """(where, class) of a request to the S3 server: where is ``out`` or ``in`` (or ``-``), the class one of
    :data:`OUTPUT_CLASSES`' values, ``input``, ``listing`` (a GET on the bucket with list parameters) or ``other``."""
    from urllib.parse import parse_qs, unquote, urlsplit

    parts = urlsplit(path)
    key = unquote(parts.path).lstrip("/").removeprefix(BUCKET).lstrip("/")
    query = parse_qs(parts.query)
    if not key and method == "GET" and ("list-type" in query or "prefix" in query):
        key, kind = query.get("prefix", [""])[0], "listing"
    else:
        kind = None
    where, _, rest = key.partition("/")
    if where not in ("in", "out"):
        return "-", kind or "other"
    if kind or where == "in":
        return where, kind or "input"
    return where, next((name for prefix, name in OUTPUT_CLASSES.items() if rest.startswith(prefix)), "other")


class Counting:
    """A moto S3 server on loopback with one bucket, and the fault proxy (faults off) in front of it, counting every
    forwarded request by (where, class, method); ``storage_options`` reach the server through the proxy."""

    def __init__(self) -> None:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from collections import Counter

        import s3fs
        from fault_proxy import FaultProxy
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            os.environ[name] = "testing"
        os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        self.direct = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
        s3fs.S3FileSystem(**self.direct).mkdir(BUCKET)
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self.proxy = FaultProxy(endpoint, on_request=self._count).start(faults=False)
        self.storage_options = {**self.direct, "client_kwargs": {"endpoint_url": self.proxy.url}}

    def _count(self, method: str, path: str, status: int) -> None:
        where, kind = classify(method, path)
        self.counts[where, kind, method] += 1

    def take(self) -> dict[str, int]:
        """The counts since the last take, as ``"where class METHOD": n``; resets them."""
        taken = {" ".join(key): n for key, n in sorted(self.counts.items())}
        self.counts.clear()
        return taken

    def stop(self) -> None:
        self.proxy.stop()
        self.server.stop()


def s3run_once(n: str) -> dict[str, Any]:
    """In this process: a run of ``2 n`` files on the S3 server, then the same run again; requests by class."""
    import tempfile

    import fsspec
    import ray

    import mimi
    from pipeline import runner
    from pipeline.config import RunConfig

    shards, s3 = int(n), Counting()
    from audio_fixtures import write_audio  # tests/ is on the path now (Counting)

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(2 * shards):
            write_audio(Path(tmp, "in", f"u{i:05d}.wav"), "wav_pcm16", 16_000, 1.0, seed=i)
        fsspec.filesystem("s3", **s3.direct).put(f"{tmp}/in/", f"s3://{BUCKET}/in/", recursive=True)
        model = str(mimi.write_random_checkpoint(Path(tmp, "tiny.safetensors"), mimi.MimiConfig.tiny()))
        cfg = RunConfig(input=f"s3://{BUCKET}/in", output=f"s3://{BUCKET}/out", model=model, files_per_shard=2,
                        storage_options=s3.storage_options, device="cpu", num_encoders=1,
                        decode_tasks_per_encoder=1, progress_interval_s=1.0, checkpoint_every=10)
        ray.init(num_cpus=2, include_dashboard=False)
        try:
            runs = []
            for case in ("first run", "no-op rerun"):
                t0 = time.perf_counter()
                code = runner.run(cfg)
                runs.append({"case": case, "exit": code, "wall_s": time.perf_counter() - t0, "requests": s3.take()})
            made = len(fsspec.filesystem("s3", **s3.direct).ls(f"{BUCKET}/out/data"))
        finally:
            ray.shutdown()
            s3.stop()
    return {"runs": [{"shards": made, **run} for run in runs]}


def measure_s3run(workdir: Path, n: int) -> list[dict[str, Any]]:
    """A real run of ``2 n`` files on the S3 server and its no-op rerun, in a fresh process."""
    return [{"n": n, **run} for run in _child("s3run_once", str(n))["runs"]]


def s3plan_once(inp: str, out: str) -> dict[str, Any]:
    """In this process: upload the fabricated output ``out`` to a fresh S3 server and fold; then a no-op plan in a
    fresh process (its own peak RSS) through the counting proxy."""
    import fsspec

    from pipeline import manifest

    s3 = Counting()
    try:
        t0 = time.perf_counter()
        fsspec.filesystem("s3", **s3.direct).put(f"{out}/", f"s3://{BUCKET}/out/", recursive=True)
        upload_s = time.perf_counter() - t0
        url = f"s3://{BUCKET}/out"
        t0 = time.perf_counter()
        manifest.fold_records(url, s3.storage_options)
        fold = {"fold_s": time.perf_counter() - t0, "fold_requests": s3.take()}
        result = _child("plan_once", inp, url, json.dumps(s3.storage_options))
        return {"upload_s": upload_s, **fold, **result, "requests": s3.take()}
    finally:
        s3.stop()


def measure_s3plan(workdir: Path, n: int) -> list[dict[str, Any]]:
    """A no-op plan of ``n`` finished shards on the S3 server, after a fold, in a fresh process."""
    inp, out = fabricate(workdir, n)
    shutil.rmtree(Path(out, "_state/checkpoints"), ignore_errors=True)
    return [{"n": n, "case": "S3 no-op, checkpoint", **_child("s3plan_once", inp, out)}]


def identity_once(config: str) -> dict[str, Any]:
    """Give the fabricated output the run identity of ``config`` (``_state/run.json``, as its first run stores it)."""
    from pipeline import manifest
    from pipeline.config import load_config
    from pipeline.model_files import load_model_files

    cfg = load_config(config)
    files = load_model_files(cfg.model, cfg.revision, cfg.num_codebooks)
    storage.write_json(storage.join(cfg.output, manifest.RUN_PATH),
                       manifest.make_run(cfg.to_dict(), files.provenance(), cfg.num_codebooks))
    return {"model_sha256": files.sha256}


def random_model_once(path: str) -> dict[str, Any]:
    """Full-size random weights in the official layout (the driver checks and hashes them as it would Mimi's)."""
    import mimi

    mimi.write_random_checkpoint(path)
    return {"model_mb": Path(path).stat().st_size / 2**20}


def measure_cli(workdir: Path, n: int) -> list[dict[str, Any]]:
    """``mimi-tokenize run`` on a finished output of ``n`` shards, nothing to do: the whole command in its own
    process, as a user runs it (imports, the model's check, the listing, the plan, the manifest read), with full-size
    random weights. Wall time, CPU time and peak RSS of that process (``os.wait4``)."""
    inp, out = fabricate(workdir, n)
    model = workdir / "mimi-random.safetensors"
    if not model.exists():
        _child("random_model_once", str(model))
    _child("fold_once", out)
    _child("finish_once", inp, out)  # the manifest of a complete output
    config = Path(workdir, f"n{n}", "run.yaml")
    config.write_text(json.dumps({"input": inp, "output": out, "model": str(model), "files_per_shard": FILES_PER_SHARD,
                                  "device": "cpu"}))  # JSON is YAML
    _child("identity_once", str(config))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ,
                                                                                    "PYTHONPATH": str(REPO_ROOT)})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    log_tail = proc.stderr.read().decode(errors="replace")[-2000:]
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the no-op run failed:\n{log_tail}")
    return [{"n": n, "case": "mimi-tokenize run, nothing to do (the whole command)", "cli_s": wall,
             "cli_cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}]


MEASUREMENTS = {"plan": measure_plan, "cli": measure_cli, "s3run": measure_s3run, "s3plan": measure_s3plan}


def fit(rows: list[dict[str, Any]], case: str, key: str, at: int = 10**6) -> float | None:
    """Linear fit ``a + b n`` of ``key`` over the sizes measured for ``case``, evaluated at ``at``."""
    points = [(r["n"], r[key]) for r in rows if r["case"].startswith(case) and key in r]
    if len(points) < 2:
        return None
    (n0, y0), (n1, y1) = points[0], points[-1]
    slope = (y1 - y0) / (n1 - n0)
    return y0 + slope * (at - n0)


S3_COLUMNS = ["data", "records", "checkpoints", "lock", "manifest+index", "listing", "other"]


def by_class(requests: dict[str, int], where: str) -> dict[str, dict[str, int]]:
    """``{class: {method: n}}`` of the requests on ``where`` (``out`` or ``in``)."""
    table: dict[str, dict[str, int]] = {}
    for key, n in requests.items():
        at, kind, method = key.split()
        if at == where:
            table.setdefault(kind, {})[method] = n
    return table


def s3_markdown(rows: list[dict[str, Any]]) -> str:
    """The ``s3run`` / ``s3plan`` rows: requests on the output by class (methods in the cell), per run."""
    lines = ["| shards | case | wall s | " + " | ".join(S3_COLUMNS) + " | output total | per shard | input |",
             "|---:|---|---:|" + "---|" * len(S3_COLUMNS) + "---:|---:|---:|"]
    for r in rows:
        out, shards = by_class(r["requests"], "out"), r.get("shards", r["n"])
        cells = [", ".join(f"{n} {m}" for m, n in sorted(out.get(kind, {}).items())) for kind in S3_COLUMNS]
        total = sum(sum(methods.values()) for methods in out.values())
        inputs = sum(sum(methods.values()) for methods in by_class(r["requests"], "in").values())
        lines.append(f"| {shards:,} | {r['case']} | {r.get('wall_s', r.get('plan_s', 0)):.1f} | "
                     + " | ".join(cells) + f" | {total:,} | {total / shards:.2f} | {inputs:,} |")
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]]) -> str:
    s3 = [r for r in rows if "requests" in r]
    rows = [r for r in rows if "requests" not in r]
    if not rows:
        return s3_markdown(s3)
    lines = ["| shards | case | listing s | load_records s | make_plan s | reads | listings | peak RSS MB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "cli_s" in r:
            lines.append(f"| {r['n']:,} | {r['case']}: {r['cli_s']:.1f} s, {r['cli_cpu_s']:.1f} CPU s | | | | | | "
                         f"{r['peak_rss_mb']:.0f} |")
        elif "finish_s" in r:
            lines.append(f"| {r['n']:,} | {r['case']}: {r['finish_s']:.1f} s, {r['finish_cpu_s']:.1f} CPU s, index "
                         f"{r['index_mb']:.1f} MB, manifest {r['manifest_kb']:.1f} KB | | | | | | "
                         f"{r['peak_rss_mb']:.0f} |")
        elif "plan_s" in r:
            lines.append(f"| {r['n']:,} | {r['case']} | {r['listing_s']:.1f} | {r['load_records_s']:.2f} | "
                         f"{r['make_plan_s']:.2f} | {r['reads']:,} | {r['listings']:,} | {r['peak_rss_mb']:.0f} |")
        else:
            lines.append(f"| {r['n']:,} | {r['case']}: {r['fold_s']:.1f} s, {r['checkpoint_mb']:.1f} MB | | | | | | "
                         f"{r['peak_rss_mb']:.0f} |")
    lines.append("")
    for case in ("no-op, no checkpoint", "no-op, checkpoint"):
        values = {key: fit(rows, case, key) for key in ("plan_s", "load_records_s", "reads", "peak_rss_mb")}
        if values["plan_s"] is not None:
            lines.append(f"fitted at 10^6 shards, {case}: plan {values['plan_s']:.0f} s (load_records "
                         f"{values['load_records_s']:.0f} s), {values['reads']:,.0f} reads, peak RSS "
                         f"{values['peak_rss_mb']:,.0f} MB")
    return "\n".join(lines + ([""] + [s3_markdown(s3)] if s3 else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--measure", nargs="+", choices=sorted(MEASUREMENTS), default=sorted(MEASUREMENTS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-scale"))
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args(argv)
    rows = []
    for what in args.measure:
        for n in args.sizes:
            rows += MEASUREMENTS[what](args.workdir, n)
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.markdown:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
