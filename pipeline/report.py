"""``mimi-tokenize report OUTPUT [--html FILE]``: what an output holds and how healthy its codes are.

Everything is computed from storage: ``manifest.json`` (the headline totals, shown exactly as recorded), the done
records in ``_state/shards/`` (failures with examples, throughput over the run from their timestamps) and the Parquet
files (per codebook level: code usage, entropy, perplexity; clip durations). The Parquet files are streamed one row
group at a time, reading only the ``codes`` and ``duration_s`` columns; the codes of a row group are turned into one
``[frames, K]`` int16 array (``flatten()`` twice, no per-frame Python) and counted with one ``np.bincount``. Clip
durations (one float per clip) are the only per-clip values kept in memory, for the duration histogram.

A plain-text summary always goes to stdout; :func:`render_html` makes a self-contained page (plots as embedded PNG
``data:`` URIs, no external scripts, styles or fonts). The text and the page share the formatting functions below,
so a figure reads the same in both. Only the manifest's redacted config is ever shown.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline import manifest as mf
from pipeline import state, storage
from pipeline.writer import CODEBOOK_SIZE

MAX_ENTROPY_BITS = math.log2(CODEBOOK_SIZE)  # 11
# A level is flagged when it uses fewer than this share of the codes it could have used (min(2048, frames)) ...
MIN_USED_SHARE = 0.05
# ... or when its entropy is below this share of the attainable maximum (log2 of min(2048, frames)).
MIN_ENTROPY_SHARE = 0.5
EXAMPLES_PER_CLASS = 3
DURATION_BINS = 40


# --- formatting, shared by the text summary and the HTML page -----------------------------------------------------


def fmt_int(n: int) -> str:
    return f"{int(n):,}"


def fmt_hours(h: float) -> str:
    """Hours of audio: 2 decimals from 1 h up, else 4 (a small output still shows a figure that is not 0.00)."""
    return f"{h:,.2f}" if h >= 1 else f"{h:.4f}"


def fmt_pct(share: float) -> str:
    return f"{100 * share:.2f}%"


def fmt_bits(bits: float) -> str:
    return f"{bits:.3f}"


def fmt_perplexity(p: float) -> str:
    return f"{p:,.1f}"


def fmt_speed(x: float) -> str:
    return f"{x:,.1f}x"


def fmt_seconds(s: float) -> str:
    return f"{s:.2f}"


def fmt_wall(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}"


# --- the numbers ----------------------------------------------------------------------------------------------------


@dataclass
class LevelStats:
    """Code usage of one codebook level."""

    level: int
    counts: np.ndarray  # [2048] int64
    total: int
    used: int
    entropy_bits: float
    perplexity: float
    flags: list[str]

    @property
    def collapsed(self) -> bool:
        return bool(self.flags)


@dataclass
class ReportData:
    manifest: dict[str, Any]
    levels: list[LevelStats]
    durations: np.ndarray  # seconds per clip in the Parquet files, float64
    parquet_rows: int
    parquet_frames: int
    failures_by_class: dict[str, list[dict[str, Any]]]  # class -> up to EXAMPLES_PER_CLASS examples
    throughput: list[tuple[float, float]]  # (wall seconds since the first shard started, cumulative hours)
    overall_x_realtime: float | None  # hours done over first start..last finish, all sessions
    notes: list[str] = field(default_factory=list)

    @property
    def collapsed_levels(self) -> list[LevelStats]:
        return [s for s in self.levels if s.collapsed]


def level_stats(level: int, counts: np.ndarray) -> LevelStats:
    """Used codes, entropy (bits) and perplexity of one level's code counts, and its collapse flags."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    used = int(np.count_nonzero(counts))
    if total:
        p = counts[counts > 0] / total
        entropy = float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: no "-0.000" for a single code
    else:
        entropy = 0.0
    flags = []
    attainable = min(CODEBOOK_SIZE, total)
    if total == 0:
        pass  # nothing written yet: nothing to judge (collect() notes it)
    elif used <= 1:
        flags.append("unused: one code only")
    else:
        if used < MIN_USED_SHARE * attainable:
            flags.append(f"uses {used} of {attainable} attainable codes (< {MIN_USED_SHARE:.0%})")
        if entropy < MIN_ENTROPY_SHARE * math.log2(attainable):
            flags.append(f"entropy {fmt_bits(entropy)} bits < {MIN_ENTROPY_SHARE:.0%} of attainable "
                         f"{fmt_bits(math.log2(attainable))}")
    return LevelStats(level, counts, total, used, entropy, float(2.0 ** entropy), flags)


