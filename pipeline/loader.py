"""Train on it: a PyTorch ``IterableDataset`` of packed, fixed-length sequences of Mimi codes.

``MimiCodes(source, seq_len=...)`` reads an output folder of ``mimi-tokenize run`` (any fsspec URL), a folder written
by ``mimi-tokenize export``, or a dataset published to the Hub (``hf://datasets/ORG/NAME``, or its local copy), and
yields ``{"codes": int64 [K, seq_len], "doc_ids": int32 [seq_len]}``:

* **packing**: clips (documents) are concatenated and cut every ``seq_len`` frames; ``doc_ids[t]`` numbers the clip
  that frame ``t`` belongs to within the sequence (0, 1, ...; -1 for padding), so attention can be kept within a
  clip (``doc_ids[i] == doc_ids[j]``) and a loss mask is ``doc_ids >= 0``. The last sequence of a worker is padded
  (``drop_last=False``) or dropped;
* **delays**, applied per clip at load time, never on disk: ``delays[k]`` steps for codebook k, as a list or by name:
  ``"moshi"`` (the acoustic levels one step after the semantic one: ``[0, 1, 1, ...]``) or ``"musicgen"`` (level k
  by k steps: ``[0, 1, 2, ...]``). A clip of T frames becomes ``T + max(delays)`` frames: frame ``t`` of level k
  holds the clip's frame ``t - delays[k]``, and ``pad_value`` where that is outside the clip. ``pad_value`` defaults
  to 2048, the codebook size, an id no code takes;
* **K**: the first ``num_codebooks`` codebooks (default: all the source has);
* **where**: only the clips a filter over the numeric columns selects (:mod:`pipeline.rowfilter`, e.g.
  ``"silence_share < 0.5 and bandwidth_hz > 6000"``); for an output folder or Hub dataset (an export is filtered
  when it is made: ``mimi-tokenize export --where``);
* **shuffling**, deterministic from ``seed`` and the epoch (:meth:`set_epoch`): the order of the source's units
  (files; chunks of 4,096 clips of an export), then a window of ``shuffle_window`` consecutive clips permuted at a
  time (a bounded buffer);
* **sharding**: units are dealt round-robin to ``rank``/``world_size`` (default: torch.distributed's) times the
  DataLoader's workers, so every frame is read by exactly one worker of one rank;
* **resume**: :meth:`state_dict` / :meth:`load_state_dict` save and restore the epoch and the number of sequences
  already yielded, and a restored dataset starts exactly at the next sequence, skipping whole windows from their
  clip lengths alone. With DataLoader workers, use ``torchdata.stateful_dataloader.StatefulDataLoader``: it calls
  these methods in every worker and restores each worker where it stood.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline import manifest, storage
from pipeline.index import WRITTEN
from pipeline.reading import data_files, flatten, num_codebooks, open_parquet
from pipeline.rowfilter import RowFilter, WhereError, group_mask, parse_where

PAD = 2048
EXPORT_UNIT_CLIPS = 4096
DELAY_PATTERNS = {"moshi": lambda k: [0] + [1] * (k - 1), "musicgen": lambda k: list(range(k))}


def delay_pattern(delays: str | Sequence[int] | None, k: int) -> list[int]:
    """Per-codebook delays for ``k`` codebooks: a name (``moshi``, ``musicgen``), a list of ``k`` ints, or None."""
    if delays is None:
        return [0] * k
    if isinstance(delays, str):
        if delays not in DELAY_PATTERNS:
            raise ValueError(f"unknown delay pattern {delays!r}; use one of {sorted(DELAY_PATTERNS)} or a list")
        return DELAY_PATTERNS[delays](k)
    delays = [int(d) for d in delays]
    if len(delays) != k or min(delays) < 0:
        raise ValueError(f"delays must be {k} non-negative ints (one per codebook), got {delays}")
    return delays


def apply_delays(codes: np.ndarray, delays: list[int], pad_value: int) -> np.ndarray:
    """``[T, K]`` → ``[T + max(delays), K]``: level k shifted later by ``delays[k]`` frames, ``pad_value`` around."""
    extra = max(delays)
    if not extra:
        return codes
    out = np.full((codes.shape[0] + extra, codes.shape[1]), pad_value, dtype=np.int32)
    for k, d in enumerate(delays):
        out[d:d + codes.shape[0], k] = codes[:, k]
    return out


# --- sources -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """A piece of the source dealt to one worker: a Parquet file, or a range of an export's clips."""

    key: str
    start: int = 0
    stop: int = 0


