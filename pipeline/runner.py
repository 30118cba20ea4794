"""Ray orchestration of ``mimi-tokenize run``: shards → CPU decode tasks → GPU (or CPU) encoder actors → Parquet.

The driver holds the output lock, checks ``_state/run.json``, discovers the shards and skips those with a done
record. For each remaining shard a ``decode:{shard}`` task (one CPU) reads, decodes and resamples its clips; the
decoded shard goes to one of the ``ShardEncoder`` actors (one per GPU), which batches and encodes it, writes
``data/{shard}.parquet`` and then the shard's done record. At most ``max_shards_in_flight`` shards are between
decode and commit, so memory stays bounded, and each encoder has up to two shards queued, so it never waits for
decoding or for the driver.

Faults, all with bounded retries:

* a decode task that raises or whose worker dies (segfault, OOM kill) is retried ``shard_retries`` times by Ray;
  then the shard is redone clip by clip, one ``prepare_clip:{clip}`` task per clip, so a clip that keeps killing
  its worker is recorded as ``ClipFailure(stage="crash")`` and the rest of the shard is still written;
* an encoder actor that dies is replaced by a new one; the shard it was working on is retried (``shard_retries``
  times at most); shards merely queued behind it are resubmitted without being charged an attempt;
* a shard that exhausts its retries is left without a done record: the run ends "incomplete" (exit code 1) and a
  later run retries it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError, RayError

from mimi import load_mimi
from mimi.checkpoint import resolve_source
from pipeline import manifest
from pipeline.config import RunConfig
from pipeline.encode import encode_clips
from pipeline.prepare import prepare_clip, prepare_shard
from pipeline.sources import discover_shards, iter_clips
from pipeline.storage import RunLock, join
from pipeline.tools import is_untrained
from pipeline.types import Clip, ClipFailure, Shard
from pipeline.writer import write_shard

log = logging.getLogger(__name__)

ENCODER_QUEUE_DEPTH = 2  # shards submitted to one encoder at a time: one encoding, one waiting
LOCK_REFRESH_S = 30.0  # RunLock heartbeat period (its stale_after_s is 120 s)
# settings that change which clips a shard holds, or their codes
SETTINGS_FIXED_ON_RESUME = ("input", "files_per_shard", "max_shard_bytes", "channel_policy", "dtype")


class RunError(RuntimeError):
    """An expected reason a run cannot start or go on (bad input, no GPU for ``device: cuda``, ...)."""


# --- model -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFiles:
    """The checkpoint's bytes (and its config.json), shipped to every encoder through the object store, so that a
    local ``--model`` path works on a multi-node cluster and every encoder loads exactly the same weights."""

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


def load_model_files(cfg: RunConfig) -> ModelFiles:
    """Resolve ``cfg.model`` (download from the Hub if needed), check it loads and has enough codebooks."""
    source = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
    path = resolve_source(source, cfg.revision)
    model = load_mimi(path)
    if cfg.num_codebooks > model.max_codebooks:
        raise RunError(f"num_codebooks is {cfg.num_codebooks} but {source} has only {model.max_codebooks} codebooks")
    config_json = path.parent / "config.json"
    return ModelFiles(source, cfg.revision, model.weights_sha256, path.name, path.read_bytes(),
                      config_json.read_bytes() if config_json.is_file() else None, is_untrained(path))


def file_metadata(model_files: ModelFiles, shard: Shard) -> dict[str, str]:
    """Key-value metadata of a shard's Parquet file; deterministic, so a redone shard is byte-identical."""
    return {"shard_id": shard.shard_id, "model_source": model_files.source,
            "model_revision": model_files.revision or "", "model_sha256": model_files.sha256,
            "sample_rate": "24000", "frame_rate": "12.5",
            **({"model_untrained": "true"} if model_files.untrained else {})}


# --- Ray tasks and actors ------------------------------------------------------------------------------------------


@ray.remote(num_returns=2)
def _decode_shard(shard: Shard, channel_policy: str, storage_options: dict) -> tuple[dict, tuple]:
    """(a small summary for the driver, the decoded shard for an encoder)."""
    clips, failures = prepare_shard(shard, channel_policy=channel_policy, storage_options=storage_options)
    return {"clips": len(clips), "failed": len(failures)}, (clips, failures)


@ray.remote
def _read_shard(shard: Shard, storage_options: dict) -> list:
    return list(iter_clips(shard, storage_options=storage_options))


