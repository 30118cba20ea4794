"""Corpora that change between runs: inputs added, removed, rewritten; for audio folders, manifests and WebDataset
tars. Every new input is encoded once, nothing is duplicated, the rows of removed inputs are kept until --prune, and a
pruned output equals a clean run over the new listing, file for file. Also: one metadata schema per output."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from audio_fixtures import FORMATS, encode, signal, write_audio, write_jsonl, write_tar
from outputs import assert_codes_equal, read_output, reference_codes
from pipeline import manifest
from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.runner import run
from pipeline.sources import discover_shards

FILES_PER_SHARD = 8


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def files(out: Path) -> dict[str, str]:
    """Data file name → sha256."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "data").glob("*.parquet"))}


def config(corpus: Path | str, out: Path, model: str, **overrides) -> RunConfig:
    return RunConfig(input=str(corpus), output=str(out), model=model, files_per_shard=FILES_PER_SHARD, device="cpu",
                     max_failure_share=0.0, **overrides)


def clip(path: Path, i: int) -> None:
    write_audio(path, "wav_pcm16", 16_000, 0.15 + 0.01 * (i % 11), seed=i)


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``folder``: (size, mtime in ns)."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def plan_json(corpus: Path, out: Path, capsys, *extra: str) -> dict:
    """`mimi-tokenize plan --json` for the run of :func:`config`; it must write nothing in the output."""
    before, _ = tree(out), capsys.readouterr()
    assert main(["plan", "--input", str(corpus), "--output", str(out), "--files-per-shard", str(FILES_PER_SHARD),
                 "--json", *extra]) == 0
    assert tree(out) == before
    return json.loads(capsys.readouterr().out)


def assert_plan_was_the_run(plan: dict, out: Path) -> None:
    shards = manifest.read_manifest(str(out))["listing"]["shards"]
    assert (plan["shards"]["new"], plan["shards"]["changed"], plan["shards"]["removed"], plan["shards"]["kept"]) == (
        shards["added"], shards["changed"], shards["removed"], shards["unchanged"])


def test_audio_folder_grows_and_shrinks(tmp_path, tiny_model_path, capsys):
    corpus = tmp_path / "in"
    for i in range(120):
        clip(corpus / f"spk{i % 5}" / f"utt{i:04d}.wav", i)
    out = tmp_path / "out"
    assert run(config(corpus, out, tiny_model_path)) == 0
    before, rows_before = files(out), read_output(str(out))
    n_shards = len(before)
    plan = plan_json(corpus, out, capsys)  # a finished output: nothing to do
    assert (plan["shards"]["kept"], plan["encode"]["shards"], plan["retire"]["files"]) == (n_shards, 0, 0)

    # 3 files added (first, middle and last in sort order), 1 removed
    added = ["a_first.wav", "spk2/utt0050b.wav", "zz_last.wav"]
    for j, rel in enumerate(added):
        clip(corpus / rel, 500 + j)
    (corpus / "spk3" / "utt0033.wav").unlink()
    plan = plan_json(corpus, out, capsys)
    assert (plan["clips"]["new"], plan["clips"]["gone"], plan["retire"]["rows_kept"]) == (3, 1, 1)
    assert plan["encode"]["clips"] == plan["encode"]["files"] == 3 + plan["clips"]["encoded_again"]
    assert plan["prune_drops"]["clips"] == 1 and plan["shards"]["kept"] >= n_shards - 8
    assert run(config(corpus, out, tiny_model_path)) == 0
    assert_plan_was_the_run(plan, out)
    after = files(out)
    rows = read_output(str(out))  # asserts each id once
    listing = reference_codes(str(corpus), tiny_model_path, 8, FILES_PER_SHARD)
    assert sorted(rows) == sorted([*listing, "spk3/utt0033.wav"])  # the removed input's row is kept
    assert_codes_equal({k: v for k, v in rows.items() if k in listing}, listing)
    np.testing.assert_array_equal(rows["spk3/utt0033.wav"], rows_before["spk3/utt0033.wav"])
    unchanged = sum(after.get(name) == digest for name, digest in before.items())
    assert unchanged >= n_shards - 8, f"{n_shards - unchanged} of {n_shards} shard files rewritten for 4 changes"

    final = manifest.read_manifest(str(out))
    clips = final["listing"]["clips"]
    assert (clips["new"], clips["gone"], clips["kept"], clips["pruned"]) == (3, 1, 1, 0)
    assert final["totals"]["clips"] == 123 and final["totals"]["kept_clips"] == 1
    by_change = Counter(e["change"] for e in manifest.shard_entries(str(out), final, columns=["change"]))
    assert by_change == {k: v for k, v in final["listing"]["shards"].items() if v}  # each shard's, in the index
    assert main(["status", str(out)]) == 0
    assert "listing: 3 new clip(s), 1 gone (kept 1)" in capsys.readouterr().out

    # --prune: the output equals a clean run over the new listing, file for file
    plan = plan_json(corpus, out, capsys)
    assert (plan["encode"]["shards"], plan["retire"]["files"], plan["prune_drops"]["clips"]) == (0, 0, 1)
    plan = plan_json(corpus, out, capsys, "--prune")
    assert (plan["prune_drops"]["clips"], plan["retire"]["rows_kept"], plan["encode"]["shards"]) == (1, 0, 1)
    assert plan["encode"]["clips"] == plan["clips"]["encoded_again"] > 0  # the shard that held the row is redone
    assert run(config(corpus, out, tiny_model_path, prune=True)) == 0
    assert_plan_was_the_run(plan, out)
    clean = tmp_path / "clean"
    assert run(config(corpus, clean, tiny_model_path)) == 0
    assert files(out) == files(clean)
    assert manifest.read_manifest(str(out))["listing"]["clips"]["pruned"] == 1

    # a file rewritten in place (same name, new content) is encoded again
    clip(corpus / "spk1" / "utt0001.wav", 999)
    assert run(config(corpus, out, tiny_model_path)) == 0
    assert_codes_equal(read_output(str(out)), reference_codes(str(corpus), tiny_model_path, 8, FILES_PER_SHARD))


