"""`cdfsl report` and `cdfsl compare`: read the result store (never changed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cdfsl.cli.errors import user_errors
from cdfsl.cli.output import check_output_file, check_output_folder, console, counted, out, plain
from cdfsl.errors import ConfigError


@user_errors
def report_command(
    db: Annotated[Path, typer.Option(help="SQLite result store.")] = Path("results.sqlite"),
    format_: Annotated[str, typer.Option("--format", help="table, markdown, csv, latex or json.")] = "table",
    paired: Annotated[
        str | None,
        typer.Option(
            help="Compare every method with this one, episode by episode; or every run of one column with one run "
            "(its id, a 4+ character prefix, or its run name)."
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="Folder for bar charts (and paired-difference plots); created, its parent must exist."),
    ] = None,
    with_paper_results: Annotated[bool, typer.Option(help="Add the papers' published numbers (quoted).")] = False,
    output: Annotated[
        Path | None, typer.Option("--out", help="Write the report to this file (its folder must exist).")
    ] = None,
    per_class: Annotated[
        bool,
        typer.Option(
            "--per-class",
            help="Per run: per-class accuracy and the confusion matrix (rows: true class); --plot draws the "
            "matrices; formats table, markdown, csv or json.",
        ),
    ] = False,
    curves: Annotated[
        bool,
        typer.Option(
            "--curves",
            help="Per run: training curves (L_ce; TIR's sink share; VtT's L_VtT and DGSO cosine) at every 10th step, "
            "mean over episodes; --plot draws them; formats table, markdown, csv or json.",
        ),
    ] = False,
    run: Annotated[
        str | None,
        typer.Option(
            help="With --per-class or --curves: this run only (its id, a 4+ character prefix, its run name or method)."
        ),
    ] = None,
    meta_dataset: Annotated[
        bool,
        typer.Option(
            "--meta-dataset",
            help="The Meta-Dataset table: rows are sources, columns methods, mean ± 95% interval, and the mean over "
            "sources; one table per episode kind and backbone; formats table, markdown, csv or json.",
        ),
    ] = False,
) -> None:
    """One row per (method, backbone), one column per (dataset, shots): mean ± 95% interval; paired tests. All-way
    runs (--protocol all-way) get CLIP-LoRA's table per method: datasets × shots, mean ± std over seeds. With
    --per-class or --curves: per-class accuracy and confusion matrices, or training curves, per run.

    Reads the store only: it is opened read-only and never changed.
    """
    from cdfsl.analysis.report import FORMATS, build_report, rich_table
    from cdfsl.analysis.suite_table import all_way_runs, build_suite_tables, rich_suite
    from cdfsl.engine.store import ResultStore

    if format_ not in FORMATS:
        raise ConfigError(f"unknown report format {format_!r}; choose one of {', '.join(FORMATS)}")
    if sum((per_class, curves, paired is not None)) > 1:
        raise ConfigError("--per-class, --curves and --paired are separate reports; ask for one at a time")
    if run is not None and not (per_class or curves):
        raise ConfigError("--run picks the run of --per-class or --curves; the main report covers every run")
    if not db.is_file():
        raise ConfigError(f"no result store at {db}; run `cdfsl run` first or pass --db")
    if output is not None:
        check_output_file(output, "--out", store=db)
    if plot is not None:
        check_output_folder(plot, "--plot")
    if meta_dataset:
        _md_table_report(db, format_, output, per_class or curves or paired is not None or plot is not None)
        return
    if per_class or curves:
        _run_detail_report("per-class" if per_class else "curves", db, format_, run, output, plot)
        return
    with ResultStore(db, read_only=True) as store:
        suite = build_suite_tables(store)
        episodic = not suite or len(all_way_runs(store)) < len(store.runs())  # all-way runs: their own tables
        report = build_report(store, paired=paired, with_paper_results=with_paper_results) if episodic else None
    if report is None and (paired is not None or plot is not None):
        raise ConfigError(f"--paired and --plot compare episodic runs; {db} holds all-way runs only")
    if format_ == "table" and output is None:
        if report is not None:
            out.print(rich_table(report))
        if suite:
            out.print(rich_suite(suite))
    else:
        text = _report_text(report, suite, format_)
        if output is not None:
            output.write_text(text + "\n")
        else:
            out.print(text, markup=False, highlight=False, soft_wrap=True)
    if plot is not None and report is not None:
        from cdfsl.analysis.plots import plot_report

        written = plot_report(report, plot)
        console.print(f"wrote {counted(len(written), 'figure')} to {plot}")


def _report_text(report: Any, suite: list[Any], format_: str) -> str:
    """The episodic report (`report`, or None when the store has only all-way runs) and the all-way tables
    (`suite`, `analysis.suite_table`) in `format_`: one JSON object (the all-way tables under `all_way`), else the
    two texts one after the other, separated by a blank line."""
    from cdfsl.analysis.report import render
    from cdfsl.analysis.suite_table import render_suite

    if format_ == "json":
        data = json.loads(render(report, "json")) if report is not None else {}
        if suite:
            data.update(json.loads(render_suite(suite, "json")))
        return json.dumps(data, indent=2)
    parts = [render(report, format_).rstrip("\n")] if report is not None else []
    if suite:
        parts.append(render_suite(suite, format_).rstrip("\n"))
    return "\n\n".join(parts)


def _md_table_report(db: Path, format_: str, output: Path | None, other_report: bool) -> None:
    """`report --meta-dataset` (the checks of `report_command` done): `cdfsl.analysis.md_table`."""
    from cdfsl.analysis.md_table import MD_FORMATS, build_md_report, render_md_report
    from cdfsl.engine.store import ResultStore

    if other_report:
        raise ConfigError("--meta-dataset is a report of its own: give it without --paired, --per-class or --curves")
    if format_ not in MD_FORMATS:
        raise ConfigError(f"--meta-dataset comes as {', '.join(MD_FORMATS)}, not {format_!r}")
    with ResultStore(db, read_only=True) as store:
        text = render_md_report(build_md_report(store), "markdown" if format_ == "table" else format_)
    if output is not None:
        output.write_text(text + "\n")
    else:
        out.print(text, markup=False, highlight=False, soft_wrap=True)


def _run_detail_report(
    kind: str, db: Path, format_: str, run: str | None, output: Path | None, plot: Path | None
) -> None:
    """`report --per-class` or `report --curves` (the checks of `report_command` done)."""
    from cdfsl.analysis import curves, per_class
    from cdfsl.engine.store import ResultStore

    if kind == "per-class":
        formats, collect = per_class.PER_CLASS_FORMATS, per_class.per_class_results
        rich, render = per_class.rich_per_class, per_class.render_per_class
    else:
        formats, collect = curves.CURVE_FORMATS, curves.run_curves
        rich, render = curves.rich_curves, curves.render_curves
    if format_ not in formats:
        raise ConfigError(f"--{kind} comes as {', '.join(formats)}, not {format_!r}")
    with ResultStore(db, read_only=True) as store:
        results = collect(store, run)
    if format_ == "table" and output is None:
        out.print(rich(results))
    else:
        text = render(results, "markdown" if format_ == "table" else format_)
        if output is not None:
            output.write_text(text)
        else:
            out.print(text, markup=False, highlight=False, soft_wrap=True, end="")
    if plot is not None:
        from cdfsl.analysis.plots import plot_confusions, plot_curves

        written = (plot_confusions if kind == "per-class" else plot_curves)(results, plot)
        console.print(f"wrote {counted(len(written), 'figure')} to {plot}")


@user_errors
def compare_command(
    first: Annotated[
        str, typer.Argument(help="Run A: a run id, a unique id prefix (4+ characters), a run name or a method name.")
    ],
    second: Annotated[str, typer.Argument(help="Run B, compared with A episode by episode (A − B).")],
    db: Annotated[Path, typer.Option(help="SQLite result store.")] = Path("results.sqlite"),
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the numbers as JSON here.")] = None,
) -> None:
    """Two stored runs on their shared episodes: mean difference, 95% Student's t interval, Wilcoxon p, n."""
    import math

    from cdfsl.analysis.compare import compare_runs, record_lines
    from cdfsl.engine.store import ResultStore
    from cdfsl.labels import settings_text

    if json_path is not None:
        check_output_file(json_path, "--json", store=db)
    if not db.is_file():
        raise ConfigError(f"no result store at {db}; run `cdfsl run` first or pass --db")
    with ResultStore(db, read_only=True) as store:
        result = compare_runs(store, first, second)
    table = Table(title=f"{result['n']} shared episodes", title_justify="left")
    for column in ("run", "id", "method", "recipe", "changed settings", "backbone", "episodes", "accuracy (%)"):
        table.add_column(column, justify="right" if column in ("episodes", "accuracy (%)") else "left")
    for label in ("a", "b"):
        side = result[label]
        name = f"{label.upper()}" + (f" ({side['run_name']})" if side["run_name"] else "")
        accuracy = f"{side['mean']:.2f} ± {side['ci95']:.2f}"
        table.add_row(
            plain(name), side["run_id"], plain(side["method"]), side["recipe"] or "–",
            plain(settings_text(side["settings"]) or "–"), plain(side["backbone"]), str(side["episodes"]), accuracy,
        )  # fmt: skip
    out.print(table)
    interval = f"{result['ci95']:.2f}" if math.isfinite(result["ci95"]) else "n/a"
    line = (
        f"A − B = {result['mean_diff']:+.2f} ± {interval} points (95% Student's t interval, as report --paired), "
        f"Wilcoxon p = {result['p_value']:.3g}"
    )
    if result["only_a"] or result["only_b"]:
        line += f"; left out: {result['only_a']} episodes only in A, {result['only_b']} only in B"
    out.print(line, highlight=False)
    for record in record_lines(result):
        out.print(record, highlight=False, markup=False)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2))
