"""``mimi-tokenize publish``: put a finished output on the Hugging Face Hub as a ``datasets``-loadable dataset repo.

Steps:

1. Check the output: its manifest must say "complete" (every shard done) and every shard must have its done record
   and Parquet file; failed clips must stay within the run's ``max_failure_share``. ``force`` overrides both (an
   incomplete run is then published with the shards that are done); an output whose manifest lists a shard as done
   without its done record or file is always refused.
2. Pack the shard files, in the run's shard order, into Parquet files of about ``target_file_bytes`` (500 MB) with
   row groups of about 100 MB of codes (:mod:`pipeline.packing`), each shard file checked against the sha256 of its
   done record. The dataset's layout, the one ``datasets`` reads without a loading script::

       README.md                               dataset card: YAML front matter (configs, dataset_info, license,
                                               tags), provenance (model, K, hours, failures, versions), files, usage
       data/00000/train-000000.parquet         the packed files, at most ``files_per_folder`` (10,000) per folder
       _publish/shards.parquet                 shard -> packed file and row range (and both sha256s)

3. Upload (not in a dry run) one file at a time: create the dataset repo if needed, list what it already holds, and
   for each packed file that is missing or differs (LFS sha256, or git blob id for files kept in git), pre-upload
   its bytes and delete the local copy; commit the pre-uploaded files in batches of bounded files and bytes, the
   mapping and the card last. Local disk holds one packed file at a time. Packing is deterministic, so a publish
   interrupted midway is resumed by running it again: it packs again, and uploads only what the repo does not
   hold. Files of an earlier publish that are not part of this one (``data/`` and ``_publish/``) are deleted with
   the last commit (they would otherwise be read as part of the train split). A dry run packs every file into the
   staging folder and uploads nothing. After an upload, the mapping is also written to the output, as
   ``_publish/{ORG}/{NAME}/shards.parquet``.

The Hub token comes from ``HF_TOKEN`` or the saved login and is never printed or written anywhere.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from mimi.checkpoint import sha256_file
from pipeline import index, manifest, packing, retry, state, storage
from pipeline.writer import CODEBOOK_SIZE, CORE_COLUMNS

log = logging.getLogger(__name__)

FRAME_RATE = 12.5
SAMPLE_RATE = 24_000
README = "README.md"
DEFAULT_LICENSE = "unknown"
TAGS = ["audio", "mimi", "tokenized-audio", "audio-tokens", "neural-audio-codec", "mimi-tokenize"]
TASK_CATEGORIES = ["audio-to-audio", "text-to-speech"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
COMMIT_MAX_FILES = 100
COMMIT_MAX_BYTES = 20 * 2**30
MAX_REPO_FILES = 99_000  # the Hub's limit is 100,000 files per repo
DEDUP_SEGMENTS = "_dedup/segments.parquet"  # with --dedup: the repeated segments' frame ranges (pipeline.dedup)


class PublishError(RuntimeError):
    """The output cannot be published (incomplete run, too many failed clips, inconsistent files, Hub refusal)."""


@dataclass(frozen=True)
class StagedFile:
    """One file of the staged folder: path in the repo (``/``-separated), local path, size and sha256."""

    path: str
    local_path: str
    size: int
    sha256: str


@dataclass
class PublishResult:
    """What :func:`publish` did: the staging folder, the staged files, and (unless a dry run) what was uploaded."""

    staging: str
    files: list[StagedFile]
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    commits: int = 0
    url: str | None = None


# --- checks --------------------------------------------------------------------------------------------------------


def check_publishable(output_url: str, current: dict[str, Any], done: dict[str, dict[str, Any]], *, force: bool,
                      storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The done records to publish, by file name (the index's order); raise :class:`PublishError` when the output
    must not be published (see the module docstring)."""
    where = manifest.redact(output_url)
    lock = state.live_lock(output_url, storage_options)
    if lock is not None:
        raise PublishError(f"{where} is being written by run {lock.get('run_id')!r} on host {lock.get('host')} "
                           f"(heartbeat {time.time() - lock['heartbeat']:.0f} s ago); publish it once the run ends")
    listed_done = manifest.shard_entries(output_url, current, storage_options, statuses=index.WRITTEN,
                                         columns=["shard_id", "sha256"])  # by file name
    broken = [e["shard_id"] for e in listed_done if e["shard_id"] not in done]
    if broken:
        raise PublishError(f"{where}: the manifest lists {len(broken)} shard(s) as done whose done record or Parquet "
                           f"file is missing or has the wrong size ({', '.join(broken[:5])}"
                           f"{', ...' if len(broken) > 5 else ''}); run `mimi-tokenize run` on this output again "
                           "to redo them, then publish")
    mismatched = [e["shard_id"] for e in listed_done if done[e["shard_id"]]["sha256"] != e["sha256"]]
    if mismatched:
        raise PublishError(f"{where}: done records and manifest.json disagree on the sha256 of shard(s) "
                           f"{', '.join(mismatched[:5])}; run `mimi-tokenize run` on this output again")
    records = [done[e["shard_id"]] for e in listed_done]
    shards_done, shards = shard_counts(current)
    if current["status"] != "complete" or shards_done < shards:
        message = (f"{where}: the run is {current['status']} ({shards_done} of {shards} shards done); "
                   "finish it with `mimi-tokenize run` first")
        if not force:
            raise PublishError(message + ", or pass --force to publish only the shards that are done")
        lag = manifest.index_lag(current)
        log.warning("%s; publishing the %d done shard(s) anyway (--force)%s", message, len(records),
                    f": {lag}" if lag else "")
    if not records:
        raise PublishError(f"{where}: no shard is done; there is nothing to publish")
    share = manifest.failure_share(current)
    limit = (current.get("config") or {}).get("max_failure_share", 0.01)
    if share > limit:
        classes = ", ".join(f"{cls} {n:,}" for cls, n in current["totals"]["failed_by_class"].items())
        message = (f"{where}: {100 * share:.2f}% of the clips failed ({current['totals']['failed_clips']:,}: "
                   f"{classes}), more than the run's max_failure_share {100 * limit:.2f}%; see the failures in "
                   f"{storage.join(where, manifest.MANIFEST_PATH)}")
        if not force:
            raise PublishError(message + ", or pass --force to publish anyway")
        log.warning("%s; publishing anyway (--force)", message)
    return records