def test_manifest_rows_change_by_id(tmp_path, tiny_model_path):
    audio = tmp_path / "audio"
    rows = []
    for i in range(30):
        clip(audio / f"{i:03d}.wav", i)
        rows.append({"id": f"utt{i:03d}", "audio": f"audio/{i:03d}.wav", "speaker": f"s{i % 3}", "n": i})
    write_jsonl(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    assert run(config(tmp_path / "m.jsonl", out, tiny_model_path)) == 0

    # rows reordered (same content: nothing redone), one row's metadata changed, one removed, two added
    rows = rows[::-1]
    rows[5]["speaker"] = "renamed"
    removed = rows.pop(7)
    clip(audio / "new1.wav", 101)
    clip(audio / "new2.wav", 102)
    rows += [{"id": "new1", "audio": "audio/new1.wav", "speaker": "s9", "n": 100},
             {"id": "new2", "audio": "audio/new2.wav", "speaker": "s9", "n": 101}]
    write_jsonl(tmp_path / "m.jsonl", rows)
    assert run(config(tmp_path / "m.jsonl", out, tiny_model_path)) == 0
    table = pa.concat_tables([pq.read_table(p) for p in sorted((out / "data").glob("*.parquet"))])
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 32 and removed["id"] in ids  # 29 + 2 new + the removed one, kept
    speaker = dict(zip(ids, table.column("speaker").to_pylist()))
    assert speaker[rows[5]["id"]] == "renamed" and speaker["new1"] == "s9"
    assert table.schema.field("n").type == pa.int64()

    assert run(config(tmp_path / "m.jsonl", out, tiny_model_path, prune=True)) == 0
    clean = tmp_path / "clean"
    assert run(config(tmp_path / "m.jsonl", clean, tiny_model_path)) == 0
    assert files(out) == files(clean)


def wds_sample(i: int, meta: dict) -> tuple[str, dict[str, bytes]]:
    return f"k{i:03d}", {"flac": encode(FORMATS["flac"], signal(16_000, 0.2 + 0.02 * i, seed=i), 16_000),
                         "json": json.dumps(meta).encode()}


def test_webdataset_tars_change_and_one_schema_is_unified_at_commit(tmp_path, tiny_model_path):
    """A tar rewritten with more samples is redone; a removed tar's rows are kept until --prune. Sidecar fields typed
    int in one tar and float in another, and a field only some tars have: every file ends with the same columns and
    types, and `datasets` loads the output as one split."""
    corpus = tmp_path / "wds"
    write_tar(corpus / "a.tar", [wds_sample(i, {"score": i, "lang": "en"}) for i in range(3)])
    write_tar(corpus / "b.tar", [wds_sample(i, {"score": i + 0.5}) for i in range(3, 5)])
    write_tar(corpus / "c.tar", [wds_sample(i, {"score": None, "extra": {"x": i}}) for i in range(5, 7)])
    out = tmp_path / "out"
    assert run(config(corpus, out, tiny_model_path)) == 0
    schemas = [pq.read_schema(p) for p in (out / "data").glob("*.parquet")]
    assert all(s.equals(schemas[0]) for s in schemas)
    assert schemas[0].field("score").type == pa.float64() and schemas[0].field("lang").type == pa.string()
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=f"{out}/data/*.parquet", split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 7 and sorted(ds["score"], key=lambda v: (v is None, v)) == [0, 1, 2, 3.5, 4.5, None, None]

    before = files(out)
    write_tar(corpus / "a.tar", [wds_sample(i, {"score": i, "lang": "en"}) for i in [0, 1, 2, 9]])
    (corpus / "b.tar").unlink()
    assert run(config(corpus, out, tiny_model_path)) == 0
    after = files(out)
    assert after["wds-c.parquet"] == before["wds-c.parquet"]  # untouched
    assert after["wds-a.parquet"] != before["wds-a.parquet"]  # redone
    ids = set(read_output(str(out)))
    assert ids == {f"a.tar/k{i:03d}" for i in (0, 1, 2, 9)} | {"b.tar/k003", "b.tar/k004", "c.tar/k005", "c.tar/k006"}
    assert manifest.read_manifest(str(out))["totals"]["retained_files"] == 1

    assert run(config(corpus, out, tiny_model_path, prune=True)) == 0
    assert set(read_output(str(out))) == ids - {"b.tar/k003", "b.tar/k004"} and "wds-b.parquet" not in files(out)


def test_a_manifest_column_with_two_types_is_refused_at_the_start(tmp_path, tiny_model_path, capsys):
    clip(tmp_path / "a.wav", 0)
    write_jsonl(tmp_path / "m.jsonl", [{"id": f"u{i}", "audio": "a.wav", "age": 30 if i else "thirty"}
                                       for i in range(3)])
    out = tmp_path / "out"
    assert main(["run", "--input", str(tmp_path / "m.jsonl"), "--output", str(out), "--model", tiny_model_path]) == 2
    err = capsys.readouterr().err
    assert "metadata column 'age' holds values that cannot share one type" in err and "'thirty'" in err
    assert not (out / "data").exists()


def test_million_row_manifest_is_read_once(tmp_path):
    """1,000,000 rows: listed, parsed, typed and cut into shards by the driver in one read; the shards carry their
    rows (the decode tasks never open the manifest)."""
    import time

    from pipeline.plan import make_plan
    from pipeline.schema import infer

    n = 1_000_000
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            f.write(f'{{"id": "u{i:07d}", "audio": "clips/{i % 997}.wav", "speaker": "s{i % 13}", "sec": {i % 30}}}\n')
    start = time.perf_counter()
    shards = discover_shards(str(path), files_per_shard=256)
    listed = time.perf_counter()
    schema = infer((json.loads(m.row) for s in shards for m in s.members), "big.jsonl")
    typed = time.perf_counter()
    plan = make_plan(shards, {}, {}, prune=False, read_ids=lambda shard_ids: {})
    planned = time.perf_counter()
    print(f"\n[1M-row manifest] list+read+shard {listed - start:.1f} s, schema {typed - listed:.1f} s, "
          f"plan {planned - typed:.1f} s, {len(shards)} shards")
    assert sum(len(s.members) for s in shards) == n and len(plan.pending) == len(shards)
    assert len({m.key for s in shards for m in s.members}) == n
    assert all(len(s.members) <= 256 for s in shards) and n / len(shards) > 100
    assert schema.names == ["speaker", "sec"] and schema.field("sec").type == pa.int64()
    path.unlink()  # nothing reads it again: a shard carries its rows
    assert json.loads(shards[0].members[0].row) == {"speaker": "s0", "sec": 0}
    shutil.rmtree(tmp_path, ignore_errors=True)
