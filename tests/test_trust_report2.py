"""Reports say what was run: labels show every setting changed from the recipe (report rows in every format,
`compare`, the sweep plan and status), `report --paired` refuses an ambiguous baseline as `compare` does, one rule
for the paired interval, the papers' per-dataset numbers, and run names with control characters in tables."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import t as student_t

from cdfsl.analysis.compare import compare_runs
from cdfsl.analysis.report import build_report, render, render_table
from cdfsl.config import LORA_TOWERS, SCHEDULES, VTT_FUSIONS, RunConfig
from cdfsl.engine.store import EpisodeResult, ResultStore
from cdfsl.engine.sweep import load_sweep
from cdfsl.errors import ConfigError
from cdfsl.labels import changed_settings, format_value
from cdfsl.recipes import RECIPES
from cdfsl.registry import method_names, parse_method
from test_cli_trust import assert_one_line_error, invoke, snapshot

TOTAL = 75
IDENTITY = {"dataset": "digits", "index": "abc", "ways": 5, "shots": 1, "queries": 15, "seed": 0}
CHOICES: dict[str, tuple[Any, ...]] = {
    "lora.towers": LORA_TOWERS,
    "train.schedule": SCHEDULES,
    "vtt.fusion": VTT_FUSIONS,
    "prompt.context": ("a picture of a", "a photo of a"),
    "train.batch_size": (10, "all"),
    "train.precision": ("bf16", "fp32"),
    "augment.crop_scale": ((0.2, 1.0),),
}


@dataclass(frozen=True)
class Case:
    """One recipe field changed on a method that reads it: the run config and the `key=value` its label must show."""

    recipe: str
    key: str
    config: RunConfig

    @property
    def text(self) -> str:
        return f"{self.key}={format_value(_get(self.config, self.key))}"


def _get(config: RunConfig, key: str) -> Any:
    section, _, name = key.rpartition(".")
    return getattr(getattr(config, section) if section else config, name)


def _set(config: RunConfig, key: str, value: Any) -> None:
    section, _, name = key.rpartition(".")
    setattr(getattr(config, section) if section else config, name, value)


def _alternatives(key: str, value: Any) -> Iterator[Any]:
    if key in CHOICES:
        yield from CHOICES[key]
    elif isinstance(value, bool):
        yield not value
    elif isinstance(value, int):
        yield from (value + 1, value - 1)
    elif isinstance(value, float):
        yield from (value * 2, value / 2)
    elif isinstance(value, str) and "{}" in value:
        yield "a picture of a {}."  # train.template
    elif isinstance(value, tuple) and all(isinstance(item, str) for item in value):
        yield value[:1] if len(value) > 1 else (*value, "plain")  # augment.views: one view fewer or more
    elif isinstance(value, tuple):
        yield tuple(item + 1 for item in value)
        yield tuple(item - 1 for item in value)


def _reads(method: str, recipe: str, key: str) -> bool:
    """Whether `method` under `recipe` has `key` in its run identity and lets it be set."""
    try:
        spec = parse_method(method, recipe)
    except ConfigError:
        return False
    if key in spec.base.decides or not spec.base.trains_anything:
        return False
    config = RunConfig(dataset="digits", method=method, recipe=recipe, backbone="tiny", shots=1)
    return "." not in key or key in config.reads()


UNREAD_HORIZON: set[str] = set()
"""Recipes whose `train.schedule_horizon` no method reads (their schedule is not cosine), found by `_cases`."""


def _cases() -> list[Case]:
    """Every field every recipe sets, changed on the first method (registry order) that reads it under that recipe."""
    cases = []
    for recipe in RECIPES.values():
        for value in recipe.values:
            method = next((m for m in method_names() if _reads(m, recipe.name, value.key)), None)
            if method is None:  # listed for the record, read by no method there (the cosine horizon without cosine)
                assert value.key == "train.schedule_horizon", f"no method reads {value.key} under {recipe.name}"
                UNREAD_HORIZON.add(recipe.name)
                continue
            base = RunConfig(dataset="digits", method=method, recipe=recipe.name, backbone="tiny", shots=1)
            current = _get(base.resolved(), value.key)
            for alternative in _alternatives(value.key, current):
                if alternative == current:
                    continue
                config = RunConfig(dataset="digits", method=method, recipe=recipe.name, backbone="tiny", shots=1)
                _set(config, value.key, alternative)
                try:
                    config.validate()
                except ConfigError:
                    continue
                cases.append(Case(recipe.name, value.key, config))
                break
            else:
                raise AssertionError(f"no valid other value for {value.key} under {recipe.name}")
    return cases


CASES = _cases()


def _add(store: ResultStore, run_id: str, config: RunConfig, correct: list[int]) -> None:
    store.register_run(run_id, config.resolved().to_dict(), IDENTITY)
    store.add_episodes(run_id, [EpisodeResult(i, c, TOTAL, 0.1) for i, c in enumerate(correct)])


def _unescape_markdown(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _unescape_latex(text: str) -> str:
    return re.sub(r"\\([&%$#_{}])", r"\1", text)


# ------------------------------------------------------------------------------------------------ 27.1 labels


def test_cases_cover_every_recipe_field() -> None:
    unread = {(recipe.name, "train.schedule_horizon") for recipe in RECIPES.values() if recipe.name in UNREAD_HORIZON}
    assert {(case.recipe, case.key) for case in CASES} == {
        (recipe.name, value.key) for recipe in RECIPES.values() for value in recipe.values
    } - unread


def test_a_changed_recipe_field_is_in_every_label(tmp_path: Path) -> None:
    """Each recipe field changed (one run each, alone in its cell) is `key=value` in every report format and in
    `compare`; a run on the recipe's values has a plain label."""
    plain = RunConfig(dataset="digits", method="lora", backbone="tiny", shots=1)
    with ResultStore(tmp_path / "r.sqlite") as store:
        _add(store, "plain0000", plain, [50, 55])
        for index, case in enumerate(CASES):
            _add(store, f"case{index:04d}", case.config, [60, 50])
        report = build_report(store)
        outputs = {
            "table": render_table(report, width=4000),
            "markdown": _unescape_markdown(render(report, "markdown")),
            "latex": _unescape_latex(render(report, "latex")),
        }
        rows = list(csv.DictReader(io.StringIO(render(report, "csv"))))
        data = json.loads(render(report, "json"))
        compared = [compare_runs(store, f"case{index:04d}", "plain0000") for index in range(len(CASES))]
    assert "lora / vtt-release" in {row["label"] for row in rows}  # the recipe's own values: nothing to add
    for index, case in enumerate(CASES):
        for fmt, text in outputs.items():
            assert case.text in text, (fmt, case.text)
        assert any(case.text in row["label"] and case.text in row["variant"] for row in rows), case.text
        assert any(case.text in row["label"] and case.key in row["settings"] for row in data["rows"]), case.text
        assert case.text in compared[index]["a"]["label"] and case.key in compared[index]["a"]["settings"]
        assert compared[index]["b"]["label"] == "lora / vtt-release"


