"""The encoder actor: one Mimi per GPU, fed by decode tasks it starts itself, committing what it encodes.

For each shard it is given, a :class:`ShardEncoder` starts a ``decode:{shard}`` streaming task (one CPU, preferably on
its own node, so parts move through shared memory without a copy) that yields the shard's decoded audio in bounded
parts (:mod:`pipeline.prepare`). The actor encodes the parts in order (:mod:`pipeline.encode`) and commits the shard
(:mod:`pipeline.commit`). It works on ``decode_tasks_per_encoder`` shards at once, one thread each: the threads take
turns on the model (one lock, held around the model calls only), so while one shard's parts are being decoded,
padded and copied to the device, or its codes collected, its Parquet file built and uploaded, the model encodes
another's, and the GPU does not wait for a single decoder or for a commit. The driver only hands out shards; no
audio passes through it.

Faults, all bounded:

* a decode task whose worker dies (segfault, OOM kill) is started again, ``shard_retries`` times; then the shard is
  decoded clip by clip (``decode:{shard}#{i}``), so a clip that keeps killing its worker is recorded as
  ``ClipFailure(stage="crash")`` and the rest of the shard is still written;
* a decode task that sends nothing for ``stall_timeout_s`` is cancelled and started again, like a dead one;
* a transient error (storage outage past the retry window, out of memory) fails the attempt: ``process`` raises,
  and the driver retries the shard later, or leaves it undone;
* a CUDA error other than out-of-memory marks the actor broken (:class:`~pipeline.encode.EncoderBroken`): it
  refuses further work and the driver replaces it, charging no clip.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline import retry
from pipeline import schema as output_schema
from pipeline.commit import Output
from pipeline.encode import EncoderBroken, ShardEncoding
from pipeline.model_files import ModelFiles, RunError
from pipeline.prepare import iter_parts
from pipeline.sources import list_items
from pipeline.sources.common import FETCH_AHEAD_BYTES
from pipeline.types import SAMPLE_RATE, ClipFailure, Part, Shard

log = logging.getLogger(__name__)

DECODE_AHEAD_PARTS = 2  # parts a decode task may run ahead of its encoder (Ray streaming-generator backpressure)
ISOLATION_WINDOW = 4  # single-clip decode tasks in flight while a shard is decoded clip by clip
WAIT_LOG_S = 60.0  # an encoder thread waiting this long for a part says so


@dataclass(frozen=True)
class DecodeSettings:
    """What a decode task needs."""

    channel_policy: str
    part_seconds: float
    max_clip_seconds: float
    storage_options: dict[str, Any]
    retry: retry.RetryPolicy
    vad: bool = False  # speech_share from Silero VAD

    @property
    def part_bytes(self) -> int:
        return round(self.part_seconds * SAMPLE_RATE) * 4

    def task_memory(self) -> int:
        """Bytes a decode task may hold: the part being built and one moving on, the reads ahead, the decoder."""
        return 2 * self.part_bytes + FETCH_AHEAD_BYTES + 128 * 2**20


@ray.remote(max_retries=0)
def decode_parts(shard: Shard, settings: DecodeSettings, only: int | None = None) -> Iterator[Part]:
    """The shard's decoded parts (only clip ``only``'s when given), as a Ray streaming generator."""
    retry.set_policy(settings.retry)
    yield from iter_parts(shard, channel_policy=settings.channel_policy, part_seconds=settings.part_seconds,
                          max_clip_seconds=settings.max_clip_seconds, storage_options=settings.storage_options,
                          only=only, vad=settings.vad)


@ray.remote(max_retries=0)
def shard_items(shard: Shard, settings: DecodeSettings) -> list[tuple[str, str]]:
    retry.set_policy(settings.retry)
    return list_items(shard, storage_options=settings.storage_options)


def allow_tf32(on: bool) -> None:
    """TF32 for CUDA matrix products and convolutions (a function of the module: Ray pickles the actor class by
    value, and cannot pickle torch.backends.cudnn)."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


class WorkerDied(RuntimeError):
    """A decode task's worker died (or stalled and was cancelled): restart it, or isolate its clips."""


@dataclass(frozen=True)
class EncoderSettings:
    num_codebooks: int
    batch_max_seconds: float
    max_pad_ratio: float
    chunk_frames: int
    device: str
    dtype: str
    threads: int  # torch threads of a CPU encoder
    shard_retries: int
    stall_timeout_s: float


