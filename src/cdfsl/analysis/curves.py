"""Training curves (`cdfsl report --curves`): each run's per-episode curves summarised over its episodes.

Every trained episode stores, at every 10th training step and the last (`cdfsl.methods.training.Curves`), its
cross-entropy `loss_ce`, and with the plug-ins TIR's `sink_share` (the share of patch tokens every class claims, at
TIR's blocks, before the recalibration) and VtT's `loss_vtt` and `dgso_cos` (the mean gradient agreement DGSO's switch
reads; both empty once it switched `L_VtT` off). A run's curve is, per step and quantity, the mean over the episodes
that have a value there, with the first and third quartiles.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import dataclass, field

import numpy as np
from rich.console import Group
from rich.table import Table

from cdfsl.analysis.compare import stored_runs
from cdfsl.analysis.per_class import markdown_table
from cdfsl.engine.store import ResultStore, RunRecord

CURVE_FORMATS = ("table", "markdown", "csv", "json")
QUANTITY_ORDER = ("loss_ce", "loss_vtt", "dgso_cos", "sink_share")
QUANTITY_LABELS = {
    "loss_ce": "L_ce",
    "loss_vtt": "L_VtT",
    "dgso_cos": "DGSO cosine",
    "sink_share": "TIR sink share",
}


@dataclass(frozen=True)
class Summary:
    """One quantity of one run over its episodes, per recorded step `[S]`: mean, quartiles and episode count."""

    mean: np.ndarray
    q1: np.ndarray
    q3: np.ndarray
    count: np.ndarray


@dataclass(frozen=True)
class RunCurves:
    """A run's curves: its recorded steps `[S]` and a `Summary` per quantity; `episodes` with curves, `missing`
    without (a method that trains nothing, or stored before cdfsl kept curves)."""

    run: RunRecord
    steps: np.ndarray
    quantities: dict[str, Summary] = field(default_factory=dict)
    episodes: int = 0
    missing: int = 0

    @property
    def label(self) -> str:
        return self.run.label


def _order(name: str) -> tuple[int, str]:
    return (QUANTITY_ORDER.index(name) if name in QUANTITY_ORDER else len(QUANTITY_ORDER), name)


def run_curves(store: ResultStore, run: str | None = None) -> list[RunCurves]:
    """The curves of every run in `store`, or of the one `run` names (an id, a 4+ character prefix, a run name or
    the method of a single run); raises `StoreError` for an empty store or malformed curves."""
    return [_summarise(record, store.episode_curves(record.run_id)) for record in stored_runs(store, run)]


def _summarise(run: RunRecord, stored: dict[int, dict[str, list[float | None]] | None]) -> RunCurves:
    curves = [c for c in stored.values() if c is not None]
    missing = len(stored) - len(curves)
    if not curves:
        return RunCurves(run, np.zeros(0, dtype=np.int64), episodes=0, missing=missing)
    steps = np.array(sorted({int(s) for c in curves for s in c["step"]}), dtype=np.int64)
    position = {int(s): i for i, s in enumerate(steps)}
    names = sorted({n for c in curves for n in c if n != "step"}, key=_order)
    quantities = {}
    for name in names:
        values = np.full((len(curves), len(steps)), np.nan)
        for row, curve in enumerate(curves):
            for step, value in zip(curve["step"], curve.get(name, []), strict=False):
                if value is not None:
                    values[row, position[int(step)]] = float(value)
        count = (~np.isnan(values)).sum(axis=0)
        with warnings.catch_warnings():  # an all-nan step (every episode had switched VtT off) stays nan
            warnings.simplefilter("ignore", RuntimeWarning)
            quantities[name] = Summary(
                np.nanmean(values, axis=0), *np.nanpercentile(values, [25, 75], axis=0), count=count
            )
    return RunCurves(run, steps, quantities, len(curves), missing)


def _cell(summary: Summary, i: int) -> str:
    return "–" if summary.count[i] == 0 else f"{summary.mean[i]:.4f}"


def _note(curves: RunCurves) -> str:
    note = f"mean over {curves.episodes} episodes"
    if curves.missing:
        note += f"; {curves.missing} episodes have no curves (nothing trained, or stored before curves were kept)"
    return note


def _header(curves: RunCurves) -> list[str]:
    return ["step", *(QUANTITY_LABELS.get(n, n) for n in curves.quantities)]


def _body(curves: RunCurves) -> list[list[str]]:
    return [[str(int(s)), *(_cell(q, i) for q in curves.quantities.values())] for i, s in enumerate(curves.steps)]


def rich_curves(results: list[RunCurves]) -> Group:
    """Per run, a table: one row per recorded step, the mean of each quantity over the episodes."""
    tables = []
    for curves in results:
        table = Table(title=curves.label, caption=_note(curves), title_justify="left", caption_justify="left")
        for column in _header(curves):
            table.add_column(column, justify="right")
        for row in _body(curves):
            table.add_row(*row)
        tables.append(table)
    return Group(*tables)


def render_curves(results: list[RunCurves], fmt: str) -> str:
    """`markdown` (a table per run), `csv` (long form: run, step, quantity, mean, q1, q3, episodes) or `json`."""
    if fmt == "markdown":
        lines: list[str] = []
        for curves in results:
            lines += [f"### {curves.label}", "", f"_{_note(curves)}_", ""]
            lines += markdown_table(_header(curves), _body(curves))
            lines.append("")
        return "\n".join(lines).rstrip() + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["run_id", "method", "dataset", "shots", "step", "quantity", "mean", "q1", "q3", "episodes"])
        for curves in results:
            run = curves.run
            for name, summary in curves.quantities.items():
                for i, step in enumerate(curves.steps):
                    numbers = [_num(summary.mean[i]), _num(summary.q1[i]), _num(summary.q3[i])]
                    writer.writerow(
                        [run.run_id, run.method, run.dataset, run.shots, int(step), name, *numbers, summary.count[i]]
                    )
        return buffer.getvalue()
    if fmt == "json":
        return json.dumps([_as_dict(c) for c in results], indent=2)
    raise ValueError(f"curves come as {', '.join(CURVE_FORMATS)}, not {fmt!r}")


def _num(value: float) -> str:
    return "" if np.isnan(value) else f"{value:.6g}"


def _as_dict(curves: RunCurves) -> dict[str, object]:
    def listed(values: np.ndarray) -> list[float | None]:
        return [None if np.isnan(v) else round(float(v), 6) for v in values]

    return {
        **curves.run.header(),
        "episodes": curves.episodes,
        "episodes_without_curves": curves.missing,
        "step": [int(s) for s in curves.steps],
        "quantities": {
            name: {"mean": listed(s.mean), "q1": listed(s.q1), "q3": listed(s.q3), "episodes": s.count.tolist()}
            for name, s in curves.quantities.items()
        },
    }