# --- files ---------------------------------------------------------------------------------------------------------


def git_blob_sha1(path: str | os.PathLike) -> str:
    """The git object id of a file's bytes (what the Hub reports as ``blob_id`` for files kept in git)."""
    h = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def staged(path: str, local_path: str | os.PathLike) -> StagedFile:
    """The :class:`StagedFile` of the local file ``local_path``, to be ``path`` in the repo."""
    return StagedFile(path, str(local_path), os.path.getsize(local_path), sha256_file(local_path))


# --- dataset card --------------------------------------------------------------------------------------------------


def _size_category(n: int) -> str:
    for limit, label in [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
                         (1_000_000_000, "100M<n<1B")]:
        if n < limit:
            return label
    return "1B<n<10B"


def dataset_info_yaml(schema: pa.Schema, num_rows: int, num_bytes: int, download_size: int) -> dict[str, Any]:
    """The card's ``dataset_info``, as ``datasets`` itself writes it (``push_to_hub``) for Parquet files of
    ``schema``: features inferred from the Arrow schema, and the train split's rows and in-memory Arrow bytes."""
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict

    splits = SplitDict()
    splits.add(SplitInfo(name="train", num_bytes=num_bytes, num_examples=num_rows))
    info = DatasetInfo(features=Features.from_arrow_schema(schema.remove_metadata()), splits=splits,
                       download_size=download_size, dataset_size=num_bytes)
    card_data: dict[str, Any] = {}
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    return card_data["dataset_info"]


