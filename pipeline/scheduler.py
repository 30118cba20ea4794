"""Driver-side scheduling: a pool of encoder actors that follows the cluster, and shards handed out to ready ones.

* The pool's target is ``num_encoders`` when set, else one encoder per GPU in the cluster *now* (or one CPU
  encoder on a cluster without GPUs): when a GPU node joins (autoscaling, KubeRay), an encoder is started on it;
  when one is lost, its encoder is not replaced by one that could never be placed. A fixed ``num_encoders`` above
  what the cluster holds leaves actors pending placement, which is what asks an autoscaler for more nodes.
* A shard is given only to an encoder that is up (its ``info`` call answered), and each encoder holds at most
  ``slots`` shards at once (its decode tasks run ahead of it), so no shard waits behind an actor that cannot be
  placed. If no encoder is up for ``encoder_wait_s`` while shards wait, the run gives them up (they stay undone;
  exit 1; the next run retries them).
* An encoder that dies (its node lost, killed) takes no shard with it: its shards go back to the queue, uncharged
  (at most ``shard_retries + 2`` losses per shard, so a shard that kills every encoder is given up). A broken
  encoder (sticky CUDA error) is replaced the same way. A shard whose attempt fails (a transient error that
  outlasted the retry window) is retried after a backoff, ``shard_retries`` times, then left undone.
* An output that cannot be written (full, read-only, denied: :class:`~pipeline.retry.OutputUnwritable` from a
  commit) stops the run: no shard is started any more, the shards in flight are waited for (at most
  ``DRAIN_WAIT_S``; what they commit is kept), the rest are left undone, and :attr:`Scheduler.fatal` says why.
* Every wait is bounded: the loop wakes at least every second, logs what it is waiting for when nothing has
  happened for ``progress_interval_s``, and calls the run's periodic work (progress, lock check).
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from pipeline import retry
from pipeline.model_files import RunError
from pipeline.types import Shard

log = logging.getLogger(__name__)

POOL_CHECK_S = 2.0  # how often the pool is matched to the cluster
START_FAILURES_FATAL = 3  # consecutive encoder start failures, with none ever up, that stop the run
RETRY_BACKOFF_S = 15.0  # base delay before a failed attempt is retried (exponential, jittered)
DRAIN_WAIT_S = 120.0  # once the output cannot be written: how long the shards in flight may take to finish


@dataclass
class Job:
    """One shard on its way through the pool."""

    shard: Shard
    kept: tuple[str, ...] = ()  # ids of rows kept from the shard's retired file (see pipeline.plan.Plan.kept)
    attempt: int = 1  # attempts charged, from 1
    losses: int = 0  # encoders lost while holding it
    not_before: float = 0.0  # retry backoff
    since: float = 0.0  # when it was last handed to an encoder


@dataclass
class Encoder:
    index: int
    handle: Any
    ready_ref: Any  # the pending `info` call; None once the encoder is up
    info: dict[str, Any] | None = None
    started: float = field(default_factory=time.time)
    jobs: dict[Any, Job] = field(default_factory=dict)  # `process` call → job


class EncoderPool:
    """Encoder actors matched to the cluster (see the module docstring)."""

    def __init__(self, new_actor: Callable[[], Any], *, fixed: int | None, use_gpus: bool, slots: int):
        self.new_actor, self.fixed, self.use_gpus, self.slots = new_actor, fixed, use_gpus, slots
        self.encoders: dict[int, Encoder] = {}
        self.next_index = 0
        self.last_check = 0.0
        self.start_failures = 0
        self.ever_ready = False

    def target(self) -> int:
        if self.fixed:
            return self.fixed
        return int(ray.cluster_resources().get("GPU", 0)) if self.use_gpus else 1

    def maintain(self, force: bool = False) -> None:
        """Start encoders up to the target; drop not-yet-placed ones above it."""
        if not force and time.time() - self.last_check < POOL_CHECK_S:
            return
        self.last_check = time.time()
        target = self.target()
        while len(self.encoders) < target:
            index, self.next_index = self.next_index, self.next_index + 1
            handle = self.new_actor()
            self.encoders[index] = Encoder(index, handle, handle.info.remote())
            log.info("starting encoder %d (%d wanted)", index, target)
        extra = len(self.encoders) - target
        for encoder in [e for e in self.encoders.values() if e.info is None][:max(0, extra)]:
            log.info("encoder %d was never placed and the cluster now wants %d; dropping it", encoder.index, target)
            self.remove(encoder)

    def ready(self) -> list[Encoder]:
        return [e for e in self.encoders.values() if e.info is not None]

    def starting(self) -> list[Encoder]:
        return [e for e in self.encoders.values() if e.info is None]

    def on_ready(self, encoder: Encoder, ref: Any) -> None:
        """The ``info`` call of a starting encoder finished: it is up, or it failed to start."""
        encoder.ready_ref = None
        try:
            encoder.info = ray.get(ref)
        except RayError as exc:
            self.remove(encoder)
            self.start_failures += 1
            log.warning("encoder %d could not start: %s", encoder.index, retry.brief(exc))
            if self.start_failures >= START_FAILURES_FATAL and not self.ever_ready:
                raise RunError(f"the encoders could not start: {retry.brief(exc)}") from exc
            return
        self.start_failures, self.ever_ready = 0, True
        info = encoder.info
        log.info("encoder %d up: %s (GPU ids %s) on node %s; %d encoder(s) up", encoder.index, info["device"],
                 info["gpu_ids"], info["node"][:12], len(self.ready()))

    def remove(self, encoder: Encoder) -> list[Job]:
        """Kill an encoder; return the jobs it held."""
        self.encoders.pop(encoder.index, None)
        try:
            ray.kill(encoder.handle, no_restart=True)
        except RayError:
            pass
        jobs = list(encoder.jobs.values())
        encoder.jobs.clear()
        return jobs

    def shutdown(self) -> None:
        for encoder in list(self.encoders.values()):
            self.remove(encoder)


class Scheduler:
    """Hands the pending shards to the pool and reacts to each finished call; fills ``done`` and ``errors``."""

    def __init__(self, pool: EncoderPool, jobs: list[Job], *, submit: Callable[[Encoder, Job], Any],
                 on_done: Callable[[dict[str, Any]], None], shard_retries: int, encoder_wait_s: float,
                 wait_log_s: float):
        self.pool, self.submit, self.on_done = pool, submit, on_done
        self.queue: deque[Job] = deque(jobs)
        self.shard_retries, self.encoder_wait_s, self.wait_log_s = shard_retries, encoder_wait_s, wait_log_s
        self.errors: dict[str, str] = {}  # shards given up on this run → why
        self.last_event = time.time()
        self.no_encoder_since: float | None = None
        self.fatal: retry.OutputUnwritable | None = None  # the output cannot be written: stop
        self.drain_until = 0.0

    def run(self, periodic: Callable[[], None]) -> dict[str, str]:
        """Until every shard is done or given up; returns the shards given up on, with why. When the output cannot
        be written, stops early (see the module docstring) with :attr:`fatal` set."""
        self.pool.maintain(force=True)
        while (self.queue and not self.fatal) or self._in_flight():
            if self.fatal and time.time() >= self.drain_until:
                log.error("stopping without waiting longer for %d shard(s) in flight (%.0f s, DRAIN_WAIT_S)",
                          len(self._in_flight()), DRAIN_WAIT_S)
                for job in self._in_flight():
                    self.errors[job.shard.shard_id] = f"not finished: {self.fatal}"
                break
            if not self.fatal:
                self.pool.maintain()
                self._assign()
            self._wait()
            self._watch()
            periodic()
        if self.fatal:
            for job in self.queue:
                self.errors[job.shard.shard_id] = f"not started: {self.fatal}"
            log.error("%d shard(s) not started because the output cannot be written", len(self.queue))
        return self.errors

    def _in_flight(self) -> list[Job]:
        return [job for encoder in self.pool.encoders.values() for job in encoder.jobs.values()]

    def _assign(self) -> None:
        now = time.time()
        for encoder in sorted(self.pool.ready(), key=lambda e: len(e.jobs)):
            while len(encoder.jobs) < self.pool.slots:
                job = next((j for j in self.queue if j.not_before <= now), None)
                if job is None:
                    return
                self.queue.remove(job)
                job.since = now
                encoder.jobs[self.submit(encoder, job)] = job

    def _wait(self) -> None:
        calls = {ref: encoder for encoder in self.pool.encoders.values() for ref in encoder.jobs}
        starting = {e.ready_ref: e for e in self.pool.starting() if e.ready_ref is not None}
        refs = [*calls, *starting]
        if not refs:
            time.sleep(1.0)
            return
        finished, _ = ray.wait(refs, num_returns=1, timeout=1.0)
        if finished:
            finished, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            self.last_event = time.time()
        for ref in finished:
            if ref in starting:
                self.pool.on_ready(starting[ref], ref)
            elif ref in calls and calls[ref].index in self.pool.encoders:
                self._finished(calls[ref], ref)

    def _finished(self, encoder: Encoder, ref: Any) -> None:
        job = encoder.jobs.pop(ref)
        try:
            record = ray.get(ref)
        except RayActorError as exc:  # the encoder died: its node was lost, or it was killed
            log.warning("encoder %d died (%s); its %d shard(s) go back to the queue", encoder.index,
                        retry.brief(exc), len(encoder.jobs) + 1)
            for lost in [job, *self.pool.remove(encoder)]:
                self._lost(lost, "its encoder died")
            return
        except RayTaskError as exc:
            if isinstance(exc.cause, retry.OutputUnwritable):
                self._stop(job, exc.cause)
                return
            if type(exc.cause).__name__ == "EncoderBroken":
                log.warning("encoder %d is broken (%s); replacing it", encoder.index, retry.brief(exc))
                for lost in [job, *self.pool.remove(encoder)]:
                    self._lost(lost, "its encoder broke")
                return
            self._failed(job, retry.brief(exc))
            return
        except RayError as exc:
            self._failed(job, retry.brief(exc))
            return
        self.on_done(record)

    def _lost(self, job: Job, why: str) -> None:
        job.losses += 1
        if job.losses > self.shard_retries + 1:
            self._give_up(job, f"{why} {job.losses} times")
        else:
            self.queue.appendleft(job)

    def _failed(self, job: Job, why: str) -> None:
        if job.attempt > self.shard_retries:
            self._give_up(job, f"{job.attempt} attempt(s) failed, the last with {why}")
            return
        delay = random.uniform(0.5, 1.0) * RETRY_BACKOFF_S * 2 ** (job.attempt - 1)
        log.warning("shard %s failed (%s); retrying in %.0f s", job.shard.shard_id, why, delay)
        job.attempt += 1
        job.not_before = time.time() + delay
        self.queue.append(job)

    def _stop(self, job: Job, error: retry.OutputUnwritable) -> None:
        """``job``'s commit found the output unwritable: give it up, start no more shards, drain those in flight."""
        self._give_up(job, str(error))
        if self.fatal is None:
            self.fatal, self.drain_until = error, time.time() + DRAIN_WAIT_S
            log.error("%s: the output cannot be written; no more shards are started; waiting up to %.0f s for the "
                      "%d shard(s) in flight", error, DRAIN_WAIT_S, len(self._in_flight()))

    def _give_up(self, job: Job, reason: str) -> None:
        log.error("giving up on shard %s for this run: %s", job.shard.shard_id, reason)
        self.errors[job.shard.shard_id] = reason

    def _watch(self) -> None:
        """Give up the queue when no encoder has been up for ``encoder_wait_s``; say what the loop waits for."""
        now = time.time()
        if self.queue and not self.pool.ready():
            self.no_encoder_since = self.no_encoder_since or now
            if now - self.no_encoder_since >= self.encoder_wait_s:
                reason = (f"no encoder could be placed for {self.encoder_wait_s:.0f} s (encoder_wait_s); "
                          f"cluster resources: {ray.cluster_resources()}")
                while self.queue:
                    self._give_up(self.queue.popleft(), reason)
                return
        else:
            self.no_encoder_since = None
        if now - self.last_event >= self.wait_log_s:
            self.last_event = now
            log.info("waiting for: %s", self.describe())

    def describe(self) -> str:
        now = time.time()
        busy = [(encoder, job) for encoder in self.pool.ready() for job in encoder.jobs.values()]
        oldest = max((now - job.since for _, job in busy), default=0.0)
        parts = [f"{len(busy)} shard(s) on {len(self.pool.ready())} encoder(s) up (longest {oldest:.0f} s)",
                 f"{len(self.queue)} queued" + (" (not to be started: the output cannot be written)" if self.fatal
                                                else "")]
        starting = self.pool.starting()
        if starting:
            parts.append(f"{len(starting)} encoder(s) waiting to be placed (longest "
                         f"{max(now - e.started for e in starting):.0f} s)")
        backoff = [j for j in self.queue if j.not_before > now]
        if backoff:
            parts.append(f"{len(backoff)} shard(s) in retry backoff")
        return ", ".join(parts)
