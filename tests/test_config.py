"""RunConfig: YAML file, then the flags actually given; unknown keys and bad values are clear errors."""

from pathlib import Path

import pytest

from pipeline.config import ConfigError, RunConfig, load_config

CONFIGS = Path(__file__).parent.parent / "configs"


def test_defaults_without_a_file():
    cfg = load_config(None, {"input": "in", "output": "out", "num_codebooks": None})
    assert cfg == RunConfig(input="in", output="out")
    assert cfg.model == "kyutai/mimi" and cfg.num_codebooks == 8 and cfg.num_encoders is None


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("input: s3://b/in\nnum_codebooks: 16\nbatch_max_seconds: 60\nstorage_options: {anon: true}\n")
    cfg = load_config(path, {"num_codebooks": 4, "batch_max_seconds": None})
    assert (cfg.input, cfg.num_codebooks, cfg.batch_max_seconds) == ("s3://b/in", 4, 60)
    assert cfg.storage_options == {"anon": True}
    assert cfg.to_dict()["num_codebooks"] == 4


@pytest.mark.parametrize("name", ["default.yaml", "cluster-gpu.yaml"])
def test_shipped_configs_document_every_key(name):
    text = (CONFIGS / name).read_text()
    cfg = load_config(CONFIGS / name)
    if name == "default.yaml":
        assert cfg == RunConfig()
        assert all(f"\n{key}:" in text for key in RunConfig().to_dict())


@pytest.mark.parametrize("content, message", [
    ("num_codebook: 8\n", r"unknown key\(s\) in .*bad.yaml: num_codebook;"),
    ("num_codebooks: eight\n", "num_codebooks must be"),
    ("num_codebooks: 40\n", r"num_codebooks must be in \[1, 32\]"),
    ("channel_policy: left\n", "channel_policy must be"),
    ("device: tpu\n", "device must be one of"),
    ("shard_retries: -1\n", "shard_retries must be"),
    ("- a\n- b\n", "must hold a mapping"),
    ("a: [\n", "cannot read config file"),
])
def test_bad_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_bad_flag_value():
    with pytest.raises(ConfigError, match="max_failure_share must be in"):
        load_config(None, {"max_failure_share": 2.0})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config("/nonexistent.yaml")
