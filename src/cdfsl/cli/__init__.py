"""The `cdfsl` command line: parses options, builds configs (`options.config_from_options`), calls the API, owns the
terminal. One module per command group; this one assembles the `app` and its console entry point (`main`).

User mistakes (`CdfslError`) print one line and exit 2; anything else is a bug and exits 1 with its traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from cdfsl.cli import classify, cost, diagnose, info, pretrain, results, run, sweep
from cdfsl.cli.errors import INTERRUPTED, CdfslGroup
from cdfsl.cli.output import console, out

__all__ = ["app", "main"]

app = typer.Typer(
    help="Source-free cross-domain few-shot learning with CLIP: a base (zeroshot, lora, coop, coop+lora, maple) with "
    "plug-ins (tir, vtt) on a dataset's episodes; `cdfsl methods` lists them.",
    name="cdfsl",
    cls=CdfslGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(info.datasets_app, name="datasets")
app.add_typer(diagnose.diagnose_app, name="diagnose")
app.add_typer(sweep.sweep_app, name="sweep")
# in the order `cdfsl --help` lists them
for name, command in (
    ("run", run.run_command),
    ("demo", run.demo_command),
    ("report", results.report_command),
    ("compare", results.compare_command),
    ("methods", info.methods_command),
    ("recipes", info.recipes_command),
    ("cost", cost.cost_command),
    ("pretrain-tiny", pretrain.pretrain_tiny_command),
    ("fit", classify.fit_command),
    ("predict", classify.predict_command),
    ("evaluate", classify.evaluate_command),
    ("export", classify.export_command),
    ("backbones", info.backbones_command),
):
    app.command(name)(command)


def show_version(value: bool) -> None:
    if value:
        from cdfsl.version import __version__

        out.print(f"cdfsl {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[
        bool, typer.Option("--version", callback=show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Options of the `cdfsl` command itself."""


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:  # outside a command (CdfslGroup handles it inside one)
        console.print(INTERRUPTED)
        sys.exit(130)
