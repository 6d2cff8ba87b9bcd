"""`cdfsl report`: stored runs as the papers' table, paired tests against a baseline, and renderers.

A report has one row per (method, recipe, backbone) and one column per (dataset, shots), plus a "mean" column per
shots value. Cells are mean accuracy ± 95% interval half-width over a run's finished episodes, in percent (the
protocol's `1.96 · std / sqrt(n)`, `cdfsl.stats.mean_ci95`); paired differences carry Student's t interval, the
number `cdfsl compare` shows (`cdfsl.stats.paired_difference`).

Which run fills a cell (the grouping rule):

1. Runs are grouped by (method, recipe, backbone, dataset, shots); a row's label names its recipe
   (`tir / tir-release`; runs stored before recipes existed show none) and, always, every setting of the run that
   differs from its recipe's, as `key=value` (`tir / tir-release [train.iterations=10]`; `cdfsl.labels`). Runs
   with different settings are different rows.
2. If a group of `fixed-way` runs holds 5-way runs (the field's protocol) and runs of other ways, only the 5-way
   runs are kept (a note says so). A run that is not 5-way and has no 5-way counterpart is kept, and its row label
   says `N-way`.
3. Runs under an episode protocol other than `fixed-way` (its name is in the run's identity) are kept whatever
   their ways and get columns of their own after the others, labelled by the protocol (`digits 3/5/7-way`,
   `cdfsl.data.protocols`), with no mean column.
4. Queries are taken as stored. If runs alike in every setting still share a cell (another dataset content or
   checkpoint at the same path), every run of that row gets its run name (control characters escaped) or else its
   run id in its label.

The mean column of a shots value averages the row's cell means over every dataset that has a column at that
shots value, and is blank for a row missing any of them, as the papers report the four-benchmark average. It
appears when at least two datasets share that shots value, or when quoted paper means fill it. Its interval is
`sqrt(Σ ci_d²) / k`, the half-width of an average of k independent estimates.

Paired mode (`paired="lora"`): for every row of another method, per dataset column, the per-episode
differences against the baseline method's run in the same column and backbone (the baseline's only run there; else
the only one with the same changed settings, and among several such the one of the same recipe; baseline runs that
no rule tells apart are refused, listed with what tells them apart, as `cdfsl compare` refuses a name of several
runs), matched on the episodes both runs finished — see
`cdfsl.stats.paired_difference`. Runs with different ways, queries or seed are not paired (their
episode indices name different images); unequal episode sets are matched on the shared ones and noted.

Per-episode records (what a method recorded beyond accuracy: VtT's `dlc_off_step`, MaPLe's epoch losses) are shown
by name for every measured cell whose run has any (`cdfsl.analysis.records`): in how many episodes each has a value,
and for numbers their median, mean and range. The table lists them under the table, markdown and LaTeX after it, CSV
in columns and JSON per row.

Quoted paper rows (`with_paper_results=True`, from `cdfsl.analysis.paper_results`) fill the four benchmarks'
columns (added for every quoted shots value) and the mean columns, are labelled "(TIR paper)" or "(VtT paper)", and
never count as a column's best. A quoted mean shows the number the paper prints; where it differs from the mean of
its own columns, that mean follows it (`55.97 (columns: 56.05)`) and a note says so.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from cdfsl.analysis.compare import ambiguous, find_run
from cdfsl.analysis.paper_results import BENCHMARKS, PaperResult, paper_results
from cdfsl.analysis.records import RecordSummary, records_dict, summarise_records
from cdfsl.config import METHODS
from cdfsl.data.protocols import PROTOCOLS, EpisodeSettings
from cdfsl.engine.store import ResultStore, RunRecord, record_names
from cdfsl.errors import ConfigError, StoreError
from cdfsl.labels import PROTOCOL_WAYS, changed_settings, episode_ways, run_label, variant_text, visible
from cdfsl.stats import PairedStats, episode_differences, mean_ci95, paired_difference

FORMATS = ("table", "markdown", "csv", "latex", "json")
JSON_SCHEMA = "cdfsl.report/1"
_DATASET_ORDER = ("eurosat", "isic2018", "cropdiseases", "chestx")
_BLANK = "–"
_RECORDS_TITLE = "Per-episode records (what a method recorded beyond accuracy, over each run's episodes)"


@dataclass(frozen=True)
class Column:
    """A (dataset, shots) column, or the mean over datasets of one shots value (`dataset is None`).

    Runs under an episode protocol other than `fixed-way` have columns of their own: `protocol` names it and
    `heading` is its column label (`data.protocols.EpisodeProtocol.column`); such columns get no mean column."""

    dataset: str | None
    shots: int
    protocol: str | None = None
    heading: str | None = None

    @property
    def is_mean(self) -> bool:
        return self.dataset is None

    @property
    def key(self) -> str:
        """Stable identifier used in JSON and CSV: `digits/1-shot`, `mean/5-shot`, `digits/toy-varied/1-shot`."""
        if self.protocol is not None:
            return f"{self.dataset}/{self.protocol}/{self.shots}-shot"
        return f"{self.dataset or 'mean'}/{self.shots}-shot"

    @property
    def label(self) -> str:
        if self.protocol is not None:
            return f"{self.dataset} {self.heading or self.protocol}"
        return f"{self.dataset or 'mean'} {self.shots}-shot"


@dataclass(frozen=True)
class Row:
    """A (method, recipe, backbone) row; `variant` tells apart runs sharing a cell; `quoted` marks paper rows."""

    method: str
    backbone: str
    variant: str | None = None
    quoted: bool = False
    name: str | None = None  # quoted rows: the method's name in the paper
    recipe: str | None = None
    settings: tuple[tuple[str, Any], ...] = ()  # the run's settings that differ from its recipe's (`changed_settings`)
    paper: str | None = None  # quoted rows: which paper (`TIR`, `VtT`)

    @property
    def label(self) -> str:
        if self.quoted:
            return f"{self.name or self.method} ({self.paper + ' ' if self.paper else ''}paper)"
        return run_label(self.name or self.method, self.recipe, self.variant)


@dataclass(frozen=True)
class Cell:
    """Mean accuracy and 95% half-width (percent) of one run, of a row's mean column, or a quoted number.

    `ci95` is NaN for quoted numbers. `episodes` is the run's finished episodes (summed for mean cells, 0 when
    quoted). `over` lists the datasets a mean cell averages; `source` is set exactly for quoted cells.
    """

    mean: float
    ci95: float
    episodes: int
    run_id: str | None = None
    source: str | None = None
    over: tuple[str, ...] = ()
    columns_mean: float | None = None  # quoted means printed otherwise than their columns average: that average

    @property
    def quoted(self) -> bool:
        return self.source is not None


@dataclass(frozen=True)
class PairedCell:
    """A row's run against the baseline's in one column; `differences`: per shared episode, in points."""

    stats: PairedStats
    run_id: str
    baseline_run_id: str
    baseline: Row
    differences: Mapping[int, float] = field(repr=False)


@dataclass
class Report:
    """Rows, columns and cells of a report; `paired` is filled in paired mode. Renderers read only this."""

    store: str
    rows: list[Row]
    columns: list[Column]
    cells: dict[tuple[Row, Column], Cell]
    baseline: str | None = None
    paired: dict[tuple[Row, Column], PairedCell] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Per measured cell whose run recorded anything per episode: a summary per record name (`analysis.records`).
    records: dict[tuple[Row, Column], list[RecordSummary]] = field(default_factory=dict)

    def cell(self, row: Row, column: Column) -> Cell | None:
        return self.cells.get((row, column))

    def best(self, column: Column) -> frozenset[Row]:
        """Measured rows with a column's highest mean (at two decimals); empty unless two or more compete."""
        scored = {
            row: round(cell.mean, 2)
            for row in self.rows
            if (cell := self.cell(row, column)) is not None and not cell.quoted and math.isfinite(cell.mean)
        }
        if len(scored) < 2:
            return frozenset()
        top = max(scored.values())
        return frozenset(row for row, value in scored.items() if value == top)

    def record_lines(self) -> list[str]:
        """One line per (row, column, record) in table order: `ROW, COLUMN: NAME: in n of N episodes, ...`."""
        return [
            f"{row.label}, {column.label}: {summary.text()}"
            for row in self.rows
            for column in self.columns
            for summary in self.records.get((row, column), [])
        ]

    @property
    def paired_columns(self) -> list[Column]:
        return [column for column in self.columns if any(key[1] == column for key in self.paired)]

    @property
    def paired_rows(self) -> list[Row]:
        return [row for row in self.rows if any(key[0] == row for key in self.paired)]

    def to_dict(self) -> dict[str, Any]:
        """The JSON structure (see `render_json`); NaN becomes null."""
        return _clean(
            {
                "schema": JSON_SCHEMA,
                "store": self.store,
                "units": "accuracy in percent; paired differences in percentage points (method - baseline)",
                "baseline": self.baseline,
                "columns": [_column_dict(column) for column in self.columns],
                "rows": [self._row_dict(row) for row in self.rows],
                "notes": list(self.notes),
            }
        )

    def _row_dict(self, row: Row) -> dict[str, Any]:
        cells = {c.key: _cell_dict(cell, row in self.best(c)) for c in self.columns if (cell := self.cell(row, c))}
        sources = sorted({cell.source for c in self.columns if (cell := self.cell(row, c)) and cell.source})
        entry: dict[str, Any] = {
            "label": row.label,
            "method": row.method,
            "recipe": row.recipe,
            "backbone": row.backbone,
            "variant": row.variant,
            "settings": dict(row.settings),
            "quoted": row.quoted,
            "paper": row.paper,
            "source": "; ".join(sources) if sources else None,
            "cells": cells,
        }
        records = {c.key: records_dict(self.records[(row, c)]) for c in self.columns if (row, c) in self.records}
        if records:
            entry["records"] = records
        if self.baseline is not None:
            entry["paired"] = {c.key: _paired_dict(pc) for c in self.columns if (pc := self.paired.get((row, c)))}
        return entry


