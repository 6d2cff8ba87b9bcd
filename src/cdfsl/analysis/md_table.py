"""The Meta-Dataset table (`cdfsl report --meta-dataset`): rows are sources, columns are methods, each cell the mean
accuracy ± 95% interval over the source's episodes; a last row gives each method's mean over the sources.

A run belongs to the table when its dataset is a Meta-Dataset source (an `md-` name) or its episodes were drawn by the
`meta-dataset` protocol. Runs are split into one table per episode kind and backbone: Meta-Dataset's own variable
episodes (`variable-way variable-shot`) and each fixed shape (`5-way 1-shot`, `5-way 5-shot`), so numbers of
different protocols never share a table. A column is a method as report rows name it (`cdfsl.labels`: method,
recipe and changed settings); the episodes of several runs in one cell (other seeds) are pooled, and a note says so.

The interval is the field's `1.96 · std / √n` over episodes (`cdfsl.stats.mean_ci95`). The overall row is the
unweighted mean of the source means, as Meta-Dataset papers report their average; it has no interval (its sources
differ in size and difficulty, so a pooled interval would not describe it) and names how many sources it averages
when a method lacks some.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from cdfsl.data.md_sampler import META_DATASET
from cdfsl.data.protocols import PROTOCOLS, EpisodeSettings
from cdfsl.engine.store import ResultStore, RunRecord
from cdfsl.labels import changed_settings, episode_ways, run_label, variant_text
from cdfsl.stats import mean_ci95

MD_PREFIX = "md-"
SOURCE_ORDER = (
    "md-ilsvrc_2012", "md-omniglot", "md-aircraft", "md-cu_birds", "md-dtd", "md-quickdraw", "md-fungi",
    "md-vgg_flower", "md-traffic_sign", "md-mscoco",
)  # fmt: skip
"""Meta-Dataset's order of its sources (its paper's tables); other sources follow by name."""
VARIABLE = "variable-way variable-shot"
MD_FORMATS = ("table", "markdown", "csv", "json")
JSON_SCHEMA = "cdfsl.md-table/1"


@dataclass(frozen=True)
class SourceCell:
    """One (source, method) cell: mean and 95% half-width in percent over `episodes` episodes of `runs`."""

    mean: float
    ci95: float
    episodes: int
    runs: tuple[str, ...]


@dataclass
class MdTable:
    """One table: `kind` (the episode kind), `backbone`, its sources (rows) and methods (columns) in order."""

    kind: str
    backbone: str
    sources: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str], SourceCell] = field(default_factory=dict)

    def overall(self, method: str) -> tuple[float, int]:
        """(unweighted mean of the method's source means, how many sources it has)."""
        means = [self.cells[(s, method)].mean for s in self.sources if (s, method) in self.cells]
        return (sum(means) / len(means) if means else math.nan), len(means)


@dataclass
class MdReport:
    tables: list[MdTable]
    notes: list[str]


def episode_kind(run: RunRecord, protocol: str | None) -> str | None:
    """The table a run belongs to, None for a run outside the Meta-Dataset tables: `VARIABLE` under the
    `meta-dataset` protocol, `N-way K-shot` for a fixed shape on a source (`protocol` None: fixed-way), and another
    protocol's own column heading on a source."""
    if protocol == META_DATASET:
        return VARIABLE
    if not run.dataset.startswith(MD_PREFIX):
        return None
    if protocol is None:
        return f"{run.ways}-way {run.shots}-shot"
    known = PROTOCOLS.get(protocol)
    return known.column(EpisodeSettings(run.ways, run.shots, run.queries)) if known is not None else protocol


def _source_key(source: str) -> tuple[int, str]:
    return (SOURCE_ORDER.index(source) if source in SOURCE_ORDER else len(SOURCE_ORDER), source)


def _kind_key(kind: str) -> tuple[int, str]:
    """Variable episodes first (Meta-Dataset's own), then fixed shapes."""
    return (1 if re.fullmatch(r"\d+-way \d+-shot", kind) else 0, kind)


def build_md_report(store: ResultStore) -> MdReport:
    """The Meta-Dataset tables of every run in `store` that belongs to one (module docstring)."""
    pooled: dict[tuple[str, str, str, str], dict[str, dict[int, float]]] = defaultdict(dict)
    for run in store.runs():
        kind = episode_kind(run, store.run_identity(run.run_id).get("protocol"))
        if kind is None or run.episodes == 0:
            continue
        label = run_label(run.method, run.recipe, variant_text(episode_ways(run.config), changed_settings(run.config)))
        pooled[(kind, run.backbone, run.dataset, label)][run.run_id] = store.episode_accuracies(run.run_id)
    tables: dict[tuple[str, str], MdTable] = {}
    notes = []
    for (kind, backbone, source, label), runs in sorted(pooled.items()):
        table = tables.setdefault((kind, backbone), MdTable(kind, backbone))
        accuracies = [accuracy for episodes in runs.values() for accuracy in episodes.values()]
        mean, ci95 = mean_ci95(accuracies)
        table.cells[(source, label)] = SourceCell(mean, ci95, len(accuracies), tuple(sorted(runs)))
        if len(runs) > 1:
            notes.append(f"{kind}, {backbone}, {source}, {label}: episodes of {len(runs)} runs pooled")
    for table in tables.values():
        table.sources = sorted({source for source, _ in table.cells}, key=_source_key)
        table.methods = sorted({method for _, method in table.cells})
    ordered = sorted(tables.values(), key=lambda t: (_kind_key(t.kind), t.backbone))
    return MdReport(ordered, notes)


def _cell_text(cell: SourceCell | None) -> str:
    return "–" if cell is None else f"{cell.mean:.2f} ± {cell.ci95:.2f}"


def _overall_text(table: MdTable, method: str) -> str:
    mean, count = table.overall(method)
    if count == 0:
        return "–"
    return f"{mean:.2f}" + ("" if count == len(table.sources) else f" ({count} of {len(table.sources)} sources)")


def table_rows(table: MdTable) -> list[list[str]]:
    """The table as text rows: a header, one row per source, then `overall`."""
    rows = [["Source", *table.methods]]
    rows += [[source, *(_cell_text(table.cells.get((source, m))) for m in table.methods)] for source in table.sources]
    rows.append(["overall (mean of sources)", *(_overall_text(table, m) for m in table.methods)])
    return rows


def title(table: MdTable) -> str:
    return f"Meta-Dataset, {table.kind}, {table.backbone}: accuracy (%) ± 95% interval over episodes"


def render_md_report(report: MdReport, fmt: str) -> str:
    """`markdown` (also what `table` prints), `csv` (one line per cell) or `json`."""
    if fmt == "json":
        return json.dumps(_json(report), indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["kind", "backbone", "source", "method", "mean", "ci95", "episodes", "runs"])
        for table in report.tables:
            for (source, method), cell in sorted(table.cells.items(), key=lambda kv: _source_key(kv[0][0])):
                row = [table.kind, table.backbone, source, method, f"{cell.mean:.4f}", f"{cell.ci95:.4f}"]
                writer.writerow([*row, cell.episodes, " ".join(cell.runs)])
        return buffer.getvalue().rstrip("\n")
    if not report.tables:
        return "No Meta-Dataset runs in the store (md-* sources, or the meta-dataset protocol)."
    parts = []
    for table in report.tables:
        rows = table_rows(table)
        lines = [f"**{title(table)}**", "", "| " + " | ".join(rows[0]) + " |"]
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
        parts.append("\n".join(lines))
    parts += [f"Note: {note}" for note in report.notes]
    return "\n\n".join(parts)


def _json(report: MdReport) -> dict[str, Any]:
    return {
        "schema": JSON_SCHEMA,
        "tables": [
            {
                "kind": table.kind,
                "backbone": table.backbone,
                "sources": table.sources,
                "methods": table.methods,
                "cells": [
                    {"source": s, "method": m, "mean": c.mean, "ci95": c.ci95, "episodes": c.episodes, "runs": c.runs}
                    for (s, m), c in sorted(table.cells.items(), key=lambda kv: _source_key(kv[0][0]))
                ],
                "overall": {m: {"mean": table.overall(m)[0], "sources": table.overall(m)[1]} for m in table.methods},
            }
            for table in report.tables
        ],
        "notes": report.notes,
    }
