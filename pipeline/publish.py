"""``mimi-tokenize publish``: put a finished output on the Hugging Face Hub as a ``datasets``-loadable dataset repo.

Steps:

1. Check the output: its manifest must say "complete" (every shard done) and every shard must have its done record
   and Parquet file; failed clips must stay within the run's ``max_failure_share``. ``force`` overrides both (an
   incomplete run is then published with the shards that are done); an output whose manifest lists a shard as done
   without its done record or file is always refused.
2. Stage a folder in the layout ``datasets`` reads without a loading script::

       README.md                               dataset card: YAML front matter (configs, dataset_info, license,
                                               tags) and provenance (model, K, hours, failures, versions)
       data/train-00000-of-0000N.parquet       the shard files, by file name (hardlinked when the
                                               output is on local disk, else downloaded through fsspec)

   Every staged file is checked against the sha256 in its done record.
3. Upload (not in a dry run): create the dataset repo if needed, list what the repo already holds, and commit
   only the files that are missing or differ (LFS sha256, or git blob id for files kept in git), data files in
   batches and the card last. A publish interrupted midway is resumed by running it again: what was committed
   is not uploaded twice. Data files of an earlier publish that are not part of this one are deleted with the
   last commit (they would otherwise be read as part of the train split).

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

import pyarrow.parquet as pq
import yaml
from fsspec.implementations.local import LocalFileSystem

from mimi.checkpoint import sha256_file
from pipeline import index, manifest, state, storage
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


# --- staging -------------------------------------------------------------------------------------------------------


def data_file_name(index: int, count: int) -> str:
    """Repo path of the ``index``-th of ``count`` data files: ``data/train-00000-of-00003.parquet``."""
    return f"data/train-{index:05d}-of-{count:05d}.parquet"


def git_blob_sha1(path: str | os.PathLike) -> str:
    """The git object id of a file's bytes (what the Hub reports as ``blob_id`` for files kept in git)."""
    h = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stage_one(src_url: str, dst: Path, expected_sha256: str, expected_size: int,
               storage_options: dict[str, Any] | None) -> None:
    """Make ``dst`` a verified copy (or hardlink) of the shard file ``src_url``."""
    if dst.is_file() and dst.stat().st_size == expected_size and sha256_file(dst) == expected_sha256:
        return  # staged by an earlier publish
    fs, src = storage.get_fs(src_url, storage_options)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    linked = False
    if isinstance(fs, LocalFileSystem):
        try:
            os.link(src, tmp)
            linked = True
        except OSError:  # another device, or no hardlinks: copy
            pass
    if not linked:
        with fs.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 22)
    digest = sha256_file(tmp)
    if digest != expected_sha256:
        tmp.unlink()
        raise PublishError(f"{manifest.redact(src_url)} has sha256 {digest}, but its done record says "
                           f"{expected_sha256}: the file changed after the run wrote it; rerun the shard")
    os.replace(tmp, dst)


def stage(output_url: str, records: list[dict[str, Any]], staging: str | os.PathLike,
          storage_options: dict[str, Any] | None = None) -> list[StagedFile]:
    """Stage the shard files of ``records`` (in order) as ``data/train-*.parquet`` under ``staging``."""
    data_dir = Path(staging) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    names = [data_file_name(i, len(records)) for i in range(len(records))]
    for stale in data_dir.glob("train-*-of-*.parquet"):  # from an earlier publish of another shard count
        if f"data/{stale.name}" not in names:
            stale.unlink()
    files = []
    for name, record in zip(names, records):
        dst = Path(staging) / name
        _stage_one(storage.join(output_url, record["file"]), dst, record["sha256"], record["bytes"], storage_options)
        files.append(StagedFile(name, str(dst), record["bytes"], record["sha256"]))
    log.info("staged %d data file(s) in %s", len(files), data_dir)
    return files


# --- dataset card --------------------------------------------------------------------------------------------------


