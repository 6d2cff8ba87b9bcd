"""The live progress bar of runs and fits, and the lines a run prints while it waits or when it is interrupted."""

from __future__ import annotations

import sys
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cdfsl.cli.output import console, shown
from cdfsl.config import RunConfig
from cdfsl.spec import RunSpec


class QuietProgress(Progress):
    """rich's `Progress`, except that a bar stopped while an error propagates (or made transient) leaves nothing
    behind: no half-drawn bar and no blank line (rich ends a bar with one when the console is not a terminal), so a
    failed command ends with its error line alone, whether the bar is a `with` block or stopped in a `finally`."""

    def stop(self) -> None:
        if sys.exc_info()[0] is None and not self.live.transient:
            super().stop()
            return
        self.live.transient = True
        if not self.disable:
            self.live.stop()


def progress_bar() -> Progress:
    return QuietProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[accuracy]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def run_with_progress(run: RunConfig | RunSpec, runner: Any = None, on_stored: Any = None) -> Any:
    """Run `run` (a config, or a spec run as it is) with a live bar: episodes done, running mean ± 95% interval,
    elapsed and ETA; `on_stored` as `Runner`'s."""
    from cdfsl.engine.runner import Runner, episode_total

    config = run.config if isinstance(run, RunSpec) else run
    interrupted: KeyboardInterrupt | None = None
    with progress_bar() as bar:
        task = bar.add_task(f"{config.method} · {config.dataset}", total=episode_total(config), accuracy="")
        tested: list[Any] = []  # the streamed queries' bar (all-way: the test split), added on the first batch

        def queried(done: int, total: int) -> None:
            if not tested:
                tested.append(bar.add_task("test images", total=total, accuracy=""))
            bar.update(tested[0], completed=done)

        def update(p: Any) -> None:
            bar.update(task, completed=p.done, accuracy=f"{p.mean:.2f} ± {p.ci95:.2f}%")

        def waiting(holders: Any) -> None:
            bar.console.print(waiting_line(holders), markup=False, highlight=False, soft_wrap=True)

        runner = runner or Runner()
        runner.progress = update
        runner.on_stored = on_stored
        runner.on_wait = waiting
        runner.on_queries = queried
        try:
            result = runner.run(run)
        except KeyboardInterrupt as error:
            bar.live.transient = True
            interrupted = error
        except BaseException:
            bar.live.transient = True  # a failed run ends with its error line alone
            raise
        else:
            accuracy = f"{result.mean_acc:.2f} ± {result.ci95:.2f}%"
            bar.update(task, completed=len(result.per_episode), accuracy=accuracy)
    if interrupted is not None:
        console.print(interrupted_line(interrupted), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    return result


def waiting_line(holders: Any) -> str:
    """What a run waits on: per other process, the episodes it holds and until when its lease runs."""
    from datetime import datetime

    parts = []
    for holder in holders:
        if holder.count == 1:
            episodes = f"episode {holder.first}"
        else:
            episodes = f"{holder.count} episodes of {holder.first}–{holder.last}"
        until = datetime.fromtimestamp(holder.expires_at).strftime("%H:%M:%S")
        parts.append(f"{episodes}, claimed by {shown(holder.process)} until {until}")
    return f"waiting for {'; '.join(parts)} (a claim is renewed while its process runs, and taken over once it stops)"


def interrupted_line(error: KeyboardInterrupt) -> str:
    """The one line Ctrl-C leaves: what is stored, and how to resume."""
    from cdfsl.engine.runner import RunInterrupted

    if isinstance(error, RunInterrupted):
        return (
            f"interrupted: {error.stored} of {error.total} episodes stored in {shown(error.db)}; run the same "
            "command again to resume"
        )
    return "interrupted before any episode was trained: nothing new was stored; run the same command again to resume"
