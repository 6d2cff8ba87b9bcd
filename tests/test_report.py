"""`cdfsl report`: grouping, paired statistics against a baseline, renderers and plots, on a synthetic store."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import t as student_t
from scipy.stats import wilcoxon

from cdfsl.analysis.plots import plot_report
from cdfsl.analysis.report import Column, Report, build_report, render, rich_table
from cdfsl.engine.store import EpisodeResult, ResultStore
from cdfsl.errors import ConfigError, StoreError
from cdfsl.stats import paired_difference

TOTAL = 75  # 5 ways x 15 queries
# Mean accuracy per method; the synthetic episodes scatter around it.
LEVELS = {"zeroshot": 0.45, "lora": 0.60, "tir": 0.66, "tir+vtt": 0.67}


def _config(method: str, dataset: str, shots: int, **extra: object) -> dict[str, object]:
    config: dict[str, object] = {
        "dataset": dataset,
        "method": method,
        "backbone": "tiny",
        "pretrained": "openai",
        "ways": 5,
        "shots": shots,
        "queries": 15,
        "seed": 0,
        "run_name": None,
        "train": {"lr": 2e-4},
    }
    config.update(extra)
    return config


def _add_run(
    store: ResultStore,
    run_id: str,
    config: dict[str, object],
    episodes: range | list[int],
    level: float,
    seed: int,
) -> dict[int, float]:
    """Register a run with binomial per-episode results; return episode → accuracy as stored."""
    rng = np.random.default_rng(seed)
    store.register_run(run_id, config, {"run": run_id})
    results = [EpisodeResult(i, int(rng.binomial(TOTAL, level)), TOTAL, 0.01) for i in episodes]
    store.add_episodes(run_id, results)
    return {r.episode: r.accuracy for r in results}


@pytest.fixture
def store(tmp_path: Path) -> ResultStore:
    """zeroshot, lora, tir on digits (1- and 5-shot) and eurosat (1-shot); tir digits 1-shot misses episodes."""
    db = ResultStore(tmp_path / "results.sqlite")
    seed = 0
    for method in ("zeroshot", "lora", "tir"):
        for dataset, shots in (("digits", 1), ("digits", 5), ("eurosat", 1)):
            episodes: range | list[int] = range(20)
            if method == "tir" and (dataset, shots) == ("digits", 1):
                episodes = [i for i in range(22) if i not in (3, 7, 11)]  # 17 shared with lora, 2 extra
            seed += 1
            _add_run(db, f"{method}-{dataset}-{shots}", _config(method, dataset, shots), episodes, LEVELS[method], seed)
    yield db
    db.close()


def _direct(store: ResultStore, run: str, base: str) -> tuple[float, float, float, int]:
    a, b = store.episode_accuracies(run), store.episode_accuracies(base)
    shared = sorted(set(a) & set(b))
    diffs = np.array([a[i] - b[i] for i in shared]) * 100.0
    p_value = wilcoxon(np.round(diffs, 10), alternative="two-sided").pvalue
    t_half = student_t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
    return float(diffs.mean()), float(t_half), float(p_value), len(shared)


# ----------------------------------------------------------------------------------------------- paired stats


def test_paired_json_matches_direct_computation(store: ResultStore) -> None:
    data = json.loads(render(build_report(store, paired="lora"), "json"))
    assert data["baseline"] == "lora"
    rows = {row["label"]: row for row in data["rows"]}
    for method in ("zeroshot", "tir"):
        for column in ("digits/1-shot", "digits/5-shot", "eurosat/1-shot"):
            dataset, shots = column.split("/")
            entry = rows[method]["paired"][column]
            run_id = f"{method}-{dataset}-{shots.split('-')[0]}"
            mean_diff, ci95, p_value, shared = _direct(store, run_id, f"lora-{dataset}-{shots.split('-')[0]}")
            assert entry["mean_diff"] == pytest.approx(mean_diff, rel=1e-9, abs=1e-9)
            assert entry["ci95"] == pytest.approx(ci95, rel=1e-9)
            assert entry["p_value"] == pytest.approx(p_value, rel=1e-9)
            assert entry["shared"] == shared
            assert entry["run_id"] == run_id
    assert "paired" in rows["lora"] and rows["lora"]["paired"] == {}


def test_unequal_episode_sets_are_matched_on_shared_and_flagged(store: ResultStore) -> None:
    report = build_report(store, paired="lora")
    tir = next(row for row in report.rows if row.method == "tir")
    cell = report.paired[(tir, Column("digits", 1))]
    assert (cell.stats.shared, cell.stats.only_a, cell.stats.only_b) == (17, 2, 3)
    assert cell.stats.unequal
    assert sorted(cell.differences) == sorted(set(range(22)) - {3, 7, 11, 20, 21})
    assert any("episode sets differ" in note and "17 shared" in note for note in report.notes)
    entry = report.to_dict()["rows"][2]["paired"]["digits/1-shot"]
    assert entry["unequal_episode_sets"] is True
    assert (entry["only_method"], entry["only_baseline"]) == (2, 3)
    assert not report.paired[(tir, Column("digits", 5))].stats.unequal
    assert "†" in render(report, "markdown")


def test_paired_difference_edge_cases() -> None:
    one = paired_difference({0: 0.5}, {0: 0.4})
    assert one.shared == 1 and one.mean_diff == pytest.approx(10.0) and math.isnan(one.ci95)  # t: undefined at n = 1
    assert math.isnan(one.p_value)
    zeros = paired_difference({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6, 2: 0.1})
    assert zeros.mean_diff == 0.0 and math.isnan(zeros.p_value) and (zeros.only_a, zeros.only_b) == (0, 1)
    none = paired_difference({0: 0.5}, {1: 0.5})
    assert none.shared == 0 and math.isnan(none.mean_diff)


def test_unknown_baseline_and_empty_store(store: ResultStore, tmp_path: Path) -> None:
    with pytest.raises(
        StoreError, match=r"unknown baseline 'vtt' for --paired: neither a method .zeroshot, lora, tir."
    ):
        build_report(store, paired="vtt")
    with ResultStore(tmp_path / "empty.sqlite") as empty, pytest.raises(StoreError, match="no finished episodes"):
        build_report(empty)


def test_runs_with_different_seed_are_not_paired(store: ResultStore) -> None:
    _add_run(store, "vtt-digits-5", _config("vtt", "digits", 5, seed=3), range(20), 0.6, 99)
    report = build_report(store, paired="lora")
    vtt = next(row for row in report.rows if row.method == "vtt")
    assert (vtt, Column("digits", 5)) not in report.paired
    assert any("not paired" in note and "seed 3 vs 0" in note for note in report.notes)


# --------------------------------------------------------------------------------------------------- grouping


def test_mean_column_only_over_complete_rows(store: ResultStore) -> None:
    _add_run(store, "vtt-digits-1", _config("vtt", "digits", 1), range(20), 0.6, 50)  # no eurosat run
    report = build_report(store)
    assert [c.key for c in report.columns] == [
        "eurosat/1-shot",
        "digits/1-shot",
        "mean/1-shot",
        "digits/5-shot",  # a single 5-shot dataset: no mean column
    ]
    mean = Column(None, 1)
    for row in report.rows:
        cell = report.cell(row, mean)
        if row.method == "vtt":
            assert cell is None
            continue
        parts = [report.cell(row, Column(d, 1)) for d in ("eurosat", "digits")]
        assert cell is not None and cell.mean == pytest.approx(sum(p.mean for p in parts) / 2)
        assert cell.ci95 == pytest.approx(math.sqrt(sum(p.ci95**2 for p in parts)) / 2)
        assert cell.over == ("eurosat", "digits")


def test_cells_are_mean_and_ci_of_stored_episodes(store: ResultStore) -> None:
    report = build_report(store)
    lora = next(row for row in report.rows if row.method == "lora")
    cell = report.cell(lora, Column("digits", 5))
    values = np.array(list(store.episode_accuracies("lora-digits-5").values())) * 100
    assert cell is not None and cell.run_id == "lora-digits-5" and cell.episodes == 20
    assert cell.mean == pytest.approx(values.mean())
    assert cell.ci95 == pytest.approx(1.96 * values.std() / math.sqrt(values.size))
    assert [row.method for row in report.rows] == ["zeroshot", "lora", "tir"]


def test_other_ways_dropped_and_conflicting_runs_become_variants(store: ResultStore) -> None:
    _add_run(store, "lora-10way", _config("lora", "digits", 1, ways=10), range(20), 0.5, 60)
    _add_run(
        store,
        "lora-named",
        _config("lora", "digits", 1, run_name="my_run", train={"lr": 1e-3}),
        range(20),
        0.6,
        61,
    )
    report = build_report(store, paired="lora")
    labels = [row.label for row in report.rows]
    # Every row says the settings it changed from its recipe; the run name is only needed where settings tie.
    assert labels == ["zeroshot", "lora", "lora [train.lr=0.001]", "tir"]
    assert not any("10-way" in label for label in labels)
    assert any("left out lora-10way (10-way)" in note for note in report.notes)
    # tir runs on its recipe's settings, so it pairs with the lora run on its recipe's settings.
    tir = next(row for row in report.rows if row.method == "tir")
    assert report.paired[(tir, Column("digits", 1))].baseline.label == "lora"


# -------------------------------------------------------------------------------------------------- renderers


def _store_for_latex(store: ResultStore) -> Report:
    _add_run(store, "tv-digits-1", _config("tir+vtt", "digits", 1), range(20), 0.9, 70)
    _add_run(store, "tv-named", _config("tir+vtt", "digits", 1, run_name="a_b & 50% #1"), range(20), 0.2, 71)
    return build_report(store, paired="lora", with_paper_results=True)


def test_latex_is_a_balanced_booktabs_fragment(store: ResultStore) -> None:
    report = _store_for_latex(store)
    latex = render(report, "latex")
    assert latex.count(r"\begin{tabular}") == latex.count(r"\end{tabular}") == 2
    assert latex.index(r"\begin{tabular}") < latex.index(r"\end{tabular}")
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert rule in latex
    assert r"tir+vtt [a\_b \& 50\% \#1]" in latex
    assert "a_b" not in latex.replace("% ", "%").split("\\begin{tabular}", 1)[1]
    assert r"\textit{CLIP-LoRA-Vision (TIR paper)}" in latex and r"\textit{65.99}" in latex
    for table in re.findall(r"\\begin\{tabular\}\{(\w+)\}(.*?)\\end\{tabular\}", latex, flags=re.S):
        spec, body = table
        rows = [line for line in body.splitlines() if line.endswith(r"\\")]
        assert rows and {line.count("&") - line.count(r"\&") for line in rows} == {len(spec) - 1}
    # The best measured mean of digits 1-shot is tir+vtt (level 0.9): bold; quoted rows never are.
    lines = latex.splitlines()
    digits = next(line for line in lines if line.startswith("Method & ")).split(" & ").index("digits 1-shot")
    best_line = next(line for line in lines if line.startswith("tir+vtt [tv-digits-1] & "))
    assert best_line.split(" & ")[digits].startswith(r"\textbf{")
    assert not any(r"\textbf" in line for line in latex.splitlines() if "paper)" in line)


def test_best_ignores_quoted_rows(store: ResultStore) -> None:
    report = build_report(store, with_paper_results=True)
    quoted = [row for row in report.rows if row.quoted]
    assert quoted and all(row.label.endswith(("(TIR paper)", "(VtT paper)")) for row in quoted)
    for column in report.columns:
        assert not any(row.quoted for row in report.best(column))
    data = report.to_dict()
    paper = [row for row in data["rows"] if row["quoted"]]
    assert all(row["source"] and "CVPR 2026" in row["source"] for row in paper)
    mean5 = {row["label"]: row["cells"].get("mean/5-shot", {}).get("mean") for row in paper}
    assert mean5["TIR (TIR paper)"] == 68.44 and mean5["CLIP-LoRA-Vision (TIR paper)"] == 65.99
    pe_core = {row["label"]: row for row in paper if row["backbone"] == "PE-Core"}
    assert pe_core["PE-Core-LoRA + VtT (VtT paper)"]["cells"]["mean/1-shot"]["mean"] == 61.00
    assert pe_core["PE-Core-LoRA (VtT paper)"]["cells"]["mean/1-shot"]["mean"] == 59.78
    assert all(not cell["best"] for row in paper for cell in row["cells"].values())


def test_csv_parses_with_one_field_per_header(store: ResultStore) -> None:
    report = build_report(store, paired="lora", with_paper_results=True)
    rows = list(csv.reader(io.StringIO(render(report, "csv"))))
    header, body = rows[0], rows[1:]
    assert len(body) == len(report.rows)
    assert all(len(line) == len(header) for line in body)
    record = dict(zip(header, body[2], strict=True))
    assert record["method"] == "tir"
    assert float(record["digits/5-shot diff"]) == pytest.approx(
        _direct(store, "tir-digits-5", "lora-digits-5")[0], abs=1e-4
    )
    assert int(record["digits/1-shot shared"]) == 17


def test_json_round_trips(store: ResultStore) -> None:
    report = build_report(store, paired="lora", with_paper_results=True)
    text = render(report, "json")
    data = json.loads(text)
    assert data == report.to_dict()
    assert json.dumps(data, indent=2) + "\n" == text
    assert data["schema"] == "cdfsl.report/1"
    cell = data["rows"][0]["cells"]["digits/1-shot"]
    assert set(cell) >= {"mean", "ci95", "episodes", "run_id"}


def test_markdown_and_terminal_table(store: ResultStore) -> None:
    report = build_report(store, paired="lora")
    lines = render(report, "markdown").splitlines()
    assert lines[0].startswith("| Method | Backbone |")
    assert re.fullmatch(r"\| --- \| --- \|( ---: \|)+", lines[1])
    assert sum(1 for line in lines if line.startswith("| --- ")) == 2  # results and paired differences
    table = rich_table(report)
    assert len(table.columns) == 2 + len(report.columns)
    text = render(report, "table")
    assert "digits 1-shot" in text and "Δ" in text
    with pytest.raises(ConfigError, match="unknown report format"):
        render(report, "html")


# ------------------------------------------------------------------------------------------------------ plots


def test_plots_are_written(tmp_path: Path) -> None:
    with ResultStore(tmp_path / "small.sqlite") as small:  # few figures: rendering dominates the test's time
        for seed, method in enumerate(("zeroshot", "lora", "tir+vtt")):
            episodes = range(15) if method == "lora" else range(2, 17)
            _add_run(small, method, _config(method, "digits", 1), episodes, LEVELS[method], seed)
        report = build_report(small, paired="lora", with_paper_results=True)
    paths = plot_report(report, tmp_path / "plots")
    assert sorted(path.name for path in paths) == [
        "accuracy_1shot.png",
        "paired_summary_vs_lora.png",
        "paired_tir-vtt_vs_lora_digits_1shot.png",
        "paired_zeroshot_vs_lora_digits_1shot.png",
    ]
    for path in paths:
        assert path.parent == tmp_path / "plots"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
