"""``mimi-tokenize run``: the run policy. Check the paths (never adopt a folder this tool did not create), lock the
output, list the input, plan against storage, retire stale files, encode the pending shards on the encoder pool,
unify the metadata schema, write the manifest.

Modules it drives: :mod:`pipeline.model_files` (loading and shipping the weights), :mod:`pipeline.plan` (what is
done, what to encode, what to retire), :mod:`pipeline.scheduler` (the elastic encoder pool), :mod:`pipeline.encoder`
(decode tasks → encoder actor → commit). All state lives on storage: a run killed at any point is resumed by
running the same command again, with nothing lost or duplicated.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import posixpath
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from fsspec.implementations.local import LocalFileSystem

from pipeline import index, ledger, manifest, retry, signals, state, storage
from pipeline import schema as output_schema
from pipeline.commit import Output
from pipeline.config import RunConfig
from pipeline.encoder import DecodeSettings, EncoderSettings, ShardEncoder
from pipeline.footers import parquet_footers
from pipeline.model_files import ModelFiles, RunError, load_model_files
from pipeline.plan import Plan, make_plan
from pipeline.progress import Progress, manifest_writer
from pipeline.records import RecordSet
from pipeline.scheduler import EncoderPool, Job, Scheduler
from pipeline.sources import discover_shards
from pipeline.sources.parquet import metadata_schema as parquet_metadata_schema
from pipeline.lock import RunLock
from pipeline.storage import join
from pipeline.types import Shard
from pipeline.window import bounded

log = logging.getLogger(__name__)

ENCODER_MEMORY = 3 * 2**30  # host memory an encoder actor declares (model, batch activations, its shards' codes)
MAINTENANCE_MEMORY = 2**30  # a retire / conform task holds one shard file's table (codes and metadata)
MAINTENANCE_PER_CPU = 2  # retire / conform tasks in flight per cluster CPU (the rest wait on the driver, not in Ray)
MIN_FREE_BYTES = 100 * 2**20  # a run does not start on a local output disk with less free space
MANIFEST_WRITE_WINDOW_S = 30.0  # a progress write of the manifest retries this long at most, then again later
# settings that change which clips a shard holds, or their codes
SETTINGS_FIXED_ON_RESUME = ("input", "files_per_shard", "max_shard_bytes", "channel_policy", "dtype")

__all__ = ["RunError", "checked_config", "exit_code", "list_shards", "plan_run", "run"]


# --- start: run identity, listing, schema ------------------------------------------------------------------------


def _check_paths(cfg: RunConfig) -> None:
    """Refuse, before anything is written, an output that is a file, a folder this tool did not create, or one that
    overlaps the input (the output's own files would be listed as input on the next run)."""
    options, where = cfg.output_options(), manifest.redact(cfg.output)
    fs, path = storage.get_fs(cfg.output, options)
    if retry.call(fs.isfile, path, what=f"stat {where}"):
        raise RunError(f"--output {where} is a file; give a folder (new, or made by mimi-tokenize)")
    root = _listed_root(cfg)
    if root is not None and (_inside(cfg.output, root) or _inside(root, cfg.output)):
        raise RunError(f"--output {where} and --input {manifest.redact(cfg.input)} overlap: the output's files would "
                       "be read as input; put the output outside the input folder")
    foreign = state.foreign_entries(cfg.output, options)
    if foreign:
        raise RunError(f"--output {where} is not empty and was not made by mimi-tokenize (it holds "
                       f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); give a new or empty folder")


def _listed_root(cfg: RunConfig) -> str | None:
    """The folder the input listing searches (a folder, or a glob's part before its first wildcard); None for a
    single file (a manifest, a tar, a Parquet file), which is read, not searched."""
    if glob.has_magic(cfg.input):
        return posixpath.dirname(re.split(r"[*?\[]", cfg.input, maxsplit=1)[0]).rstrip("/")
    fs, path = storage.get_fs(cfg.input, cfg.input_options())
    try:
        return None if retry.call(fs.isfile, path, what=f"stat {manifest.redact(cfg.input)}") else cfg.input.rstrip("/")
    except OSError:  # reported by the listing, with its reason
        return None


def _inside(url: str, folder: str) -> bool:
    url, folder = url.rstrip("/"), folder.rstrip("/")
    return url == folder or url.startswith(folder + "/")


def _init_run(cfg: RunConfig, model_files: ModelFiles) -> dict[str, Any]:
    """The output's run identity, written on first use; an output that holds no row yet (a run that stopped at the
    start, or whose clips all failed) starts over with this run's settings rather than being bound to the first."""
    run = manifest.make_run(cfg.to_dict(), model_files.provenance(), cfg.num_codebooks)
    try:
        stored = manifest.init_run(cfg.output, run, cfg.output_options())
        check_settings(stored, cfg)
    except manifest.IncompatibleOutputError as exc:
        if not _clear_rowless_output(cfg):
            raise
        log.warning("the output holds no rows yet: it starts over with this run's settings (%s)", exc)
        storage.write_json(join(cfg.output, manifest.RUN_PATH), run, cfg.output_options())
        return run
    return stored


def check_settings(stored: dict[str, Any], cfg: RunConfig) -> None:
    """Raise :class:`~pipeline.manifest.IncompatibleOutputError` if ``cfg`` changes a setting of the output's stored
    run identity that decides which clips a shard holds, or their codes (:data:`SETTINGS_FIXED_ON_RESUME`)."""
    config = manifest.redact(cfg.to_dict())
    changed = [f"{k}: output has {stored['config'].get(k)!r}, this run has {config[k]!r}"
               for k in SETTINGS_FIXED_ON_RESUME if stored["config"].get(k) != config[k]]
    if changed:
        raise manifest.IncompatibleOutputError(
            "the output folder was started with other settings (" + "; ".join(changed) + "). Write to a new "
            "output folder, or resume with the same settings.")


def _clear_rowless_output(cfg: RunConfig) -> bool:
    """Delete the state of an output that holds no row (records, their empty files, schema, manifest) and return
    True; return False, touching nothing, when it holds rows or data files that no record names."""
    options = cfg.output_options()
    records, files = manifest.load_records(cfg.output, options, check_order=True)
    named = {r["file"].rsplit("/", 1)[-1] for r in records.values()}
    if any(r["rows"] for r in records.values()) or set(files) - named:
        return False
    for shard_id, record in records.items():  # the file first: a record without its file is ignored by the plan
        storage.remove(join(cfg.output, record["file"]), options)
        storage.remove(manifest.record_url(cfg.output, shard_id), options)
    for path in (output_schema.SCHEMA_PATH, manifest.MANIFEST_PATH):
        storage.remove(join(cfg.output, path), options)
    index.remove_others(cfg.output, "", options)
    return True


def checked_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` with absolute local paths, its retry window in force, and its paths checked (:func:`_check_paths`)
    before anything is read or written: the start of `run` and `plan`."""
    if not cfg.input or not cfg.output:
        raise RunError("input and output are required (--input URL --output URL, or in the config file)")
    cfg = dataclasses.replace(cfg, input=_absolute(cfg.input), output=_absolute(cfg.output))
    retry.set_policy(retry.RetryPolicy(outage_s=cfg.storage_retry_s))
    _check_paths(cfg)
    return cfg


def list_shards(cfg: RunConfig) -> list[Shard]:
    """The input's listing cut into shards (:func:`pipeline.sources.discover_shards`); a bad input is a
    :class:`RunError`."""
    try:
        return discover_shards(cfg.input, files_per_shard=cfg.files_per_shard, max_shard_bytes=cfg.max_shard_bytes,
                               storage_options=cfg.input_options())
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot use input {manifest.redact(cfg.input)}: {exc}") from exc


def _input_schema(cfg: RunConfig, shards: list[Shard]) -> pa.Schema | None:
    """The metadata schema the input decides before encoding (None for WebDataset: known only at commit)."""
    kind = shards[0].kind
    where = f"input {manifest.redact(cfg.input)}"
    if kind == "files":
        return pa.schema([])
    if kind == "manifest":
        return output_schema.infer((json.loads(m.row) for s in shards for m in s.members if m.row and not m.error),
                                   where)
    if kind == "parquet":
        return parquet_metadata_schema(parquet_footers(shards, cfg.output, input_options=cfg.input_options(),
                                                       output_options=cfg.output_options(), save=True))
    return None


def _decide_schema(cfg: RunConfig, shards: list[Shard]) -> pa.Schema | None:
    """The output's metadata schema for this run: the stored one, joined with what the input decides now; stored
    before anything is encoded. A column whose type the input now contradicts is an error here, at the start."""
    url = join(cfg.output, output_schema.SCHEMA_PATH)
    try:
        stored = output_schema.from_json(storage.read_json(url, cfg.output_options()))
    except FileNotFoundError:
        stored = None
    try:
        decided = _input_schema(cfg, shards)
    except (output_schema.MetadataSchemaError, OSError) as exc:
        raise RunError(str(exc)) from exc
    if decided is None or stored is None:
        target = stored if decided is None else decided
    else:
        target = output_schema.unify([stored, decided])
        clash = [f.name for f in target if output_schema.is_json(f) and f.name in decided.names
                 and not output_schema.is_json(decided.field(f.name))]
        if clash:
            raise RunError(f"metadata column(s) {', '.join(clash)} of input {manifest.redact(cfg.input)} no longer "
                           f"have the type this output has for them ({stored}); give them their earlier type, or "
                           "write to a new output")
    if target is not None and (stored is None or not target.equals(stored, check_metadata=True)):
        storage.write_json(url, output_schema.to_json(target), cfg.output_options())
    return target


# --- Ray ---------------------------------------------------------------------------------------------------------


_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _drop_token_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


@contextmanager
def _ray_session(cfg: RunConfig) -> Iterator[None]:
    """Join (or start, and shut down after) Ray."""
    # Ray's notice that it enabled token authentication by default is logged on every start; it asks nothing of the
    # user of a local instance
    logging.getLogger(_RAY_AUTH_LOGGER).addFilter(_drop_token_auth_notice)
    started = not ray.is_initialized()
    if started:
        try:  # a local instance needs no dashboard
            ray.init(address=cfg.ray_address, **({} if cfg.ray_address else {"include_dashboard": False}))
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RunError(f"cannot start or join Ray (address {cfg.ray_address!r}): {exc}") from exc
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@ray.remote(max_retries=3)
def _maintenance(output: Output, policy: retry.RetryPolicy, method: str, *args: Any) -> Any:
    """One commit step on the output (retire a stale file, conform a file to the schema), as a Ray task."""
    retry.set_policy(policy)
    return getattr(output, method)(*args)


def _run_steps(output: Output, what: str, calls: list[tuple[str, str, tuple]], periodic: Callable[[], None],
               log_every_s: float) -> tuple[dict[str, Any], dict[str, str]]:
    """Run ``(shard id, method, args)`` commit steps as Ray tasks, at most :data:`MAINTENANCE_PER_CPU` per cluster
    CPU at once (:func:`pipeline.window.bounded`); return their results (the records they wrote, or None for a
    deletion) and the shards whose step failed, with why. Logs what it waits for at most every ``log_every_s``."""
    if not calls:
        return {}, {}
    log.info("%s: %d file(s)", what, len(calls))
    policy = retry.policy()
    width = MAINTENANCE_PER_CPU * max(1, int(ray.cluster_resources().get("CPU", 1)))

    def submit(call: tuple[str, str, tuple]) -> ray.ObjectRef:
        shard_id, method, args = call
        return _maintenance.options(num_cpus=1, memory=MAINTENANCE_MEMORY, name=f"{method}:{shard_id}").remote(
            output, policy, method, *args)

    def wait(refs: list[ray.ObjectRef], timeout_s: float) -> list[ray.ObjectRef]:
        return ray.wait(refs, num_returns=1, timeout=timeout_s)[0]

    results, errors = {}, {}
    logged = time.monotonic()

    def idle(flight: list[tuple[str, str, tuple]], waited_s: float) -> None:
        nonlocal logged
        if time.monotonic() - logged >= log_every_s:
            logged = time.monotonic()
            log.info("%s: waiting for %d file(s) (%s%s), %d of %d done; none finished for %.0f s", what, len(flight),
                     ", ".join(shard_id for shard_id, _, _ in flight[:3]), ", ..." if len(flight) > 3 else "",
                     len(results) + len(errors), len(calls), waited_s)
        periodic()

    for (shard_id, _, _), ref in bounded(calls, submit, wait, width=width, idle=idle):
        try:
            results[shard_id] = ray.get(ref)
        except ray.exceptions.RayError as exc:
            errors[shard_id] = f"{what} failed: {retry.brief(exc)}"
            log.error("%s: shard %s: %s", what, shard_id, retry.brief(exc))
        periodic()
    return results, errors


# --- the run -----------------------------------------------------------------------------------------------------


def _progress_line(m: dict[str, Any]) -> str:
    totals, timing = m["totals"], m["timing"]
    eta = f", ETA {timing['eta_s'] / 60:.1f} min" if timing["eta_s"] is not None else ""
    label = "[UNTRAINED model] " if m["model"].get("untrained") else ""
    return (f"{label}{totals['shards_done']}/{totals['shards']} shards, {totals['hours']:.2f} h of audio, "
            f"{timing['x_realtime']:.1f}x realtime{eta}, {totals['failed_clips']} failed clip(s)")


class _Every:
    """Calls ``fn`` when at least ``interval_s`` passed since the last call (or since creation)."""

    def __init__(self, interval_s: float, fn: Callable[[], None]):
        self.interval_s, self.fn, self.last = interval_s, fn, time.time()

    def __call__(self) -> None:
        if time.time() - self.last >= self.interval_s:
            self.fn()
            self.last = time.time()


def _encode(cfg: RunConfig, plan: Plan, model_files: ModelFiles, output: Output, schema: pa.Schema | None,
            on_done: Callable[[dict[str, Any]], None], periodic: Callable[[], None]
            ) -> tuple[dict[str, str], retry.OutputUnwritable | None]:
    """Encode the plan's pending shards on the encoder pool, handing each record committed to ``on_done``; return
    the shards given up on, and the error that stopped the run when the output could not be written."""
    resources = ray.cluster_resources()
    use_gpus = cfg.device != "cpu" and resources.get("GPU", 0) > 0
    if cfg.device == "cuda" and not resources.get("GPU", 0):
        raise RunError("device is 'cuda' but the Ray cluster has no GPUs")
    expected = cfg.num_encoders or (int(resources["GPU"]) if use_gpus else 1)
    cpus = int(resources.get("CPU", 1))
    slots = cfg.decode_tasks_per_encoder or max(2, (cpus - expected) // expected)
    decode = DecodeSettings(cfg.channel_policy, cfg.part_seconds, cfg.max_clip_seconds, cfg.input_options(),
                            retry.policy(), cfg.vad)
    settings = EncoderSettings(cfg.num_codebooks, cfg.batch_max_seconds, cfg.max_pad_ratio, cfg.chunk_frames,
                               cfg.device, cfg.dtype, max(1, cpus // expected), cfg.shard_retries, cfg.stall_timeout_s)
    model_ref = ray.put(model_files.shipped())  # the bytes go to the object store; the driver keeps none of them
    actor = ShardEncoder.options(num_gpus=1 if use_gpus else 0, num_cpus=1, max_concurrency=slots + 2,
                                 memory=ENCODER_MEMORY + slots * decode.part_bytes)
    pool = EncoderPool(lambda: actor.remote(settings, decode, model_ref, output), fixed=cfg.num_encoders,
                       use_gpus=use_gpus, slots=slots)
    schema_json = None if schema is None else output_schema.to_json(schema)

    def submit(encoder, job: Job):
        return encoder.handle.process.remote(job.shard, attempt=job.attempt, kept=job.kept, schema=schema_json)

    log.info("%d shard(s) to encode on %d encoder(s) (%s), %d decode task(s) each", len(plan.pending), expected,
             "GPU" if use_gpus else "CPU", slots)
    scheduler = Scheduler(pool, [Job(s, tuple(plan.kept.get(s.shard_id, ()))) for s in plan.pending], submit=submit,
                          on_done=on_done, shard_retries=cfg.shard_retries, encoder_wait_s=cfg.encoder_wait_s,
                          wait_log_s=cfg.progress_interval_s)
    try:
        return scheduler.run(periodic), scheduler.fatal
    finally:
        pool.shutdown()


def _unify_schema(cfg: RunConfig, output: Output, done: RecordSet, periodic: Callable[[], None]
                  ) -> tuple[RecordSet, dict[str, str]]:
    """At commit: bring every file of ``done`` (the valid records) to the union of the metadata schemas (WebDataset
    inputs, or types that grew); return the records, updated where their files were rewritten, and the files that
    could not be rewritten. Each distinct schema is parsed once."""
    url = join(cfg.output, output_schema.SCHEMA_PATH)
    try:
        stored = [output_schema.from_json(storage.read_json(url, cfg.output_options()))]
    except FileNotFoundError:
        stored = []
    texts = done.column("schema").cast(pa.string()).combine_chunks()
    distinct = pc.unique(texts).drop_null().to_pylist()
    schemas = [output_schema.from_json(json.loads(text)) for text in distinct]
    target = output_schema.unify([*stored, *schemas])
    if not stored or not target.equals(stored[0], check_metadata=True):
        storage.write_json(url, output_schema.to_json(target), cfg.output_options())
    differ = pa.array([t for t, s in zip(distinct, schemas) if not s.equals(target, check_metadata=True)], pa.string())
    calls = [(shard_id, "conform", (record, target))
             for shard_id, record in done.filter(pc.is_in(texts, value_set=differ)).items()]
    rewritten, errors = _run_steps(output, "unifying the metadata columns", calls, periodic, cfg.progress_interval_s)
    return done.updated(rewritten), errors


def run(cfg: RunConfig) -> int:
    """Tokenize ``cfg.input`` into ``cfg.output``, resuming where a previous run stopped.

    Returns 0, or 1 when some shards could not be completed or failed clips exceed ``max_failure_share``.
    Raises :class:`RunError`, ``OutputLockedError``, ``IncompatibleOutputError`` or ``CheckpointError`` when the run
    cannot start, and :class:`~pipeline.retry.OutputUnwritable` when the output cannot be written (the run stops
    at once, keeping what it committed).
    """
    cfg = checked_config(cfg)
    _check_free_space(cfg.output, cfg.output_options())
    if cfg.vad:
        try:
            signals.vad_model()
        except RuntimeError as exc:
            raise RunError(str(exc)) from exc
    session_start = time.time()
    model_files = load_model_files(cfg.model, cfg.revision, cfg.num_codebooks)
    if model_files.untrained:
        log.warning("model %s holds UNTRAINED generated weights: the codes carry no meaning (for trying the "
                    "pipeline only); the manifest records model.untrained = true", model_files.source)
    options = cfg.output_options()
    lock = RunLock(cfg.output, run_id=uuid.uuid4().hex[:12], storage_options=options, lease_s=cfg.lock_lease_s)
    lock.acquire(wait_s=cfg.lock_wait_s)
    lock.start_heartbeat()
    compactor = None
    try:
        run_record = _init_run(cfg, model_files)
        shards = list_shards(cfg)
        lock.check()
        schema = _decide_schema(cfg, shards)
        output = Output(cfg.output, cfg.num_codebooks, model_files.file_metadata(), options, lock.fence())
        compactor = ledger.Compactor(lambda: manifest.fold_records(cfg.output, options, output.writing),
                                     cfg.checkpoint_every)
        plan = plan_run(cfg, shards, output.read_ids)
        for warning in plan.warnings:
            log.warning("%s", warning)
        _log_plan(cfg, plan)
        final = _finished_manifest(cfg, plan)
        if final is None:
            final = _work(cfg, plan, model_files, output, schema, run_record, lock, session_start, compactor)
            compactor.finish()  # the next run reads the checkpoint, not every record
        elif plan.unfolded:  # nothing to do, but records were read one by one: fold them for the next run
            compactor.finish()  # (a plan that read every record from the newest checkpoint leaves it as it is)
    finally:
        if compactor is not None:
            compactor.finish(fold=False)
        try:
            lock.release()
        except OSError as exc:  # the store is down: the lock goes stale on its own (its heartbeat has stopped)
            log.warning("could not release the output's lock (%s); it goes stale in %.0f s", retry.brief(exc),
                        lock.lease_s)
    return exit_code(cfg, final)


def _work(cfg: RunConfig, plan: Plan, model_files: ModelFiles, output: Output, schema: pa.Schema | None,
          run_record: dict[str, Any], lock: RunLock, session_start: float, compactor: ledger.Compactor
          ) -> dict[str, Any]:
    """Retire, encode and unify on Ray; return the final manifest (written)."""
    options = cfg.output_options()
    counters = Progress(_build_manifest(cfg, run_record, plan, plan.done.updated(plan.retained), session_start),
                        session_start)  # the entries go to the session's first index; then totals only
    plan.release_done()  # read again at the end, from storage
    window_s = min(cfg.progress_interval_s, MANIFEST_WRITE_WINDOW_S)
    writer = manifest_writer(cfg.output, counters, output.writing, options, window_s)

    def report() -> None:
        current = counters.snapshot()
        log.info(_progress_line(current))
        writer.submit(current)

    progress = _Every(cfg.progress_interval_s, report)

    def periodic() -> None:
        lock.check()
        progress()

    def committed(record: dict[str, Any]) -> None:
        counters.add(record)
        compactor.added()

    report()  # `status` sees the listing and the plan from the start (the session's index)
    unwritable: retry.OutputUnwritable | None = None  # the run stops; what is committed is kept
    with writer, _ray_session(cfg):  # the writer stops before the final manifest: no progress write lands after it
        _, errors = _run_steps(output, "retiring files the listing no longer matches",
                               [(r.shard_id, "retire", (r,)) for r in plan.retire], periodic,
                               cfg.progress_interval_s)
        if errors:  # encoding now could write a clip that a stale file still holds: stop here
            log.error("%d stale file(s) could not be retired; nothing is encoded this run", len(errors))
        elif plan.pending:
            errors, unwritable = _encode(cfg, plan, model_files, output, schema, committed, periodic)
        records = manifest.load_done(cfg.output, options, check_order=True)  # what storage holds now: the truth
        if unwritable is None:
            records, unified = _unify_schema(cfg, output, records, periodic)
            errors.update(unified)
    final = _build_manifest(cfg, run_record, plan, records, session_start, finished=time.time())
    if errors:
        final["shard_errors"] = errors
    try:
        with output.writing():
            manifest.write_manifest(cfg.output, final, options)
    except retry.OutputUnwritable as exc:
        log.error("the manifest could not be written: %s", exc)
        unwritable = unwritable or exc
    if unwritable is not None:
        raise unwritable
    return final


def _build_manifest(cfg: RunConfig, run_record: dict[str, Any], plan: Plan, done: RecordSet,
                    started: float, finished: float | None = None) -> dict[str, Any]:
    return manifest.build_manifest(cfg.output, run_record, plan.shards, done, started=started, finished=finished,
                                   changes=plan.changes, change=plan.change, removed=plan.removed)


def plan_run(cfg: RunConfig, shards: list[Shard], read_ids: Callable[[list[str]], dict[str, list[str]]]) -> Plan:
    """What a run of ``cfg`` does with the listing ``shards``, from the output's state (reads storage only): the plan
    `run` follows and `mimi-tokenize plan` shows."""
    records, files = manifest.load_records(cfg.output, cfg.output_options(), check_order=True)
    return make_plan(shards, records, files, prune=cfg.prune, read_ids=read_ids)


def _log_plan(cfg: RunConfig, plan: Plan) -> None:
    shards, clips = plan.changes["shards"], plan.changes["clips"]
    log.info("%s: %d shard(s), %d already done, %d to encode", manifest.redact(cfg.input), len(plan.shards),
             len(plan.done), len(plan.pending))
    if plan.retire or shards["changed"] or clips["gone"]:
        log.info("listing changed: %d shard(s) added, %d changed, %d removed; %d clip(s) new, %d gone (%s)",
                 shards["added"], shards["changed"], shards["removed"], clips["new"], clips["gone"],
                 "pruned" if plan.changes["prune"] else "their rows are kept; --prune drops them")


def _check_free_space(url: str, storage_options: dict[str, Any]) -> None:
    """Refuse to start when ``url`` is on a local disk with less than :data:`MIN_FREE_BYTES` free."""
    fs, path = storage.get_fs(url, storage_options)
    if not isinstance(fs, LocalFileSystem):
        return
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise RunError(f"only {free / 2**20:.1f} MB free on the disk of {url} ({path}); a run needs at least "
                       f"{MIN_FREE_BYTES / 2**20:.0f} MB there (MIN_FREE_BYTES): make room, or write elsewhere")


def _absolute(url: str) -> str:
    """Local paths made absolute (every worker, and a resumed run from another folder, must see the same data)."""
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


def _finished_manifest(cfg: RunConfig, plan: Plan) -> dict[str, Any] | None:
    """The output's manifest, if there is nothing to do and it already records the listing as complete."""
    if plan.pending or plan.retire:
        return None
    try:
        existing = manifest.read_manifest(cfg.output, cfg.output_options())
    except FileNotFoundError:
        return None
    complete = existing["status"] == "complete" and existing["totals"]["shards"] == len(plan.shards)
    return existing if complete else None


def exit_code(cfg: RunConfig, final: dict[str, Any]) -> int:
    """0 when every shard is done and failed clips stay within ``max_failure_share``, else 1 (logged, then a summary
    line)."""
    log.info(_progress_line(final))
    totals, where = final["totals"], manifest.redact(cfg.output)
    share = manifest.failure_share(final)
    if final["status"] != "complete":
        left = totals["shards"] - totals["shards_done"]
        partial = totals.get("partial_shards", 0)
        log.error("%d shard(s) are not done%s; run the same command again to retry them", left,
                  f" ({partial} of them hold a tar or Parquet input that could not be read to its end: see the "
                  "failures of stage 'container' in the manifest)" if partial else "")
        log.info("incomplete: %d of %d shard(s) left, %s clips (%.2f hours) so far, output in %s", left,
                 totals["shards"], f"{totals['clips']:,}", totals["hours"], where)
        return 1
    log.info("done: %s clips, %.2f hours, %s failed, output in %s", f"{totals['clips']:,}", totals["hours"],
             f"{totals['failed_clips']:,}", where)
    if share > cfg.max_failure_share:
        log.error("%.2f%% of the clips failed, more than max_failure_share %.2f%%; see the failures in %s",
                  100 * share, 100 * cfg.max_failure_share, join(manifest.redact(cfg.output), manifest.MANIFEST_PATH))
        return 1
    return 0

