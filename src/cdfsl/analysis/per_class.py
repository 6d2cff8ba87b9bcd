"""Per-class results (`cdfsl report --per-class`): per-class accuracy and a confusion matrix for each run.

Every stored episode keeps its class names and each query's true and predicted label (`EpisodeQueries`). A run's
queries are pooled over its episodes by class name: row = the query's true class, column = the class it was given.
An episode offers only its K classes, so two classes that never met in an episode have no cell to confuse; each row's
shares are of that class's queries, whichever classes they met. Episodes stored before cdfsl kept per-query labels
are counted and left out (the report says how many).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

import numpy as np
from rich.console import Group
from rich.table import Table

from cdfsl.analysis.compare import stored_runs
from cdfsl.engine.store import ResultStore, RunRecord

# Above this many classes the terminal shows per-class accuracy only (CropDiseases has 38); csv, json and --plot
# still carry the whole matrix.
MAX_PRINTED_CLASSES = 12
PER_CLASS_FORMATS = ("table", "markdown", "csv", "json")


@dataclass(frozen=True)
class ClassResults:
    """One run's pooled queries.

    Attributes:
        run: the run.
        classes: its class names, sorted.
        confusion: counts `[K, K]`: row = true class, column = predicted class (int64).
        episodes: episodes with per-query labels; `missing`: stored episodes without them.
    """

    run: RunRecord
    classes: list[str]
    confusion: np.ndarray
    episodes: int
    missing: int

    @property
    def queries(self) -> np.ndarray:
        """Queries per true class `[K]`."""
        return self.confusion.sum(axis=1)

    @property
    def accuracy(self) -> np.ndarray:
        """Per-class accuracy `[K]` in [0, 1] (nan for a class without queries)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.diag(self.confusion) / self.queries

    def most_confused(self, row: int) -> tuple[str, float] | None:
        """The class most often given to queries of class `row`, and its share of that class's queries."""
        others = self.confusion[row].astype(float)
        others[row] = -1
        best = int(others.argmax())
        if others[best] <= 0:
            return None
        return self.classes[best], float(others[best] / self.queries[row])

    @property
    def label(self) -> str:
        return self.run.label


def per_class_results(store: ResultStore, run: str | None = None) -> list[ClassResults]:
    """Per-class results of every run in `store`, or of the one `run` names (an id, a 4+ character prefix, a run name or
    the method of a single run), in the store's order; raises `StoreError` for an empty store or a malformed record."""
    return [_results_of(store, record) for record in stored_runs(store, run)]


def _results_of(store: ResultStore, run: RunRecord) -> ClassResults:
    stored = store.episode_queries(run.run_id)
    records = [q for q in stored.values() if q is not None]
    classes = sorted({name for q in records for name in q.classes})
    position = {name: i for i, name in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for queries in records:
        rows = [position[queries.classes[t]] for t in queries.truth]
        columns = [position[queries.classes[p]] for p in queries.predicted]
        np.add.at(confusion, (rows, columns), 1)
    return ClassResults(run, classes, confusion, len(records), len(stored) - len(records))


# ---------------------------------------------------------------------------------------------------------- output
def _percent(value: float) -> str:
    return "–" if np.isnan(value) else f"{100 * value:.2f}"


def _accuracy_rows(result: ClassResults) -> list[list[str]]:
    rows = []
    for i, name in enumerate(result.classes):
        confused = result.most_confused(i)
        given = f"{confused[0]} ({100 * confused[1]:.1f}%)" if confused else "–"
        rows.append([name, str(int(result.queries[i])), _percent(result.accuracy[i]), given])
    return rows


def _note(result: ClassResults) -> str:
    note = f"{result.episodes} episodes, {int(result.confusion.sum())} queries"
    if result.missing:
        note += f"; {result.missing} episodes stored before per-query labels were kept are left out"
    return note


ACCURACY_HEADER = ["class", "queries", "accuracy %", "most confused with (share)"]


def rich_per_class(results: list[ClassResults]) -> Group:
    """Per run: a per-class accuracy table and, up to `MAX_PRINTED_CLASSES` classes, the confusion matrix."""
    parts: list[Table] = []
    for result in results:
        table = Table(title=result.label, caption=_note(result), title_justify="left", caption_justify="left")
        for i, column in enumerate(ACCURACY_HEADER):
            table.add_column(column, justify="right" if i in (1, 2) else "left")
        for row in _accuracy_rows(result):
            table.add_row(*row)
        parts.append(table)
        if 0 < len(result.classes) <= MAX_PRINTED_CLASSES:
            matrix = Table(title="confusion: % of each true class's queries given to class 1…K", title_justify="left")
            matrix.add_column("true class", no_wrap=True)
            for number in range(1, len(result.classes) + 1):
                matrix.add_column(str(number), justify="right")
            for i, name in enumerate(result.classes):
                matrix.add_row(f"{i + 1} {name}", *_shares(result, i, digits=0))
            parts.append(matrix)
    return Group(*parts)


def _shares(result: ClassResults, row: int, digits: int = 1) -> list[str]:
    total = result.queries[row]
    return ["–" if total == 0 else f"{100 * count / total:.{digits}f}" for count in result.confusion[row]]


def render_per_class(results: list[ClassResults], fmt: str) -> str:
    """`markdown` (accuracy and confusion tables per run), `csv` (long form: one line per true/predicted pair with a
    count, zero counts included) or `json` (per run: classes, per-class queries and accuracy, the confusion counts)."""
    if fmt == "markdown":
        return _markdown(results)
    if fmt == "csv":
        return _csv(results)
    if fmt == "json":
        return json.dumps([_as_dict(r) for r in results], indent=2)
    raise ValueError(f"per-class results come as {', '.join(PER_CLASS_FORMATS)}, not {fmt!r}")


def _markdown(results: list[ClassResults]) -> str:
    lines: list[str] = []
    for result in results:
        lines += [f"### {result.label}", "", f"_{_note(result)}_", ""]
        lines += markdown_table(ACCURACY_HEADER, _accuracy_rows(result))
        if 0 < len(result.classes) <= MAX_PRINTED_CLASSES:
            lines += ["", "Confusion (rows: true class, columns: predicted; % of the row's queries):", ""]
            body = [[name, *_shares(result, i)] for i, name in enumerate(result.classes)]
            lines += markdown_table(["true \\ predicted", *result.classes], body)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    """A markdown table's lines (a `|` in a cell escaped)."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in body)]


def _csv(results: list[ClassResults]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["run_id", "run_name", "method", "recipe", "backbone", "dataset", "shots", "true", "predicted", "count"]
    )
    for result in results:
        run = result.run
        for i, true in enumerate(result.classes):
            for j, predicted in enumerate(result.classes):
                writer.writerow(
                    [run.run_id, run.run_name or "", run.method, run.recipe or "", run.backbone, run.dataset,
                     run.shots, true, predicted, int(result.confusion[i, j])]
                )  # fmt: skip
    return buffer.getvalue()


def _as_dict(result: ClassResults) -> dict[str, object]:
    return {
        **result.run.header(),
        "episodes": result.episodes,
        "episodes_without_per_query_labels": result.missing,
        "classes": result.classes,
        "queries": [int(q) for q in result.queries],
        "accuracy": [None if np.isnan(a) else round(float(a), 6) for a in result.accuracy],
        "confusion": result.confusion.tolist(),
    }
