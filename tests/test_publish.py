"""`mimi-tokenize publish` on a real pipeline output: the packed folder loads with `datasets` as the card describes,
packing keeps every row (several files, row groups and folders; union schema; deterministic bytes), the card carries
the manifest's provenance and no secret, refusals, dry run, and the upload at the `HfApi` boundary (a simulated Hub
in memory): create_repo arguments, one packed file on local disk at a time, only missing/changed files uploaded,
resume after an interruption.
"""

from __future__ import annotations

import fnmatch
import hashlib
import inspect
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.hf_api import RepoFile, RepoFolder

from audio_fixtures import corrupt_bytes, write_audio
from pipeline import manifest, publish
from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.runner import run
from pipeline.reading import data_files
from pipeline.types import ClipInfo, EncodedClip, Member, Shard
from pipeline.writer import read_codes, write_shard

K = 4
REPO = "acme/speech-codes"
HF_SECRET = "hf_TESTsecretTOKEN0123456789"
STORAGE_SECRET = "storageSECRET-abc987"


@pytest.fixture(scope="module")
def output(tmp_path_factory, tiny_model_path) -> Path:
    """A finished run: 5 good clips in several shards, 1 corrupt file (failure share 1/6), a token in
    storage_options."""
    root = tmp_path_factory.mktemp("publish")
    corpus = root / "corpus"
    specs = [("wav_pcm16", 16_000, 0.3, 1), ("flac", 44_100, 1.1, 2), ("wav_float", 24_000, 2.5, 1),
             ("wav_pcm16", 24_000, 1.0, 1), ("flac", 16_000, 2.0, 1)]
    for i, (fmt, sr, seconds, channels) in enumerate(specs):
        write_audio(corpus / f"set{i % 2}" / f"clip{i:02d}.{'flac' if fmt == 'flac' else 'wav'}", fmt, sr, seconds,
                    channels, seed=i)
    (corpus / "set0" / "corrupt.wav").write_bytes(corrupt_bytes())
    model = tiny_model_path
    cfg = RunConfig(input=str(corpus), output=str(root / "out"), model=str(model), num_codebooks=K, files_per_shard=2,
                    device="cpu", max_failure_share=0.5, storage_options={"token": STORAGE_SECRET})
    assert run(cfg) == 0
    assert n_shards(root / "out") >= 3
    return root / "out"


def n_shards(out: Path) -> int:
    return json.loads((out / "manifest.json").read_text())["index"]["rows"]


def entries(out: Path) -> list[dict]:
    """The output's shard entries, from its index, by file name."""
    return manifest.shard_entries(str(out), manifest.read_manifest(str(out)))


ONE_FILE = "data/00000/train-000000.parquet"  # the whole (small) output packed at the default target size
MAPPING = "_publish/shards.parquet"


def shard_rows(out: Path) -> list[dict]:
    """Every row of the output's shard files, in the index's order (by file name)."""
    rows = []
    for entry in entries(out):
        rows += pq.read_table(out / entry["file"]).to_pylist()
    return rows


@pytest.fixture
def out_copy(output, tmp_path) -> Path:
    """A copy of the finished output that a test may damage."""
    return Path(shutil.copytree(output, tmp_path / "out"))


def edit_manifest(out: Path, fn) -> None:
    """Rewrite the output's manifest (and, through ``shards``, its index) as ``fn`` edits it."""
    current = manifest.read_manifest(str(out))
    current = {**{k: v for k, v in current.items() if k != "index"}, "shards": entries(out)}
    fn(current)
    manifest.write_manifest(str(out), current)


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, "card has no YAML front matter"
    return yaml.safe_load(match.group(1))


