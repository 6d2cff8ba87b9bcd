"""The all-way runs of a result store as CLIP-LoRA's table: datasets × shots, mean ± std over seeds, and averages.

An all-way run (`--protocol all-way`, `cdfsl.data.allway`) is one fit per (dataset, K, seed, method) with one stored
episode: its accuracy on the whole test split. `build_suite_tables` gives one table per method (with its recipe,
backbone and changed settings, `cdfsl.labels.changed_settings`, as the episodic report's rows): one row per dataset
(in the benchmarks' order), one column per shot count present (1, 2, 4, 8, 16), each cell the mean ± standard deviation
(numpy's default, over n seeds) of the accuracies of the seeds stored, in percent. The `Average` column is the mean of a
row's cell means and the `Average` row the mean of a column's over datasets, each given only when every cell it
averages is present (else `–`), as CLIP-LoRA's average is over every dataset.

Several runs of one seed in a cell (the same command on another data root or device) keep the newest, with a note.
Renderers: `table` (plain text), `markdown`, `csv`, `latex`, `json` — the formats of `cdfsl report`; `rich_suite`
gives the terminal tables.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.table import Table

from cdfsl.data.protocols import ALL_WAY
from cdfsl.engine.store import ResultStore, RunRecord
from cdfsl.labels import changed_settings, run_label, settings_text, visible

AVERAGE = "Average"
UNLABELLED = ("shots", "seed", "protocol", "ways", "queries")  # cells, seeds, the table itself; not read


@dataclass(frozen=True)
class SuiteCell:
    """One (dataset, shots) cell: the accuracies (percent) of the seeds stored, by seed."""

    accuracies: dict[int, float]

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.accuracies.values())))

    @property
    def std(self) -> float:
        return float(np.std(list(self.accuracies.values())))

    @property
    def seeds(self) -> list[int]:
        return sorted(self.accuracies)


@dataclass
class SuiteTable:
    """The all-way runs of one method (with its recipe, backbone and changed settings).

    Attributes:
        label: `method / recipe [settings]`; `backbone` its backbone.
        datasets: row order; `shots`: column order (ascending).
        cells: (dataset, shots) → cell, for the cells with a stored run.
        notes: what the table left out (a seed stored twice).
    """

    label: str
    backbone: str
    datasets: list[str]
    shots: list[int]
    cells: dict[tuple[str, int], SuiteCell]
    notes: list[str] = field(default_factory=list)

    def row_average(self, dataset: str) -> float | None:
        """The mean of the row's cell means, when every column of the table has a cell in it; else None."""
        means = [self.cells[(dataset, k)].mean for k in self.shots if (dataset, k) in self.cells]
        return float(np.mean(means)) if len(means) == len(self.shots) else None

    def column_average(self, shots: int) -> float | None:
        """The mean over datasets of the column's cell means, when every dataset has a cell in it; else None."""
        means = [self.cells[(d, shots)].mean for d in self.datasets if (d, shots) in self.cells]
        return float(np.mean(means)) if len(means) == len(self.datasets) else None

    def overall_average(self) -> float | None:
        """The mean of every cell mean, when the table is full; else None."""
        averages = [self.column_average(k) for k in self.shots]
        return float(np.mean(averages)) if averages and None not in averages else None  # type: ignore[arg-type]


def all_way_runs(store: ResultStore) -> list[RunRecord]:
    """The store's all-way runs (identity `protocol` = `all-way`) with a stored result, oldest first."""
    return [run for run in store.runs() if store.run_identity(run.run_id).get("protocol") == ALL_WAY]


def build_suite_tables(store: ResultStore) -> list[SuiteTable]:
    """One `SuiteTable` per method (recipe, backbone, changed settings) of the store's all-way runs; empty when it
    has none."""
    groups: dict[tuple[str, str, str], list[RunRecord]] = {}
    for run in all_way_runs(store):
        changes = {k: v for k, v in changed_settings(run.config).items() if k not in UNLABELLED}
        label = run_label(run.method, run.recipe, settings_text(changes) or None)
        groups.setdefault((label, run.backbone, run.method), []).append(run)
    tables = []
    for (label, backbone, _), runs in sorted(groups.items(), key=lambda item: (item[0][2], item[0][0], item[0][1])):
        cells: dict[tuple[str, int], dict[int, float]] = {}
        notes: list[str] = []
        for run in runs:  # oldest first, so the newest of a seed stored twice wins
            accuracies = store.episode_accuracies(run.run_id)
            if 0 not in accuracies:
                continue
            seeds = cells.setdefault((run.dataset, run.shots), {})
            if run.seed in seeds:
                notes.append(f"{run.dataset} {run.shots}-shot seed {run.seed}: stored twice, the newest run kept")
            seeds[run.seed] = accuracies[0] * 100.0
        datasets = sorted({d for d, _ in cells}, key=_dataset_order)
        shots = sorted({k for _, k in cells})
        table_cells = {key: SuiteCell(seeds) for key, seeds in cells.items()}
        tables.append(SuiteTable(visible(label), visible(backbone), datasets, shots, table_cells, notes))
    return tables


def _dataset_order(dataset: str) -> tuple[int, str]:
    from cdfsl.data.readers import DATASETS

    order = list(DATASETS)
    return (order.index(dataset) if dataset in order else len(order), dataset)


def _cell_text(cell: SuiteCell | None) -> str:
    return "–" if cell is None else f"{cell.mean:.2f} ± {cell.std:.2f}"


