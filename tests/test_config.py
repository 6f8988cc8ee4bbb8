from __future__ import annotations

import pytest

from surd_builder.config import TEMPLATE, ExportSettings, SurdConfig, load_config, parse_config
from surd_builder.errors import ConfigError
from tests.conftest import run_surd, sidecar_folder


def test_new_workspace_has_the_commented_template(workspace):
    assert (workspace.root / "surd.toml").read_text() == TEMPLATE
    assert load_config(workspace.root) == SurdConfig()


def test_values_are_typed_and_unknown_keys_rejected():
    config = parse_config({"export": {"test_fraction": 0, "status": ["accepted"]}}, "x.toml")
    assert config.export == ExportSettings(test_fraction=0.0, status=("accepted",))
    assert isinstance(config.export.test_fraction, float)
    with pytest.raises(ConfigError, match=r"unknown key export.test_frac \(known: .*test_fraction"):
        parse_config({"export": {"test_frac": 0.1}}, "x.toml")
    with pytest.raises(ConfigError, match=r"unknown section \[exprot\]"):
        parse_config({"exprot": {}}, "x.toml")
    with pytest.raises(ConfigError, match="ingest.workers must be int, not str"):
        parse_config({"ingest": {"workers": "2"}}, "x.toml")
    with pytest.raises(ConfigError, match="keep_duplicates must be bool"):
        parse_config({"export": {"keep_duplicates": 1}}, "x.toml")
    with pytest.raises(ConfigError, match=r"x.toml: \[ingest\] batch_size must be 1..100000"):
        parse_config({"ingest": {"batch_size": 0}}, "x.toml")
    with pytest.raises(ConfigError, match="sum to less than 1"):
        parse_config({"export": {"test_fraction": 0.6, "validation_fraction": 0.5}}, "x.toml")
    with pytest.raises(ConfigError, match="status must be a list of strings"):
        parse_config({"export": {"status": "accepted"}}, "x.toml")


def test_workspace_settings_apply_and_the_command_line_wins(tmp_path):
    ws, folder = tmp_path / "ws", tmp_path / "in"
    assert run_surd("init", str(ws)).returncode == 0
    sidecar_folder(folder, 30)
    (ws / "surd.toml").write_text("[ingest]\nworkers = 1\n\n[export]\ntest_fraction = 0.5\n")
    assert run_surd("build", "ingest", str(folder), "-w", str(ws), "--no-progress").returncode == 0
    first = run_surd("build", "export", str(tmp_path / "a"), "-w", str(ws), "--no-progress")
    assert first.returncode == 0 and "split test" in first.stdout
    override = run_surd(
        "build",
        "export",
        str(tmp_path / "b"),
        "-w",
        str(ws),
        "--test-fraction",
        "0",
        "--no-progress",
    )
    assert override.returncode == 0 and "split test" not in override.stdout
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "a" / "data").iterdir()) == [
        "test",
        "train",
    ]

    (ws / "surd.toml").write_text("[export]\ntest_fraction = 'half'\n")
    bad = run_surd("build", "export", str(tmp_path / "c"), "-w", str(ws))
    assert bad.returncode == 4
    assert (
        bad.stderr.strip()
        == f"error: {ws / 'surd.toml'}: export.test_fraction must be float, not str"
    )
