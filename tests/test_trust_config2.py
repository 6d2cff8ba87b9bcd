"""Configuration files are type-checked, and what a user writes wrong is one `error:` line naming the file and key.

Covers `run --config` (TOML, JSON and a `--json` summary fed back), sweep files (`[sweep]`, `[roots]`, `[grid]`,
`[set]`, `[[run]]` and its `set`), a classifier's `model.json` `config`, `--set` flags (only true/false), files
nested deeper than the parsers follow, a string where a list belongs (`augment.views = "plain"`) and a finite but
huge `lora.alpha` (refused naming it, not by a training error that blames the learning rate). Every refusal comes
before any work: no result store is created, a model folder is unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
from typer.testing import CliRunner

from cdfsl.cli import app
from cdfsl.config import RunConfig, check_field, config_keys
from cdfsl.engine.sweep import load_sweep
from cdfsl.errors import ConfigError
from layouts import make_imagefolder
from test_cli_trust import assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--backbone", "tiny", "--pretrained", "none", "--device", "cpu"]
DEEP = 5000  # levels: deeper than tomllib's and json's recursion reaches


def invoke(args: list[str]) -> Any:
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"})


def run_args(config: Path, db: Path, method: str = "lora", *extra: str) -> list[str]:
    return [
        "run", "--config", str(config), "--dataset", "digits", "--method", method, *TINY, "--episodes", "1",
        "--iterations", "1", "--db", str(db), *extra,
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------- run --config
CONFIG_FILES = {
    "bool as text": ("run.toml", '[vtt]\ncorrection = "false"\n', "vtt.correction", "tir+vtt"),
    "bool as yes/no": ("run.toml", '[lora]\nmerge_for_prediction = "no"\n', "lora.merge_for_prediction", "lora"),
    "bool as 0 in JSON": ("run.json", '{"vtt": {"dlc": 0}}', "vtt.dlc", "vtt"),
    "bool for an int": ("run.toml", "shots = true\n", "shots", "lora"),
    "float for an int": ("run.json", '{"seed": 1.0}', "seed", "lora"),
    "text for a float": ("run.toml", '[train]\nlr = "1e-3"\n', "train.lr", "lora"),
    "int template": ("run.toml", "[train]\ntemplate = 5\n", "train.template", "lora"),
    "int prompt context": ("run.toml", "[prompt]\ncontext = 5\n", "prompt.context", "coop"),
    "int db": ("run.toml", "db = 5\n", "db", "lora"),
    "views as one string": ("run.toml", '[augment]\nviews = "plain"\n', "augment.views", "lora"),
    "targets as one string": ("run.toml", '[lora]\ntargets = "qkv"\n', "lora.targets", "lora"),
    "bool among block indices": ("run.toml", "[tir]\nblocks = [-4, true]\n", "tir.blocks", "tir"),
    "section as a value": ("run.toml", "train = 5\n", "train", "lora"),
    "null for a required text": ("run.json", '{"backbone": null}', "backbone", "lora"),
    "summary with a bad value": (
        "summary.json",
        json.dumps({"run_id": "x", "config": {"lora": {"merge_for_prediction": "no"}}}),
        "lora.merge_for_prediction",
        "lora",
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_FILES))
def test_a_config_file_value_of_the_wrong_type_is_refused(tmp_path: Path, case: str) -> None:
    name, text, key, method = CONFIG_FILES[case]
    config = tmp_path / name
    config.write_text(text, encoding="utf-8")
    db = tmp_path / "results.sqlite"
    line = assert_one_line_error(invoke(run_args(config, db, method)), f"--config {config}", key)
    assert "must be" in line or "is a section" in line
    assert not db.exists()


def test_a_quoted_flag_says_to_drop_the_quotes(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('[vtt]\ncorrection = "false"\n', encoding="utf-8")
    assert_one_line_error(invoke(run_args(config, tmp_path / "r.sqlite", "vtt")), "write false without quotes")


@pytest.mark.parametrize("name", ["deep.toml", "deep.json", "deep_object.json"])
def test_a_config_file_nested_too_deeply_is_refused(tmp_path: Path, name: str) -> None:
    config = tmp_path / name
    if name == "deep.toml":
        config.write_text("a = " + "[" * DEEP + "]" * DEEP + "\n", encoding="utf-8")
    elif name == "deep.json":
        config.write_text("[" * DEEP + "]" * DEEP, encoding="utf-8")
    else:
        config.write_text('{"a": ' * DEEP + "1" + "}" * DEEP, encoding="utf-8")
    db = tmp_path / "results.sqlite"
    assert_one_line_error(invoke(run_args(config, db)), f"--config {config}", "too deeply")
    assert not db.exists()


def test_a_json_summary_still_reproduces_its_run(tmp_path: Path) -> None:
    """A `--json` summary holds the resolved config (nulls, lists, integers for numbers): it passes the checks."""
    db, summary = tmp_path / "results.sqlite", tmp_path / "summary.json"
    first = invoke(["run", "--dataset", "digits", "--method", "zeroshot", *TINY, "--episodes", "1", "--db", str(db),
                    "--json", str(summary)])  # fmt: skip
    assert first.exit_code == 0, first.output
    again = invoke(["run", "--config", str(summary)])
    assert again.exit_code == 0, again.output
    assert "0 evaluated, 1 from" in again.output


def test_from_dict_takes_dotted_keys_and_integers_for_numbers() -> None:
    config = RunConfig.from_dict({"train.lr": 1, "vtt": {"beta": 5}, "augment": {"views": ["plain"]}})
    assert (config.train.lr, config.vtt.beta, config.augment.views) == (1, 5, ("plain",))
    with pytest.raises(ConfigError, match=r"^a file: augment\.views must be a list of strings"):
        RunConfig.from_dict({"augment": {"views": "plain"}}, source="a file")
    with pytest.raises(ConfigError, match=r"^config: lora\.merge_for_prediction must be true or false"):
        RunConfig(lora={"merge_for_prediction": "no"})


# ------------------------------------------------------------------------------------------- the type checker
@pytest.mark.parametrize(
    ("annotation", "value", "expected"),
    [
        (bool, True, True),
        (int, 3, 3),
        (float, 3, 3),
        (float, 0.5, 0.5),
        (str, "a", "a"),
        (int | None, None, None),
        (int | str | None, "all", "all"),
        (tuple[str, ...], ["a", "b"], ("a", "b")),
        (tuple[int, ...], (1, 2), (1, 2)),
        (tuple[int, str], [1, "x"], (1, "x")),
        (Literal["a", "b"], "b", "b"),
        (Literal[1, 2], 2, 2),
    ],
)
def test_check_field_accepts_its_type(annotation: Any, value: Any, expected: Any) -> None:
    got = check_field("k", value, annotation)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    ("annotation", "value", "words"),
    [
        (bool, 1, "true or false"),
        (bool, "true", "true or false"),
        (bool, None, "true or false"),
        (int, True, "an integer"),
        (int, 2.0, "an integer"),
        (float, False, "a number"),
        (float, "1e-3", "a number"),
        (str, 5, "a string"),
        (str, ["a"], "a string"),
        (int | None, "none", "an integer or none"),
        (int | str | None, True, "an integer, a string or none"),
        (tuple[str, ...], "plain", "a list of strings"),
        (tuple[int, ...], [1, False], "a list of integers"),
        (tuple[int, str], [1], "a list of"),
        (Literal["a", "b"], "c", "one of 'a', 'b'"),
        (Literal[1, 2], True, "one of 1, 2"),
    ],
)
def test_check_field_refuses_another_type(annotation: Any, value: Any, words: str) -> None:
    with pytest.raises(ConfigError, match=rf"^here: k must be {words}"):
        check_field("k", value, annotation, "here")


def test_every_config_field_has_a_type_check() -> None:
    """Each field's own default passes the checker (a new field type would raise `TypeError` here first)."""
    config = RunConfig()
    for key in config_keys():
        section, _, name = key.rpartition(".")
        owner = getattr(config, section) if section else config
        value = getattr(owner, name)
        assert check_field(key, value, typing.get_type_hints(type(owner))[name]) == value