@ray.remote(max_restarts=0, max_task_retries=0)
class ShardEncoder:
    """Holds one Mimi; decodes (through its tasks), encodes and commits the shards it is given."""

    def __init__(self, settings: EncoderSettings, decode: DecodeSettings, model_files: ModelFiles, output: Output):
        retry.set_policy(decode.retry)
        self.settings, self.decode, self.output = settings, decode, output
        self.device = "cuda" if settings.device != "cpu" and torch.cuda.is_available() else "cpu"
        if settings.device == "cuda" and self.device != "cuda":
            raise RunError("device is 'cuda' but CUDA is not available to the encoder")
        if self.device == "cuda":  # exact mode keeps TF32 off (float32 codes are the reference); fast mode allows it
            allow_tf32(settings.dtype != "float32")
        if self.device == "cpu":
            # Ray pins a 1-CPU actor to one thread; a CPU encoder may use its share of the node's cores, alongside
            # the decode tasks (the thread count does not change the codes: tests/test_mimi_model.py).
            torch.set_num_threads(settings.threads)
        self.model = model_files.load(self.device, getattr(torch, settings.dtype))
        self.model_lock = threading.Lock()
        self.node = ray.get_runtime_context().get_node_id()
        self.broken: str | None = None

    def info(self) -> dict[str, Any]:
        return {"device": self.device, "gpu_ids": [str(i) for i in ray.get_gpu_ids()], "pid": os.getpid(),
                "node": self.node}

    def process(self, shard: Shard, *, attempt: int, kept: tuple[str, ...], schema: dict[str, Any] | None
                ) -> dict[str, Any]:
        """Decode, encode and commit ``shard`` (with the rows ``kept`` from its retired file); return its record."""
        if self.broken:
            raise EncoderBroken(self.broken)
        started = time.time()
        try:
            encoding = self._encode(shard)
        except EncoderBroken as exc:
            self.broken = str(exc)
            raise
        return self.output.commit(shard, encoding.rows, encoding.failures,
                                  schema=None if schema is None else output_schema.from_json(schema), kept=kept,
                                  started=started, attempt=attempt)

    def _new_encoding(self) -> ShardEncoding:
        s = self.settings
        return ShardEncoding(self.model, num_codebooks=s.num_codebooks, batch_max_seconds=s.batch_max_seconds,
                             max_pad_ratio=s.max_pad_ratio, chunk_frames=s.chunk_frames, lock=self.model_lock)

    def _start(self, shard: Shard, only: int | None = None):
        name = f"decode:{shard.shard_id}" + ("" if only is None else f"#{only}")
        return decode_parts.options(
            name=name, num_returns="streaming", _generator_backpressure_num_objects=DECODE_AHEAD_PARTS, num_cpus=1,
            memory=self.decode.task_memory(),
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.node, soft=True),
        ).remote(shard, self.decode, only)

    def _encode(self, shard: Shard) -> ShardEncoding:
        """Encode the shard's parts as its decode task yields them; restart the task if its worker dies."""
        for trial in range(self.settings.shard_retries + 1):
            encoding = self._new_encoding()
            try:
                for part in self._parts(self._start(shard), f"shard {shard.shard_id}"):
                    encoding.add(part)  # holds the model lock around its model calls only
                return encoding
            except WorkerDied as exc:
                log.warning("decoding shard %s failed (%s), try %d of %d", shard.shard_id, exc, trial + 1,
                            self.settings.shard_retries + 1)
        log.warning("decoding shard %s kept failing; decoding it clip by clip", shard.shard_id)
        return self._encode_isolated(shard)

    def _encode_isolated(self, shard: Shard) -> ShardEncoding:
        """Decode each clip in a task of its own, so a clip that kills its worker fails alone (stage ``crash``)."""
        listing = shard_items.options(num_cpus=1, max_retries=self.settings.shard_retries).remote(shard, self.decode)
        try:
            items = ray.get(listing, timeout=self.settings.stall_timeout_s)
        except GetTimeoutError as exc:
            ray.cancel(listing, force=True)
            raise TimeoutError(f"listing the clips of shard {shard.shard_id} took over "
                               f"{self.settings.stall_timeout_s:.0f} s (stall_timeout_s)") from exc
        result = self._new_encoding()
        started = {i: self._start(shard, i) for i in range(min(ISOLATION_WINDOW, len(items)))}
        try:
            self._isolated(shard, items, started, result)
        finally:
            for generator in started.values():
                ray.cancel(generator, force=True)
        return result

    def _isolated(self, shard: Shard, items: list[tuple[str, str]], started: dict, result: ShardEncoding) -> None:
        for i, (clip_id, source_uri) in enumerate(items):
            if i + ISOLATION_WINDOW < len(items):
                started[i + ISOLATION_WINDOW] = self._start(shard, i + ISOLATION_WINDOW)
            generator, error = started.pop(i), None
            for trial in range(self.settings.shard_retries + 1):
                encoding = self._new_encoding()
                try:
                    for part in self._parts(generator, f"clip {clip_id} of shard {shard.shard_id}"):
                        encoding.add(part)
                    result.rows += encoding.rows
                    result.failures += encoding.failures
                    break
                except WorkerDied as exc:
                    error = exc
                    if trial < self.settings.shard_retries:
                        generator = self._start(shard, i)
            else:
                log.warning("clip %s (%s) keeps killing its decode worker: %s", clip_id, source_uri, error)
                result.failures.append(ClipFailure.from_exception(clip_id, source_uri, "crash", error))

    def _parts(self, generator, what: str) -> Iterator[Part]:
        """The parts of a decode task, each waited for with a timeout; raises :class:`WorkerDied` when the task's
        worker dies or it stalls, re-raises the task's own errors (transient ones fail the attempt). A task left
        unfinished (an error here or in the encoder) is cancelled."""
        waited, step, finished = 0.0, min(WAIT_LOG_S, self.settings.stall_timeout_s), False
        try:
            while True:
                ready, _ = ray.wait([generator], timeout=step)
                if not ready:
                    waited += step
                    if waited >= self.settings.stall_timeout_s:
                        raise WorkerDied(f"no decoded audio for {waited:.0f} s (stall_timeout_s)")
                    log.info("waiting for decoded audio of %s (%.0f s so far)", what, waited)
                    continue
                waited = 0.0
                try:
                    ref = next(generator)
                except StopIteration:
                    finished = True
                    return
                try:
                    part = ray.get(ref, timeout=self.settings.stall_timeout_s)
                except RayTaskError as exc:
                    raise exc.cause if isinstance(exc.cause, BaseException) else exc
                except GetTimeoutError as exc:
                    raise WorkerDied(f"a decoded part could not be fetched: {exc}") from exc
                except RayError as exc:  # the worker died, its node was lost, or the object with it
                    raise WorkerDied(retry.brief(exc)) from exc
                del ref
                yield part
        finally:
            if not finished:
                ray.cancel(generator, force=True)