def count_codes(table_or_batch, num_codebooks: int) -> np.ndarray:
    """``[K, 2048]`` code counts of the ``codes`` column of a pyarrow Table or RecordBatch, vectorised."""
    column = table_or_batch.column("codes")
    chunks = column.chunks if hasattr(column, "chunks") else [column]
    counts = np.zeros(num_codebooks * CODEBOOK_SIZE, dtype=np.int64)
    offsets = np.arange(num_codebooks, dtype=np.int64) * CODEBOOK_SIZE
    for chunk in chunks:
        if chunk.type.value_type.list_size != num_codebooks:
            raise ValueError(f"codes have {chunk.type.value_type.list_size} codebooks, the manifest {num_codebooks}")
        flat = chunk.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, num_codebooks)
        counts += np.bincount((flat.astype(np.int64) + offsets).ravel(), minlength=counts.size)
    return counts.reshape(num_codebooks, CODEBOOK_SIZE)


def _scan_parquet(output: str, files: list[str], num_codebooks: int,
                  storage_options: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Code counts ``[K, 2048]``, clip durations and frame count over ``files``, one row group at a time."""
    counts = np.zeros((num_codebooks, CODEBOOK_SIZE), dtype=np.int64)
    durations: list[np.ndarray] = []
    frames = 0
    for rel in files:
        fs, path = storage.get_fs(storage.join(output, rel), storage_options)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            for i in range(pf.num_row_groups):
                group = pf.read_row_group(i, columns=["codes", "duration_s"])
                group_counts = count_codes(group, num_codebooks)
                counts += group_counts
                frames += int(group_counts[0].sum()) if num_codebooks else 0
                durations.append(group.column("duration_s").to_numpy())
    all_durations = np.concatenate(durations).astype(np.float64) if durations else np.zeros(0)
    return counts, all_durations, frames


def _throughput(done: dict[str, dict[str, Any]]) -> tuple[list[tuple[float, float]], float | None]:
    records = sorted(done.values(), key=lambda r: (r["finished"], r["shard"]["shard_id"]))
    if not records:
        return [], None
    t0 = min(datetime.fromisoformat(r["started"]).timestamp() for r in records)
    points, hours = [(0.0, 0.0)], 0.0
    for r in records:
        hours += r["hours"]
        points.append((datetime.fromisoformat(r["finished"]).timestamp() - t0, hours))
    span = points[-1][0]
    return points, (hours * 3600 / span if span > 0 else None)


def _failure_examples(done: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_class: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for shard_id in sorted(done):
        for failure in done[shard_id]["failures"]:
            by_class[failure["error_class"]].append(failure)
    return {cls: sorted(items, key=lambda f: f["clip_id"])[:EXAMPLES_PER_CLASS] for cls, items in by_class.items()}


def collect(output: str, storage_options: dict[str, Any] | None = None) -> ReportData:
    """Read an output's manifest, done records and Parquet files into a :class:`ReportData`.

    Raises :class:`pipeline.state.OutputError` if ``output`` is not an output with a readable ``manifest.json``.
    """
    man = state.read_output(output, storage_options)
    k = int(man["num_codebooks"])
    done = dict(mf.load_done(output, storage_options).items())
    files = [done[s]["file"] for s in sorted(done)]
    counts, durations, frames = _scan_parquet(output, files, k, storage_options)
    throughput, overall = _throughput(done)
    data = ReportData(
        manifest=man,
        levels=[level_stats(i, counts[i]) for i in range(k)],
        durations=durations,
        parquet_rows=int(durations.size),
        parquet_frames=frames,
        failures_by_class=_failure_examples(done),
        throughput=throughput,
        overall_x_realtime=overall,
    )
    totals = man["totals"]
    if (data.parquet_rows, data.parquet_frames) != (totals["clips"], totals["frames"]):
        data.notes.append(f"the Parquet files hold {fmt_int(data.parquet_rows)} clips and "
                          f"{fmt_int(data.parquet_frames)} frames, the manifest {fmt_int(totals['clips'])} and "
                          f"{fmt_int(totals['frames'])} (status {man['status']}: the manifest is rewritten as a run "
                          "goes; code statistics are over the Parquet files)")
    if frames == 0:
        data.notes.append("the Parquet files hold no frames yet: no code statistics")
    elif frames < CODEBOOK_SIZE:
        data.notes.append(f"only {fmt_int(frames)} frames per level, fewer than the {CODEBOOK_SIZE} codes: usage "
                          "and entropy are limited by the sample size (flags use the attainable maximum)")
    return data


# --- text -----------------------------------------------------------------------------------------------------------


def _headline(data: ReportData) -> list[tuple[str, str, str]]:
    """(id, label, value) of the headline figures, as shown in both the text and the HTML."""
    m = data.manifest
    t, timing = m["totals"], m["timing"]
    rows = [
        ("status", "status", m["status"]),
        ("shards", "shards done", f"{fmt_int(t['shards_done'])}/{fmt_int(t['shards'])}"),
        ("hours", "audio hours", fmt_hours(t["hours"])),
        ("clips", "clips", fmt_int(t["clips"])),
        ("failed-clips", "failed clips", f"{fmt_int(t['failed_clips'])} ({fmt_pct(mf.failure_share(m))})"),
        ("frames", "frames", fmt_int(t["frames"])),
        ("tokens", "tokens", f"{fmt_int(t['tokens'])} ({fmt_int(t['frames'])} × {m['num_codebooks']})"),
        ("wall", "wall time (last session)", fmt_wall(timing["wall_s"])),
        ("speed", "speed (last session, start-up included)", f"{fmt_speed(timing['x_realtime'])} realtime"),
    ]
    if data.overall_x_realtime is not None:
        rows.append(("speed-all", "speed while encoding (all sessions: first shard's start to last shard's end)",
                     f"{fmt_speed(data.overall_x_realtime)} realtime"))
    return rows


def _model_rows(data: ReportData) -> list[tuple[str, str, str]]:
    model = data.manifest.get("model") or {}
    return [
        ("model-source", "source", str(mf.redact(model.get("source")))),
        ("model-revision", "revision", model.get("revision") or "default"),
        ("model-sha256", "sha256", str(model.get("sha256"))),
        ("model-k", "codebooks (K)", str(data.manifest["num_codebooks"])),
        ("model-untrained", "untrained (generated weights)", "YES" if model.get("untrained") else "no"),
    ]


def _duration_summary(d: np.ndarray) -> str:
    if not d.size:
        return "no clips"
    return (f"min {fmt_seconds(d.min())} s, median {fmt_seconds(float(np.median(d)))} s, "
            f"mean {fmt_seconds(d.mean())} s, max {fmt_seconds(d.max())} s")


def render_text(data: ReportData) -> str:
    m = data.manifest
    lines = []
    if (m.get("model") or {}).get("untrained"):
        lines += ["!! UNTRAINED MODEL: this output was made with generated (random) weights, a demo run; "
                  "its codes mean nothing" + (f" ({m['model']['note']})" if m["model"].get("note") else ""), ""]
    collapsed = data.collapsed_levels
    if collapsed:
        lines += [f"!! COLLAPSED/UNUSED CODEBOOK LEVELS: {', '.join(str(s.level) for s in collapsed)} "
                  f"of {len(data.levels)}", ""]
    lines.append(f"mimi-tokenize report: {mf.redact(m.get('output_url', ''))}")
    width = max(len(label) for _, label, _ in _headline(data))
    lines += [f"  {label:<{width}}  {value}" for _, label, value in _headline(data)]
    lines.append("model: " + ", ".join(f"{label} {value}" for _, label, value in _model_rows(data)))
    lines.append(f"durations: {_duration_summary(data.durations)}")
    by_class = m["totals"]["failed_by_class"]
    if by_class:
        lines.append("failures by class:")
        for cls, n in by_class.items():
            lines.append(f"  {cls}: {fmt_int(n)}")
            for f in data.failures_by_class.get(cls, []):
                lines.append(f"    {f['clip_id']} [{f['stage']}] {f['source_uri']}: {f['message']}")
    else:
        lines.append("failures: none")
    lines.append(f"codebook levels (used codes of {CODEBOOK_SIZE}, entropy in bits of max "
                 f"{MAX_ENTROPY_BITS:.0f}, perplexity):")
    for s in data.levels:
        flag = f"  << {'; '.join(s.flags)}" if s.flags else ""
        lines.append(f"  level {s.level:>2}: used {fmt_int(s.used):>5}  entropy {fmt_bits(s.entropy_bits):>6}  "
                     f"perplexity {fmt_perplexity(s.perplexity):>7}{flag}")
    lines += [f"note: {n}" for n in data.notes]
    return "\n".join(lines)


# --- plots ----------------------------------------------------------------------------------------------------------


def _png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(data: ReportData) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plots = {}
    if data.durations.size:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.hist(data.durations, bins=min(DURATION_BINS, max(5, data.durations.size)), color="#4878a8")
        ax.set_xlabel("clip duration (s)")
        ax.set_ylabel("clips")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("clip durations")
        plots["durations"] = _png_data_uri(fig)
    if len(data.throughput) > 1:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        xs, ys = zip(*data.throughput)
        ax.step(xs, ys, where="post", color="#2a7a4a", marker="o", markersize=3)
        ax.set_xlabel("wall time since the first shard started (s)")
        ax.set_ylabel("audio hours done")
        ax.set_title("throughput (done records)")
        plots["throughput"] = _png_data_uri(fig)
    by_class = data.manifest["totals"]["failed_by_class"]
    if by_class:
        fig, ax = plt.subplots(figsize=(6, 0.6 + 0.4 * len(by_class)))
        names = list(by_class)[::-1]
        ax.barh(names, [by_class[n] for n in names], color="#b04040")
        ax.set_xlabel("failed clips")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("failures by class")
        plots["failures"] = _png_data_uri(fig)
    if data.levels:
        k = len(data.levels)
        fig, ax = plt.subplots(figsize=(6, 3.2))
        colors = ["#c03030" if s.collapsed else "#4878a8" for s in data.levels]
        ax.bar([s.level for s in data.levels], [s.entropy_bits for s in data.levels], color=colors)
        ax.axhline(MAX_ENTROPY_BITS, color="gray", linestyle="--", linewidth=1, label=f"max {MAX_ENTROPY_BITS:.0f}")
        ax.set_ylim(0, MAX_ENTROPY_BITS + 0.5)
        ax.set_xlabel("codebook level")
        ax.set_ylabel("entropy (bits)")
        ax.set_title("code entropy per level (red: flagged)")
        ax.set_xticks(range(k))
        ax.legend(loc="lower right")
        plots["entropy"] = _png_data_uri(fig)

        cols = min(4, k)
        rows = math.ceil(k / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.0 * rows), squeeze=False, sharex=True)
        for ax in axes.ravel()[k:]:
            ax.set_visible(False)
        for s, ax in zip(data.levels, axes.ravel()):
            color = "#c03030" if s.collapsed else "#4878a8"
            used = np.flatnonzero(s.counts)  # one visible line per used code, however thin the bins are
            ax.vlines(used, 0.8, s.counts[used], color=color, linewidth=0.8, antialiased=False)
            ax.set_yscale("log")
            ax.set_ylim(0.8, max(2, int(s.counts.max(initial=0))) * 1.5)
            ax.set_xlim(0, CODEBOOK_SIZE)
            ax.set_title(f"level {s.level}: {s.used} used, {fmt_bits(s.entropy_bits)} bits"
                         + (" (FLAGGED)" if s.collapsed else ""), fontsize=8, color=color)
            ax.tick_params(labelsize=7)
        fig.suptitle(f"code usage per level: count of each of the {CODEBOOK_SIZE} codes (log scale)", fontsize=10)
        fig.tight_layout()
        plots["usage"] = _png_data_uri(fig)
    return plots


# --- HTML -----------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:sans-serif;margin:24px auto;max-width:1200px;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
.banner{padding:12px 16px;margin:12px 0;border-radius:4px;font-weight:bold}
.untrained{background:#fff3cd;border:2px solid #d4a000}.collapsed{background:#f8d7da;border:2px solid #c03030}
.note{background:#eef;border:1px solid #99c;padding:6px 10px;margin:6px 0}
tr.flagged td{background:#fbe3e4}img{max-width:100%;display:block;margin:8px 0}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plots img{max-width:580px}
pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:12px}code{font-size:12px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _kv_table(rows: list[tuple[str, str, str]], values: dict[str, Any] | None = None) -> str:
    values = values or {}
    out = ["<table>"]
    for rid, label, value in rows:
        data_value = f' data-value="{_e(values[rid])}"' if rid in values else ""
        out.append(f'<tr><th>{_e(label)}</th><td id="{_e(rid)}"{data_value}>{_e(value)}</td></tr>')
    out.append("</table>")
    return "\n".join(out)


def _img(plots: dict[str, str], name: str, alt: str) -> str:
    return f'<img id="plot-{name}" alt="{_e(alt)}" src="{plots[name]}">' if name in plots else ""


def render_html(data: ReportData) -> str:
    """A self-contained HTML page of the report (see the module docstring)."""
    m = data.manifest
    t = m["totals"]
    plots = _plots(data)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>mimi-tokenize report: {_e(mf.redact(m.get('output_url', '')))}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>mimi-tokenize report</h1><p>output <code>{_e(mf.redact(m.get('output_url', '')))}</code>, "
             f"run created {_e(m.get('run_created'))}, updated {_e(m['timing'].get('updated'))}</p>"]
    if (m.get("model") or {}).get("untrained"):
        note = m["model"].get("note")
        parts.append('<div class="banner untrained" id="untrained-banner">UNTRAINED MODEL — this output was made '
                     "with generated (random) weights, a demo run: its codes carry no meaning."
                     + (f"<br><span style=\"font-weight:normal\">{_e(note)}</span>" if note else "") + "</div>")
    collapsed = data.collapsed_levels
    if collapsed:
        parts.append(f'<div class="banner collapsed" id="collapsed-banner">COLLAPSED/UNUSED CODEBOOK LEVELS: '
                     f"{_e(', '.join(str(s.level) for s in collapsed))} of {len(data.levels)} — "
                     f"{_e('; '.join(f'level {s.level}: ' + ', '.join(s.flags) for s in collapsed))}</div>")
    parts += [f'<div class="note">{_e(n)}</div>' for n in data.notes]

    parts.append("<h2>Totals</h2>")
    parts.append(_kv_table(_headline(data), {"hours": repr(float(t["hours"])), "clips": t["clips"],
                                             "failed-clips": t["failed_clips"], "frames": t["frames"],
                                             "tokens": t["tokens"]}))
    parts.append('<div class="plots">' + _img(plots, "throughput", "audio hours done over wall time")
                 + _img(plots, "durations", "histogram of clip durations") + "</div>")
    parts.append(f'<p id="durations">Clip durations: {_e(_duration_summary(data.durations))}</p>')

    parts.append("<h2>Model</h2>")
    parts.append(_kv_table(_model_rows(data)))

    parts.append("<h2>Codebook levels</h2>")
    parts.append(f"<p>Over {_e(fmt_int(data.parquet_frames))} frames per level read from the Parquet files. "
                 f"Entropy in bits (max {MAX_ENTROPY_BITS:.0f}); perplexity = 2<sup>entropy</sup>. Flagged: fewer "
                 f"than {MIN_USED_SHARE:.0%} of the attainable codes used, or entropy below "
                 f"{MIN_ENTROPY_SHARE:.0%} of the attainable maximum (attainable: min({CODEBOOK_SIZE}, frames)).</p>")
    parts.append('<table id="levels"><tr><th>level</th><th>used codes</th><th>entropy (bits)</th>'
                 "<th>perplexity</th><th>flags</th></tr>")
    for s in data.levels:
        parts.append(
            f'<tr class="{"flagged" if s.collapsed else "ok"}"><td class="num">{s.level}</td>'
            f'<td class="num" id="used-{s.level}" data-value="{s.used}">{_e(fmt_int(s.used))}</td>'
            f'<td class="num" id="entropy-{s.level}" data-value="{s.entropy_bits!r}">{_e(fmt_bits(s.entropy_bits))}</td>'
            f'<td class="num" id="perplexity-{s.level}" data-value="{s.perplexity!r}">'
            f"{_e(fmt_perplexity(s.perplexity))}</td><td>{_e('; '.join(s.flags))}</td></tr>")
    parts.append("</table>")
    parts.append('<div class="plots">' + _img(plots, "entropy", "entropy per codebook level") + "</div>")
    parts.append(_img(plots, "usage", "code usage histogram per level"))

    parts.append("<h2>Failures</h2>")
    if t["failed_by_class"]:
        parts.append('<table id="failures"><tr><th>class</th><th>clips</th><th>examples (clip id, stage, URI, '
                     "message)</th></tr>")
        for cls, n in t["failed_by_class"].items():
            examples = "<br>".join(
                f"<code>{_e(f['clip_id'])}</code> [{_e(f['stage'])}] <code>{_e(f['source_uri'])}</code>: "
                f"{_e(f['message'])}" for f in data.failures_by_class.get(cls, []))
            parts.append(f'<tr><td>{_e(cls)}</td><td class="num" data-class="{_e(cls)}">{_e(fmt_int(n))}</td>'
                         f"<td>{examples}</td></tr>")
        parts.append("</table>")
        parts.append(_img(plots, "failures", "failed clips by error class"))
    else:
        parts.append('<p id="failures">No failed clips.</p>')

    parts.append("<h2>Run</h2>")
    parts.append("<p>Software</p><pre>" + _e(json.dumps(m.get("software", {}), indent=2)) + "</pre>")
    parts.append("<p>Config (redacted)</p><pre>" + _e(json.dumps(mf.redact(m.get("config", {})), indent=2))
                 + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def report(output: str, html_path: str | None = None, storage_options: dict[str, Any] | None = None) -> ReportData:
    """Print the text summary of ``output``; with ``html_path``, also write the HTML page there (any fsspec URL)."""
    from pipeline.dedup import describe, read_summary

    data = collect(output, storage_options)
    summary = read_summary(output, storage_options)
    print(render_text(data) + (f"\n{describe(summary)}" if summary else ""))
    if html_path:
        storage.atomic_write_bytes(html_path, render_html(data).encode("utf-8"))
        print(f"report page: {html_path}")
    return data
