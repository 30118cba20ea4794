"""``mimi-tokenize plan``: what a run would do, without doing it: the listing's shards that are new, changed, removed
or kept; the files, bytes, clips (and hours, where the inputs say) to encode; the stale files to retire first; and
what ``--prune`` would drop.

It reads storage only: no lock is taken and nothing is written (not even the footer cache a run keeps). The plan is
the run's own (:func:`pipeline.runner.plan_run` over :func:`pipeline.runner.list_shards`), so what it shows is what
a run started now would do, unless the input or the output changes in between.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from pipeline import manifest, storage
from pipeline.commit import Output
from pipeline.config import RunConfig
from pipeline.footers import parquet_footers
from pipeline.plan import Plan
from pipeline.runner import check_settings, checked_config, list_shards, plan_run
from pipeline.types import Member, Shard

DURATION_COLUMNS = ("duration_s", "duration")  # manifest columns read as a clip's seconds


def preview(cfg: RunConfig) -> dict[str, Any]:
    """What a run of ``cfg`` would do now (see the module docstring), as plain data."""
    cfg = checked_config(cfg)
    shards = list_shards(cfg)
    read_ids = _memo(Output(cfg.output, cfg.num_codebooks, {}, cfg.output_options()).read_ids)
    plan = plan_run(cfg, shards, read_ids)
    _check_resumable(cfg, plan)
    pruned = plan if cfg.prune else plan_run(dataclasses.replace(cfg, prune=True), shards, read_ids)
    shard_changes, clips = plan.changes["shards"], plan.changes["clips"]
    listed = {s.shard_id for s in shards}
    return {
        "input": manifest.redact(cfg.input),
        "output": manifest.redact(cfg.output),
        "kind": shards[0].kind,
        "prune": cfg.prune,
        "shards": {"listed": len(shards), "new": shard_changes["added"], "changed": shard_changes["changed"],
                   "removed": shard_changes["removed"], "kept": shard_changes["unchanged"],
                   "retained": len(plan.retained)},
        "encode": {"shards": len(plan.pending), **_to_encode(cfg, plan.pending)},
        "retire": {"files": len(plan.retire), "rewritten": sum(bool(r.keep) for r in plan.retire),
                   "deleted": sum(not r.keep for r in plan.retire), "rows_kept": sum(len(r.keep) for r in plan.retire)},
        "clips": {"new": clips["new"], "encoded_again": clips["encoded_before"], "gone": clips["gone"]},
        "prune_drops": {"clips": pruned.changes["clips"]["pruned"],
                        "files_deleted": sum(not r.keep and r.shard_id not in listed for r in pruned.retire)},
        "warnings": plan.warnings,
    }


def _memo(read_ids: Callable[[list[str]], dict[str, list[str]]]) -> Callable[[list[str]], dict[str, list[str]]]:
    """``read_ids`` reading each shard's ids once (the plan with and without ``prune`` asks for the same files)."""
    known: dict[str, list[str]] = {}

    def read(shard_ids: list[str]) -> dict[str, list[str]]:
        missing = [s for s in shard_ids if s not in known]
        if missing:
            known.update(read_ids(missing))
        return {s: known[s] for s in shard_ids}

    return read


def _check_resumable(cfg: RunConfig, plan: Plan) -> None:
    """Raise as a run would when the output holds files of a run with other settings (an output without any starts
    over, as a run's would)."""
    try:
        stored = storage.read_json(storage.join(cfg.output, manifest.RUN_PATH), cfg.output_options())
    except FileNotFoundError:
        return
    if plan.done or plan.retained or plan.retire:
        check_settings(stored, cfg)


def _to_encode(cfg: RunConfig, pending: list[Shard]) -> dict[str, Any]:
    """Files, bytes, clips and hours of the shards to encode; clips None where only decoding counts them (tars),
    hours None unless a manifest gives every clip's duration."""
    kind = pending[0].kind if pending else "files"
    if kind in ("files", "manifest"):
        members = [m for s in pending for m in s.members]
        files = {m.uri: m.size for m in members if not m.error}
        return {"files": len(files), "bytes": sum(files.values()), "clips": len(members), "hours": _hours(members)}
    clips = None
    if kind == "parquet":
        rows = parquet_footers(pending, cfg.output, input_options=cfg.input_options(),
                               output_options=cfg.output_options(), save=False)
        clips = None if any(f is None for f in rows.values()) else sum(f.rows for f in rows.values())
    return {"files": len(pending), "bytes": sum(s.size for s in pending), "clips": clips, "hours": None}


def _hours(members: list[Member]) -> float | None:
    """The hours of the manifest rows ``members`` by their duration column, None unless every row gives one (a
    number, or a CSV's text of one)."""
    seconds = 0.0
    for m in members:
        row = json.loads(m.row) if m.row else {}
        try:
            seconds += float(next(row[c] for c in DURATION_COLUMNS if row.get(c) not in (None, "")))
        except (StopIteration, TypeError, ValueError):
            return None
    return seconds / 3600


def summarize(p: dict[str, Any]) -> str:
    """The plan as a few readable lines."""
    s, e, r, d = p["shards"], p["encode"], p["retire"], p["prune_drops"]
    clips = "unknown clips" if e["clips"] is None else f"{e['clips']:,} clip(s)"
    hours = ("hours unknown (the input gives no durations)" if e["hours"] is None
             else f"{e['hours']:,.2f} h" if e["hours"] >= 0.01 else f"{e['hours'] * 3600:.1f} s of audio")
    lines = [f"plan: {p['input']} -> {p['output']} ({p['kind']}, {s['listed']:,} shard(s) listed"
             f"{', with --prune' if p['prune'] else ''})",
             f"  shards: {s['new']:,} new, {s['changed']:,} changed, {s['removed']:,} removed, {s['kept']:,} kept "
             f"(done, unchanged), {s['retained']:,} file(s) of gone inputs kept as they are",
             f"  to encode: {e['shards']:,} shard(s), {e['files']:,} file(s), {e['bytes'] / 1e6:,.1f} MB, {clips}, "
             f"{hours}; {p['clips']['new']:,} clip(s) new, {p['clips']['encoded_again']:,} encoded again"]
    if r["files"]:
        lines.append(f"  to retire first: {r['files']:,} stale file(s): {r['rewritten']:,} rewritten keeping "
                     f"{r['rows_kept']:,} row(s) of gone inputs, {r['deleted']:,} deleted")
    if p["prune"]:
        lines.append(f"  --prune drops {d['clips']:,} clip(s) of inputs gone from the listing")
    elif d["clips"]:
        lines.append(f"  --prune would drop {d['clips']:,} clip(s) of inputs gone from the listing "
                     f"({d['files_deleted']:,} file(s) deleted)")
    else:
        lines.append("  --prune would drop nothing")
    if not e["shards"] and not r["files"]:
        lines.append("  nothing to encode: a run would only check the output")
    lines += [f"  warning: {w}" for w in p["warnings"]]
    return "\n".join(lines)
