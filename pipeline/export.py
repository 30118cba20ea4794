"""``mimi-tokenize export OUTPUT DIR``: a flat, memory-mappable copy of an output's codes for LM training stacks.

::

    DIR/codes.u16     uint16 [total_frames, K], row-major (a frame's K codes are contiguous), all clips concatenated
    DIR/offsets.npy   int64 [n_clips + 1]: clip i is codes[offsets[i]:offsets[i + 1]]
    DIR/ids.txt       the clip ids, one per line, in the same order
    DIR/meta.json     K, frame rate, model source and sha256, the output's manifest sha256 and data digest, counts,
                      the ``--where`` filter (null: every row)

Order: the output's data files sorted by name (``data/{shard_id}.parquet``), and the rows of each file in file order.
K may be lower than the output's (the first K codebooks are kept). ``where_text`` (:mod:`pipeline.rowfilter`) keeps
only the rows it selects, and ``meta.json`` records it (``where``, ``source_clips``). The copy is streamed a row group
at a time, so memory does not grow with the output. An incomplete output is refused unless ``force``. The files are
written under temporary names and renamed into place, ``meta.json`` last: a DIR without ``meta.json`` is not an
export, and a rerun into a DIR whose ``meta.json`` names the same data, K and filter does nothing. A DIR that holds
anything else (other files, another export) is refused unless ``force``; a DIR inside the output always is.

Read it with numpy::

    codes = np.memmap("DIR/codes.u16", np.uint16, "r").reshape(-1, K)
    offsets = np.load("DIR/offsets.npy")
    clip = codes[offsets[i]:offsets[i + 1]]           # [n_frames, K]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import index, manifest, state, storage
from pipeline.reading import data_files, iter_codes, num_codebooks, open_parquet
from pipeline.rowfilter import parse_where

log = logging.getLogger(__name__)

FORMAT = "mimi-tokenize-export/1"
FILES = ("codes.u16", "offsets.npy", "ids.txt")
KEPT_OFFSETS = ".offsets.kept.tmp"  # offsets.npy cut to the rows a filter kept, before it replaces the full one


class ExportError(RuntimeError):
    """The output cannot be exported (incomplete, fewer codebooks than asked, nothing in it)."""


def data_digest(records: list[dict[str, Any]]) -> str:
    """sha256 of the data files' names and sha256s: what an export was made from."""
    pairs = sorted((r["file"], r["sha256"]) for r in records)
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def _existing_export(dest: Path, output_url: str, force: bool) -> dict[str, Any] | None:
    """The ``meta.json`` of the export in ``dest`` (None if there is none); raise :class:`ExportError` if ``dest`` is
    a file, lies in the output, or (unless ``force``) is a non-empty folder that is not an export."""
    if dest.is_file():
        raise ExportError(f"{dest} is a file; give a folder to export into")
    if "://" not in output_url and _inside(dest.resolve(), Path(output_url).resolve()):
        raise ExportError(f"{dest} is inside the output {output_url}; export into a folder of its own")
    try:
        return json.loads((dest / "meta.json").read_text())
    except FileNotFoundError:
        pass
    except ValueError as exc:
        if not force:
            raise ExportError(f"{dest}/meta.json is not an export's (not JSON: {exc}); pass --force to replace "
                              "it") from None
        return None
    own = {f".{name}.tmp" for name in FILES} | {KEPT_OFFSETS}  # an interrupted export's files
    other = sorted(p.name for p in dest.iterdir() if p.name not in own) if dest.is_dir() else []
    if other and not force:
        raise ExportError(f"{dest} is not empty and holds no export ({', '.join(other[:3])}"
                          f"{', ...' if len(other) > 3 else ''}); give an empty or new folder, or pass --force to "
                          "write the export files there")
    return None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def export(output_url: str, dest: str | Path, *, num_codebooks_out: int | None = None, force: bool = False,
           where_text: str | None = None, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export ``output_url`` (the rows ``where_text`` selects, if given) into the local folder ``dest``; return its
    ``meta.json`` content."""
    row_filter = None if where_text is None else parse_where(where_text)
    where = manifest.redact(output_url)
    current = state.read_output(output_url, storage_options)
    if current["status"] != "complete":
        message = f"{where}: the run is {current['status']} ({current['totals']['shards_done']} of " \
                  f"{current['totals']['shards']} shards done)"
        if not force:
            raise ExportError(message + "; finish it with `mimi-tokenize run`, or pass --force to export what is done")
        lag = manifest.index_lag(current)
        log.warning("%s; exporting the shards that are done (--force)%s", message, f": {lag}" if lag else "")
    k_out = current["num_codebooks"]
    k = k_out if num_codebooks_out is None else num_codebooks_out
    if not 1 <= k <= k_out:
        raise ExportError(f"--num-codebooks must be between 1 and {k_out} (the codebooks {where} has), got {k}")
    entries = manifest.shard_entries(output_url, current, storage_options, statuses=index.WRITTEN,
                                     columns=["file", "sha256", "rows", "hours"])
    if not entries:
        raise ExportError(f"{where}: no shard is done; there is nothing to export")
    files, _ = data_files(output_url, storage_options)
    if row_filter is not None:
        row_filter.check(open_parquet(files[0], storage_options).schema_arrow, where)
    digest = data_digest(entries)
    dest = Path(dest)
    existing = _existing_export(dest, output_url, force)
    if existing is not None and (existing.get("data_digest"), existing.get("num_codebooks"),
                                 existing.get("where")) == (digest, k, where_text):
        log.info("%s already holds this export; nothing to do", dest)
        return existing
    if existing is not None and not force:
        raise ExportError(f"{dest} holds another export ({existing.get('num_codebooks')} codebooks of "
                          f"{existing.get('source')}, where {existing.get('where')!r}); pass --force to replace it, "
                          "or give another folder")
    (dest / "meta.json").unlink(missing_ok=True)  # DIR is not a finished export until the new meta.json lands
    dest.mkdir(parents=True, exist_ok=True)

    n_clips = sum(e["rows"] for e in entries)
    tmp = {name: dest / f".{name}.tmp" for name in FILES}
    started = time.time()
    offsets = np.lib.format.open_memmap(tmp["offsets.npy"], mode="w+", dtype=np.int64, shape=(n_clips + 1,))
    offsets[0] = 0
    row = frames = read = 0
    seconds = 0.0
    with open(tmp["codes.u16"], "wb") as codes_out, open(tmp["ids.txt"], "w", encoding="utf-8") as ids_out:
        for url in files:
            parquet = open_parquet(url, storage_options)
            if num_codebooks(parquet) != k_out:
                raise ExportError(f"{manifest.redact(url)} has {num_codebooks(parquet)} codebooks, not {k_out}")
            read += parquet.metadata.num_rows
            if read > n_clips:
                raise ExportError(f"{where}: the data files hold more rows than the manifest records; rerun "
                                  "`mimi-tokenize run` on the output")
            for batch in iter_codes(parquet, row_filter=row_filter):
                codes_out.write(np.ascontiguousarray(batch.codes[:, :k], dtype=np.uint16).tobytes())
                offsets[row + 1: row + 1 + batch.rows] = frames + batch.offsets[1:]
                frames += int(batch.offsets[-1])
                row += batch.rows
                seconds += batch.duration_s
                ids_out.writelines(f"{clip_id}\n" for clip_id in batch.ids)
        if read != n_clips:
            raise ExportError(f"{where}: the data files hold {read} rows, the manifest {n_clips}")
        for f in (codes_out, ids_out):
            f.flush()
            os.fsync(f.fileno())
    offsets.flush()
    if row < n_clips:  # rows the filter left out: offsets.npy is shorter
        kept = np.lib.format.open_memmap(dest / KEPT_OFFSETS, mode="w+", dtype=np.int64, shape=(row + 1,))
        kept[:] = offsets[:row + 1]
        kept.flush()
        del kept
        os.replace(dest / KEPT_OFFSETS, tmp["offsets.npy"])
    del offsets
    for name, path in tmp.items():
        os.replace(path, dest / name)
    meta = {
        "format": FORMAT, "num_codebooks": k, "source_num_codebooks": k_out, "frame_rate": 12.5, "dtype": "uint16",
        "codebook_size": 2048, "clips": row, "frames": frames, "tokens": frames * k,
        "hours": sum(e["hours"] for e in entries) if row_filter is None else seconds / 3600,
        "source_clips": n_clips, "where": where_text, "model": current["model"], "source": where,
        "manifest_sha256": hashlib.sha256(json.dumps(current, sort_keys=True).encode()).hexdigest(),
        "data_digest": digest, "source_status": current["status"], "order": "data files by name, rows in file order",
    }
    storage.atomic_write_bytes(str(dest / "meta.json"), json.dumps(meta, indent=2).encode())
    elapsed = time.time() - started
    log.info("exported %d clips, %d frames x %d codebooks (%.1f MB) in %.1f s to %s", row, frames, k,
             frames * k * 2 / 1e6, elapsed, dest)
    return meta