@ray.remote
def _prepare_clip(src, channel_policy: str) -> Clip | ClipFailure:
    return prepare_clip(src, channel_policy=channel_policy)


@ray.remote(max_restarts=0, max_task_retries=0)
class ShardEncoder:
    """Holds one Mimi; encodes decoded shards and commits them (Parquet file, then done record)."""

    def __init__(self, cfg: RunConfig, model_files: ModelFiles):
        self.cfg, self.model_files = cfg, model_files
        self.device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
        if cfg.device == "cuda" and self.device != "cuda":
            raise RunError("device is 'cuda' but CUDA is not available to the encoder")
        if self.device == "cpu":
            # Ray pins a 1-CPU actor to one thread; a CPU encoder may use the node's cores, sharing them with the
            # decode tasks (the thread count does not change the codes: tests/test_mimi_model.py).
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // (cfg.num_encoders or 1)))
        self.model = model_files.load(self.device, getattr(torch, cfg.dtype))

    def info(self) -> dict[str, Any]:
        return {"device": self.device, "gpu_ids": [str(i) for i in ray.get_gpu_ids()], "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id()}

    def process(self, shard: Shard, decoded: tuple[list[Clip], list[ClipFailure]], attempt: int,
                started: float) -> dict[str, Any]:
        clips, failures = decoded
        cfg = self.cfg
        clips, codes, encode_failures = encode_clips(
            self.model, clips, num_codebooks=cfg.num_codebooks, batch_max_seconds=cfg.batch_max_seconds,
            max_pad_ratio=cfg.max_pad_ratio, chunk_frames=cfg.chunk_frames)
        result = write_shard(join(cfg.output, manifest.shard_file(shard.shard_id)), clips, codes,
                             num_codebooks=cfg.num_codebooks, file_metadata=file_metadata(self.model_files, shard),
                             storage_options=cfg.storage_options)
        return manifest.write_done_record(cfg.output, shard, result, failures + encode_failures, started=started,
                                          finished=time.time(), attempt=attempt,
                                          storage_options=cfg.storage_options)


def encoder_resources(cfg: RunConfig) -> dict[str, float]:
    """Ray resources of one encoder actor: a GPU each when the cluster has GPUs (and device allows), else a CPU."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.device == "cuda" and not gpus:
        raise RunError("device is 'cuda' but the Ray cluster has no GPUs")
    return {"num_gpus": 1, "num_cpus": 1} if gpus and cfg.device != "cpu" else {"num_gpus": 0, "num_cpus": 1}


class EncoderPool:
    """``n`` encoder actors, each with a FIFO of submitted calls; a dead actor is replaced by a fresh one."""

    def __init__(self, cfg: RunConfig, model_ref: ray.ObjectRef, n: int):
        self.cfg, self.model_ref = cfg, model_ref
        self.resources = encoder_resources(cfg)
        self.actors = [self._new_actor() for _ in range(n)]
        self.queues: list[list[ray.ObjectRef]] = [[] for _ in range(n)]
        self.dead_heads: set[ray.ObjectRef] = set()  # calls that were running when their actor died
        try:
            self.infos = ray.get([a.info.remote() for a in self.actors])
        except RayError as exc:
            raise RunError(f"the encoders could not start: {exc}") from exc

    def _new_actor(self):
        return ShardEncoder.options(**self.resources).remote(self.cfg, self.model_ref)

    def free_slot(self) -> int | None:
        """The least busy encoder with room in its queue, or None."""
        slot = min(range(len(self.actors)), key=lambda i: len(self.queues[i]))
        return slot if len(self.queues[slot]) < ENCODER_QUEUE_DEPTH else None

    def submit(self, slot: int, *args) -> ray.ObjectRef:
        ref = self.actors[slot].process.remote(*args)
        self.queues[slot].append(ref)
        return ref

    def release(self, slot: int, ref: ray.ObjectRef, actor_died: bool) -> bool:
        """Forget the call ``ref``; replace its actor if it died. Returns whether the call is charged an attempt:
        it raised, or it was the one running when its actor died (the calls queued behind it are not)."""
        if actor_died and ref in self.queues[slot]:  # first news of this actor's death
            log.warning("encoder %d died; starting a new one", slot)
            self.dead_heads.add(self.queues[slot][0])
            ray.kill(self.actors[slot], no_restart=True)
            self.actors[slot], self.queues[slot] = self._new_actor(), []
        if ref in self.queues[slot]:
            self.queues[slot].remove(ref)
        if not actor_died:
            return True
        charged = ref in self.dead_heads
        self.dead_heads.discard(ref)
        return charged

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


# --- scheduling ------------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    """One shard on its way through the pipeline."""

    shard: Shard
    started: float
    attempt: int = 1  # encode attempt, from 1
    decoded: ray.ObjectRef | None = None  # (clips, failures), once decoded


@dataclass
class _Assembly:
    """A shard being redone clip by clip: its read items, each replaced by its Clip or ClipFailure when known."""

    job: _Job
    items: list
    remaining: int


def _brief(exc: BaseException) -> str:
    """``Class: first line`` of an error (of its cause, for errors raised inside a Ray task)."""
    cause = getattr(exc, "cause", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0][:300] if lines else ''}"


class _Scheduler:
    """Moves shards through decode → encode → commit, reacting to each finished Ray call; updates ``done``."""

    def __init__(self, cfg: RunConfig, shards: list[Shard], pool: EncoderPool, max_in_flight: int,
                 done: dict[str, dict]):
        self.cfg, self.pool, self.max_in_flight, self.done = cfg, pool, max_in_flight, done
        self.waiting: deque[Shard] = deque(shards)
        self.ready: deque[_Job] = deque()  # decoded, waiting for an encoder
        self.handlers: dict[ray.ObjectRef, Callable[[ray.ObjectRef], None]] = {}
        self.in_flight = 0  # shards between decode submission and commit (or giving up)
        self.errors: dict[str, str] = {}  # shards given up on → why

    def run(self, periodic: list[Callable[[], None]]) -> None:
        while self.waiting or self.ready or self.handlers:
            self._submit()
            finished, _ = ray.wait(list(self.handlers), num_returns=1, timeout=1.0)
            if finished:
                finished, _ = ray.wait(list(self.handlers), num_returns=len(self.handlers), timeout=0)
            for ref in finished:
                self.handlers.pop(ref)(ref)
            for fn in periodic:
                fn()

    def _submit(self) -> None:
        cfg = self.cfg
        while self.waiting and self.in_flight < self.max_in_flight:
            job = _Job(self.waiting.popleft(), time.time())
            summary, job.decoded = _decode_shard.options(
                name=f"decode:{job.shard.shard_id}", num_cpus=1, max_retries=cfg.shard_retries, retry_exceptions=True,
            ).remote(job.shard, cfg.channel_policy, cfg.storage_options)
            self._on(summary, self._decoded, job)
            self.in_flight += 1
        while self.ready and (slot := self.pool.free_slot()) is not None:
            job = self.ready.popleft()
            self._on(self.pool.submit(slot, job.shard, job.decoded, job.attempt, job.started), self._encoded, job, slot)

    def _on(self, ref: ray.ObjectRef, handler: Callable, *args) -> None:
        self.handlers[ref] = lambda r: handler(r, *args)

    def _decoded(self, ref: ray.ObjectRef, job: _Job) -> None:
        try:
            ray.get(ref)
        except RayError as exc:
            log.warning("decoding shard %s failed %d time(s), last with %s; redoing it clip by clip",
                        job.shard.shard_id, self.cfg.shard_retries + 1, _brief(exc))
            job.decoded = None
            read = _read_shard.options(name=f"read:{job.shard.shard_id}", num_cpus=1,
                                       max_retries=self.cfg.shard_retries, retry_exceptions=True)
            self._on(read.remote(job.shard, self.cfg.storage_options), self._read, job)
            return
        self.ready.append(job)

    def _read(self, ref: ray.ObjectRef, job: _Job) -> None:
        try:
            items = ray.get(ref)
        except RayError as exc:
            self._give_up(job, f"reading its clips failed: {_brief(exc)}")
            return
        sources = [i for i, item in enumerate(items) if not isinstance(item, ClipFailure)]
        assembly = _Assembly(job, items, len(sources))
        for i in sources:
            task = _prepare_clip.options(name=f"prepare_clip:{items[i].clip_id}", num_cpus=1,
                                         max_retries=self.cfg.shard_retries)
            self._on(task.remote(items[i], self.cfg.channel_policy), self._clip_prepared, assembly, i)
        self._assembled(assembly)

    def _clip_prepared(self, ref: ray.ObjectRef, assembly: _Assembly, i: int) -> None:
        src = assembly.items[i]
        try:
            assembly.items[i] = ray.get(ref)
        except RayError as exc:
            log.warning("clip %s (%s) could not be decoded: %s", src.clip_id, src.source_uri, _brief(exc))
            assembly.items[i] = ClipFailure.from_exception(src.clip_id, src.source_uri, "crash", exc)
        assembly.remaining -= 1
        self._assembled(assembly)

    def _assembled(self, assembly: _Assembly) -> None:
        if assembly.remaining:
            return
        clips = [item for item in assembly.items if isinstance(item, Clip)]
        failures = [item for item in assembly.items if isinstance(item, ClipFailure)]
        assembly.job.decoded = ray.put((clips, failures))
        self.ready.append(assembly.job)

    def _encoded(self, ref: ray.ObjectRef, job: _Job, slot: int) -> None:
        try:
            record = ray.get(ref)
        except RayError as exc:
            if self.pool.release(slot, ref, actor_died=isinstance(exc, RayActorError)):
                job.attempt += 1
            if job.attempt > self.cfg.shard_retries + 1:
                self._give_up(job, f"encoding failed {job.attempt - 1} time(s), last with {_brief(exc)}")
            else:
                log.warning("encoding shard %s failed (%s); retrying", job.shard.shard_id, _brief(exc))
                self.ready.appendleft(job)
            return
        self.pool.release(slot, ref, actor_died=False)
        self.done[job.shard.shard_id] = record
        self.in_flight -= 1

    def _give_up(self, job: _Job, reason: str) -> None:
        log.error("giving up on shard %s for this run: %s", job.shard.shard_id, reason)
        self.errors[job.shard.shard_id] = reason
        self.in_flight -= 1


class _Every:
    """Calls ``fn`` when at least ``interval_s`` passed since the last call (or since creation)."""

    def __init__(self, interval_s: float, fn: Callable[[], None]):
        self.interval_s, self.fn, self.last = interval_s, fn, time.time()

    def __call__(self) -> None:
        if time.time() - self.last >= self.interval_s:
            self.fn()
            self.last = time.time()


# --- the run -------------------------------------------------------------------------------------------------------


def _init_run(cfg: RunConfig, model_files: ModelFiles) -> dict[str, Any]:
    model = {"source": model_files.source, "revision": model_files.revision, "sha256": model_files.sha256,
             "untrained": model_files.untrained}
    run = manifest.make_run(cfg.to_dict(), model, cfg.num_codebooks)
    stored = manifest.init_run(cfg.output, run, cfg.storage_options)
    changed = [f"{k}: output has {stored['config'].get(k)!r}, this run has {run['config'][k]!r}"
               for k in SETTINGS_FIXED_ON_RESUME if stored["config"].get(k) != run["config"][k]]
    if changed:
        raise manifest.IncompatibleOutputError(
            "the output folder was started with other settings (" + "; ".join(changed) + "). Write to a new "
            "output folder, or resume with the same settings.")
    return stored


def _discover(cfg: RunConfig) -> list[Shard]:
    try:
        return discover_shards(cfg.input, files_per_shard=cfg.files_per_shard, max_shard_bytes=cfg.max_shard_bytes,
                               storage_options=cfg.storage_options)
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot use input {manifest.redact(cfg.input)}: {exc}") from exc


def _progress_line(m: dict[str, Any]) -> str:
    totals, timing = m["totals"], m["timing"]
    eta = f", ETA {timing['eta_s'] / 60:.1f} min" if timing["eta_s"] is not None else ""
    label = "[UNTRAINED model] " if m["model"].get("untrained") else ""
    return (f"{label}{totals['shards_done']}/{totals['shards']} shards, {totals['hours']:.2f} h of audio, "
            f"{timing['x_realtime']:.1f}x realtime{eta}, {totals['failed_clips']} failed clip(s)")


def _report(cfg: RunConfig, run_record: dict[str, Any], shards: list[Shard], done: dict[str, dict],
            started: float) -> None:
    """Log the progress and rewrite manifest.json (status "running"), for `mimi-tokenize status`."""
    current = manifest.build_manifest(cfg.output, run_record, shards, done, started=started)
    log.info(_progress_line(current))
    try:
        manifest.write_manifest(cfg.output, current, cfg.storage_options)
    except OSError as exc:
        log.warning("could not update the manifest (%s); will retry", _brief(exc))


def _encode_pending(cfg: RunConfig, pending: list[Shard], model_files: ModelFiles, done: dict[str, dict],
                    periodic: list[Callable[[], None]]) -> dict[str, str]:
    """Run the pending shards on Ray (joined, or started here and shut down after); return the shards given up on."""
    started_ray = not ray.is_initialized()
    if started_ray:
        try:
            ray.init(address=cfg.ray_address)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RunError(f"cannot start or join Ray (address {cfg.ray_address!r}): {exc}") from exc
    pool = None
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if cfg.device != "cpu" else 0
        n = cfg.num_encoders or gpus or 1
        pool = EncoderPool(cfg, ray.put(model_files), n)
        log.info("%d encoder(s): %s", n, ", ".join(f"{i['device']} (GPU ids {i['gpu_ids']})" for i in pool.infos))
        decode_cpus = max(1, int(resources.get("CPU", 1)) - n * int(pool.resources["num_cpus"]))
        scheduler = _Scheduler(cfg, pending, pool, cfg.max_shards_in_flight or decode_cpus + ENCODER_QUEUE_DEPTH * n,
                               done)
        scheduler.run(periodic)
        return scheduler.errors
    finally:
        if pool is not None:
            pool.shutdown()
        if started_ray:
            ray.shutdown()


def run(cfg: RunConfig) -> int:
    """Tokenize ``cfg.input`` into ``cfg.output``, resuming where a previous run stopped.

    Returns 0, or 1 when some shards could not be completed or failed clips exceed ``max_failure_share``.
    Raises :class:`RunError`, ``OutputLockedError``, ``IncompatibleOutputError`` or ``CheckpointError`` when the run
    cannot start.
    """
    if not cfg.input or not cfg.output:
        raise RunError("input and output are required (--input URL --output URL, or in the config file)")
    cfg = dataclasses.replace(cfg, input=_absolute(cfg.input), output=_absolute(cfg.output))
    session_start = time.time()
    model_files = load_model_files(cfg)
    if model_files.untrained:
        log.warning("model %s holds UNTRAINED generated weights: the codes carry no meaning (for trying the "
                    "pipeline only); the manifest records model.untrained = true", model_files.source)
    lock = RunLock(cfg.output, run_id=uuid.uuid4().hex[:12], storage_options=cfg.storage_options)
    lock.acquire(wait_s=cfg.lock_wait_s)
    try:
        run_record = _init_run(cfg, model_files)
        shards = _discover(cfg)
        done = manifest.load_done(cfg.output, cfg.storage_options)
        pending = [s for s in shards if s.shard_id not in done]
        log.info("%s: %d shard(s), %d already done, %d to encode", manifest.redact(cfg.input), len(shards),
                 len(shards) - len(pending), len(pending))
        final = _finished_manifest(cfg, len(shards)) if not pending else None
        if final is None:
            periodic = [_Every(LOCK_REFRESH_S, lock.refresh),
                        _Every(cfg.progress_interval_s, lambda: _report(cfg, run_record, shards, done, session_start))]
            errors = _encode_pending(cfg, pending, model_files, done, periodic) if pending else {}
            final = manifest.build_manifest(cfg.output, run_record, shards,
                                            manifest.load_done(cfg.output, cfg.storage_options),
                                            started=session_start, finished=time.time())
            if errors:
                final["shard_errors"] = errors
            manifest.write_manifest(cfg.output, final, cfg.storage_options)
    finally:
        lock.release()
    return exit_code(cfg, final)


def _absolute(url: str) -> str:
    """Local paths made absolute (every worker, and a resumed run from another folder, must see the same data)."""
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


def _finished_manifest(cfg: RunConfig, n_shards: int) -> dict[str, Any] | None:
    """The output's manifest if it already records every shard as done (then there is nothing to rewrite)."""
    try:
        existing = manifest.read_manifest(cfg.output, cfg.storage_options)
    except FileNotFoundError:
        return None
    complete = existing["status"] == "complete" and existing["totals"]["shards"] == n_shards
    return existing if complete else None


def exit_code(cfg: RunConfig, final: dict[str, Any]) -> int:
    """0 when every shard is done and failed clips stay within ``max_failure_share``, else 1 (logged)."""
    log.info(_progress_line(final))
    share = manifest.failure_share(final)
    if final["status"] != "complete":
        log.error("%d shard(s) are not done; run the same command again to retry them",
                  final["totals"]["shards"] - final["totals"]["shards_done"])
        return 1
    if share > cfg.max_failure_share:
        log.error("%.2f%% of the clips failed, more than max_failure_share %.2f%%; see the failures in %s",
                  100 * share, 100 * cfg.max_failure_share, join(manifest.redact(cfg.output), manifest.MANIFEST_PATH))
        return 1
    return 0