def _size_category(n: int) -> str:
    for limit, label in [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
                         (1_000_000_000, "100M<n<1B")]:
        if n < limit:
            return label
    return "1B<n<10B"


def dataset_info_yaml(files: list[StagedFile]) -> dict[str, Any]:
    """The card's ``dataset_info``, as ``datasets`` itself writes it (``push_to_hub``) for these Parquet files:
    features inferred from the Arrow schema, and the train split's rows and in-memory Arrow bytes."""
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict

    schema, num_rows, num_bytes = None, 0, 0
    for f in files:
        table = pq.read_table(f.local_path)
        this = table.schema.remove_metadata()
        if schema is None:
            schema = this
        elif not this.equals(schema):
            raise PublishError(f"{f.path} has columns {this} but {files[0].path} has {schema}: datasets cannot read "
                               "shards with different columns as one split (metadata keys should keep one type and "
                               "appear in every shard)")
        num_rows += table.num_rows
        num_bytes += table.nbytes
    splits = SplitDict()
    splits.add(SplitInfo(name="train", num_bytes=num_bytes, num_examples=num_rows))
    info = DatasetInfo(features=Features.from_arrow_schema(schema), splits=splits,
                       download_size=sum(f.size for f in files), dataset_size=num_bytes)
    card_data: dict[str, Any] = {}
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    return card_data["dataset_info"]