# ----------------------------------------------------------------------------------------------------------
# build


def build_report(store: ResultStore, paired: str | None = None, with_paper_results: bool = False) -> Report:
    """Group the store's runs into a report; with `paired`, test every other method against that baseline.

    Raises `StoreError` when the store has no finished episode, or when `paired` names a method with no run.
    """
    runs = store.runs()
    if not runs:
        raise StoreError(f"no finished episodes in {store.path}; run `cdfsl run` first")
    methods = sorted({run.method for run in runs}, key=_method_order)
    baseline_run = None
    if paired is not None and paired not in methods:
        try:
            baseline_run = find_run(runs, paired)
        except ConfigError:
            raise StoreError(
                f"unknown baseline {paired!r} for --paired: neither a method ({', '.join(methods)}) nor a run id, "
                f"id prefix or run name in {store.path}"
            ) from None
    notes: list[str] = []
    protocols = {run.run_id: store.run_identity(run.run_id).get("protocol") for run in runs}
    runs = [run for run in runs if protocols[run.run_id] != "all-way"]  # their own table: analysis.suite_table
    runs = _keep_protocol_ways(runs, notes, protocols)
    changes = {run.run_id: changed_settings(run.config) for run in runs}
    variants = _variants(runs, changes)
    accuracies = {run.run_id: store.episode_accuracies(run.run_id) for run in runs}
    placed: dict[tuple[Row, Column], RunRecord] = {}
    cells: dict[tuple[Row, Column], Cell] = {}
    for run in runs:
        row = Row(
            run.method, run.backbone, variants[run.run_id], recipe=run.recipe, settings=_frozen(changes[run.run_id])
        )
        key = (row, _column_of(run, protocols[run.run_id]))
        mean, ci95 = mean_ci95(list(accuracies[run.run_id].values()))
        placed[key] = run
        cells[key] = Cell(mean, ci95, len(accuracies[run.run_id]), run.run_id)
    rows = sorted({row for row, _ in cells}, key=_row_order)
    quoted = list(paper_results()) if with_paper_results else []
    columns = _columns({column for _, column in cells} | _quoted_columns(quoted), {result.shots for result in quoted})
    _add_means(rows, columns, cells)
    if quoted:
        rows += _add_quoted(quoted, columns, cells, notes)
    report = Report(str(store.path), rows, columns, cells, paired, notes=notes)
    for key, run in placed.items():
        summaries = summarise_records(store.episode_records(run.run_id))
        if summaries:
            report.records[key] = summaries
    if baseline_run is not None:
        report.paired = _pair_with_run(baseline_run, placed, accuracies, notes)
    elif paired is not None:
        report.paired = _pair_all(report, paired, placed, accuracies, notes)
    return report


