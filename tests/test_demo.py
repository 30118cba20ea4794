"""`mimi-tokenize demo` end to end (sample corpus, generated weights, a real run on local Ray), then
`decode OUTPUT --id` on its output."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

import mimi
from pipeline import manifest
from pipeline.cli import build_parser, main
from pipeline.writer import read_codes

N_CLIPS = 10  # two shards of the demo's 8 clips; clip 5 is the 18.4 s one


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out, work = root / "out", root / "work"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["demo", "--output", str(out), "--workdir", str(work), "--clips", str(N_CLIPS)])
    return {"code": code, "out": out, "work": work, "stdout": stdout.getvalue()}


def row(out: Path, clip_id: str) -> dict:
    for file in sorted((out / "data").glob("*.parquet")):
        table = pq.read_table(file)
        ids = table.column("id").to_pylist()
        if clip_id in ids:
            i = ids.index(clip_id)
            return {"codes": read_codes(table, i), "duration_s": table.column("duration_s")[i].as_py(),
                    "metadata": table.schema.metadata}
    raise KeyError(clip_id)


def test_demo_writes_a_complete_output_labelled_untrained(demo_run):
    assert demo_run["code"] == 0
    final = manifest.read_manifest(str(demo_run["out"]))
    assert final["status"] == "complete" and final["totals"]["clips"] == N_CLIPS
    assert final["totals"]["failed_clips"] == 0 and final["totals"]["shards"] >= 2
    assert final["model"]["untrained"] is True and "UNTRAINED" in final["model"]["note"]
    assert json.loads((demo_run["out"] / manifest.RUN_PATH).read_text())["model"]["untrained"] is True
    rows = sum(pq.read_metadata(f).num_rows for f in (demo_run["out"] / "data").glob("*.parquet"))
    assert rows == N_CLIPS
    long = row(demo_run["out"], "spk0/utt005")
    assert long["codes"].shape == (int(np.ceil(18.4 * 12.5)), 8)
    assert long["metadata"][b"model_untrained"] == b"true"
    # metadata columns of the sample corpus pass through
    table = pq.read_table(next((demo_run["out"] / "data").glob("*.parquet")))
    assert {"speaker", "text", "format"} <= set(table.column_names)

    text = demo_run["stdout"]
    n = final["totals"]["shards"]
    assert f"status: complete — {n}/{n} shards done" in text and "UNTRAINED" in text
    # every printed next command is a valid command line of this CLI
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("mimi-tokenize ")]
    assert any(c.startswith("mimi-tokenize decode ") for c in commands)
    for command in commands:
        build_parser().parse_args(shlex.split(command)[1:])


def test_status_shows_the_untrained_label(demo_run, capsys):
    assert main(["status", str(demo_run["out"])]) == 0
    assert "model: UNTRAINED" in capsys.readouterr().out


def test_decode_by_id_equals_decoding_the_row(demo_run, tmp_path):
    out = demo_run["out"]
    final = manifest.read_manifest(str(out))
    model = mimi.load_mimi(final["model"]["source"])
    for clip_id in ("spk0/utt005", "spk3/utt003"):
        wav = tmp_path / f"{clip_id.replace('/', '_')}.wav"
        assert main(["decode", str(out), "--id", clip_id, str(wav)]) == 0  # model: the manifest's
        decoded, sr = sf.read(wav, dtype="float32")
        r = row(out, clip_id)
        n = round(r["duration_s"] * 24_000)
        expected = model.decode(torch.from_numpy(r["codes"].T.astype(np.int64))[None])[0, 0, :n].numpy()
        assert sr == 24_000 and decoded.shape == (n,)
        np.testing.assert_allclose(decoded, expected, atol=1e-6)


def test_decode_unknown_id_and_other_weights(demo_run, tmp_path, capsys):
    out = str(demo_run["out"])
    assert main(["decode", out, "--id", "spk9/nope", str(tmp_path / "x.wav")]) == 2
    err = capsys.readouterr().err
    assert "no clip with id 'spk9/nope'" in err and f"{N_CLIPS} clips" in err and "ids look like ['spk" in err
    other = str(mimi.write_random_checkpoint(tmp_path / "other.safetensors", mimi.MimiConfig.tiny(), seed=7))
    assert main(["decode", out, "--id", "spk0/utt000", str(tmp_path / "x.wav"), "--model", other]) == 2
    assert "not the one that made the codes" in capsys.readouterr().err
    assert not (tmp_path / "x.wav").exists()
    assert main(["decode", out, "--id", "spk0/utt000", str(tmp_path / "x.wav"), "--model", other, "--force"]) == 0


def test_demo_rerun_finds_the_output_finished(demo_run):
    before = (demo_run["out"] / "manifest.json").read_bytes()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["demo", "--output", str(demo_run["out"]), "--workdir", str(demo_run["work"]),
                     "--clips", str(N_CLIPS)]) == 0
    assert (demo_run["out"] / "manifest.json").read_bytes() == before
    assert "status: complete" in stdout.getvalue()