LOAD_EXAMPLE = '''\
import numpy as np
from datasets import load_dataset

REPO = "{repo}"
K = {k}  # codebooks per frame

ds = load_dataset(REPO, split="train")

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


def build_card(repo_id: str, current: dict[str, Any], records: list[dict[str, Any]], files: list[StagedFile], *,
               license: str = DEFAULT_LICENSE) -> str:
    """The dataset card ``README.md``: YAML front matter for the Hub and ``datasets``, then provenance and usage."""
    current = manifest.redact(current)
    k = current["num_codebooks"]
    model = current["model"]
    totals = card_totals(current, records)
    info = dataset_info_yaml(files)
    front = {
        "license": license,
        "pretty_name": repo_id.split("/", 1)[1],
        "tags": TAGS,
        "task_categories": TASK_CATEGORIES,
        "size_categories": [_size_category(totals["clips"])],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
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
        f"| data files | {len(files):,} ({sum(f.size for f in files):,} bytes) |",
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
    lines += ["", "## How to load the codes as int16 arrays", "", "```python",
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


def _batches(files: list[StagedFile], max_files: int, max_bytes: int) -> list[list[StagedFile]]:
    batches: list[list[StagedFile]] = []
    size = 0
    for f in files:
        if not batches or len(batches[-1]) >= max_files or size + f.size > max_bytes:
            batches.append([])
            size = 0
        batches[-1].append(f)
        size += f.size
    return batches


def upload(api: Any, repo_id: str, staging: str, files: list[StagedFile], *, private: bool,
           commit_max_files: int = COMMIT_MAX_FILES, commit_max_bytes: int = COMMIT_MAX_BYTES,
           result: PublishResult) -> None:
    """Create the repo if needed and commit the staged files that it does not hold yet (card last)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        remote = remote_files(api, repo_id)
    except HfHubHTTPError as exc:
        raise PublishError(f"cannot create or read the dataset repo {repo_id}: {exc}") from exc
    result.url = str(url)
    wanted = {f.path for f in files}
    missing = [f for f in files if f.path not in remote or not same_file(remote[f.path], f)]
    stale = sorted(p for p in remote if fnmatch.fnmatch(p, "data/*.parquet") and p not in wanted)
    data = [f for f in missing if f.path != README]
    card = [f for f in missing if f.path == README]
    log.info("%s holds %d of the %d file(s) already; uploading %d (%s bytes), deleting %d stale data file(s)",
             repo_id, len(files) - len(missing), len(files), len(missing), f"{sum(f.size for f in missing):,}",
             len(stale))
    batches = _batches(data, commit_max_files, commit_max_bytes)
    if card or stale or not batches:
        batches.append(card)  # the card last: it describes the whole upload
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        if not batch and not (last and stale):
            continue
        paths = [f.path for f in batch]
        message = ("Update dataset card" if README in paths else "Remove stale data files" if not paths
                   else f"Add Mimi codes ({len(paths)} file(s), commit {i + 1} of {len(batches)})")
        try:
            api.upload_folder(folder_path=staging, repo_id=repo_id, repo_type="dataset", allow_patterns=paths,
                              delete_patterns=stale if last and stale else None,
                              commit_message=f"{message} [mimi-tokenize publish]")
        except Exception as exc:  # HTTP, network, disk: what was committed stays, a rerun uploads the rest
            raise PublishError(f"upload to {repo_id} failed after {result.commits} commit(s): "
                               f"{type(exc).__name__}: {exc}; run the same command again to upload the rest") from exc
        result.commits += 1
        result.uploaded += paths
        if last:
            result.deleted += stale
        log.info("committed %d file(s) to %s (%d/%d)", len(paths), repo_id, i + 1, len(batches))


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
            storage_options: dict[str, Any] | None = None, api: Any = None,
            commit_max_files: int = COMMIT_MAX_FILES, commit_max_bytes: int = COMMIT_MAX_BYTES) -> PublishResult:
    """Check, stage and (unless ``dry_run``) upload the output ``output_url`` to the dataset repo ``repo_id``.

    ``api`` is a ``huggingface_hub.HfApi`` (default: one with :func:`hf_token`). ``staging`` defaults to a new
    temporary folder, deleted after a successful upload or a dry run; a given folder is kept, and a rerun reuses what
    it holds. Raises :class:`PublishError` when the output must not or cannot be published.
    """
    if not _REPO_ID.fullmatch(repo_id):
        raise PublishError(f"--repo must be ORG/NAME (a Hub dataset repo id), got {repo_id!r}")
    output_url = output_url if "://" in output_url else os.path.abspath(os.path.expanduser(output_url))
    if not dry_run and api is None:
        token = hf_token()
        if not token:
            raise PublishError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login` "
                               "(or use --dry-run to only stage the dataset)")
        api = make_api(token)
        del token
    current = state.read_output(output_url, storage_options)
    done = manifest.load_done(output_url, storage_options)
    records = check_publishable(output_url, current, done, force=force, storage_options=storage_options)
    temporary = staging is None
    staging = tempfile.mkdtemp(prefix="mimi-publish-") if staging is None else os.path.abspath(staging)
    result = PublishResult(staging=str(staging), files=[])
    try:
        files = stage(output_url, records, staging, storage_options)
        card = build_card(repo_id, current, records, files, license=license)
        card_path = Path(staging) / README
        card_path.write_text(card, encoding="utf-8")
        files.append(StagedFile(README, str(card_path), card_path.stat().st_size, sha256_file(card_path)))
        result.files = files
        if not dry_run:
            upload(api, repo_id, str(staging), files, private=private, commit_max_files=commit_max_files,
                   commit_max_bytes=commit_max_bytes, result=result)
    except BaseException:
        if temporary and not dry_run:
            log.info("staging folder kept at %s: pass --staging %s to reuse it", staging, staging)
        elif temporary:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if temporary:  # a dry run's temporary staging is removed too: --staging keeps it
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def run_publish(output: str, repo: str, *, private: bool, dry_run: bool, force: bool, staging: str | None,
                license: str, storage_options: dict[str, Any] | None) -> int:
    """The ``publish`` subcommand: publish, then print what was (or in a dry run, would be) uploaded."""
    result = publish(output, repo, private=private, dry_run=dry_run, force=force, staging=staging, license=license,
                     storage_options=storage_options)
    if dry_run:
        where = (f"staged in {result.staging}" if staging else
                 "staged in a temporary folder, now removed (pass --staging DIR to keep the staged files)")
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