def _pair_with_run(
    baseline: RunRecord,
    placed: Mapping[tuple[Row, Column], RunRecord],
    accuracies: Mapping[str, dict[int, float]],
    notes: list[str],
) -> dict[tuple[Row, Column], PairedCell]:
    """Every other run of the baseline run's column (same dataset and shots) against that one run."""
    reference = next(((row, column) for (row, column), run in placed.items() if run.run_id == baseline.run_id), None)
    if reference is None:
        notes.append(f"run {baseline.run_id} is not in the report (not the protocol's ways): nothing paired")
        return {}
    base_row, base_column = reference
    paired: dict[tuple[Row, Column], PairedCell] = {}
    for (row, column), run in placed.items():
        if column != base_column or run.run_id == baseline.run_id:
            continue
        mismatch = _episode_mismatch(run, baseline)
        if mismatch:
            notes.append(f"{row.label} vs run {baseline.run_id}, {column.label}: not paired, {mismatch}")
            continue
        a, b = accuracies[run.run_id], accuracies[baseline.run_id]
        paired[(row, column)] = PairedCell(
            paired_difference(a, b), run.run_id, baseline.run_id, base_row, episode_differences(a, b)
        )
    return paired


def _column_of(run: RunRecord, protocol: str | None) -> Column:
    """A run's column: (dataset, shots) under `fixed-way` (no protocol in its identity), else its protocol's own."""
    if protocol is None:
        return Column(run.dataset, run.shots)
    known = PROTOCOLS.get(protocol)
    heading = known.column(EpisodeSettings(run.ways, run.shots, run.queries)) if known is not None else None
    return Column(run.dataset, run.shots, protocol, heading)


def _group_key(run: RunRecord) -> tuple[str, str | None, str, str, int]:
    """The cell a run belongs to: (method, recipe, backbone, dataset, shots)."""
    return (run.method, run.recipe, run.backbone, run.dataset, run.shots)


