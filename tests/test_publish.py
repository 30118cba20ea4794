"""`mimi-tokenize publish` on a real pipeline output: the staged folder loads with `datasets` as the card describes,
the card carries the manifest's provenance and no secret, refusals, dry run, and the upload at the `HfApi` boundary
(a simulated Hub in memory): create_repo arguments, only missing/changed files uploaded, resume after an interruption.
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
from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoFile, RepoFolder

from audio_fixtures import corrupt_bytes, write_audio
from pipeline import manifest, publish
from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.runner import run
from pipeline.writer import read_codes

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


def staged_names(n: int) -> list[str]:
    return [f"data/train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]


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
    """Replaces `HfApi.create_repo`, `list_repo_tree` and `upload_folder` with an in-memory repo. Every call is
    checked against the real method's signature, and recorded with the token of the `HfApi` it was made on."""

    def __init__(self, monkeypatch):
        self.files: dict[str, bytes] = {}
        self.calls: list[tuple[str, dict]] = []
        self.fail_on_upload: int | None = None  # raise on the n-th upload_folder call (1-based): an interruption
        for name in ("create_repo", "list_repo_tree", "upload_folder"):
            monkeypatch.setattr(HfApi, name, self._method(name))

    def _method(self, name):
        real, impl = getattr(HfApi, name), getattr(self, "_" + name)

        def method(api, *args, **kwargs):
            bound = inspect.signature(real).bind(api, *args, **kwargs)  # a call the real HfApi accepts
            call = {k: v for k, v in bound.arguments.items() if k != "self"}
            self.calls.append((name, {**call, "token_used": api.token}))
            return impl(**call)
        return method

    def uploads(self) -> list[dict]:
        return [c for name, c in self.calls if name == "upload_folder"]

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

    def _upload_folder(self, folder_path, allow_patterns=None, delete_patterns=None, **kwargs):
        if self.fail_on_upload is not None and len(self.uploads()) == self.fail_on_upload:
            raise ConnectionError("connection reset by peer")
        local = {p.relative_to(folder_path).as_posix(): p for p in Path(folder_path).rglob("*") if p.is_file()}
        added = {path: p.read_bytes() for path, p in local.items()
                 if allow_patterns is None or any(fnmatch.fnmatch(path, pat) for pat in allow_patterns)}
        for path in list(self.files):
            if delete_patterns and path not in added and any(fnmatch.fnmatch(path, p) for p in delete_patterns):
                del self.files[path]
        self.files.update(added)


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
    assert names == ["README.md"] + staged_names(n_shards(output))
    assert str(staging) in printed and all(name in printed for name in names) and "total:" in printed

    # data files: the run's shard files in shard order, byte for byte
    current = manifest.read_manifest(str(output))
    for i, entry in enumerate(entries(output)):
        staged = staging / staged_names(n_shards(output))[i]
        assert staged.read_bytes() == (output / entry["file"]).read_bytes()

    # the card's YAML
    card = (staging / "README.md").read_text()
    meta = front_matter(card)
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    assert meta["license"] == "cc-by-4.0"
    assert {"audio", "mimi", "tokenized-audio"} <= set(meta["tags"]) and meta["task_categories"]
    info = meta["dataset_info"]
    assert info["splits"] == [{"name": "train", "num_bytes": info["dataset_size"],
                               "num_examples": current["totals"]["clips"]}]
    assert info["download_size"] == sum(e["bytes"] for e in entries(output))
    codes_feature = next(f for f in info["features"] if f["name"] == "codes")
    assert codes_feature == {"name": "codes", "list": {"list": "int16", "length": K}}

    # what datasets infers from the bare Parquet files is exactly what the card declares
    bare = load_dataset("parquet", data_files=str(staging / "data/*.parquet"), split="train")
    assert Features._from_yaml_list(info["features"]) == bare.features
    assert info["dataset_size"] == bare.info.dataset_size

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
    assert len(clips) == len(ids) == 5
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
    assert sorted(f"data/{p.name}" for p in (staging / "data").iterdir()) == staged_names(n - 1)
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
    assert set(hub.files) >= {"README.md", *staged_names(n_shards(out_copy))}


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
    staging = tmp_path / "staging"
    args = ["publish", str(output), "--repo", REPO, "--private", "--staging", str(staging), "--config", str(config)]

    # first publish: every file, data before the card, on an HfApi holding the token
    assert main(args) == 0
    (name, create), = [c for c in hub.calls if c[0] == "create_repo"]
    assert create["repo_id"] == REPO and create["repo_type"] == "dataset" and create["private"] is True
    assert create["exist_ok"] is True
    assert all(call["token_used"] == HF_SECRET for _, call in hub.calls)
    staged = {p.relative_to(staging).as_posix(): p.read_bytes() for p in staging.rglob("*") if p.is_file()}
    assert {p: d for p, d in hub.files.items() if p != ".gitattributes"} == staged
    uploads = hub.uploads()
    assert [sorted(u["allow_patterns"]) for u in uploads] == [sorted(p for p in staged if p.startswith("data/")),
                                                              ["README.md"]]
    assert all(u["repo_type"] == "dataset" and u["repo_id"] == REPO and u["folder_path"] == str(staging)
               for u in uploads)
    n = n_shards(output)
    names = staged_names(n)
    assert f"uploaded {n + 1} of {n + 1} file(s)" in capsys.readouterr().out

    # publishing again uploads nothing
    hub.calls.clear()
    assert main(args) == 0
    assert not hub.uploads() and f"uploaded 0 of {n + 1} file(s)" in capsys.readouterr().out

    # an interrupted publish (remote has the first data file only, and a stale card): one commit per file, the
    # second commit fails; the rerun uploads exactly what is still missing or different
    hub.files = {".gitattributes": hub.files[".gitattributes"], names[0]: staged[names[0]], "README.md": b"old card\n",
                 "data/train-00000-of-00001.parquet": b"stale data of an earlier publish"}
    hub.calls.clear()
    hub.fail_on_upload = 2
    with pytest.raises(publish.PublishError, match="failed after 1 commit.*run the same command again"):
        publish.publish(str(output), REPO, staging=staging, commit_max_files=1)
    assert [u["allow_patterns"] for u in hub.uploads()] == [[names[1]], [names[2]]]
    assert names[1] in hub.files and names[2] not in hub.files

    hub.calls.clear()
    hub.fail_on_upload = None
    result = publish.publish(str(output), REPO, staging=staging, commit_max_files=1)
    uploads = hub.uploads()
    assert [u["allow_patterns"] for u in uploads] == [[name] for name in names[2:]] + [["README.md"]]
    assert uploads[-1]["delete_patterns"] == ["data/train-00000-of-00001.parquet"]  # stale data removed
    assert result.uploaded == [*names[2:], "README.md"]
    assert {p: d for p, d in hub.files.items() if p != ".gitattributes"} == staged

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
    for i, entry in enumerate(entries(output)):
        staged = staging / staged_names(n_shards(output))[i]
        assert staged.read_bytes() == (output / entry["file"]).read_bytes() and staged.stat().st_nlink == 1
    assert [f.path for f in result.files][-1] == "README.md"

    # a shard file changed after the run (same size, other bytes) is refused, not published
    path = remote.removeprefix("memory://") + "/" + entries(output)[1]["file"]
    data = bytearray(fs.cat_file(path))
    data[100] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    with pytest.raises(publish.PublishError, match="the file changed after the run wrote it"):
        publish.publish(remote, REPO, dry_run=True, staging=tmp_path / "staging2")
    fs.rm(remote.removeprefix("memory://"), recursive=True)