# --- a simulated Hub, at the HfApi boundary ------------------------------------------------------------------------


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Replaces `HfApi.create_repo`, `list_repo_tree`, `preupload_lfs_files` and `create_commit` with an in-memory
    repo (Parquet files in LFS, as the Hub's .gitattributes says). Every call is checked against the real method's
    signature, and recorded with the token of the `HfApi` it was made on."""

    def __init__(self, monkeypatch):
        self.files: dict[str, bytes] = {}
        self.blobs: dict[str, bytes] = {}  # pre-uploaded LFS objects by sha256
        self.calls: list[tuple[str, dict]] = []
        self.fail_on_commit: int | None = None  # raise on the n-th create_commit call (1-based): an interruption
        self.on_preupload = lambda op: None
        for name in ("create_repo", "list_repo_tree", "preupload_lfs_files", "create_commit"):
            monkeypatch.setattr(HfApi, name, self._method(name))

    def _method(self, name):
        real, impl = getattr(HfApi, name), getattr(self, "_" + name)

        def method(api, *args, **kwargs):
            bound = inspect.signature(real).bind(api, *args, **kwargs)  # a call the real HfApi accepts
            call = {k: v for k, v in bound.arguments.items() if k != "self"}
            self.calls.append((name, {**call, "token_used": api.token}))
            return impl(**call)
        return method

    def commits(self) -> list[dict]:
        return [c for name, c in self.calls if name == "create_commit"]

    def committed(self) -> list[list[str]]:
        """Per commit, the paths it added, then ``-path`` for those it deleted."""
        return [[op.path_in_repo if isinstance(op, CommitOperationAdd) else "-" + op.path_in_repo
                 for op in c["operations"]] for c in self.commits()]

    def _create_repo(self, repo_id, **kwargs):
        if not self.files:
            self.files[".gitattributes"] = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"
        return f"https://huggingface.co/datasets/{repo_id}"

    def _list_repo_tree(self, repo_id, **kwargs):
        entries = [RepoFolder(path="data", oid="0" * 40)]
        for path, data in sorted(self.files.items()):
            lfs = ({"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 130}
                   if path.endswith(".parquet") else None)
            entries.append(RepoFile(path=path, size=len(data), oid=git_sha1(data), lfs=lfs))
        return iter(entries)

    def _preupload_lfs_files(self, repo_id, additions, **kwargs):
        for op in additions:
            self.on_preupload(op)
            if op.path_in_repo.endswith(".parquet"):
                with op.as_file() as f:
                    self.blobs[op.upload_info.sha256.hex()] = f.read()
                op.path_or_fileobj = b""  # as the real one does (free_memory=True)

    def _create_commit(self, repo_id, operations, commit_message, **kwargs):
        if self.fail_on_commit is not None and len(self.commits()) == self.fail_on_commit:
            raise ConnectionError("connection reset by peer")
        for op in operations:
            if isinstance(op, CommitOperationDelete):
                del self.files[op.path_in_repo]
            elif op.path_or_fileobj == b"":
                self.files[op.path_in_repo] = self.blobs[op.upload_info.sha256.hex()]
            else:
                with op.as_file() as f:
                    self.files[op.path_in_repo] = f.read()


@pytest.fixture
def hub(monkeypatch) -> FakeHub:
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    return FakeHub(monkeypatch)


# --- staging and the card ------------------------------------------------------------------------------------------


def test_staged_dataset_loads_as_the_card_says(output, tmp_path, hub, capsys):
    from datasets import Features, load_dataset

    staging = tmp_path / "staging"
    assert main(["publish", str(output), "--repo", REPO, "--dry-run", "--staging", str(staging),
                 "--license", "cc-by-4.0"]) == 0
    printed = capsys.readouterr().out
    assert not hub.calls, "a dry run must not touch the Hub"
    names = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    assert names == ["README.md", "_publish/shards.parquet", ONE_FILE]
    assert str(staging) in printed and all(name in printed for name in names) and "total:" in printed

    # the data file: the rows of the run's shard files, in shard order, every column
    current = manifest.read_manifest(str(output))
    assert pq.read_table(staging / ONE_FILE).to_pylist() == shard_rows(output)

    # the card's YAML
    card = (staging / "README.md").read_text()
    meta = front_matter(card)
    assert meta["configs"] == [{"config_name": "default",
                                "data_files": [{"split": "train", "path": "data/*/train-*.parquet"}]}]
    assert meta["license"] == "cc-by-4.0"
    assert {"audio", "mimi", "tokenized-audio"} <= set(meta["tags"]) and meta["task_categories"]
    info = meta["dataset_info"]
    assert info["splits"] == [{"name": "train", "num_bytes": info["dataset_size"],
                               "num_examples": current["totals"]["clips"]}]
    assert info["download_size"] == (staging / ONE_FILE).stat().st_size
    codes_feature = next(f for f in info["features"] if f["name"] == "codes")
    assert codes_feature == {"name": "codes", "list": {"list": "int16", "length": K}}

    # what datasets infers from the bare Parquet files is exactly what the card declares
    bare = load_dataset("parquet", data_files=str(staging / ONE_FILE), split="train")
    assert Features._from_yaml_list(info["features"]) == bare.features
    assert abs(info["dataset_size"] - bare.info.dataset_size) <= 0.01 * bare.info.dataset_size + 64  # validity bitmaps

    # the staged folder loads by itself (card + data/), with those features, and the source's codes as int16 [T, K]
    ds = load_dataset(str(staging), split="train")
    assert ds.features == bare.features and len(ds) == current["totals"]["clips"] == 5
    source = {}
    for entry in entries(output):
        table = pq.read_table(output / entry["file"])
        source.update({clip_id: read_codes(table, i) for i, clip_id in enumerate(table.column("id").to_pylist())})
    as_int16 = ds.with_format("numpy", columns=["codes"], dtype=np.int16)
    for i, clip_id in enumerate(ds["id"]):
        codes = as_int16[i]["codes"]
        assert codes.dtype == np.int16 and codes.shape == (ds[i]["n_frames"], K)
        np.testing.assert_array_equal(codes, source[clip_id])
    assert sorted(ds["id"]) == sorted(source)


def fabricated_output(root: Path) -> Path:
    """A finished output made by the writer and record code (random codes, no encoding): 7 shards of 1-4 clips, a
    `speaker` column in every shard and an `snr` column only in the odd ones (a column newer shards add)."""
    rng = np.random.default_rng(0)
    shards, done = [], {}
    for s in range(7):
        shard = Shard(f"files-{s:04d}", "files", "file:///c", "file:///c", f"d{s}", members=(Member(f"{s}", "f"),))
        rows = [EncodedClip(ClipInfo(i, f"s{s}/c{i}", f"file:///c/s{s}/c{i}.wav", 16_000, 1,
                                     {"speaker": f"spk{s}"} | ({"snr": s + i / 4} if s % 2 else {})),
                            rng.integers(0, 2048, (K, int(rng.integers(1, 40)))), 1920)
                for i in range(int(rng.integers(1, 5)))]
        result = write_shard(str(root / manifest.shard_file(shard.shard_id)), rows, num_codebooks=K,
                             file_metadata={"model_source": "synthetic", "shard_id": shard.shard_id})
        done[shard.shard_id] = manifest.write_record(str(root), shard, result, [], started=0, finished=1, attempt=1)
        shards.append(shard)
    run = manifest.make_run({}, {"source": "synthetic", "revision": None, "sha256": "0" * 64}, K)
    manifest.init_run(str(root), run)
    manifest.write_manifest(str(root), manifest.build_manifest(str(root), run, shards, done, started=0, finished=1))
    return root


def test_packing_round_trips_every_row(tmp_path):
    """Several packed files in several folders, several row groups each: every row of every shard file, in order,
    with the union of their columns; read back by pyarrow, `datasets` and the loader's file listing; mapped to its
    shard; and the same bytes when packed again."""
    from datasets import load_dataset

    out = fabricated_output(tmp_path / "out")
    records = [manifest.load_done(str(out))[e["shard_id"]] for e in manifest.read_manifest(str(out))["shards"]]
    target = records[0]["bytes"] + records[1]["bytes"]  # about two shards per file
    options = dict(dry_run=True, target_file_bytes=target, files_per_folder=3, row_group_bytes=200)
    result = publish.publish(str(out), REPO, staging=tmp_path / "a", **options)
    data = [f for f in result.files if f.path.startswith("data/")]
    assert len(data) >= 4 and len({f.path.split("/")[1] for f in data}) >= 2  # a folder split
    assert [f.path for f in data] == [f"data/{i // 3:05d}/train-{i:06d}.parquet" for i in range(len(data))]

    expected = []
    for record in records:
        rows = pq.read_table(out / record["file"]).to_pylist()
        expected += [{"speaker": None, "snr": None} | row for row in rows]
    packed = [pq.ParquetFile(f.local_path) for f in data]
    assert [row for p in packed for row in p.read().to_pylist()] == expected
    assert all(p.schema_arrow.names == packed[0].schema_arrow.names for p in packed)
    assert b"shard_id" not in packed[0].schema_arrow.metadata
    assert packed[0].schema_arrow.metadata[b"model_source"] == b"synthetic"
    for p in packed:  # row groups close at the first row that brings their codes to 200 bytes
        groups = [p.read_row_group(g).column("n_frames").to_numpy() * K * 2 for g in range(p.num_row_groups)]
        assert all(sum(g) >= 200 > sum(g) - g[-1] for g in groups[:-1]) and sum(groups[-1]) > 0
    assert max(p.num_row_groups for p in packed) > 2

    # the mapping: each shard, in order, with its rows in its packed file
    mapping = pq.read_table(tmp_path / "a" / MAPPING).to_pylist()
    assert [m["shard_id"] for m in mapping] == [r["shard"]["shard_id"] for r in records]
    for m, record in zip(mapping, records):
        rows = pq.read_table(tmp_path / "a" / m["packed_file"]).slice(m["row_start"], m["row_stop"] - m["row_start"])
        assert rows.column("id").to_pylist() == pq.read_table(out / record["file"]).column("id").to_pylist()
        assert m["shard_sha256"] == record["sha256"] and m["shard_file"] == record["file"]
        assert m["packed_sha256"] == next(f.sha256 for f in data if f.path == m["packed_file"])
    assert max(sum(m["packed_file"] == f.path for m in mapping) for f in data) >= 2
    for f in data:  # a file holds at most the target, or one shard
        shard_bytes = [r["bytes"] for m, r in zip(mapping, records) if m["packed_file"] == f.path]
        assert sum(shard_bytes) <= target or len(shard_bytes) == 1

    # datasets reads the packed folder through the card's glob, and the loader lists its files in order
    ds = load_dataset(str(tmp_path / "a"), split="train")
    assert ds["id"] == [row["id"] for row in expected] and ds.features["snr"].dtype == "float64"
    assert data_files(str(tmp_path / "a"))[0] == [f.local_path for f in data]

    # packed again: the same bytes
    again = publish.publish(str(out), REPO, staging=tmp_path / "b", **options)
    assert [(f.path, f.sha256) for f in again.files] == [(f.path, f.sha256) for f in result.files]


def test_numpy_format_pitfalls(output):
    """What the card warns about, on datasets' own formatting of this schema."""
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(output / "data/*.parquet"), split="train")
    assert ds.with_format("numpy")[0]["codes"].dtype == np.int64  # silently widened
    batch = ds.with_format("numpy", dtype=np.int16)[:]  # dtype applies to every numeric column
    assert batch["duration_s"].dtype == np.int16 and (batch["orig_sample_rate"] < 0).any()  # 44100 wrapped
    only_codes = ds.with_format("numpy", columns=["codes"], dtype=np.int16)[:]
    assert list(only_codes) == ["codes"] and all(c.dtype == np.int16 for c in only_codes["codes"])


