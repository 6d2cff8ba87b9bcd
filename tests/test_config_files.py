"""Config files: `cdfsl run --config FILE` (TOML or JSON, options typed on the command line and `--set` over it), a
`--json` summary fed back to reproduce its run, `RunConfig.from_dict` and sections given as mappings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cdfsl.cli import app
from cdfsl.cli.options import config_from_options, load_config_file
from cdfsl.config import RunConfig
from cdfsl.errors import ConfigError

TOML = """
dataset = "digits"
method = "lora"
backbone = "tiny"
pretrained = "none"
shots = 1
queries = 3
episodes = 2
device = "cpu"

[train]
iterations = 2
lr = 0.001

[augment]
views = ["plain", "flip"]
"""


def invoke(args: list[str]) -> Any:
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"})


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_toml_file_gives_every_key() -> None:
    config = RunConfig.from_dict(
        {"method": "vtt", "train": {"iterations": 2}, "augment": {"views": ["plain"]}, "vtt": {"beta": 3.0}}
    )
    assert (config.method, config.train.iterations, config.augment.views, config.vtt.beta) == (
        "vtt",
        2,
        ("plain",),
        3.0,
    )
    assert config.train.template == RunConfig().train.template  # keys left out keep their defaults


def test_sections_given_as_mappings_in_python() -> None:
    config = RunConfig(method="coop", train={"lr": 1e-3}, augment={"views": ["plain"]})
    assert config.train.lr == 1e-3 and config.augment.views == ("plain",)
    assert config.train.iterations is None  # the recipe fills it
    config.validate()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"trian": {"lr": 1}}, "unknown config key 'trian'"),
        ({"train": {"rl": 1}}, "unknown config key 'train.rl'"),
        ({"train": 3}, "train is a section"),
        ([1, 2], "must hold a table of config keys"),
    ],
)
def test_bad_mappings_are_refused(data: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(data)


def test_options_typed_and_set_override_the_file(tmp_path: Path) -> None:
    base = load_config_file(write(tmp_path / "run.toml", TOML))
    options = {"shots": 5, "dataset": None, "method": None, "ways": 5}
    config = config_from_options(options, ["train.iterations=7"], base=base, typed={"shots"})
    assert (config.shots, config.train.iterations, config.train.lr) == (5, 7, 0.001)
    assert (config.method, config.queries, config.augment.views) == ("lora", 3, ("plain", "flip"))


def test_a_json_summary_reproduces_its_run(tmp_path: Path) -> None:
    db, summary = tmp_path / "results.sqlite", tmp_path / "summary.json"
    first = invoke(
        ["run", "--config", str(write(tmp_path / "run.toml", TOML)), "--db", str(db), "--json", str(summary)]
    )
    assert first.exit_code == 0, first.output
    again = invoke(["run", "--config", str(summary)])
    assert again.exit_code == 0, again.output
    run_id = json.loads(summary.read_text())["run_id"]
    assert f"run {run_id}; 0 trained, 2 from {db}" in again.stdout.replace("\n", "")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.toml", "x = [\n", "is not valid TOML"),
        ("bad.json", "{", "is not valid JSON"),
        ("run.yaml", "a: 1", "give a .toml or .json file"),
        ("keys.toml", "shot = 1\n", "unknown config key 'shot'"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    result = invoke(["run", "--config", str(write(tmp_path / name, text)), "--db", str(tmp_path / "r.sqlite")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "r.sqlite").exists()


def test_missing_file_and_missing_method(tmp_path: Path) -> None:
    assert "no such file" in invoke(["run", "--config", str(tmp_path / "none.toml")]).output
    result = invoke(["run", "--dataset", "digits"])
    assert result.exit_code == 2 and "--method is required" in result.output
