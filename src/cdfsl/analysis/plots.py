"""Report figures: accuracy bars per shots value; in paired mode, per-episode differences to the baseline; with
`--per-class`, a confusion matrix per run; with `--curves`, training curves per run.

Every figure is a `matplotlib.figure.Figure` drawn with the Agg renderer (no pyplot, no global figure state),
sized for a paper column (3.5 in wide, 7 in when many bars need it), fonts of 8 pt, saved as PNG at 200 dpi.
Quoted paper rows are not plotted: they have no episodes and no interval.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cdfsl.analysis.curves import QUANTITY_LABELS, RunCurves
from cdfsl.analysis.figure_style import COLUMN_WIDTH_IN, DPI, PAGE_WIDTH_IN, TEXT_LINE_IN, paper_style
from cdfsl.analysis.per_class import MAX_PRINTED_CLASSES, ClassResults
from cdfsl.analysis.report import Column, PairedCell, Report, Row, format_p

# More bars than this in one chart and it gets the full page width.
MAX_BARS_AT_COLUMN_WIDTH = 12


def plot_report(report: Report, out_dir: Path) -> list[Path]:
    """Write the report's figures under `out_dir` (created if missing) and return their paths.

    - `accuracy_{N}shot.png` per shots value: x = dataset (and the mean column), one bar per measured row,
      error bars the 95% interval.
    - paired mode: `paired_{method}_vs_{baseline}_{dataset}_{N}shot.png` per compared cell, a histogram of the
      per-episode differences with zero, the mean difference and its 95% interval marked; and
      `paired_summary_vs_{baseline}.png`, every mean difference ± 95% interval on one axis.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with paper_style():
        for shots in sorted({column.shots for column in report.columns}):
            figure = _accuracy_figure(report, shots)
            if figure is not None:
                written.append(_save(figure, out_dir, f"accuracy_{shots}shot", written))
        for (row, column), cell in report.paired.items():
            if cell.stats.shared == 0:
                continue
            name = f"paired_{_slug(row.label)}_vs_{_slug(cell.baseline.label)}_{_slug(column.dataset or 'mean')}"
            written.append(_save(_paired_figure(row, column, cell), out_dir, f"{name}_{column.shots}shot", written))
        if report.paired and report.baseline is not None:
            figure = _summary_figure(report)
            written.append(_save(figure, out_dir, f"paired_summary_vs_{_slug(report.baseline)}", written))
    return written


def _accuracy_figure(report: Report, shots: int) -> Figure | None:
    columns = [c for c in report.columns if c.shots == shots]
    rows = [r for r in report.rows if not r.quoted and any(report.cell(r, c) for c in columns)]
    columns = [c for c in columns if any(report.cell(r, c) for r in rows)]
    if not rows or not columns:
        return None
    colors = _row_colors(report)
    wide = len(rows) * len(columns) > MAX_BARS_AT_COLUMN_WIDTH
    one_backbone = len({r.backbone for r in rows}) == 1
    labels = [_wrap(r.label if one_backbone else f"{r.label} ({r.backbone})", 70 if wide else 40) for r in rows]
    legend_columns = 1 if any("\n" in label or len(label) > 14 for label in labels) else min(3, len(rows))
    legend_lines = sum(label.count("\n") + 1 for label in labels[::legend_columns])
    height = 2.6 + TEXT_LINE_IN * legend_lines
    figure = Figure(figsize=(PAGE_WIDTH_IN if wide else COLUMN_WIDTH_IN, height), layout="constrained")
    axes = figure.add_subplot()
    width = 0.8 / len(rows)
    x = np.arange(len(columns), dtype=float)
    top = 0.0
    for index, (row, label) in enumerate(zip(rows, labels, strict=True)):
        cells = [report.cell(row, column) for column in columns]
        means = np.array([c.mean if c else np.nan for c in cells])
        errors = np.array([c.ci95 if c and np.isfinite(c.ci95) else 0.0 for c in cells])
        offset = (index - (len(rows) - 1) / 2) * width
        axes.bar(
            x + offset,
            means,
            width * 0.92,
            yerr=errors,
            capsize=2,
            error_kw={"elinewidth": 0.8, "capthick": 0.8},
            label=label,
            color=colors[row],
        )
        top = max(top, float(np.nanmax(means + errors)))
    axes.set_xticks(x, [_tick(column) for column in columns])
    axes.set_ylabel("accuracy (%)")
    axes.set_xlabel("dataset")
    axes.set_ylim(0, min(100.0, top * 1.08 + 1.0))
    axes.set_title(f"{shots}-shot: mean accuracy ± 95% CI")
    axes.grid(axis="y", linewidth=0.4, alpha=0.5)
    axes.set_axisbelow(True)
    figure.legend(loc="outside lower center", ncol=legend_columns, frameon=False)
    return figure