class ParquetSource:
    """An output folder, or a folder (or Hub dataset) with ``data/*.parquet``: one unit per file, by file name; with a
    ``row_filter``, a file's clips are those it selects. An output with an index is opened from its manifest alone;
    each worker then reads the index's file names and keeps only its own units' (:meth:`units_at`)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None, row_filter: RowFilter | None = None):
        self.url, self.storage_options, self.row_filter = url, storage_options, row_filter
        try:
            current = manifest.read_manifest(url, storage_options)
        except FileNotFoundError:
            current = None
        if current is not None and "index" in current:
            self.current, self.files, self.count = current, None, current["index"]["files"]
        else:
            self.current, (self.files, _) = None, data_files(url, storage_options)
            self.count = len(self.files)
        first = (open_parquet(self.units_at(np.zeros(1, np.int64))[0].key, storage_options)
                 if self.count and (row_filter is not None or current is None) else None)
        if row_filter is not None and first is not None:
            row_filter.check(first.schema_arrow, url)
        self.num_codebooks = current["num_codebooks"] if current else num_codebooks(first)

    def units_at(self, positions: np.ndarray) -> list[Unit]:
        """The units at ``positions`` (of all the source's units, in file-name order)."""
        files = self.files
        if files is None:
            names = manifest.shard_table(self.url, self.current, self.storage_options, statuses=WRITTEN,
                                         columns=["file"]).column("file")
            if len(names) != self.count:
                raise RuntimeError(f"{manifest.redact(self.url)} was rewritten by a run while it was being read "
                                   f"({len(names)} data files, {self.count} when opened); open the dataset again")
            return [Unit(storage.join(self.url, names[int(i)].as_py())) for i in positions]
        return [Unit(files[int(i)]) for i in positions]

    def lengths(self, unit: Unit) -> np.ndarray:
        parquet = open_parquet(unit.key, self.storage_options)
        if self.row_filter is None:
            return parquet.read(columns=["n_frames"]).column(0).to_numpy()
        lengths = [np.zeros(0, np.int32)]
        for group in range(parquet.metadata.num_row_groups):
            n_frames = parquet.read_row_group(group, columns=["n_frames"]).column(0).to_numpy()
            lengths.append(n_frames[group_mask(parquet, group, self.row_filter)])
        return np.concatenate(lengths)

    def docs(self, unit: Unit, start: int = 0) -> Iterator[np.ndarray]:
        """The unit's (selected) clips from the ``start``-th on, ``[T, K_source]`` int16 each."""
        parquet = open_parquet(unit.key, self.storage_options)
        first = 0
        for group in range(parquet.metadata.num_row_groups):
            mask = group_mask(parquet, group, self.row_filter)
            rows = parquet.metadata.row_group(group).num_rows if mask is None else int(mask.sum())
            if first + rows > start:
                table = parquet.read_row_group(group, columns=["codes"])
                codes, offsets = flatten((table if mask is None else table.filter(mask)).column(0))
                for i in range(max(0, start - first), rows):
                    yield codes[offsets[i]:offsets[i + 1]]
            first += rows


class ExportSource:
    """A folder written by ``mimi-tokenize export``: units of 4,096 consecutive clips."""

    def __init__(self, folder: Path):
        meta = json.loads((folder / "meta.json").read_text())
        self.num_codebooks = meta["num_codebooks"]
        self.offsets = np.load(folder / "offsets.npy", mmap_mode="r")
        self.codes = np.memmap(folder / "codes.u16", np.uint16, "r").reshape(-1, self.num_codebooks)
        n = len(self.offsets) - 1
        self.units = [Unit("export", a, min(a + EXPORT_UNIT_CLIPS, n)) for a in range(0, n, EXPORT_UNIT_CLIPS)]
        self.count = len(self.units)

    def units_at(self, positions: np.ndarray) -> list[Unit]:
        return [self.units[int(i)] for i in positions]

    def lengths(self, unit: Unit) -> np.ndarray:
        return np.diff(self.offsets[unit.start:unit.stop + 1])

    def docs(self, unit: Unit, start: int = 0) -> Iterator[np.ndarray]:
        for i in range(unit.start + start, unit.stop):
            yield self.codes[self.offsets[i]:self.offsets[i + 1]]


def open_source(source: str, storage_options: dict[str, Any] | None = None, where: str | None = None
                ) -> ParquetSource | ExportSource:
    row_filter = None if where is None else parse_where(where)
    if "://" not in source and (Path(source) / "meta.json").is_file() and (Path(source) / "codes.u16").is_file():
        if row_filter is not None:
            raise WhereError(f"--where {where!r}: {source} is an export, which holds no signal columns; filter when "
                             "exporting (mimi-tokenize export --where), or load the output folder")
        return ExportSource(Path(source))
    return ParquetSource(source, storage_options, row_filter)


# --- the dataset ---------------------------------------------------------------------------------------------------


class MimiCodes(IterableDataset):
    """Packed sequences of Mimi codes for LM training (see the module docstring)."""

    def __init__(self, source: str, *, seq_len: int, num_codebooks: int | None = None,
                 delays: str | Sequence[int] | None = None, pad_value: int = PAD, shuffle: bool = True,
                 seed: int = 0, shuffle_window: int = 1024, drop_last: bool = False, rank: int | None = None,
                 world_size: int | None = None, storage_options: dict[str, Any] | None = None,
                 where: str | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.source = open_source(str(source), storage_options, where)
        k = num_codebooks or self.source.num_codebooks
        if not 1 <= k <= self.source.num_codebooks:
            raise ValueError(f"the source has {self.source.num_codebooks} codebooks; cannot load {k}")
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else torch.distributed.get_rank() if distributed else 0
        self.world_size = world_size if world_size is not None else (
            torch.distributed.get_world_size() if distributed else 1)
        self.seq_len, self.num_codebooks, self.pad_value = seq_len, k, pad_value
        self.delays = delay_pattern(delays, k)
        self.shuffle, self.seed, self.window, self.drop_last = shuffle, seed, max(1, shuffle_window), drop_last
        self.epoch = 0
        self.yielded = 0  # sequences this copy (worker) has yielded in the current epoch
        self.skip = 0  # sequences to skip at the next iteration (restored state)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.yielded, self.skip = epoch, 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.yielded, self.skip = state["epoch"], state["yielded"], state["yielded"]

    # iteration -------------------------------------------------------------------------------------------------------

    def worker(self) -> tuple[int, int]:
        """(this worker's global index, the number of workers of all ranks)."""
        info = get_worker_info()
        workers, index = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + index, self.world_size * workers

    def units(self) -> list[Unit]:
        """This worker's units, in this epoch's order."""
        order = np.arange(self.source.count)
        if self.shuffle:  # the same permutation as shuffling the list of units
            np.random.default_rng([self.seed, self.epoch]).shuffle(order)
        index, count = self.worker()
        return self.source.units_at(order[index::count])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        index, _ = self.worker()
        skip_frames = self.skip * self.seq_len
        self.yielded, self.skip = self.skip, 0
        units = self.units()
        window, unit_i, row, skipped = self._seek(units, skip_frames)
        pending = np.zeros((0, self.num_codebooks), np.int32)
        pending_ids = np.zeros(0, np.int32)
        next_doc = 0
        for docs in self._windows(units, unit_i, row, window, index):
            pieces = [apply_delays(d[:, :self.num_codebooks], self.delays, self.pad_value) for d in docs]
            lengths = np.array([len(p) for p in pieces])
            stream = np.concatenate([pending, *pieces]) if pieces else pending
            ids = np.concatenate([pending_ids, np.repeat(np.arange(next_doc, next_doc + len(pieces)), lengths)])
            next_doc += len(pieces)
            if skipped < skip_frames:  # the window holding the resume point: drop the frames already trained on
                cut = skip_frames - skipped
                stream, ids, skipped = stream[cut:], ids[cut:], skip_frames
            whole = len(stream) // self.seq_len * self.seq_len
            for start in range(0, whole, self.seq_len):
                yield self._sequence(stream[start:start + self.seq_len], ids[start:start + self.seq_len])
            pending, pending_ids = stream[whole:], ids[whole:]
        if len(pending) and not self.drop_last:
            fill = self.seq_len - len(pending)
            codes = np.concatenate([pending, np.full((fill, self.num_codebooks), self.pad_value, np.int32)])
            yield self._sequence(codes, np.concatenate([pending_ids, np.full(fill, -1, np.int32)]))

    def _sequence(self, codes: np.ndarray, ids: np.ndarray) -> dict[str, torch.Tensor]:
        self.yielded += 1
        first = ids[ids >= 0][:1]
        local = np.where(ids >= 0, ids - (first[0] if len(first) else 0), -1).astype(np.int32)
        return {"codes": torch.from_numpy(np.ascontiguousarray(codes.T, dtype=np.int64)),
                "doc_ids": torch.from_numpy(local)}

    def _windows(self, units: list[Unit], unit_i: int, row: int, window: int, worker: int
                 ) -> Iterator[list[np.ndarray]]:
        """Windows of ``shuffle_window`` consecutive clips of the worker's stream, from window ``window`` (which starts
        at row ``row`` of unit ``unit_i``), each permuted when shuffling."""
        docs: list[np.ndarray] = []
        for i in range(unit_i, len(units)):
            for doc in self.source.docs(units[i], row if i == unit_i else 0):
                docs.append(doc)
                if len(docs) == self.window:
                    yield self._permuted(docs, window, worker)
                    docs, window = [], window + 1
        if docs:
            yield self._permuted(docs, window, worker)

    def _permuted(self, docs: list[np.ndarray], window: int, worker: int) -> list[np.ndarray]:
        if not self.shuffle:
            return docs
        order = np.random.default_rng([self.seed, self.epoch, worker, window]).permutation(len(docs))
        return [docs[i] for i in order]

    def _seek(self, units: list[Unit], skip_frames: int) -> tuple[int, int, int, int]:
        """Where to start reading to skip ``skip_frames`` frames of the stream: (window, unit, row, frames before that
        window), from the clips' lengths alone (a window's length does not depend on its order)."""
        if not skip_frames:
            return 0, 0, 0, 0
        extra = max(self.delays)
        window = before = count = total = 0
        start = (0, 0)
        for i, unit in enumerate(units):
            for j, length in enumerate(self.source.lengths(unit)):
                if count == 0:
                    start = (i, j)
                total += int(length) + extra
                count += 1
                if count == self.window:
                    if before + total > skip_frames:
                        return window, *start, before
                    window, before, count, total = window + 1, before + total, 0, 0
        return (window, *start, before) if count else (window, len(units), 0, before)

