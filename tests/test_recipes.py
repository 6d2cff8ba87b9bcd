"""Recipes: every value resolved, listings that match what runs, `--set` over the recipe, the schedule, identities."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cdfsl.analysis.report import build_report
from cdfsl.cli import app
from cdfsl.config import METHODS, RunConfig, apply_override
from cdfsl.engine.runner import Runner
from cdfsl.engine.store import ResultStore
from cdfsl.errors import ConfigError
from cdfsl.methods.lora.method import learning_rate_schedules
from cdfsl.recipes import RECIPES, tir_logit_scale

# The fields a recipe decides: `None` by default, never `None` once resolved.
RECIPE_FIELDS = (
    "lora.towers",
    "lora.rank",
    "lora.alpha",
    "prompt.context",
    "train.iterations",
    "train.batch_size",
    "train.lr",
    "train.schedule",
    "train.schedule_horizon",
    "train.logit_scale",
    "vtt.fusion",
    "vtt.lr",
    "pre_resize",
    "augment.views",
)


def get(config: RunConfig, key: str) -> object:
    section, _, name = key.rpartition(".")
    return getattr(getattr(config, section) if section else config, name)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("method", METHODS)
def test_every_recipe_resolves_every_recipe_field(recipe: str, method: str) -> None:
    config = RunConfig(method=method, recipe=recipe)
    assert all(get(config, key) is None for key in RECIPE_FIELDS)
    resolved = config.resolved()
    assert resolved.recipe == recipe
    assert all(get(resolved, key) is not None for key in RECIPE_FIELDS)
    assert resolved.resolved() == resolved  # idempotent


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_listed_values_of_fixed_fields_equal_their_defaults(recipe: str) -> None:
    """A recipe may list a field with a fixed default only with that default, so `cdfsl recipes` never lies."""
    default = RunConfig(dataset="isic2018", data_root=".", shots=5)
    for value in RECIPES[recipe].values:
        if value.key not in RECIPE_FIELDS:
            assert get(default, value.key) == value.resolve(default), value.key
        assert value.source


def test_each_method_defaults_to_its_release() -> None:
    """TIR on its released base runs the TIR release's loop; everything else the VtT release's."""
    defaults = {m: RunConfig(method=m).recipe_name for m in METHODS}
    assert {m for m, r in defaults.items() if r == "tir-release"} == {"tir", "coop+lora+tir"}
    assert set(defaults.values()) == {"tir-release", "vtt-release"}


def test_vtt_release_values() -> None:
    config = RunConfig(method="lora").resolved()
    assert (config.lora.towers, config.prompt.context) == ("vision", "")
    assert (config.train.iterations, config.train.batch_size, config.train.lr) == (250, 25, 2e-4)
    assert (config.train.schedule, config.train.schedule_horizon, config.train.logit_scale) == ("cosine", 8.0, 100.0)
    assert (config.vtt.fusion, config.vtt.lr) == ("release", 5e-4)
    chestx = RunConfig(method="vtt", dataset="chestx", data_root=".").resolved()
    assert (chestx.train.lr, chestx.vtt.lr) == (4e-4, 1e-3)


def test_tir_release_values() -> None:
    config = RunConfig(method="tir", shots=5).resolved()
    assert (config.lora.towers, config.prompt.context) == ("both", "a photo of a")
    assert (config.prompt.lr, config.prompt.momentum, config.prompt.weight_decay) == (2e-3, 0.9, 5e-4)
    assert (config.train.iterations, config.train.batch_size, config.train.schedule) == (100, "all", "none")
    assert config.train.logit_scale == 4.0
    assert RunConfig(method="tir", shots=1).resolved().train.logit_scale == 2.0
    isic = RunConfig(method="tir", dataset="isic2018", data_root=".").resolved()
    assert isic.train.lr == 2e-4  # the TIR release uses one learning rate everywhere
    assert (config.tir.blocks, config.tir.ratio, config.tir.text_layer) == ((-4, -2), 0.3, -2)


def test_paper_recipe_uses_the_papers_words() -> None:
    config = RunConfig(method="tir", recipe="paper").resolved()
    assert (config.lora.towers, config.prompt.context, config.train.logit_scale) == ("vision", "", 100.0)
    assert RunConfig(method="vtt", recipe="paper").resolved().vtt.fusion == "ssm"


@pytest.mark.parametrize(("shots", "scale"), [(1, 2.0), (2, 2.0), (4, 2.0), (5, 4.0), (10, 4.0)])
def test_tir_logit_scale_rule(shots: int, scale: float) -> None:
    assert tir_logit_scale(shots) == scale


def test_set_wins_over_the_recipe() -> None:
    config = RunConfig(method="tir")
    for assignment in (
        "train.lr=3e-4",
        "train.iterations=7",
        "train.batch_size=10",
        "prompt.context=",
        "train.logit_scale=9",
    ):
        apply_override(config, assignment)
    resolved = config.resolved()
    assert (resolved.train.lr, resolved.train.iterations, resolved.train.batch_size) == (3e-4, 7, 10)
    assert (resolved.prompt.context, resolved.train.logit_scale) == ("", 9.0)
    assert resolved.lora.towers == "both"  # unset fields still come from the recipe


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"recipe": "nope"}, "recipe must be one of"),
        ({"method": "vtt", "vtt__fusion": "none", "vtt__tia": False}, "nothing to learn"),
        ({"train__batch_size": "most"}, "train.batch_size must be"),
        ({"train__batch_size": 0}, "train.batch_size must be"),
        ({"train__schedule": "linear"}, "train.schedule must be one of"),
        ({"train__schedule_horizon": 0.0}, "train.schedule_horizon"),
        ({"lora__towers": "left"}, "lora.towers must be one of"),
        ({"method": "vtt", "vtt__fusion": "mamba"}, "vtt.fusion must be one of"),
    ],
)
def test_bad_recipe_settings_are_refused(changes: dict[str, object], message: str) -> None:
    config = RunConfig()
    for key, value in changes.items():
        section, _, name = key.rpartition("__")
        setattr(getattr(config, section) if section else config, name, value)
    with pytest.raises(ConfigError, match=message):
        config.validate()


# ------------------------------------------------------------------------------------------- the schedule


def rates_after(config: RunConfig, steps: int) -> list[float]:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=config.train.lr)
    schedules = learning_rate_schedules([optimizer], config)
    for _ in range(steps):
        optimizer.step()
        for schedule in schedules:
            schedule.step()
    return [group["lr"] for group in optimizer.param_groups]


def test_vtt_release_rate_ends_near_96_percent() -> None:
    config = RunConfig(method="vtt").resolved()
    (rate,) = rates_after(config, 250)
    expected = 1e-6 + (2e-4 - 1e-6) * (1 + math.cos(math.pi * 250 / 2000)) / 2
    assert rate == pytest.approx(expected) and rate / 2e-4 == pytest.approx(0.962, abs=1e-3)


def test_horizon_one_decays_to_the_minimum() -> None:
    config = RunConfig(method="lora").resolved()
    config.train.schedule_horizon = 1.0
    (rate,) = rates_after(config, 250)
    assert rate == pytest.approx(1e-6)


def test_tir_release_rate_is_constant() -> None:
    config = RunConfig(method="tir").resolved()
    assert rates_after(config, 100) == [2e-4]


# ------------------------------------------------------------------------------------------- identity and report


def test_runs_differing_only_in_recipe_are_two_runs_and_both_show_in_report(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    runner = Runner()
    results = []
    for recipe in ("vtt-release", "paper"):
        config = RunConfig(
            dataset="digits", method="tir", recipe=recipe, backbone="tiny", pretrained="none", shots=1, episodes=2,
            queries=3, device="cpu", db=str(db),
        )  # fmt: skip
        config.train.iterations = 1
        results.append(runner.run(config))
    assert results[0].run_id != results[1].run_id
    assert results[0].config.recipe == "vtt-release" and results[1].config.recipe == "paper"
    with ResultStore(db) as store:
        assert {run.recipe for run in store.runs()} == {"vtt-release", "paper"}
        report = build_report(store)
    assert {(row.method, row.recipe) for row in report.rows} == {("tir", "vtt-release"), ("tir", "paper")}
    changed = "[queries=3, pretrained=none, train.iterations=1]"  # what the runs changed from their recipes
    assert {row.label for row in report.rows} == {f"tir / vtt-release {changed}", f"tir / paper {changed}"}
    assert all(row["recipe"] for row in report.to_dict()["rows"])


def test_identity_holds_resolved_values() -> None:
    default = RunConfig(method="tir").identity("fp32", "index", "gelu")
    explicit = RunConfig(method="tir", recipe="tir-release")
    explicit.train.iterations = 100
    assert default == explicit.identity("fp32", "index", "gelu")
    assert default["recipe"] == "tir-release" and default["train"]["logit_scale"] == 2.0
    assert default["prompt"]["context"] == "a photo of a"
    changed = dataclasses.replace(RunConfig(method="tir"), recipe="paper").identity("fp32", "index", "gelu")
    assert changed != default


# ------------------------------------------------------------------------------------------- cli


def test_recipes_command_lists_every_value_with_its_source() -> None:
    result = CliRunner().invoke(app, ["recipes"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name, recipe in RECIPES.items():
        assert name in result.output
        for value in recipe.values:
            assert value.key in result.output
    assert "coop_lora_trainer.py" in result.output and "VtT.py" in result.output


def test_recipes_command_resolves_for_a_dataset() -> None:
    result = CliRunner().invoke(
        app, ["recipes", "--recipe", "vtt-release", "--dataset", "chestx"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0 and "0.0004" in result.output and "tir-release" not in result.output


def test_recipes_command_refuses_unknown_recipe() -> None:
    result = CliRunner().invoke(app, ["recipes", "--recipe", "nope"])
    assert result.exit_code == 2 and "must be one of" in result.output