def _average_text(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _title(table: SuiteTable) -> str:
    return f"{table.label} ({table.backbone}): all-way accuracy (%), mean ± std over seeds"


def _body(table: SuiteTable) -> tuple[list[str], list[list[str]]]:
    """Header and rows (with the Average row) as text."""
    header = ["Dataset", *(f"{k}-shot" for k in table.shots), AVERAGE]
    rows = [
        [dataset, *(_cell_text(table.cells.get((dataset, k))) for k in table.shots),
         _average_text(table.row_average(dataset))]
        for dataset in table.datasets
    ]  # fmt: skip
    rows.append(
        [AVERAGE, *(_average_text(table.column_average(k)) for k in table.shots),
         _average_text(table.overall_average())]
    )  # fmt: skip
    return header, rows


def rich_suite(tables: list[SuiteTable]) -> Group:
    """The terminal tables, one per method, its notes and seed counts in the caption."""
    shown = []
    for table in tables:
        header, rows = _body(table)
        caption = [*table.notes, f"seeds per cell: {_seed_counts(table)}"]
        rich = Table(title=_title(table), caption="\n".join(caption), caption_justify="left")
        for position, name in enumerate(header):
            rich.add_column(name, justify="left" if position == 0 else "right")
        for row in rows:
            rich.add_row(*row, style="bold" if row[0] == AVERAGE else "")
        shown.append(rich)
    return Group(*shown)


def _seed_counts(table: SuiteTable) -> str:
    counts = sorted({len(cell.accuracies) for cell in table.cells.values()})
    return ", ".join(map(str, counts)) or "none"


def render_suite(tables: list[SuiteTable], fmt: str) -> str:
    """The tables as text: `table`, `markdown`, `csv`, `latex` or `json` (`ValueError` for another)."""
    renderers = {"table": _plain, "markdown": _markdown, "csv": _csv, "latex": _latex, "json": _json}
    if fmt not in renderers:
        raise ValueError(f"unknown format {fmt!r}")
    return renderers[fmt](tables)


def _plain(tables: list[SuiteTable]) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=160, color_system=None, force_terminal=False).print(rich_suite(tables))
    return buffer.getvalue()


def _markdown(tables: list[SuiteTable]) -> str:
    lines: list[str] = []
    for table in tables:
        header, rows = _body(table)
        lines += [f"### {_title(table)}", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join(["---", *("---:" for _ in header[1:])]) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += [*(f"\n_{note}_" for note in table.notes), ""]
    return "\n".join(lines)


def _latex(tables: list[SuiteTable]) -> str:
    lines: list[str] = []
    for table in tables:
        header, rows = _body(table)
        lines += [f"% {_title(table)}", "\\begin{tabular}{l" + "r" * (len(header) - 1) + "}", "\\toprule"]
        lines.append(" & ".join(_tex(cell) for cell in header) + " \\\\")
        lines.append("\\midrule")
        for row in rows:
            if row[0] == AVERAGE:
                lines.append("\\midrule")
            lines.append(" & ".join(_tex(cell) for cell in row) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}", *(f"% {note}" for note in table.notes), ""]
    return "\n".join(lines)


def _tex(text: str) -> str:
    escaped = "".join("\\" + c if c in "&%$#_{}" else c for c in text)
    return escaped.replace("±", "$\\pm$").replace("–", "--")


def _csv(tables: list[SuiteTable]) -> str:
    """One line per cell: method label, backbone, dataset, shots, mean, std, seeds (`;`-joined)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "backbone", "dataset", "shots", "mean", "std", "seeds"])
    for table in tables:
        for dataset in table.datasets:
            for shots in table.shots:
                cell = table.cells.get((dataset, shots))
                if cell is not None:
                    seeds = ";".join(map(str, cell.seeds))
                    writer.writerow(
                        [table.label, table.backbone, dataset, shots, _num(cell.mean), _num(cell.std), seeds]
                    )
            writer.writerow([table.label, table.backbone, dataset, AVERAGE, _num(table.row_average(dataset)), "", ""])
        for shots in table.shots:
            writer.writerow([table.label, table.backbone, AVERAGE, shots, _num(table.column_average(shots)), "", ""])
        writer.writerow([table.label, table.backbone, AVERAGE, AVERAGE, _num(table.overall_average()), "", ""])
    return buffer.getvalue()


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _json(tables: list[SuiteTable]) -> str:
    """`{"all_way": [{method, backbone, shots, datasets: {dataset: {"K": {mean, std, seeds, per_seed}, "average"}},
    "average": {"K": value, "all": value}, notes}]}` (averages null where a cell is missing)."""
    listed = []
    for table in tables:
        datasets: dict[str, Any] = {}
        for dataset in table.datasets:
            entry: dict[str, Any] = {}
            for shots in table.shots:
                cell = table.cells.get((dataset, shots))
                if cell is not None:
                    entry[str(shots)] = {
                        "mean": round(cell.mean, 4), "std": round(cell.std, 4), "seeds": cell.seeds,
                        "per_seed": {str(s): round(a, 4) for s, a in sorted(cell.accuracies.items())},
                    }  # fmt: skip
            entry["average"] = _rounded(table.row_average(dataset))
            datasets[dataset] = entry
        average = {str(k): _rounded(table.column_average(k)) for k in table.shots}
        average["all"] = _rounded(table.overall_average())
        listed.append(
            {"method": table.label, "backbone": table.backbone, "shots": table.shots, "datasets": datasets,
             "average": average, "notes": table.notes}
        )  # fmt: skip
    return json.dumps({"all_way": listed}, indent=2)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
