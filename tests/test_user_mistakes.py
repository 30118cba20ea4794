"""The mistakes a new user makes (issue 19), on real folders, real files and real runs: a folder the tool did not
create, a run that fails at the start, an output inside its input, `status` during and after a run, wrong paths
everywhere, exports over other files, generated weights, and the rough edges of the messages."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from audio_fixtures import write_audio
from pipeline import manifest, runner
from pipeline.cli import main
from pipeline.lock import RunLock, host_identity

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three short mono clips."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        write_audio(root / f"clip{i}.wav", "wav_pcm16", 16_000, 0.3 + 0.1 * i, seed=i)
    return root


def run_args(corpus: Path, out: Path, model: str, *extra: str) -> list[str]:
    return ["run", "--input", str(corpus), "--output", str(out), "--model", model, "--files-per-shard", "2",
            "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def done_output(corpus, tiny_model_path, tmp_path_factory):
    """A complete output of the corpus (made with generated weights), and the log of its run."""
    out = tmp_path_factory.mktemp("done") / "out"
    handler, logger = _Capture(), logging.getLogger("pipeline")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        assert main(run_args(corpus, out, tiny_model_path)) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out, handler.text()


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def text(self) -> str:
        return "\n".join(self.lines)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- 1. a folder the tool did not create ------------------------------------------------------------------------


def test_foreign_output_folder_is_refused_untouched(corpus, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "data").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1, 2, 3]}), out / "data" / "results.parquet")
    (out / "notes.txt").write_text("my notes")
    (out / "manifest.json").write_text(json.dumps({"mine": True}))
    before = snapshot(out)
    assert main(run_args(corpus, out, tiny_model_path)) == 2
    assert "not empty and was not made by mimi-tokenize" in one_line_error(capsys)
    assert snapshot(out) == before and not (out / "_state").exists()


def test_foreign_parquet_in_an_output_is_left_alone(done_output, corpus, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(done_output[0], out)
    foreign = out / "data" / "results.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), foreign)
    before = foreign.read_bytes()
    assert main(run_args(corpus, out, tiny_model_path)) == 0
    assert foreign.read_bytes() == before and not (out / "_state" / "shards" / "results.json").exists()
    assert manifest.read_manifest(str(out))["totals"]["clips"] == 3


# --- 2. a run that fails at the start does not fix the output's settings ------------------------------------------


def test_failed_start_does_not_fix_the_settings(corpus, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "out"
    empty, text = tmp_path / "empty", tmp_path / "text"
    empty.mkdir()
    text.mkdir()
    (text / "readme.txt").write_text("not audio")
    for wrong in (tmp_path / "nope", empty, text):
        assert main(run_args(wrong, out, tiny_model_path)) == 2
        assert "cannot use input" in one_line_error(capsys)
    # every clip fails (mono clips have no channel 5): rows never produced, so the corrected command starts over
    assert main(run_args(corpus, out, tiny_model_path, "--channel-policy", "channel:5")) == 1
    assert manifest.read_manifest(str(out))["totals"]["clips"] == 0
    assert main(run_args(corpus, out, tiny_model_path)) == 0
    final = manifest.read_manifest(str(out))
    assert (final["status"], final["totals"]["clips"], final["totals"]["failed_clips"]) == ("complete", 3, 0)
    assert final["config"]["channel_policy"] == "mix"
    # once rows exist, the settings are fixed
    capsys.readouterr()
    assert main(run_args(corpus, out, tiny_model_path, "--channel-policy", "channel:0")) == 2
    assert "started with other settings" in one_line_error(capsys)


# --- 3. --output inside --input -----------------------------------------------------------------------------------


def test_output_inside_input_is_refused_at_once(corpus, tiny_model_path, tmp_path, capsys):
    work = tmp_path / "in"
    shutil.copytree(corpus, work)
    for _ in range(2):  # the same command, twice: refused at once, clearly, both times
        assert main(run_args(work, work / "tokens", tiny_model_path)) == 2
        assert "overlap" in one_line_error(capsys)
        assert not (work / "tokens").exists()
    assert main(run_args(work / "*.wav", work / "tokens", tiny_model_path)) == 2  # a glob searches its folder
    assert "overlap" in one_line_error(capsys)


# --- 4. status from the first second, and after an interrupt ------------------------------------------------------


def test_status_before_the_first_manifest_write(corpus, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(run_args(tmp_path / "nope", out, tiny_model_path)) == 2  # started, stopped before any manifest
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    assert capsys.readouterr().out.startswith("status: interrupted")
    for command in (["report", str(out)], ["export", str(out), str(tmp_path / "flat")]):
        assert main(command) == 2
        err = one_line_error(capsys)
        assert "interrupted" in err and "not an output" not in err and "no run has written" not in err
    for folder in (out, tmp_path / "new"):  # a live run (this process) holds the output, or has only just locked it
        lock = RunLock(str(folder), run_id="live", settle_s=0.0)
        lock.acquire()
        try:
            assert main(["status", str(folder)]) == 0
            assert capsys.readouterr().out.startswith("status: running")
        finally:
            lock.release()


def test_status_after_a_kill_says_interrupted(done_output, tmp_path, capsys):
    out = Path(shutil.copytree(done_output[0], tmp_path / "out"))
    killed = manifest.read_manifest(str(out))  # what a run killed mid-way leaves: "running", an ETA, its lock
    killed["status"], killed["timing"]["eta_s"] = "running", 16.0
    (out / manifest.MANIFEST_PATH).write_text(json.dumps(killed))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = {**host_identity(), "pid": dead.pid, "run_id": "killed", "token": "t", "heartbeat": time.time()}
    (out / "_state" / "lock.json").write_text(json.dumps(lock))
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("status: interrupted") and "ETA" not in text
    (out / "_state" / "lock.json").unlink()
    assert main(["status", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "interrupted"


# --- 5. wrong paths: one line, exit 2 -----------------------------------------------------------------------------


def test_wrong_paths_answer_in_one_line(done_output, corpus, tiny_model_path, tmp_path, capsys):
    out = str(done_output[0])
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    binary, utf16 = tmp_path / "binary.yaml", tmp_path / "utf16.yaml"
    binary.write_bytes(bytes(range(256)))
    utf16.write_bytes("num_codebooks: 8\n".encode("utf-16"))
    not_json, no_keys = tmp_path / "not-json", tmp_path / "no-keys"
    for folder, text in ((not_json, "{not json"), (no_keys, '{"status": "complete"}')):
        folder.mkdir()
        (folder / "manifest.json").write_text(text)
    nope = str(tmp_path / "nope")
    cases = [
        (["run", "--config", str(binary)], "not UTF-8"),
        (["run", "--config", str(utf16)], "not UTF-8"),
        (run_args(corpus, a_file, tiny_model_path), "is a file"),
        (["export", out, str(a_file)], "is a file"),
        (["encode", nope + ".wav", str(tmp_path / "x.npz"), "--model", tiny_model_path], "cannot read"),
        (["decode", nope + ".npz", str(tmp_path / "x.wav")], "not a readable .npz"),
        (["decode", str(a_file), str(tmp_path / "x.wav"), "--id", "a"], "is a file"),
        (["sample-corpus", str(a_file)], "not a folder"),
        (["plan", "--input", nope, "--output", str(tmp_path / "new")], "cannot use input"),
        (["plan", "--input", str(corpus), "--output", str(a_file)], "is a file"),
        (["plan", "--input", str(corpus), "--output", str(not_json)], "not made by mimi-tokenize"),
        (["plan", "--input", str(corpus), "--output", out, "--files-per-shard", "3"], "started with other settings"),
    ]
    before = snapshot(done_output[0])
    for command in ("status", "report", "export", "publish"):
        extra = {"export": [str(tmp_path / "flat")], "publish": ["--repo", "org/name", "--dry-run"]}.get(command, [])
        cases += [([command, nope, *extra], "not found"), ([command, str(a_file), *extra], "is a file"),
                  ([command, str(not_json), *extra], "not valid JSON"),
                  ([command, str(no_keys), *extra], "lacks num_codebooks")]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        assert expected in one_line_error(capsys), argv
    assert not (tmp_path / "flat").exists() and not (tmp_path / "new").exists()
    assert snapshot(done_output[0]) == before


def test_wrong_output_path_from_the_command_line(corpus, tiny_model_path, tmp_path):
    """The command itself, with its own logging: one line on stderr, exit 2, before Ray or the model."""
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *run_args(corpus, a_file, tiny_model_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "is a file" in done.stderr


# --- 6. export never overwrites what is not its own ---------------------------------------------------------------


def test_export_refuses_folders_that_are_not_this_export(done_output, tmp_path, capsys):
    out = done_output[0]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "codes.u16").write_bytes(b"my own tokens")
    assert main(["export", str(out), str(mine)]) == 2
    assert "not empty and holds no export" in one_line_error(capsys)
    assert (mine / "codes.u16").read_bytes() == b"my own tokens"
    before = snapshot(out)
    assert main(["export", str(out), str(out)]) == 2  # the output folder itself
    assert "inside the output" in one_line_error(capsys)
    assert snapshot(out) == before
    flat = tmp_path / "flat"
    assert main(["export", str(out), str(flat)]) == 0
    exported = snapshot(flat)
    assert main(["export", str(out), str(flat)]) == 0  # this export, these settings: nothing to do
    capsys.readouterr()
    assert main(["export", str(out), str(flat), "--num-codebooks", "4"]) == 2
    assert "holds another export" in one_line_error(capsys) and snapshot(flat) == exported
    for k in ("0", "-1", "9"):
        assert main(["export", str(out), str(tmp_path / f"k{k}"), "--num-codebooks", k]) == 2
        assert f"--num-codebooks must be between 1 and 8 (the codebooks {out} has), got {k}" in one_line_error(capsys)
    assert main(["export", str(out), str(mine), "--force"]) == 0  # asked for: the export goes there
    assert json.loads((mine / "meta.json").read_text())["num_codebooks"] == 8


# --- 7. generated weights are labelled untrained everywhere -------------------------------------------------------


def test_generated_weights_are_labelled_untrained(done_output, tmp_path, capsys):
    out = done_output[0]
    final = manifest.read_manifest(str(out))
    assert final["model"]["untrained"] is True
    for path in (out / "data").glob("*.parquet"):
        assert pq.read_metadata(path).metadata[b"model_untrained"] == b"true"
    assert main(["report", str(out)]) == 0
    assert re.search(r"untrained \(generated weights\) +YES", capsys.readouterr().out)
    staging = tmp_path / "staging"
    assert main(["publish", str(out), "--repo", "org/name", "--dry-run", "--staging", str(staging)]) == 0
    card = (staging / "README.md").read_text()
    assert "[Mimi](https://huggingface.co/kyutai/mimi) codes" not in card and "These codes come from untrained" in card
    metadata_keys = (ROOT / "README.md").read_text().split("key-value metadata records", 1)[1].split("A clip", 1)[0]
    assert "`model_untrained`" in metadata_keys


# --- 8. rough edges -----------------------------------------------------------------------------------------------


def test_rough_edges(done_output, corpus, tiny_model_path, tmp_path, monkeypatch, capsys):
    out, log = done_output
    assert re.search(r"done: 3 clips, 0\.00 hours, 0 failed, output in .*out$", log, re.MULTILINE)

    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "revision None" not in text and re.search(r"revision +default", text)
    assert "speed (all sessions" not in text and "speed while encoding" in text

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert main(["publish", str(out), "--repo", "org/name", "--dry-run"]) == 0
    assert "now removed (pass --staging DIR" in capsys.readouterr().out
    assert not list(tmp_path.glob("mimi-publish-*"))

    config = tmp_path / "run.yaml"
    config.write_text("num_codebooks: eight\n")
    assert main(["run", "--config", str(config)]) == 2
    assert f"{config}: num_codebooks must be int, got 'eight'" in one_line_error(capsys)

    lock = RunLock(str(out), run_id="other", settle_s=0.0)
    lock.acquire()
    try:
        assert main(run_args(corpus, out, tiny_model_path)) == 2
        err = one_line_error(capsys)
        assert "--lock-wait-s" in err and "force=True" not in err
    finally:
        lock.release()


def test_ray_token_notice_is_silenced(caplog):
    """Ray logs that it enabled token authentication on every local start; the run's session filters that line."""
    notice = logging.getLogger(runner._RAY_AUTH_LOGGER)
    with caplog.at_level(logging.WARNING):
        with runner._ray_session(runner.RunConfig()):  # Ray is up: the session joins it, the filter is in place
            pass
        notice.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled ...")
    assert "Token authentication" not in caplog.text


def test_a_model_file_replaced_during_a_run_is_refused(tiny_model_path, tmp_path):
    """The driver keeps the checkpoint's path and hash, not its bytes; the bytes shipped to the encoders are read
    when they start, and a file replaced since the check is refused rather than encoded with other weights."""
    import torch

    from pipeline.model_files import RunError, load_model_files

    path = tmp_path / "model.safetensors"
    shutil.copyfile(tiny_model_path, path)
    files = load_model_files(str(path), None, 8)
    assert files.weights is None and files.path == str(path)
    shipped = files.shipped()
    assert shipped.weights == path.read_bytes() and shipped.sha256 == files.sha256
    assert shipped.load("cpu", torch.float32).weights_sha256 == files.sha256
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # a weight's last byte: same size, other weights
    path.write_bytes(bytes(data))
    with pytest.raises(RunError, match="changed during the run"):
        files.shipped()
