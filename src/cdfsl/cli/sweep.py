"""`cdfsl sweep plan | status | run`: a grid of runs from one TOML file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
)
from rich.table import Table

from cdfsl.cli.errors import user_errors
from cdfsl.cli.output import console, out, plain, shown
from cdfsl.cli.progress import interrupted_line, run_with_progress, waiting_line
from cdfsl.errors import ConfigError

sweep_app = typer.Typer(
    help="A grid of runs from one TOML file: plan, run (locally or on Ray), status.", no_args_is_help=True
)


SweepFile = Annotated[Path, typer.Argument(help="The sweep file (TOML; see docs/sweeps.md).")]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _plan_table(plans: list[Any], title: str, with_accuracy: bool) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("#", "run", "id", "episodes", "stored"):
        table.add_column(column, justify="left" if column in ("run", "id") else "right")
    table.add_column("accuracy %" if with_accuracy else "time left", justify="right")
    for plan in plans:
        last = _duration(plan.seconds_left)
        if with_accuracy:
            last = "–" if plan.mean is None else f"{plan.mean:.2f} ± {plan.ci95:.2f}"
        label = plain(plan.run.label)
        if plan.same_as is not None:
            label.append(f" (same run as #{plan.same_as + 1}, counted once)")
        if plan.data_missing is not None:
            label.append(" (no data here)")
        stored = "?" if plan.stored is None else str(plan.stored)
        table.add_row(str(plan.run.position + 1), label, plan.run_id or "–", str(plan.total), stored, last)
    return table


def _planned(file: Path, device: str | None) -> tuple[Any, list[Any], list[Any]]:
    """(sweep, every run's plan, one plan per distinct run), with a transient bar while the runs are identified."""
    from cdfsl.engine.sweep import distinct_runs, load_sweep, plan_sweep

    sweep = load_sweep(file)
    with Progress(
        TextColumn("planning"), BarColumn(), MofNCompleteColumn(), console=console, transient=True
    ) as bar:  # fmt: skip
        task = bar.add_task("plan", total=len(sweep.runs))
        plans = plan_sweep(sweep, device=device, on_planned=lambda done, _: bar.update(task, completed=done))
    return sweep, plans, distinct_runs(plans)


def _plan_notes(plans: list[Any], distinct: list[Any]) -> list[str]:
    """Lines under a plan or status table: runs listed twice, and runs whose data cannot be read here."""
    notes = []
    repeated = len(plans) - len(distinct)
    if repeated:
        notes.append(f"{repeated} run(s) repeat an earlier run's identity: each run is trained and counted once")
    reasons: dict[str, list[int]] = {}
    for plan in plans:
        if plan.data_missing is not None:
            reasons.setdefault(plan.data_missing, []).append(plan.run.position + 1)
    for reason, positions in reasons.items():
        runs = ", ".join(map(str, positions))
        notes.append(
            f"no data for run(s) {runs} here ({shown(reason)}); their stored episodes cannot be counted until it is "
            "there (the file's roots table)"
        )
    return notes


@sweep_app.command("plan")
@user_errors
def sweep_plan(
    file: SweepFile,
    device: Annotated[str | None, typer.Option(help="The device the runs will train on (cpu, cuda).")] = None,
) -> None:
    """Every run of the sweep with its episodes, how many are stored, and the time left estimated from stored
    timings. Runs whose data is not there yet are listed too, marked."""
    sweep, plans, distinct = _planned(file, device)
    out.print(_plan_table(plans, f"{len(plans)} runs of {file} in {sweep.db}", with_accuracy=False))
    for note in _plan_notes(plans, distinct):
        out.print(note, markup=False, highlight=False, soft_wrap=True)
    left = [p.seconds_left for p in distinct if p.stored is None or p.total > p.stored]
    missing = sum(p.total - (p.stored or 0) for p in distinct)
    known = [s for s in left if s is not None]
    estimate = _duration(sum(known)) + ("" if len(known) == len(left) else " for the runs with a timing")
    if not missing:
        out.print("every episode is stored: `cdfsl sweep status` shows the results", highlight=False)
        return
    at_most = " at most" if any(p.stored is None for p in distinct) else ""
    out.print(f"{missing} episodes to train{at_most}; time left: {estimate if known else '–'}", highlight=False)


@sweep_app.command("status")
@user_errors
def sweep_status(
    file: SweepFile,
    device: Annotated[str | None, typer.Option(help="The device the runs train on (cpu, cuda).")] = None,
) -> None:
    """Progress of every run of the sweep: stored episodes and the accuracy so far (the store is only read)."""
    _, plans, distinct = _planned(file, device)
    stored = sum(p.stored or 0 for p in distinct)
    title = f"{file}: {stored} of {sum(p.total for p in distinct)} episodes stored"
    out.print(_plan_table(plans, title, with_accuracy=True))
    for note in _plan_notes(plans, distinct):
        out.print(note, markup=False, highlight=False, soft_wrap=True)


@sweep_app.command("run")
@user_errors
def sweep_run(
    file: SweepFile,
    executor: Annotated[str, typer.Option(help="local (this process) or ray.")] = "local",
    address: Annotated[str | None, typer.Option(help="With ray: an existing cluster's address.")] = None,
    gpus_per_task: Annotated[
        float, typer.Option(help="With ray: GPUs per worker (1: one worker per GPU; 0: CPU workers).")
    ] = 1.0,
    cpus_per_task: Annotated[float, typer.Option(help="With ray: CPUs per worker.")] = 1.0,
) -> None:
    """Train every missing episode of the sweep's runs; finished episodes are stored and skipped on re-runs. With ray,
    a failed chunk is retried in halves, and runs with episodes that fail even alone are named at the end (exit
    status 1) while the other runs finish."""
    from cdfsl.engine.sweep import SweepRunsFailed, load_sweep, run_local, run_ray

    if executor not in ("local", "ray"):
        raise ConfigError(f"--executor must be local or ray, not {executor!r}")
    sweep = load_sweep(file)
    if executor == "local":
        from cdfsl.engine.runner import Runner

        runner = Runner()

        def announce(run: Any) -> None:
            out.print(f"run {run.position + 1} of {len(sweep.runs)}: {shown(run.label)}", highlight=False)

        results = run_local(sweep, lambda config: run_with_progress(config, runner), announce)
        out.print(f"{len(results)} runs done; `cdfsl sweep status {file}` shows them", highlight=False)
        return
    total = {"stored": 0}

    def stored(plan: Any, episodes: int) -> None:
        total["stored"] += episodes
        line = f"stored {episodes} episodes of {shown(plan.run.label)} ({total['stored']} this sweep)"
        console.print(line, markup=False, highlight=False)

    def waiting(plan: Any, holders: Any) -> None:
        line = f"{shown(plan.run.label)}: {waiting_line(holders)}"
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    def retrying(plan: Any, episodes: list[int], error: str) -> None:
        half = len(episodes) // 2
        line = (
            f"{shown(plan.run.label)}: episodes {episodes[0]}–{episodes[-1]} failed ({shown(error)}); retrying them as "
            f"{half} + {len(episodes) - half}"
        )
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    try:
        count = run_ray(
            sweep, address, gpus_per_task, cpus_per_task, on_stored=stored, on_wait=waiting, on_retry=retrying
        )
    except KeyboardInterrupt as error:
        console.print(interrupted_line(error), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except SweepRunsFailed as error:
        out.print(f"stored {error.stored} episodes; {len(error.failures)} run(s) failed:", highlight=False)
        for failure in error.failures:
            out.print(f"  {shown(failure.line())}", markup=False, highlight=False, soft_wrap=True)
        out.print(f"the other runs finished; `cdfsl sweep run {file}` retries the missing episodes", highlight=False)
        raise typer.Exit(1) from None
    out.print(f"stored {count} episodes; `cdfsl sweep status {file}` shows the results", highlight=False)