def _keep_protocol_ways(
    runs: list[RunRecord], notes: list[str], protocols: Mapping[str, str | None]
) -> list[RunRecord]:
    """Drop runs of other ways from a (method, recipe, backbone, dataset, shots) group of fixed-way runs that has a
    5-way run; runs under another protocol (`protocols`: run id → its name, None for fixed-way) are all kept."""
    groups: dict[tuple[str, str | None, str, str, int], list[RunRecord]] = defaultdict(list)
    kept: list[RunRecord] = [run for run in runs if protocols.get(run.run_id) is not None]
    for run in runs:
        if protocols.get(run.run_id) is None:
            groups[_group_key(run)].append(run)
    for (method, _, backbone, dataset, shots), group in groups.items():
        protocol = [run for run in group if run.ways == PROTOCOL_WAYS]
        if protocol and len(protocol) < len(group):
            dropped = ", ".join(f"{run.run_id} ({run.ways}-way)" for run in group if run.ways != PROTOCOL_WAYS)
            notes.append(f"{method} on {backbone}, {dataset} {shots}-shot: kept the 5-way run(s), left out {dropped}")
            group = protocol
        kept.extend(group)
    return kept


def _variants(runs: list[RunRecord], changes: Mapping[str, Mapping[str, Any]]) -> dict[str, str | None]:
    """Run id → row variant, following the grouping rule of the module docstring; `changes`: run id → the run's
    `changed_settings`."""
    variants = {run.run_id: variant_text(episode_ways(run.config), changes[run.run_id]) for run in runs}
    cells: dict[tuple[Any, ...], list[RunRecord]] = defaultdict(list)
    for run in runs:
        cells[(*_group_key(run), variants[run.run_id])].append(run)
    crowded = {_row_key(run, variants) for group in cells.values() if len(group) > 1 for run in group}
    for run in runs:  # runs alike in every setting that still share a cell: their run name, else their id
        if _row_key(run, variants) in crowded:
            tag = visible(run.run_name) if run.run_name else run.run_id
            variants[run.run_id] = ", ".join(filter(None, [variants[run.run_id], tag]))
    for group in cells.values():  # identical labels inside one cell: tell them apart by run id
        labels = [variants[run.run_id] for run in group]
        for run in group:
            if labels.count(variants[run.run_id]) > 1:
                variants[run.run_id] = ", ".join(filter(None, [variants[run.run_id], run.run_id]))
    return variants