def test_sweep_plan_labels_show_changed_settings(tmp_path: Path) -> None:
    """The sweep's run labels (`sweep plan`, `status`, `run`) carry the same `key=value` as report rows."""
    # `--set` reads none/auto as "unset", so those values cannot be written in a sweep file's [set] table.
    cases = [case for case in CASES if str(_get(case.config, case.key)).lower() not in ("none", "auto")]
    entries = []
    for case in cases:
        value = _get(case.config, case.key)
        toml_value = json.dumps(list(value) if isinstance(value, tuple) else value)
        entries.append(
            f'[[run]]\nmethod = "{case.config.method}"\ndataset = "digits"\nrecipe = "{case.recipe}"\n'
            f'backbone = "tiny"\n[run.set]\n"{case.key}" = {toml_value}\n'
        )
    path = tmp_path / "sweep.toml"
    path.write_text(f'[sweep]\ndb = "{tmp_path / "s.sqlite"}"\n' + "\n".join(entries))
    sweep = load_sweep(path)
    for run, case in zip(sweep.runs, cases, strict=True):
        assert case.text in run.label, (run.label, case.text)
        assert run.label.startswith(f"{case.config.method} / {case.recipe} [")


def test_cli_run_then_report_names_the_overridden_iterations(tmp_path: Path) -> None:
    """The issue's case: `run --config` with `train.iterations` for `tir`, then `report --format csv`."""
    db = tmp_path / "r.sqlite"
    config = tmp_path / "run.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            dataset = "digits"
            method = "tir"
            backbone = "tiny"
            pretrained = "none"
            episodes = 1
            queries = 2
            device = "cpu"
            db = "{db}"
            [train]
            iterations = 1
            """
        )
    )
    assert invoke(["run", "--config", str(config)]).exit_code == 0
    result = invoke(["report", "--format", "csv", "--db", str(db)])
    assert result.exit_code == 0, result.output
    (row,) = csv.DictReader(io.StringIO(result.stdout))
    assert row["label"] == "tir / tir-release [queries=2, pretrained=none, train.iterations=1]"
    assert row["variant"] == "queries=2, pretrained=none, train.iterations=1"


def test_changed_settings_leave_out_what_never_changes_results() -> None:
    """Episodes, device, paths, the run name and the sections of unused plug-ins are no difference."""
    config = RunConfig(method="lora", episodes=3, device="cpu", db="x.sqlite", run_name="n", episode_batch=4)
    config.vtt.beta = 1.0  # lora does not use VtT
    assert changed_settings(config) == {}
    assert changed_settings(config.resolved().to_dict()) == {}
    config.seed = 3
    assert changed_settings(config) == {"seed": 3}


# ------------------------------------------------------------------------------------------ 27.2 paired baseline


def _lora(lr: float | None = None, seed: int = 0) -> RunConfig:
    config = RunConfig(dataset="digits", method="lora", backbone="tiny", shots=1, seed=seed)
    config.train.lr = lr
    return config


def test_report_paired_refuses_a_baseline_of_several_runs_as_compare_does(tmp_path: Path) -> None:
    """Two lora runs neither of which has tir's settings: `report --paired lora` is refused with both runs and what
    tells them apart, as `compare lora …` is; the store is unchanged."""
    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        _add(store, "lora1e3a", _lora(1e-3), [50, 55, 52])
        _add(store, "lora2e3b", _lora(2e-3), [51, 54, 53])
        tir = RunConfig(dataset="digits", method="tir", backbone="tiny", shots=1)
        _add(store, "tirplain", tir, [60, 61, 62])
    before = snapshot(db)
    line = assert_one_line_error(
        invoke(["report", "--paired", "lora", "--db", str(db)]),
        "lora1e3a",
        "lora2e3b",
        "train.lr=0.001",
        "train.lr=0.002",
        "--paired RUN_ID",
    )
    assert "names 2 runs" in line
    assert_one_line_error(invoke(["compare", "lora", "tirplain", "--db", str(db)]), "names 2 runs", "train.lr=0.001")
    assert snapshot(db) == before
    by_id = invoke(["report", "--paired", "lora1e3a", "--db", str(db), "--format", "json"])
    assert by_id.exit_code == 0, by_id.output
    assert any(row["paired"] for row in json.loads(by_id.stdout)["rows"])


def test_report_paired_pairs_the_baseline_run_with_the_same_settings(tmp_path: Path) -> None:
    with ResultStore(tmp_path / "r.sqlite") as store:
        _add(store, "loraplain", _lora(), [50, 55, 52])
        _add(store, "lora1e3a", _lora(1e-3), [51, 54, 53])
        _add(store, "tirplain", RunConfig(dataset="digits", method="tir", backbone="tiny", shots=1), [60, 61, 62])
        report = build_report(store, paired="lora")
    (cell,) = report.paired.values()
    assert (cell.run_id, cell.baseline_run_id) == ("tirplain", "loraplain")


# ---------------------------------------------------------------------------------------------- 27.3 one interval


def test_report_paired_and_compare_show_one_interval_the_t_interval(tmp_path: Path) -> None:
    """n = 6 shared episodes: `report --paired` and `compare` give the same half-width, Student's t, and compare
    prints no second interval."""
    db = tmp_path / "r.sqlite"
    a, b = [60, 62, 58, 70, 66, 61], [55, 63, 50, 64, 60, 61]
    with ResultStore(db) as store:
        _add(store, "loraplain", _lora(), b)
        _add(store, "tirplain", RunConfig(dataset="digits", method="tir", backbone="tiny", shots=1), a)
    diffs = (np.array(a) - np.array(b)) / TOTAL * 100.0
    expected = student_t.ppf(0.975, 5) * diffs.std(ddof=1) / math.sqrt(6)
    out = tmp_path / "c.json"
    compared = invoke(["compare", "tirplain", "loraplain", "--db", str(db), "--json", str(out)])
    assert compared.exit_code == 0, compared.output
    assert json.loads(out.read_text())["ci95"] == pytest.approx(expected)
    (line,) = [text for text in compared.stdout.splitlines() if text.startswith("A − B")]
    assert line.count("±") == 1 and f"± {expected:.2f} " in line
    reported = invoke(["report", "--paired", "lora", "--db", str(db), "--format", "json"])
    assert reported.exit_code == 0, reported.output
    (paired,) = [row["paired"]["digits/1-shot"] for row in json.loads(reported.stdout)["rows"] if row["paired"]]
    assert paired["ci95"] == pytest.approx(expected)
    markdown = invoke(["report", "--paired", "lora", "--db", str(db), "--format", "markdown"]).stdout
    assert f"± {expected:.2f} (" in markdown and "Student's t" in markdown


# ------------------------------------------------------------------------------------- 15c control characters


def test_a_run_name_with_control_characters_keeps_every_table_on_its_lines(tmp_path: Path) -> None:
    """Two runs alike in every setting share a cell, so their labels carry their run names; a newline, tab or
    carriage return in one is written as an escape in markdown, csv and latex (and the table and json labels)."""
    with ResultStore(tmp_path / "r.sqlite") as store:
        named = _lora()
        named.run_name = "line one\nline two\r\tend | x"
        _add(store, "lora-named", named, [50, 55])
        store.register_run("lora-other", _lora().resolved().to_dict(), {**IDENTITY, "index": "other"})
        store.add_episodes("lora-other", [EpisodeResult(i, 60, TOTAL, 0.1) for i in range(2)])
        report = build_report(store)
    assert any(r"line one\nline two\r\tend | x" in row.label for row in report.rows)
    markdown = render(report, "markdown").splitlines()
    table = [line for line in markdown if line.startswith("|")]
    assert len(table) == 4 and all(line.endswith("|") for line in table)
    assert {len(re.findall(r"(?<!\\)\|", line)) for line in table} == {4}
    rows = list(csv.reader(io.StringIO(render(report, "csv"))))
    assert len(rows) == 3 and all("\n" not in field and "\r" not in field for row in rows for field in row)
    latex = render(report, "latex")
    body = latex.split(r"\midrule", 1)[1].split(r"\bottomrule", 1)[0].strip().splitlines()
    assert len(body) == 2 and all(line.endswith(r"\\") for line in body)
    assert "\t" not in render_table(report, width=400)
    assert all("\n" not in row["label"] for row in json.loads(render(report, "json"))["rows"])


# ---------------------------------------------------------------------------------------- 22 the papers' numbers


def test_with_paper_results_shows_every_per_dataset_number_and_both_means(tmp_path: Path) -> None:
    """Every quoted per-dataset number has its cell; a printed mean shows as printed, with its columns' mean beside it
    exactly where the two differ (55.97, 68.57, 70.05); the two papers' baselines stay two rows."""
    from cdfsl.analysis.paper_results import paper_results

    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        _add(store, "loraplain", _lora(), [50, 55])
        report = build_report(store, with_paper_results=True)
    data = json.loads(render(report, "json"))
    rows = {row["label"]: row for row in data["rows"] if row["quoted"]}
    for result in paper_results():
        cells = rows[f"{result.name} ({result.paper} paper)"]["cells"]
        for dataset, value in result.per_dataset:
            assert cells[f"{dataset}/{result.shots}-shot"]["mean"] == value
        mean = cells[f"mean/{result.shots}-shot"]
        assert mean["mean"] == result.mean
        assert ("columns_mean" in mean) == (result.mean in (55.97, 68.57, 70.05))
    baseline = {
        label: row["cells"]["mean/1-shot"]["mean"] for label, row in rows.items() if "CLIP-LoRA-Vision" in label
    }
    assert baseline == {"CLIP-LoRA-Vision (TIR paper)": 55.92, "CLIP-LoRA-Vision (VtT paper)": 55.97}
    markdown = invoke(["report", "--with-paper-results", "--format", "markdown", "--db", str(db)]).stdout
    for text in ("*55.97 (columns: 56.05)*", "*68.57 (columns: 68.60)*", "*70.05 (columns: 70.03)*", "*35.23*"):
        assert text in markdown, text
    assert "arXiv 2603.05235" in markdown and "main table" in markdown


def test_the_tiny_models_shipped_weights_are_not_a_changed_setting() -> None:
    """A run on `tiny` records its weights as `shipped` (what the default tag `openai` loads there): the demo's rows
    must not read `[pretrained=shipped]`, while random weights are a change."""
    from cdfsl.labels import changed_settings

    for tag in ("shipped", "openai"):
        assert changed_settings(RunConfig(dataset="digits", method="lora", backbone="tiny", pretrained=tag)) == {}
    changed = changed_settings(RunConfig(dataset="digits", method="lora", backbone="tiny", pretrained="none"))
    assert changed == {"pretrained": "none"}