def _row_colors(report: Report) -> dict[Row, str]:
    """One colour per measured row, the same in every figure."""
    return {row: f"C{index % 10}" for index, row in enumerate(r for r in report.rows if not r.quoted)}


def _tick(column: Column) -> str:
    return "mean" if column.is_mean else str(column.dataset)


def _paired_figure(row: Row, column: Column, cell: PairedCell) -> Figure:
    stats = cell.stats
    diffs = np.fromiter(cell.differences.values(), dtype=np.float64)
    unequal = ", unequal sets" if stats.unequal else ""
    title = (
        _wrap(f"{row.label} − {cell.baseline.label}, {column.label}", 48)
        + f"\nn={stats.shared}{unequal}, Wilcoxon {format_p(stats.p_value)}"
    )
    figure = Figure(figsize=(COLUMN_WIDTH_IN, 2.4 + TEXT_LINE_IN * title.count("\n")), layout="constrained")
    axes = figure.add_subplot()
    axes.hist(diffs, bins=_bins(diffs), color="0.65", edgecolor="white", linewidth=0.5, label="episodes")
    axes.axvspan(stats.mean_diff - stats.ci95, stats.mean_diff + stats.ci95, color="C3", alpha=0.25, label="95% CI")
    axes.axvline(stats.mean_diff, color="C3", linewidth=1.2, label=f"mean {stats.mean_diff:+.2f}")
    axes.axvline(0.0, color="black", linewidth=0.8, linestyle="--", label="no difference")
    axes.set_xlabel("accuracy difference (points)")
    axes.set_ylabel("episodes")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    if np.unique(diffs).size == 1:  # one value: keep the bar narrow and the zero line in view
        axes.set_xlim(min(diffs[0], 0.0) - 3.0, max(diffs[0], 0.0) + 3.0)
    axes.set_title(title)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2, frameon=False)
    return figure


def _bins(diffs: np.ndarray) -> int | np.ndarray:
    """One bin per distinct difference when they are few (accuracies are discrete), else 'auto'-like."""
    values = np.unique(diffs)
    if values.size <= 1:
        center = float(values[0]) if values.size else 0.0
        return np.array([center - 0.5, center + 0.5])
    step = float(np.min(np.diff(values)))
    if values.size <= 25 and (values[-1] - values[0]) / step <= 60:
        return np.arange(values[0] - step / 2, values[-1] + step, step)
    return int(min(30, max(10, np.sqrt(diffs.size))))


def _summary_figure(report: Report) -> Figure:
    """Every compared cell's mean difference ± 95% interval, grouped by row, in the bar-chart colours."""
    colors = _row_colors(report)
    columns = [
        column
        for column in report.paired_columns
        if any((cell := report.paired.get((row, column))) and cell.stats.shared for row in report.paired_rows)
    ]
    single = columns[0].label if len(columns) == 1 else None  # named once in the title instead of on every row
    entries = [
        (colors[row], row.label if single else f"{row.label} · {column.label}", cell)
        for row in report.paired_rows
        for column in columns
        if (cell := report.paired.get((row, column))) is not None and cell.stats.shared > 0
    ]
    labels = [_wrap(label, 32) for _, label, _ in entries]
    row_height = max(0.22, TEXT_LINE_IN * max(label.count("\n") + 1 for label in labels) + 0.06)
    figure = Figure(figsize=(COLUMN_WIDTH_IN, 1.0 + row_height * len(entries)), layout="constrained")
    axes = figure.add_subplot()
    for y, (color, _, cell) in zip(range(len(entries) - 1, -1, -1), entries, strict=True):
        axes.errorbar(
            cell.stats.mean_diff,
            y,
            xerr=cell.stats.ci95,
            fmt="o",
            color=color,
            markersize=3.5,
            capsize=2,
            elinewidth=0.9,
        )
    axes.axvline(0.0, color="black", linewidth=0.8, linestyle="--")
    axes.set_yticks(range(len(entries) - 1, -1, -1), labels)
    axes.set_ylim(-0.7, len(entries) - 0.3)
    axes.set_xlabel(f"difference vs {report.baseline} (points)")
    where = f", {single}" if single else ""
    figure.suptitle(f"Paired differences vs {report.baseline}{where}\n(mean ± 95% CI over shared episodes)")
    axes.grid(axis="x", linewidth=0.4, alpha=0.5)
    return figure