def _frozen(changes: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A run's changed settings as a hashable row field (lists as tuples)."""
    return tuple((key, tuple(value) if isinstance(value, list) else value) for key, value in changes.items())


def _row_key(run: RunRecord, variants: Mapping[str, str | None]) -> tuple[str, str | None, str, str | None]:
    return (run.method, run.recipe, run.backbone, variants[run.run_id])


def _method_order(method: str) -> tuple[int, str]:
    return (METHODS.index(method) if method in METHODS else len(METHODS), method)


def _row_order(row: Row) -> tuple[Any, ...]:
    return (row.quoted, _method_order(row.method), row.recipe or "", row.backbone, row.variant or "", row.name or "")


def _dataset_order(dataset: str) -> tuple[int, str]:
    return (_DATASET_ORDER.index(dataset) if dataset in _DATASET_ORDER else len(_DATASET_ORDER), dataset)


def _columns(measured: set[Column], quoted_shots: set[int]) -> list[Column]:
    """Dataset columns grouped by shots, each group followed by its mean column where one is shown; then the columns
    of other protocols, by protocol, dataset and shots."""
    columns: list[Column] = []
    fixed = {column for column in measured if column.protocol is None}
    for shots in sorted({column.shots for column in fixed} | quoted_shots):
        datasets = sorted((c.dataset for c in fixed if c.shots == shots and c.dataset), key=_dataset_order)
        columns += [Column(dataset, shots) for dataset in datasets]
        if len(datasets) >= 2 or shots in quoted_shots:
            columns.append(Column(None, shots))
    others = measured - fixed
    return columns + sorted(others, key=lambda c: (c.protocol or "", _dataset_order(c.dataset or ""), c.shots))


def _add_means(rows: list[Row], columns: list[Column], cells: dict[tuple[Row, Column], Cell]) -> None:
    for mean_column in (column for column in columns if column.is_mean):
        datasets = [c for c in columns if c.shots == mean_column.shots and not c.is_mean and c.protocol is None]
        if not datasets:
            continue
        for row in rows:
            parts = [cells.get((row, column)) for column in datasets]
            if any(part is None for part in parts):
                continue
            present = [part for part in parts if part is not None]
            mean = sum(part.mean for part in present) / len(present)
            ci95 = math.sqrt(sum(part.ci95**2 for part in present)) / len(present)
            over = tuple(column.dataset or "" for column in datasets)
            cells[(row, mean_column)] = Cell(mean, ci95, sum(part.episodes for part in present), over=over)


def _quoted_columns(results: list[PaperResult]) -> set[Column]:
    """The dataset columns quoted per-dataset numbers fill."""
    return {Column(dataset, result.shots) for result in results for dataset, _ in result.per_dataset}


def _add_quoted(
    results: list[PaperResult], columns: list[Column], cells: dict[tuple[Row, Column], Cell], notes: list[str]
) -> list[Row]:
    """Add quoted rows (one per paper, method name and backbone) and their cells; return the new rows."""
    rows: dict[tuple[str, str, str], Row] = {}
    for result in results:
        row = rows.setdefault(
            (result.paper, result.name, result.backbone),
            Row(result.method, result.backbone, quoted=True, name=result.name, paper=result.paper),
        )
        differs = result.columns_mean if result.printed_differs else None
        cells[(row, Column(None, result.shots))] = Cell(
            result.mean, math.nan, 0, source=result.source, over=result.datasets, columns_mean=differs
        )
        for dataset, value in result.per_dataset:
            if Column(dataset, result.shots) in columns:
                cells[(row, Column(dataset, result.shots))] = Cell(value, math.nan, 0, source=result.source)
        if differs is not None:
            notes.append(
                f"{row.label}, mean {result.shots}-shot: the paper prints {result.mean:.2f}, its four columns "
                f"average {differs:.2f}; both are shown"
            )
    notes.append(
        "rows marked (… paper) quote published numbers (5-way, 15 queries, 800 episodes at 1 shot and 400 at 5, on "
        "the backbone in their row; means over "
        + ", ".join(BENCHMARKS)
        + "); they are not measured here: "
        + "; ".join(sorted({result.source for result in results}))
    )
    for shots in sorted({result.shots for result in results}):
        measured = {
            row.method for (row, column) in cells if column.shots == shots and not row.quoted and not column.is_mean
        }
        datasets = {c.dataset for c in columns if c.shots == shots and c.dataset and c.protocol is None}
        if measured and not datasets <= set(BENCHMARKS):
            notes.append(
                f"mean {shots}-shot: quoted means average {', '.join(BENCHMARKS)}; a measured row's mean needs a run "
                f"on every dataset column ({', '.join(sorted(datasets, key=_dataset_order))})"
            )
    return list(rows.values())  # in the order of `paper_results()`: by paper, baseline, ablations, full method


def _pair_all(
    report: Report,
    baseline: str,
    placed: Mapping[tuple[Row, Column], RunRecord],
    accuracies: Mapping[str, dict[int, float]],
    notes: list[str],
) -> dict[tuple[Row, Column], PairedCell]:
    paired: dict[tuple[Row, Column], PairedCell] = {}
    for (row, column), run in placed.items():
        if row.method == baseline:
            continue
        reference = _baseline_row(report, row, column, baseline, placed)
        if reference is None:
            notes.append(f"{row.label} on {row.backbone}, {column.label}: no {baseline} run to pair with")
            continue
        base_run = placed[(reference, column)]
        mismatch = _episode_mismatch(run, base_run)
        if mismatch:
            notes.append(f"{row.label} vs {reference.label}, {column.label}: not paired, {mismatch}")
            continue
        a, b = accuracies[run.run_id], accuracies[base_run.run_id]
        stats = paired_difference(a, b)
        differences = episode_differences(a, b)
        paired[(row, column)] = PairedCell(stats, run.run_id, base_run.run_id, reference, differences)
        if stats.unequal:
            notes.append(
                f"{row.label} vs {reference.label}, {column.label}: episode sets differ, matched on the "
                f"{stats.shared} shared ({stats.only_a} only in {row.label}, "
                f"{stats.only_b} only in {reference.label})"
            )
    return paired


def _baseline_row(
    report: Report, row: Row, column: Column, baseline: str, placed: Mapping[tuple[Row, Column], RunRecord]
) -> Row | None:
    """The baseline row for `row` in `column` (same backbone): the only one; else the only one with the same changed
    settings, among those the one of the same recipe. None when the column has no baseline run; several that no rule
    tells apart are refused as `compare` refuses a name of several runs (`ambiguous`)."""
    candidates = [
        other
        for other in report.rows
        if other.method == baseline and other.backbone == row.backbone and (other, column) in placed
    ]
    if not candidates:
        return None
    same = [candidate for candidate in candidates if candidate.settings == row.settings] or candidates
    if len(same) > 1:
        same = [candidate for candidate in same if candidate.recipe == row.recipe] or same
    if len(same) == 1:
        return same[0]
    raise ambiguous(
        f"--paired {baseline!r} for {row.label} in {column.label} on {row.backbone}",
        [placed[(candidate, column)] for candidate in same],
        f"give one run's id (--paired RUN_ID pairs that run's column), or keep one {baseline} run per setting",
    )


def _episode_mismatch(run: RunRecord, base: RunRecord) -> str:
    """Why episode `i` of the two runs are different images, or '' when they are the same episodes."""
    differences = [
        f"{name} {getattr(run, name)} vs {getattr(base, name)}"
        for name in ("ways", "queries", "seed")
        if getattr(run, name) != getattr(base, name)
    ]
    return "different episodes (" + ", ".join(differences) + ")" if differences else ""


# ------------------------------------------------------------------------------------------------------
# rendering


def render(report: Report, fmt: str) -> str:
    """The report as text: `table` (plain terminal table), `markdown`, `csv`, `latex` or `json`."""
    renderers = {
        "table": render_table,
        "markdown": render_markdown,
        "csv": render_csv,
        "latex": render_latex,
        "json": render_json,
    }
    if fmt not in renderers:
        raise ConfigError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return renderers[fmt](report)


def format_cell(cell: Cell | None) -> str:
    """`mean ± ci` with two decimals; quoted numbers and cells without an interval show the mean alone."""
    if cell is None or not math.isfinite(cell.mean):
        return ""
    if cell.quoted and cell.columns_mean is not None:
        return f"{cell.mean:.2f} (columns: {cell.columns_mean:.2f})"
    if cell.quoted or not math.isfinite(cell.ci95):
        return f"{cell.mean:.2f}"
    return f"{cell.mean:.2f} ± {cell.ci95:.2f}"


def format_p(p_value: float) -> str:
    """`p=0.034`, `p<0.001`, or `p=n/a` where the test is undefined."""
    if not math.isfinite(p_value):
        return "p=n/a"
    return "p<0.001" if p_value < 0.001 else f"p={p_value:.3f}"


def format_paired(cell: PairedCell | None, marker: str = "†") -> str:
    """`+1.23 ± 0.45 (p=0.004, n=20)`; `marker` is appended when the episode sets were unequal."""
    if cell is None or cell.stats.shared == 0:
        return ""
    s = cell.stats
    text = f"{s.mean_diff:+.2f} ± {_interval(s.ci95)} ({format_p(s.p_value)}, n={s.shared})"
    return text + (marker if s.unequal else "")


def _interval(half_width: float) -> str:
    """A paired interval's half-width; `n/a` where it is undefined (a single shared episode)."""
    return f"{half_width:.2f}" if math.isfinite(half_width) else "n/a"


def _paired_title(report: Report) -> str:
    return (
        f"Paired differences vs {report.baseline} (method - baseline, percentage points, ± 95% Student's t interval; "
        "Wilcoxon signed-rank p; n shared episodes; † episode sets differ, matched on the shared ones)"
    )


def render_markdown(report: Report) -> str:
    """A GitHub markdown table; best measured cell per column in bold, quoted rows in italics."""
    lines = _markdown_table(
        ["Method", "Backbone", *(column.label for column in report.columns)],
        [
            [_md_text(row.label, row.quoted), _md_text(row.backbone, row.quoted)]
            + [_md_cell(report, row, column) for column in report.columns]
            for row in report.rows
        ],
    )
    if report.baseline is not None and report.paired:
        columns = report.paired_columns
        lines += ["", f"**{_md_escape(_paired_title(report))}**", ""]
        lines += _markdown_table(
            ["Method", "Backbone", *(column.label for column in columns)],
            [
                [_md_escape(row.label), _md_escape(row.backbone)]
                + [_md_escape(format_paired(report.paired.get((row, c)))) or _BLANK for c in columns]
                for row in report.paired_rows
            ],
        )
    if report.records:
        lines += ["", f"**{_RECORDS_TITLE}**", "", *(f"- {_md_escape(line)}" for line in report.record_lines())]
    if report.notes:
        lines += ["", *(f"- {_md_escape(note)}" for note in report.notes)]
    return "\n".join(lines) + "\n"


def _markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |"]
    lines.append("| " + " | ".join(["---", "---"] + ["---:"] * (len(header) - 2)) + " |")
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def _md_escape(text: str) -> str:
    return re.sub(r"([\\|*_`\[\]<>])", r"\\\1", text)


def _md_text(text: str, italic: bool) -> str:
    return f"*{_md_escape(text)}*" if italic else _md_escape(text)


def _md_cell(report: Report, row: Row, column: Column) -> str:
    cell = report.cell(row, column)
    text = format_cell(cell)
    if not text:
        return _BLANK
    if cell is not None and cell.quoted:
        return f"*{text}*"
    return f"**{text}**" if row in report.best(column) else text


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters in one pass (so the escapes themselves are not escaped again)."""
    return re.sub(r"[\\&%$#_{}~^]", lambda match: _LATEX_SPECIAL[match.group(0)], text)


def render_latex(report: Report) -> str:
    """A booktabs `tabular` fragment (needs `\\usepackage{booktabs}`): best bold, quoted rows italic.

    In paired mode a second tabular follows with the differences against the baseline. Notes are `%` comments.
    """
    lines = ["% cdfsl report: mean accuracy (%) +- 95% interval over episodes; needs \\usepackage{booktabs}"]
    lines += [f"% {_comment(note)}" for note in report.notes]
    if report.records:
        lines += [f"% {_RECORDS_TITLE}", *(f"%   {_comment(line)}" for line in report.record_lines())]
    header = ["Method", "Backbone", *(column.label for column in report.columns)]
    body: list[list[str]] = []
    separators: set[int] = set()
    for index, row in enumerate(report.rows):
        if row.quoted and (index == 0 or not report.rows[index - 1].quoted):
            separators.add(len(body))
        body.append(
            [_tex_text(row.label, row.quoted), _tex_text(row.backbone, row.quoted)]
            + [_tex_cell(report, row, column) for column in report.columns]
        )
    lines += _latex_tabular(header, body, separators)
    if report.baseline is not None and report.paired:
        columns = report.paired_columns
        lines += ["", f"% {_comment(_paired_title(report))}"]
        paired_body = [
            [latex_escape(row.label), latex_escape(row.backbone)]
            + [_tex_paired(report.paired.get((row, column))) for column in columns]
            for row in report.paired_rows
        ]
        lines += _latex_tabular(["Method", "Backbone", *(c.label for c in columns)], paired_body, set())
    return "\n".join(lines) + "\n"


def _latex_tabular(header: list[str], body: list[list[str]], separators: set[int]) -> list[str]:
    lines = [r"\begin{tabular}{ll" + "c" * (len(header) - 2) + "}", r"\toprule"]
    lines.append(" & ".join(latex_escape(h) for h in header) + r" \\")
    lines.append(r"\midrule")
    for index, cells in enumerate(body):
        if index in separators and index > 0:
            lines.append(r"\midrule")
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return lines


def _comment(text: str) -> str:
    return " ".join(text.split())


def _tex_text(text: str, italic: bool) -> str:
    return rf"\textit{{{latex_escape(text)}}}" if italic else latex_escape(text)


def _tex_cell(report: Report, row: Row, column: Column) -> str:
    cell = report.cell(row, column)
    text = format_cell(cell)
    if cell is None or not text:
        return "--"
    text = text.replace(" ± ", r" $\pm$ ")
    if cell.quoted:
        return rf"\textit{{{text}}}"
    return rf"\textbf{{{text}}}" if row in report.best(column) else text


def _tex_paired(cell: PairedCell | None) -> str:
    if cell is None or cell.stats.shared == 0:
        return "--"
    s = cell.stats
    p = format_p(s.p_value).replace("<", r"$<$")
    dagger = r"$^\dagger$" if s.unequal else ""
    return rf"${s.mean_diff:+.2f} \pm {_interval(s.ci95)}$ ({p}, n={s.shared}){dagger}"


def render_csv(report: Report) -> str:
    """One CSV line per row: identity fields, then numbers per column (empty when blank).

    Per column `KEY mean`, `KEY ci95`, `KEY episodes`; in paired mode, per compared dataset column, also
    `KEY diff`, `KEY diff_ci95`, `KEY p_value`, `KEY shared`, `KEY only_method`, `KEY only_baseline`; per dataset
    column and record name some run there recorded, `KEY NAME present`, `KEY NAME episodes`, `KEY NAME median`,
    `KEY NAME mean` (the last two empty for records that are not numbers). Column keys are `dataset/N-shot` or
    `mean/N-shot` (`dataset/PROTOCOL/N-shot` for a protocol other than fixed-way).
    """
    header = ["label", "method", "backbone", "variant", "quoted", "source"]
    for column in report.columns:
        header += [f"{column.key} {field_name}" for field_name in ("mean", "ci95", "episodes")]
    paired_columns = report.paired_columns if report.baseline is not None else []
    paired_fields = ("diff", "diff_ci95", "p_value", "shared", "only_method", "only_baseline")
    for column in paired_columns:
        header += [f"{column.key} {field_name}" for field_name in paired_fields]
    record_columns = _record_columns(report)
    for column, name in record_columns:
        header += [f"{column.key} {name} {field_name}" for field_name in _RECORD_FIELDS]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in report.rows:
        sources = sorted({c.source for col in report.columns if (c := report.cell(row, col)) and c.source})
        line = [
            row.label,
            row.method,
            row.backbone,
            row.variant or "",
            str(row.quoted).lower(),
            "; ".join(sources),
        ]
        for column in report.columns:
            cell = report.cell(row, column)
            line += [_num(cell.mean), _num(cell.ci95), str(cell.episodes)] if cell else ["", "", ""]
        for column in paired_columns:
            pc = report.paired.get((row, column))
            if pc is None:
                line += [""] * len(paired_fields)
            else:
                s = pc.stats
                line += [_num(s.mean_diff), _num(s.ci95), _num(s.p_value, 6), str(s.shared)]
                line += [str(s.only_a), str(s.only_b)]
        for column, name in record_columns:
            summary = next((r for r in report.records.get((row, column), []) if r.name == name), None)
            if summary is None:
                line += [""] * len(_RECORD_FIELDS)
            else:
                numbers = (summary.median, summary.mean)
                line += [str(summary.present), str(summary.episodes)]
                line += ["" if value is None else _num(value, 6) for value in numbers]
        writer.writerow(line)
    return buffer.getvalue()


_RECORD_FIELDS = ("present", "episodes", "median", "mean")


def _record_columns(report: Report) -> list[tuple[Column, str]]:
    """(column, record name) pairs that some row of `report` has, in column order, names in `record_names` order."""
    pairs = []
    for column in report.columns:
        present = [{summary.name: None for summary in report.records.get((row, column), [])} for row in report.rows]
        pairs += [(column, name) for name in record_names(present)]
    return pairs


def _num(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else ""


def render_json(report: Report) -> str:
    """The report as JSON (`Report.to_dict`); NaN is written as null.

    ```
    {"schema": "cdfsl.report/1", "store": PATH, "units": ..., "baseline": METHOD | null,
     "columns": [{"key": "digits/1-shot", "dataset": "digits" | null (mean column), "shots": 1, "kind":
                  "dataset" | "mean", "label": "digits 1-shot"}, ...],
     "rows": [{"label", "method", "recipe", "backbone", "variant", "settings": {KEY: VALUE} (changed from the
               recipe's), "quoted": bool, "source": str | null,
               "cells": {COLUMN_KEY: {"mean", "ci95", "episodes", "run_id", "best": bool,
                                      "quoted": bool, "source", "over": [datasets] (mean cells)}},
               "paired": {COLUMN_KEY: {"baseline": LABEL, "baseline_run_id", "run_id", "mean_diff", "ci95",
                                       "p_value", "shared", "only_method", "only_baseline",
                                       "unequal_episode_sets": bool}}  (paired mode only),
               "records": {COLUMN_KEY: {NAME: {"episodes", "present", "median", "mean", "min", "max",
                                              "per_episode": [value | null, ...]}}}  (runs with records only)},
              ...],
     "notes": [str, ...]}
    ```
    """
    return json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n"


def _column_dict(column: Column) -> dict[str, Any]:
    return {
        "key": column.key,
        "dataset": column.dataset,
        "shots": column.shots,
        "kind": "mean" if column.is_mean else "dataset",
        "label": column.label,
        **({"protocol": column.protocol} if column.protocol is not None else {}),
    }


def _cell_dict(cell: Cell, best: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "mean": cell.mean,
        "ci95": cell.ci95,
        "episodes": cell.episodes,
        "run_id": cell.run_id,
        "best": best,
        "quoted": cell.quoted,
    }
    if cell.source:
        entry["source"] = cell.source
    if cell.columns_mean is not None:
        entry["columns_mean"] = cell.columns_mean
    if cell.over:
        entry["over"] = list(cell.over)
    return entry


def _paired_dict(cell: PairedCell) -> dict[str, Any]:
    s = cell.stats
    return {
        "baseline": cell.baseline.label,
        "baseline_run_id": cell.baseline_run_id,
        "run_id": cell.run_id,
        "mean_diff": s.mean_diff,
        "ci95": s.ci95,
        "p_value": s.p_value,
        "shared": s.shared,
        "only_method": s.only_a,
        "only_baseline": s.only_b,
        "unequal_episode_sets": s.unequal,
    }


def _clean(value: Any) -> Any:
    """Replace NaN and infinities by None, recursively, so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    return value


def rich_table(report: Report) -> Table:
    """The terminal table: best per column bold, quoted rows dim italic.

    In paired mode each compared cell gets a second line with the difference against the baseline. Notes go in
    the caption.
    """
    title = "Mean accuracy (%) ± 95% interval"
    if report.baseline is not None:
        title += f"; Δ vs {report.baseline}: points ± 95% t interval, Wilcoxon p, n shared († unequal episode sets)"
    caption = list(report.notes)
    if report.records:
        caption += [f"{_RECORDS_TITLE}:", *(f"  {line}" for line in report.record_lines())]
    table = Table(title=title, caption="\n".join(caption) or None, caption_justify="left")
    table.add_column("Method")
    table.add_column("Backbone")
    for column in report.columns:
        table.add_column(column.label, justify="right")
    for row in report.rows:
        style = "dim italic" if row.quoted else ""
        table.add_row(
            Text(row.label, style=style),
            Text(row.backbone, style=style),
            *(_rich_cell(report, row, column) for column in report.columns),
        )
    return table


def _rich_cell(report: Report, row: Row, column: Column) -> Text:
    cell = report.cell(row, column)
    text = format_cell(cell)
    if cell is None or not text:
        return Text(_BLANK, style="dim")
    style = "dim italic" if cell.quoted else ("bold" if row in report.best(column) else "")
    out = Text(text, style=style)
    paired = report.paired.get((row, column))
    if paired is not None and paired.stats.shared:
        out.append("\nΔ " + format_paired(paired), style="cyan")
    return out


def render_table(report: Report, width: int = 160) -> str:
    """The rich terminal table as plain text (no colour), for logs and tests."""
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False).print(rich_table(report))
    return buffer.getvalue()


def iter_cells(report: Report) -> Iterable[tuple[Row, Column, Cell]]:
    """Every filled (row, column, cell), in table order."""
    for row in report.rows:
        for column in report.columns:
            cell = report.cell(row, column)
            if cell is not None:
                yield row, column, cell