def test_card_code_runs(output, tmp_path):
    """The card's "How to load" code runs as written, on the staged folder standing in for the Hub repo."""
    staging = tmp_path / "staging"
    publish.publish(str(output), REPO, dry_run=True, staging=staging)
    card = (staging / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert f'REPO = "{REPO}"' in code and f"K = {K}" in code
    scope: dict = {}
    exec(code.replace(f'REPO = "{REPO}"', f"REPO = {str(staging)!r}"), scope)
    assert scope["x"].dtype == np.int16
    clips = scope["clips"]  # the last batch: all 5 clips
    ids = scope["ds"]["id"]
    codes = scope["codes"]
    assert len(clips) == len(ids) == 5 and scope["first"]["id"] == ids[0]  # streaming
    for i, clip in enumerate(clips):
        assert clip.dtype == np.int16
        np.testing.assert_array_equal(clip, codes[i]["codes"])


def test_card_provenance_equals_manifest(output, tmp_path):
    staging = tmp_path / "staging"
    publish.publish(str(output), REPO, dry_run=True, staging=staging)
    card = (staging / "README.md").read_text()
    current = manifest.read_manifest(str(output))
    totals, model = current["totals"], current["model"]
    expected_rows = [
        f"| clips | {totals['clips']:,} |",
        f"| hours | {publish._hours(totals['hours'])} |",
        f"| frames | {totals['frames']:,} |",
        f"| tokens (frames × K) | {totals['tokens']:,} |",
        f"| failed clips (not included) | {totals['failed_clips']:,} |",
        "| failed clips by class | " + ", ".join(f"{c} {n}" for c, n in totals["failed_by_class"].items()) + " |",
        f"| model source | `{model['source']}` |",
        f"| weights sha256 | `{model['sha256']}` |",
        f"| codebooks (K) | {current['num_codebooks']} |",
        "| frame rate | 12.5 Hz |",
        "| sample rate | 24000 Hz",
    ]
    for row in expected_rows:
        assert row in card, row
    assert totals["failed_by_class"] == {"DecodeError": 1}
    for name, version in current["software"].items():
        assert f"- {name} {version}" in card
    untrained = bool(model.get("untrained"))
    assert (f"| untrained weights | {'**yes**' if untrained else 'no'} |") in card
    assert ("These codes come from untrained" in card.split("## Contents")[0]) == untrained


@pytest.mark.parametrize("untrained", [True, False])
def test_untrained_weights_stated_at_the_top(out_copy, tmp_path, untrained):
    edit_manifest(out_copy, lambda m: m["model"].update(untrained=untrained))
    publish.publish(str(out_copy), REPO, dry_run=True, staging=tmp_path / "staging")
    card = (tmp_path / "staging" / "README.md").read_text()
    body = card.split("\n---\n", 1)[1]
    warning = f"# {REPO}\n\n> [!WARNING]\n> **These codes come from untrained"
    assert body.lstrip().startswith(warning) == untrained
    assert ("untrained weights | **yes**" in card) == untrained


# --- refusals ------------------------------------------------------------------------------------------------------


def test_incomplete_run_refused(out_copy, hub, tmp_path, capsys):
    def pending_last(m):
        m["status"] = "incomplete"
        m["totals"]["shards_done"] -= 1
        m["shards"][-1] = {k: m["shards"][-1][k] for k in ("shard_id", "kind", "uri")} | {"status": "pending"}
    edit_manifest(out_copy, pending_last)
    last = entries(out_copy)[-1]["shard_id"]
    (out_copy / "_state/shards" / f"{last}.json").unlink()
    assert main(["publish", str(out_copy), "--repo", REPO]) == 2
    err = capsys.readouterr().err
    n = n_shards(out_copy)
    assert f"incomplete ({n - 1} of {n} shards done)" in err and "--force" in err
    assert not hub.calls
    # --force publishes the done shards, and the card says so
    staging = tmp_path / "staging"
    assert main(["publish", str(out_copy), "--repo", REPO, "--force", "--dry-run", "--staging", str(staging)]) == 0
    assert pq.read_table(staging / MAPPING).num_rows == n - 1
    assert f"Partial dataset: {n - 1} of {n} shards" in (staging / "README.md").read_text()


def test_missing_done_record_refused_even_with_force(out_copy, hub, capsys):
    next((out_copy / "_state/shards").glob("*.json")).unlink()
    assert main(["publish", str(out_copy), "--repo", REPO, "--force"]) == 2
    assert "done record or Parquet file is missing" in capsys.readouterr().err
    assert not hub.calls


def test_failures_over_threshold_refused_unless_force(out_copy, hub, tmp_path, capsys):
    edit_manifest(out_copy, lambda m: m["config"].update(max_failure_share=0.1))  # the run had 1/6 = 16.7% fail
    assert main(["publish", str(out_copy), "--repo", REPO]) == 2
    err = capsys.readouterr().err
    assert "16.67% of the clips failed" in err and "DecodeError 1" in err and "max_failure_share 10.00%" in err
    assert not hub.calls
    assert main(["publish", str(out_copy), "--repo", REPO, "--force"]) == 0
    assert set(hub.files) >= {"README.md", ONE_FILE, MAPPING}


def test_no_token_refused(output, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(publish, "hf_token", lambda: None)
    assert main(["publish", str(output), "--repo", REPO]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    assert main(["publish", str(output), "--repo", "not-a-repo-id", "--dry-run"]) == 2
    assert "ORG/NAME" in capsys.readouterr().err


# --- upload --------------------------------------------------------------------------------------------------------


def test_publish_uploads_once_and_resumes(output, hub, tmp_path, capsys, caplog):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storage_options": {"token": STORAGE_SECRET}}))
    staging, dry = tmp_path / "staging", tmp_path / "dry"
    args = ["publish", str(output), "--repo", REPO, "--private", "--staging", str(staging), "--config", str(config)]
    assert main([*args[:-4], "--dry-run", "--staging", str(dry)]) == 0
    packed = {p.relative_to(dry).as_posix(): p.read_bytes() for p in dry.rglob("*") if p.is_file()}

    # first publish: what the dry run packed, byte for byte, in one commit (the card in it), on an HfApi holding the
    # token; each file deleted locally once pre-uploaded
    assert main(args) == 0
    (name, create), = [c for c in hub.calls if c[0] == "create_repo"]
    assert create["repo_id"] == REPO and create["repo_type"] == "dataset" and create["private"] is True
    assert create["exist_ok"] is True
    assert all(call["token_used"] == HF_SECRET for _, call in hub.calls)
    assert {p: d for p, d in hub.files.items() if p != ".gitattributes"} == packed
    assert hub.committed() == [[ONE_FILE, MAPPING, "README.md"]]
    assert all(c["repo_type"] == "dataset" and c["repo_id"] == REPO for c in hub.commits())
    assert not [p for p in staging.rglob("*") if p.is_file()]
    assert "uploaded 3 of 3 file(s)" in capsys.readouterr().out
    kept = output / "_publish" / REPO / "shards.parquet"  # the mapping, in the output too
    assert kept.read_bytes() == packed[MAPPING]

    # publishing again uploads nothing
    hub.calls.clear()
    assert main(args) == 0
    assert not hub.commits() and "uploaded 0 of 3 file(s)" in capsys.readouterr().out

    # an interrupted publish of one file per shard, 2 per folder, one commit per file (the repo holds an earlier
    # layout and card): the third commit fails; the rerun uploads exactly what is still missing or different, with
    # one packed file on local disk at a time
    small = dict(staging=staging, target_file_bytes=1, files_per_folder=2, commit_max_files=1)
    n = n_shards(output)
    names = [f"data/{i // 2:05d}/train-{i:06d}.parquet" for i in range(n)]
    hub.files = {".gitattributes": hub.files[".gitattributes"], "README.md": b"old card\n", ONE_FILE: packed[ONE_FILE],
                 "data/train-00000-of-00001.parquet": b"stale data of an earlier layout"}
    on_disk = []
    hub.on_preupload = lambda op: on_disk.append(len(list(staging.rglob("train-*.parquet"))))
    hub.calls.clear()
    hub.fail_on_commit = 3
    with pytest.raises(publish.PublishError, match="failed after 2 commit.*run the same command again"):
        publish.publish(str(output), REPO, **small)
    assert hub.committed() == [[names[0]], [names[1]], [names[2]]]  # the third did not land
    assert names[1] in hub.files and names[2] not in hub.files

    hub.calls.clear()
    hub.fail_on_commit = None
    result = publish.publish(str(output), REPO, **small)
    assert hub.committed() == [[name] for name in names[2:]] + [
        [MAPPING, "README.md", "-data/train-00000-of-00001.parquet"]]  # ONE_FILE is names[0]: replaced
    assert result.uploaded == [*names[2:], MAPPING, "README.md"]
    assert max(on_disk) == 1  # mapping and card: 0
    publish.publish(str(output), REPO, dry_run=True, **(small | {"staging": tmp_path / "dry-small"}))
    assert {p: d for p, d in hub.files.items() if p != ".gitattributes"} == {
        p.relative_to(tmp_path / "dry-small").as_posix(): p.read_bytes()
        for p in (tmp_path / "dry-small").rglob("*") if p.is_file()}

    # the Hub token and the storage secret appear nowhere: output, logs, card
    captured = capsys.readouterr()
    for secret in (HF_SECRET, STORAGE_SECRET):
        assert secret not in captured.out + captured.err + caplog.text
        assert all(secret.encode() not in data for data in hub.files.values())
    assert manifest.REDACTED in json.dumps(manifest.read_manifest(str(output))["config"]["storage_options"])


def test_temporary_staging_removed_after_upload(output, hub, tmp_path, monkeypatch):
    monkeypatch.setattr(publish.tempfile, "tempdir", str(tmp_path))
    result = publish.publish(str(output), REPO)
    assert result.uploaded and not os.path.exists(result.staging)
    assert Path(result.staging).parent == tmp_path


def test_remote_output_staged_through_fsspec_and_verified(output, tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    remote = f"memory://publish-{os.getpid()}/out"
    fs.put(str(output), remote.removeprefix("memory://"), recursive=True)
    staging = tmp_path / "staging"
    result = publish.publish(remote, REPO, dry_run=True, staging=staging)
    current = manifest.read_manifest(str(output))
    assert pq.read_table(staging / ONE_FILE).to_pylist() == shard_rows(output)
    assert [f.path for f in result.files] == [ONE_FILE, MAPPING, "README.md"]

    # a shard file changed after the run (same size, other bytes) is refused, not published
    path = remote.removeprefix("memory://") + "/" + entries(output)[1]["file"]
    data = bytearray(fs.cat_file(path))
    data[100] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    with pytest.raises(publish.PublishError, match="the file changed after the run wrote it"):
        publish.publish(remote, REPO, dry_run=True, staging=tmp_path / "staging2")
    fs.rm(remote.removeprefix("memory://"), recursive=True)