def test_a_long_or_nested_value_is_shown_short() -> None:
    with pytest.raises(ConfigError) as caught:
        check_field("train.template", [[[[["x" * 500]]]]] * 50, str)
    assert len(str(caught.value)) < 200 and "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------- --set flags
@pytest.mark.parametrize("raw", ["no", "0", "off", "yes", "1", "on", "fals"])
def test_set_takes_only_true_or_false_for_a_flag(tmp_path: Path, raw: str) -> None:
    db = tmp_path / "results.sqlite"
    args = ["run", "--dataset", "digits", "--method", "lora", *TINY, "--episodes", "1", "--iterations", "1",
            "--db", str(db), "--set", f"lora.merge_for_prediction={raw}"]  # fmt: skip
    assert_one_line_error(invoke(args), "lora.merge_for_prediction", "true or false", repr(raw))
    assert not db.exists()


# ------------------------------------------------------------------------------------------- 15a: wrong-way messages
@pytest.mark.parametrize("how", ["--set", "--config"])
def test_a_huge_lora_alpha_is_refused_naming_it(tmp_path: Path, how: str) -> None:
    """`lora.alpha=1e300` trained into a non-finite loss whose message suggested lowering `train.lr`."""
    db = tmp_path / "results.sqlite"
    if how == "--set":
        args = ["run", "--dataset", "digits", "--method", "lora", *TINY, "--episodes", "1", "--iterations", "1",
                "--db", str(db), "--set", "lora.alpha=1e300"]  # fmt: skip
    else:
        config = tmp_path / "run.toml"
        config.write_text("[lora]\nalpha = 1e300\n", encoding="utf-8")
        args = run_args(config, db)
    line = assert_one_line_error(invoke(args), "lora.alpha must be", "1e+300")
    assert "train.lr" not in line
    assert not db.exists()