LOAD_EXAMPLE = '''\
import numpy as np
from datasets import load_dataset

REPO = "{repo}"
K = {k}  # codebooks per frame

ds = load_dataset(REPO, split="train")

# Or stream it without downloading it first (datasets reads a Parquet row group, about 100 MB of codes, at a time):
first = next(iter(load_dataset(REPO, split="train", streaming=True)))

# One clip's codes as an int16 [n_frames, K] array. Format only the codes column: plain with_format("numpy")
# widens the int16 codes to int64, and dtype=np.int16 is applied to every numeric column it formats
# (duration_s would be truncated to whole seconds, orig_sample_rate 44100 would wrap around).
codes = ds.with_format("numpy", columns=["codes"], dtype=np.int16)
x = codes[0]["codes"]
assert x.dtype == np.int16 and x.shape == (ds[0]["n_frames"], K)

# Batches straight from Arrow with little copying (e.g. in a training data loader):
for batch in ds.with_format("arrow").iter(batch_size=256):
    col = batch["codes"].combine_chunks()                          # list<fixed_size_list<int16, K>>
    steps = col.values.flatten().to_numpy().reshape(-1, K)         # every frame of the batch, int16
    offsets = col.offsets.to_numpy()
    clips = [steps[a:b] for a, b in zip(offsets[:-1], offsets[1:])]  # one int16 [n_frames, K] array per clip
'''


def _hours(hours: float) -> str:
    return f"{hours:,.2f}" if hours >= 10 else f"{hours:.4g}"


def _fmt_failures(failed_by_class: dict[str, int]) -> str:
    return ", ".join(f"{cls} {n:,}" for cls, n in failed_by_class.items()) or "none"


def shard_counts(current: dict[str, Any]) -> tuple[int, int]:
    """(done, all) shards of the listing, from the manifest's totals (retained files are not shards of it)."""
    return current["totals"]["shards_done"], current["totals"]["shards"]