def _wrap(label: str, width: int) -> str:
    """A row label broken into lines of at most `width` characters (at spaces), so variants stay readable whole."""
    return "\n".join(textwrap.wrap(label, width, break_long_words=False)) or label


def plot_confusions(results: list[ClassResults], out_dir: Path) -> list[Path]:
    """One `confusion_{method}_{dataset}_{N}shot_{run id}.png` per run with per-query labels: each row's shares of
    its true class's queries, true class down, predicted across (the shares printed up to 12 classes)."""
    drawn = [(r.run, _confusion_figure(r)) for r in results if r.classes]
    return _save_per_run("confusion", drawn, out_dir)


def _save_per_run(kind: str, drawn: list[tuple[Any, Figure]], out_dir: Path) -> list[Path]:
    """Save one figure per run as `{kind}_{method}_{dataset}_{N}shot_{run id}.png` under `out_dir` (created)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for run, figure in drawn:
        stem = f"{kind}_{_slug(run.method)}_{_slug(run.dataset)}_{run.shots}shot_{run.run_id}"
        written.append(_save(figure, out_dir, stem, written))
    return written


def _confusion_figure(result: ClassResults) -> Figure:
    with paper_style():
        return _draw_confusion(result)


def _draw_confusion(result: ClassResults) -> Figure:
    k = len(result.classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.nan_to_num(result.confusion / result.queries[:, None])
    side = min(PAGE_WIDTH_IN, max(COLUMN_WIDTH_IN, 0.3 * k + 1.8))
    figure = Figure(figsize=(side, side), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(k), result.classes, rotation=90)
    axes.set_yticks(range(k), result.classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true class")
    if k <= MAX_PRINTED_CLASSES:
        for i in range(k):
            for j in range(k):
                if result.confusion[i, j]:
                    color = "white" if shares[i, j] > 0.5 else "black"
                    axes.text(j, i, f"{100 * shares[i, j]:.0f}", ha="center", va="center", color=color)
    run = result.run
    axes.set_title(f"{run.method} · {run.dataset} · {run.shots}-shot", loc="left")
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the true class's queries")
    return figure


def plot_curves(results: list[RunCurves], out_dir: Path) -> list[Path]:
    """One `curves_{method}_{dataset}_{N}shot_{run id}.png` per run with curves: a panel per quantity, the mean over
    episodes against the training step with the band between the first and third quartiles."""
    drawn = [(c.run, _curves_figure(c)) for c in results if c.quantities]
    return _save_per_run("curves", drawn, out_dir)


def _curves_figure(curves: RunCurves) -> Figure:
    with paper_style():
        return _draw_curves(curves)


def _draw_curves(curves: RunCurves) -> Figure:
    panels = len(curves.quantities)
    figure = Figure(figsize=(PAGE_WIDTH_IN if panels > 2 else COLUMN_WIDTH_IN * panels, 2.2), layout="constrained")
    axes_list = figure.subplots(1, panels, squeeze=False)[0]
    for axes, (name, summary) in zip(axes_list, curves.quantities.items(), strict=True):
        axes.fill_between(curves.steps, summary.q1, summary.q3, alpha=0.25, linewidth=0)
        axes.plot(curves.steps, summary.mean, marker="o" if len(curves.steps) < 12 else None)
        axes.set_title(QUANTITY_LABELS.get(name, name), loc="left")
        axes.set_xlabel("training step")
        axes.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    run = curves.run
    figure.suptitle(f"{run.method} · {run.dataset} · {run.shots}-shot: mean over {curves.episodes} episodes, IQR band")
    return figure


def _slug(text: str) -> str:
    """A file-name-safe slug: lower case letters, digits and single dashes (`tir+vtt` → `tir-vtt`), at most 60
    characters (a label lists a run's changed settings; `_save` numbers names that collide)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60].strip("-") or "x"


def _save(figure: Figure, out_dir: Path, stem: str, written: list[Path]) -> Path:
    path = out_dir / f"{stem}.png"
    counter = 2
    while path in written:
        path = out_dir / f"{stem}_{counter}.png"
        counter += 1
    figure.savefig(path, dpi=DPI)
    return path