# ------------------------------------------------------------------------------------------- sweep files
GRID = '[grid]\nmethod = "zeroshot"\ndataset = "digits"\nbackbone = "tiny"\npretrained = "none"\n'
RUN = '[[run]]\nmethod = "zeroshot"\ndataset = "digits"\nbackbone = "tiny"\npretrained = "none"\n'
SWEEPS = {
    "run set = 5": (RUN + "set = 5\n", "run 1", "set must be a table"),
    "cache_dir = 5": ("[sweep]\ncache_dir = 5\n" + GRID, "[sweep]", "cache_dir must be"),
    "db = 5": ("[sweep]\ndb = 5\n" + GRID, "[sweep]", "db must be"),
    "episodes as text": ('[sweep]\nepisodes = "3"\n' + GRID, "[sweep]", "episodes must be"),
    "root = 5": ("[roots]\ndigits = 5\n" + GRID, "[roots]", "digits must be"),
    "set flag as text": ('[set]\n"vtt.correction" = "false"\n' + GRID, "[set]", "vtt.correction must be"),
    "set flag as 0": ('[set]\n"lora.merge_for_prediction" = 0\n' + GRID, "[set]", "merge_for_prediction must be"),
    "set views as a string": ('[set]\n"augment.views" = "plain"\n' + GRID, "[set]", "augment.views must be"),
    "set template = 5": ("[set]\ntrain.template = 5\n" + GRID, "[set]", "train.template must be"),
    "run set context = 5": (RUN + '[run.set]\n"prompt.context" = 5\n', "[run.set]", "prompt.context must be"),
    "grid shots as text": (GRID + 'shots = [1, "5"]\n', "run 2", "shots must be"),
    "grid shots as bool": (GRID + "shots = true\n", "run 1", "shots must be"),
    "deeply nested": ("a = " + "[" * DEEP + "]" * DEEP + "\n", "too deeply", ""),
}


@pytest.mark.parametrize("case", list(SWEEPS))
def test_a_sweep_file_value_of_the_wrong_type_is_refused(tmp_path: Path, case: str, monkeypatch) -> None:
    text, where, what = SWEEPS[case]
    monkeypatch.chdir(tmp_path)  # the default store, results.sqlite, would be here
    path = tmp_path / "grid.toml"
    path.write_text(text, encoding="utf-8")
    assert_one_line_error(invoke(["sweep", "plan", str(path)]), f"sweep file {path}", where, what)
    assert list(tmp_path.iterdir()) == [path]


def test_sweep_set_tables_take_typed_values_dotted_or_nested(tmp_path: Path) -> None:
    path = tmp_path / "grid.toml"
    path.write_text(
        '[set]\n"vtt.beta" = 5\ntrain.lr = 0.001\n[set.tir]\nratio = 0.2\nblocks = [-3]\n'
        + RUN
        + '[run.set]\n"vtt.beta" = 3.5\n',
        encoding="utf-8",
    )
    config = load_sweep(path).runs[0].config
    assert (config.vtt.beta, config.train.lr, config.tir.ratio, config.tir.blocks) == (3.5, 0.001, 0.2, (-3,))


# ------------------------------------------------------------------------------------------- model.json
@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A lora classifier fitted by `cdfsl fit` (1 iteration) and a folder of images to predict."""
    root = tmp_path_factory.mktemp("own")
    make_imagefolder(root / "train", ("ant", "bee"), per_class=2)
    model = root / "saved"
    fitted = invoke(["fit", "--data", str(root / "train"), "--out", str(model), *TINY, "--set", "train.iterations=1"])
    assert fitted.exit_code == 0, fitted.output
    return model, root / "train" / "ant"


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    state: dict[str, tuple[int, bytes | None]] = {}
    for path in sorted(root.rglob("*")):
        mode = os.lstat(path).st_mode
        state[path.relative_to(root).as_posix()] = (mode, path.read_bytes() if stat.S_ISREG(mode) else None)
    return state


MODEL_CHANGES = {
    "template: 5": (("train", "template"), 5),
    "merge_for_prediction: no": (("lora", "merge_for_prediction"), "no"),
    "views: plain": (("augment", "views"), "plain"),
    "seed: 1.5": (("seed",), 1.5),
}


@pytest.mark.parametrize("case", list(MODEL_CHANGES))
def test_a_model_json_config_value_of_the_wrong_type_is_refused(
    saved: tuple[Path, Path], tmp_path: Path, case: str
) -> None:
    source, images = saved
    model = tmp_path / "model"
    shutil.copytree(source, model)
    meta = json.loads((model / "model.json").read_text(encoding="utf-8"))
    keys, value = MODEL_CHANGES[case]
    owner = meta["config"]
    for key in keys[:-1]:
        owner = owner[key]
    owner[keys[-1]] = value
    (model / "model.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    before = snapshot(model)
    result = invoke(["predict", str(model), str(images)])
    assert_one_line_error(result, "model.json", ".".join(keys) + " must be")
    assert snapshot(model) == before


def test_a_stored_config_with_a_value_of_another_type_still_labels() -> None:
    """A result store written before these checks may hold such a value: its run is labelled, not refused."""
    from cdfsl.labels import changed_settings

    assert changed_settings({"method": "lora", "lora": {"merge_for_prediction": "no"}}) == {}