def card_totals(current: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals of the published shards (the manifest's totals when every shard is published)."""
    failed_by_class: dict[str, int] = {}
    for r in records:
        for f in r["failures"]:
            failed_by_class[f["error_class"]] = failed_by_class.get(f["error_class"], 0) + 1
    frames = sum(r["frames"] for r in records)
    return {"shards": len(records), "clips": sum(r["rows"] for r in records),
            "failed_clips": sum(r["failed"] for r in records),
            "failed_by_class": dict(sorted(failed_by_class.items(), key=lambda kv: (-kv[1], kv[0]))),
            "hours": sum(r["hours"] for r in records), "frames": frames,
            "tokens": frames * current["num_codebooks"]}


def build_card(repo_id: str, current: dict[str, Any], records: list[dict[str, Any]], files: list[StagedFile],
               schema: pa.Schema, packed: list[packing.PackResult], *, license: str = DEFAULT_LICENSE,
               dedup: dict[str, Any] | None = None) -> str:
    """The dataset card ``README.md``: YAML front matter for the Hub and ``datasets``, then provenance and usage.
    ``files`` are the packed data files (``packed`` says what they hold), in ``schema``; ``dedup`` is the summary of
    the ``mimi-tokenize dedup`` whose duplicates were left out."""
    current = manifest.redact(current)
    k = current["num_codebooks"]
    model = current["model"]
    totals = card_totals(current, records)
    frames = sum(p.frames for p in packed)  # what the files hold (the records' totals, less what dedup left out)
    totals.update(clips=sum(p.rows for p in packed), frames=frames, tokens=frames * k,
                  hours=sum(p.seconds for p in packed) / 3600)
    num_bytes = sum(p.arrow_bytes for p in packed)
    data_bytes = sum(f.size for f in files)
    info = dataset_info_yaml(schema, totals["clips"], num_bytes, data_bytes)
    front = {
        "license": license,
        "pretty_name": repo_id.split("/", 1)[1],
        "tags": TAGS,
        "task_categories": TASK_CATEGORIES,
        "size_categories": [_size_category(totals["clips"])],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": packing.DATA_GLOB}]}],
        "dataset_info": info,
    }
    metadata_columns = [name for name in (f["name"] for f in info["features"]) if name not in CORE_COLUMNS]
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {repo_id}", ""]
    if model.get("untrained"):
        lines += ["> [!WARNING]",
                  "> **These codes come from untrained (randomly initialised) demo weights, not from a released "
                  "Mimi model. They carry no information about the audio: use them only to test a pipeline.**", ""]
    shards_done, shards = shard_counts(current)
    if shards_done < shards or current["status"] != "complete":
        lines += ["> [!WARNING]",
                  f"> **Partial dataset: {shards_done} of {shards} shards of the run were done "
                  "when it was published.**", ""]
    lines += [
        ("Codes of an untrained Mimi-architecture model" if model.get("untrained") else
         "[Mimi](https://huggingface.co/kyutai/mimi) codes") + f" of {totals['clips']:,} audio clips "
        f"({_hours(totals['hours'])} hours), made with `mimi-tokenize`. Each row is one clip; `codes` holds its "
        f"int16 codes, time-major `[n_frames, {k}]` ({FRAME_RATE} frames per second, {k} codebooks of "
        f"{CODEBOOK_SIZE} entries each, values 0..{CODEBOOK_SIZE - 1}).",
        "",
        "## Contents",
        "",
        "| | |",
        "|---|---|",
        f"| clips | {totals['clips']:,} |",
        f"| hours | {_hours(totals['hours'])} |",
        f"| frames | {totals['frames']:,} |",
        f"| tokens (frames × K) | {totals['tokens']:,} |",
        f"| failed clips (not included) | {totals['failed_clips']:,} |",
        f"| failed clips by class | {_fmt_failures(totals['failed_by_class'])} |",
        f"| data files | {len(files):,} Parquet files, {_size(data_bytes)} ({data_bytes:,} bytes), largest "
        f"{_size(max(f.size for f in files))} |",
        "",
        "## Codes",
        "",
        "| | |",
        "|---|---|",
        f"| model source | `{model.get('source')}` |",
        f"| model revision | `{model.get('revision') or 'none'}` |",
        f"| weights sha256 | `{model.get('sha256')}` |",
        f"| untrained weights | {'**yes**' if model.get('untrained') else 'no'} |",
        f"| codebooks (K) | {k} |",
        f"| codebook size | {CODEBOOK_SIZE} |",
        f"| frame rate | {FRAME_RATE} Hz |",
        f"| sample rate | {SAMPLE_RATE} Hz (audio resampled to it before encoding) |",
        f"| channel policy | `{(current.get('config') or {}).get('channel_policy', 'mix')}` |",
        f"| schema version | {current['schema_version']} |",
        "",
        "## Columns",
        "",
        "- `id` (string): the clip's id in the source corpus",
        "- `source_uri` (string): where the clip was read from",
        f"- `codes` (list of int16 × {k}): the Mimi codes, `[n_frames, {k}]`",
        "- `n_frames` (int32), `duration_s` (float64): length in frames and seconds of source audio",
        "- `orig_sample_rate` (int32), `orig_channels` (int16): the source audio's format",
    ]
    if metadata_columns:
        lines.append("- metadata passed through from the source: " + ", ".join(f"`{c}`" for c in metadata_columns))
    if dedup:
        lines += ["", "## Duplicates left out", "",
                  f"Published with `--dedup`: `mimi-tokenize dedup` found {dedup['grouped_clips']:,} clips in "
                  f"{dedup['groups']:,} groups of exact or near duplicates and clips contained in longer ones; one "
                  f"clip per group is kept (the longest, then the widest band, then the smallest id), so "
                  f"{dedup['removed_clips']:,} of {dedup['clips']:,} clips ({_hours(dedup['removed_hours'])} of "
                  f"{_hours(dedup['hours'])} hours) are not in these files. Repeated segments (jingles, ads, intros) "
                  f"stay in the clips that hold them: [`{DEDUP_SEGMENTS}`]({DEDUP_SEGMENTS}) lists their frame "
                  "ranges per clip id."]
    lines += ["", "## Files", "",
              f"`{packing.DATA_GLOB}`: the clips in the order of the run's shards, packed into the Parquet files "
              f"counted above (row groups of about {_size(packing.ROW_GROUP_BYTES)} of codes, at most "
              f"{packing.FILES_PER_FOLDER:,} files per folder). "
              f"[`{packing.MAPPING_PATH}`]({packing.MAPPING_PATH}) traces every row to the shard of the source "
              "output it came from: one row per shard with its `packed_file` and `packed_sha256`, the "
              "`[row_start, row_stop)` rows it fills there, and its `shard_id`, `shard_file` and `shard_sha256`.",
              "", "## How to load the codes as int16 arrays", "", "```python",
              LOAD_EXAMPLE.format(repo=repo_id, k=k).rstrip(), "```", "",
              "## Software", ""]
    lines += [f"- {name} {version}" for name, version in current.get("software", {}).items()]
    lines += ["- published with " + ", ".join(f"{name} {version}" for name, version in publish_versions().items())]
    lines += [f"- encoded: {current.get('run_created')} to {(current.get('timing') or {}).get('finished')}", ""]
    return manifest.redact("\n".join(lines))


def publish_versions() -> dict[str, str | None]:
    """Versions of the libraries that wrote the card (``datasets`` inferred its features)."""
    out = {}
    for dist in ("mimi-tokenize", "datasets", "huggingface_hub"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# --- upload --------------------------------------------------------------------------------------------------------


def remote_files(api: Any, repo_id: str) -> dict[str, Any]:
    """The repo's files (``RepoFile``) by path; ``{}`` for a repo without any."""
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        entries = api.list_repo_tree(repo_id, repo_type="dataset", recursive=True)
        return {e.path: e for e in entries if hasattr(e, "blob_id")}
    except (EntryNotFoundError, RevisionNotFoundError):  # a repo without any commit
        return {}


def same_file(remote: Any, local: StagedFile) -> bool:
    """Whether the repo file ``remote`` holds exactly the bytes of ``local``."""
    if remote.size != local.size:
        return False
    if getattr(remote, "lfs", None) is not None:
        return remote.lfs.sha256 == local.sha256
    return remote.blob_id == git_blob_sha1(local.local_path)


class Uploader:
    """Commits files to a dataset repo as they are made: a file the repo does not hold yet is pre-uploaded (its bytes
    go to the Hub's storage at once) and its local copy deleted; the pre-uploaded files are committed in batches of
    at most ``max_files`` files and ``max_bytes`` bytes; :meth:`finish` commits the rest and deletes stale files."""

    def __init__(self, api: Any, repo_id: str, *, private: bool, max_files: int, max_bytes: int,
                 result: PublishResult) -> None:
        from huggingface_hub.errors import HfHubHTTPError

        self.api, self.repo_id, self.max_files, self.max_bytes, self.result = api, repo_id, max_files, max_bytes, result
        try:
            result.url = str(api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True))
            self.remote = remote_files(api, repo_id)
        except HfHubHTTPError as exc:
            raise PublishError(f"cannot create or read the dataset repo {repo_id}: {exc}") from exc
        self.pending: list[Any] = []
        self.pending_bytes = 0

    def add(self, f: StagedFile) -> None:
        """Pre-upload ``f`` unless the repo holds it already, and delete its local copy; commit once enough is
        pending."""
        self._preupload(f)
        if len(self.pending) >= self.max_files or self.pending_bytes >= self.max_bytes:
            self._commit(f"Add Mimi codes ({len(self.pending)} file(s))")

    def _preupload(self, f: StagedFile) -> None:
        from huggingface_hub import CommitOperationAdd

        if f.path not in self.remote or not same_file(self.remote[f.path], f):
            op = CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=f.local_path)
            self._call(self.api.preupload_lfs_files, self.repo_id, [op], repo_type="dataset")
            if op.path_or_fileobj != b"":  # kept in git, not LFS (small, by the Hub's rules): it goes in the commit
                op.path_or_fileobj = Path(f.local_path).read_bytes()
            self.pending.append(op)
            self.pending_bytes += f.size
            self.result.uploaded.append(f.path)
        os.unlink(f.local_path)

    def finish(self, last: list[StagedFile], wanted: set[str]) -> None:
        """Commit what is pending with the files ``last`` (mapping, card), and delete the repo's data and mapping
        files not in ``wanted``, all in one last commit."""
        from huggingface_hub import CommitOperationDelete

        for f in last:
            self._preupload(f)
        stale = sorted(p for p in self.remote if p not in wanted and
                       (fnmatch.fnmatch(p, "data/*.parquet") or p.startswith("_publish/")))
        log.info("%s: uploaded %d file(s), deleting %d stale file(s)", self.repo_id, len(self.result.uploaded),
                 len(stale))
        added = {op.path_in_repo for op in self.pending}
        self.pending += [CommitOperationDelete(path_in_repo=p) for p in stale]
        if self.pending:
            self._commit("Update dataset card" if README in added else "Add Mimi codes" if added
                         else "Remove stale data files")
        self.result.deleted += stale

    def _commit(self, message: str) -> None:
        self._call(self.api.create_commit, self.repo_id, self.pending, repo_type="dataset",
                   commit_message=f"{message} [mimi-tokenize publish]")
        self.result.commits += 1
        log.info("commit %d to %s: %d file(s)", self.result.commits, self.repo_id, len(self.pending))
        self.pending, self.pending_bytes = [], 0

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # HTTP, network, disk: what was committed stays, a rerun uploads the rest
            raise PublishError(f"upload to {self.repo_id} failed after {self.result.commits} commit(s): "
                               f"{type(exc).__name__}: {exc}; run the same command again to upload the rest") from exc


# --- the command ---------------------------------------------------------------------------------------------------


def hf_token() -> str | None:
    """The Hub token: ``HF_TOKEN``, else the saved login; None when there is neither."""
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def make_api(token: str) -> Any:
    from huggingface_hub import HfApi

    return HfApi(token=token)


def publish(output_url: str, repo_id: str, *, private: bool = False, dry_run: bool = False, force: bool = False,
            staging: str | os.PathLike | None = None, license: str = DEFAULT_LICENSE,
            storage_options: dict[str, Any] | None = None, api: Any = None, dedup: bool = False,
            target_file_bytes: int = packing.TARGET_FILE_BYTES, files_per_folder: int = packing.FILES_PER_FOLDER,
            row_group_bytes: int = packing.ROW_GROUP_BYTES, commit_max_files: int = COMMIT_MAX_FILES,
            commit_max_bytes: int = COMMIT_MAX_BYTES) -> PublishResult:
    """Check, pack and (unless ``dry_run``) upload the output ``output_url`` to the dataset repo ``repo_id``.

    ``api`` is a ``huggingface_hub.HfApi`` (default: one with :func:`hf_token`). ``staging`` is the local folder
    files are packed into (default: a new temporary folder, removed at the end); a dry run leaves every packed file
    there, an upload one at a time. With ``dedup``, only the clips ``mimi-tokenize dedup`` keeps are published, with
    the repeated segments' table (``_dedup/segments.parquet``). Raises :class:`PublishError` when the output must not
    or cannot be published.
    """
    if not _REPO_ID.fullmatch(repo_id):
        raise PublishError(f"--repo must be ORG/NAME (a Hub dataset repo id), got {repo_id!r}")
    output_url = output_url if "://" in output_url else os.path.abspath(os.path.expanduser(output_url))
    if not dry_run and api is None:
        token = hf_token()
        if not token:
            raise PublishError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login` "
                               "(or use --dry-run to only pack the dataset)")
        api = make_api(token)
        del token
    current = state.read_output(output_url, storage_options)
    done = dict(manifest.load_done(output_url, storage_options).items())  # looked up by shard id, entry by entry
    records = check_publishable(output_url, current, done, force=force, storage_options=storage_options)
    summary, keep = None, None
    if dedup:
        from pipeline.dedup import DedupError, check_current, kept_mask

        try:
            summary = check_current(output_url, storage_options)
        except DedupError as exc:
            raise PublishError(str(exc)) from exc

        def keep(record: dict[str, Any]) -> np.ndarray:
            return kept_mask(output_url, storage.join(output_url, record["file"]), record["rows"], storage_options)
    planned = packing.plan(records, target_file_bytes, files_per_folder)
    if len(planned) > MAX_REPO_FILES:
        raise PublishError(f"{len(planned):,} files of {_size(target_file_bytes)} would exceed the Hub's "
                           f"{MAX_REPO_FILES:,} files per repo; raise --target-file-mb")
    temporary = staging is None
    staging = Path(tempfile.mkdtemp(prefix="mimi-publish-") if staging is None else os.path.abspath(staging))
    result = PublishResult(staging=str(staging), files=[])
    try:
        target = packing.union_schema(output_url, records, storage_options)
        uploader = None if dry_run else Uploader(api, repo_id, private=private, max_files=commit_max_files,
                                                 max_bytes=commit_max_bytes, result=result)
        packed = []
        for i, f in enumerate(planned):
            packed.append(packing.pack_file(output_url, f, target, staging / f.path, row_group_bytes=row_group_bytes,
                                            storage_options=storage_options, keep=keep))
            result.files.append(StagedFile(f.path, str(staging / f.path), packed[-1].size, packed[-1].sha256))
            log.info("packed %s: %d shard(s), %d rows, %s (%d of %d)", f.path, len(f.records), packed[-1].rows,
                     _size(packed[-1].size), i + 1, len(planned))
            if uploader:
                uploader.add(result.files[-1])
        mapping = packing.mapping_table(planned, packed)
        (staging / packing.MAPPING_PATH).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(mapping, staging / packing.MAPPING_PATH)
        card = build_card(repo_id, current, records, result.files, target, packed, license=license, dedup=summary)
        (staging / README).write_text(card, encoding="utf-8")
        data_files = result.files
        extra = [staged(packing.MAPPING_PATH, staging / packing.MAPPING_PATH)]
        if summary is not None:
            (staging / DEDUP_SEGMENTS).parent.mkdir(parents=True, exist_ok=True)
            fs, path = storage.get_fs(storage.join(output_url, DEDUP_SEGMENTS), storage_options)
            retry.call(fs.get, path, str(staging / DEDUP_SEGMENTS), what=f"read {DEDUP_SEGMENTS}")
            extra.append(staged(DEDUP_SEGMENTS, staging / DEDUP_SEGMENTS))
        result.files = [*data_files, *extra, staged(README, staging / README)]
        if uploader:
            uploader.finish(result.files[len(data_files):], {f.path for f in result.files})
            _keep_mapping(output_url, repo_id, mapping, storage_options)
    except packing.PackingError as exc:
        raise PublishError(f"{manifest.redact(output_url)}: {exc}") from exc
    finally:
        if temporary:
            shutil.rmtree(staging, ignore_errors=True)
    return result


def _keep_mapping(output_url: str, repo_id: str, mapping: pa.Table, storage_options: dict[str, Any] | None) -> None:
    """Write the shard -> packed file mapping of a finished upload to the output too (a warning if it cannot)."""
    url = storage.join(output_url, "_publish", repo_id, "shards.parquet")
    sink = pa.BufferOutputStream()
    pq.write_table(mapping, sink)
    try:
        storage.atomic_write_bytes(url, sink.getvalue().to_pybytes(), storage_options)
    except OSError as exc:
        log.warning("could not write the shard mapping to %s (%s); the repo holds it as %s", manifest.redact(url),
                    exc, packing.MAPPING_PATH)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def run_publish(output: str, repo: str, *, private: bool, dry_run: bool, force: bool, staging: str | None,
                license: str, storage_options: dict[str, Any] | None, target_file_mb: float = 500,
                dedup: bool = False) -> int:
    """The ``publish`` subcommand: publish, then print what was (or in a dry run, would be) uploaded."""
    if target_file_mb <= 0:
        raise PublishError(f"--target-file-mb must be positive, got {target_file_mb}")
    result = publish(output, repo, private=private, dry_run=dry_run, force=force, staging=staging, license=license,
                     storage_options=storage_options, target_file_bytes=int(target_file_mb * 2**20), dedup=dedup)
    if dry_run:
        where = (f"packed in {result.staging}" if staging else
                 "packed in a temporary folder, now removed (pass --staging DIR to keep the packed files)")
        print(f"dry run: would upload {len(result.files)} file(s) to the dataset repo {repo} "
              f"({'private' if private else 'public'}), {where} (a real publish skips the files the repo already "
              "holds):")
        for f in result.files:
            print(f"  {f.path}  {_size(f.size)}")
        print(f"total: {_size(sum(f.size for f in result.files))}")
        return 0
    size = sum(f.size for f in result.files if f.path in set(result.uploaded))
    print(f"published {manifest.redact(output)} to {result.url}: uploaded {len(result.uploaded)} of "
          f"{len(result.files)} file(s) ({_size(size)}) in {result.commits} commit(s)"
          + (f", deleted {len(result.deleted)} stale file(s)" if result.deleted else "")
          + (f"; the other {len(result.files) - len(result.uploaded)} were already there"
             if len(result.uploaded) < len(result.files) else ""))
    return 0

