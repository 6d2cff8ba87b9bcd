"""`cdfsl compare A B`: any two stored runs on their shared episodes, against statistics computed by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import t as student_t
from scipy.stats import wilcoxon
from typer.testing import CliRunner

from cdfsl.analysis.compare import compare_runs
from cdfsl.analysis.report import build_report
from cdfsl.cli import app
from cdfsl.engine.store import EpisodeResult, ResultStore
from cdfsl.errors import ConfigError

TOTAL = 75


def add_run(
    store: ResultStore,
    run_id: str,
    method: str,
    correct: list[int],
    run_name: str | None = None,
    lr: float = 2e-4,
    **identity: Any,
) -> None:
    """A run of `method` with `correct[i]` of 75 queries right in episode i, on digits 5-way 1-shot seed 0."""
    config = {
        "dataset": "digits", "method": method, "backbone": "tiny", "pretrained": "none", "ways": 5, "shots": 1,
        "queries": 15, "seed": identity.get("seed", 0), "run_name": run_name, "train": {"lr": lr},
    }  # fmt: skip
    ident = {"dataset": "digits", "index": "abc", "ways": 5, "shots": 1, "queries": 15, "seed": 0, **identity}
    store.register_run(run_id, config, ident)
    store.add_episodes(run_id, [EpisodeResult(i, c, TOTAL, 0.1) for i, c in enumerate(correct)])


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "results.sqlite"
    with ResultStore(path) as store:
        add_run(store, "aaaa111122223333", "lora", [60, 62, 58, 70, 66, 61], run_name="ablation-on")
        add_run(store, "bbbb111122223333", "lora", [55, 63, 50, 64, 60, 61, 59], run_name="ablation-off", lr=1e-3)
        add_run(store, "cccc111122223333", "zeroshot", [50] * 6)
        add_run(store, "dddd111122223333", "coop", [60] * 6, seed=1)
    return path


def test_statistics_by_hand(db: Path) -> None:
    with ResultStore(db, read_only=True) as store:
        result = compare_runs(store, "ablation-on", "bbbb")
    diffs = (np.array([60, 62, 58, 70, 66, 61]) - np.array([55, 63, 50, 64, 60, 61])) / TOTAL * 100.0
    n = diffs.size
    assert (result["n"], result["only_a"], result["only_b"]) == (6, 0, 1)
    assert result["mean_diff"] == pytest.approx(diffs.mean())
    assert result["ci95"] == pytest.approx(student_t.ppf(0.975, n - 1) * diffs.std(ddof=1) / math.sqrt(n))
    assert "t_ci95" not in result  # one interval, the one `report --paired` shows
    assert result["p_value"] == pytest.approx(wilcoxon(diffs).pvalue)
    assert (result["a"]["run_name"], result["b"]["episodes"]) == ("ablation-on", 7)


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        ("lora", "zeroshot", "'lora' names 2 runs"),
        ("nosuch", "zeroshot", "no run 'nosuch'"),
        ("zeroshot", "coop", "not on the same episodes .seed differ"),
        ("zeroshot", "cccc", "are the same run"),
    ],
)
def test_refusals(db: Path, first: str, second: str, message: str) -> None:
    with ResultStore(db, read_only=True) as store, pytest.raises(ConfigError, match=message):
        compare_runs(store, first, second)


def test_cli_table_and_json(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    before = db.read_bytes()
    result = CliRunner().invoke(
        app, ["compare", "aaaa", "zeroshot", "--db", str(db), "--json", str(out)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "A − B = +" in result.stdout and "Student's t interval" in result.stdout
    assert json.loads(out.read_text())["n"] == 6
    assert db.read_bytes() == before  # read-only
    refused = CliRunner().invoke(app, ["compare", "lora", "zeroshot", "--db", str(db)], env={"COLUMNS": "200"})
    assert refused.exit_code == 2 and refused.output.startswith("error: 'lora' names 2 runs")


def test_report_paired_with_a_run(db: Path) -> None:
    """`report --paired RUN`: every other run of that run's column against it, as `compare` computes it."""
    with ResultStore(db, read_only=True) as store:
        report = build_report(store, paired="ablation-off")
        expected = compare_runs(store, "ablation-on", "ablation-off")
    by_run = {cell.run_id: cell for cell in report.paired.values()}
    assert set(by_run) == {"aaaa111122223333", "cccc111122223333"}  # the coop run (seed 1) is on other episodes
    assert by_run["aaaa111122223333"].stats.mean_diff == pytest.approx(expected["mean_diff"])
    assert by_run["aaaa111122223333"].baseline_run_id == "bbbb111122223333"
    assert any("not paired" in note for note in report.notes)
