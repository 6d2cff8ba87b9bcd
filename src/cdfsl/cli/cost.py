"""`cdfsl cost`: trainable parameters and FLOPs of one training step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cdfsl.cli.errors import user_errors
from cdfsl.cli.options import config_from_options
from cdfsl.cli.output import check_output_file, console, out
from cdfsl.recipes import RECIPES


@user_errors
def cost_command(
    method: Annotated[
        str, typer.Option(help="A base and plug-ins, e.g. lora, coop+lora+tir, maple; see `cdfsl methods`.")
    ],
    backbone: Annotated[str, typer.Option(help="open_clip model name, or 'tiny' for the embedded model.")] = "ViT-B-16",
    pretrained: Annotated[
        str, typer.Option(help="Weights: a tag, a checkpoint PATH, or none (the cost does not depend on them).")
    ] = "none",
    recipe: Annotated[
        str | None, typer.Option(help=f"Training recipe: {', '.join(RECIPES)} (default: the method's).")
    ] = None,
    ways: Annotated[int, typer.Option(help="Classes per episode.")] = 5,
    shots: Annotated[int, typer.Option(help="Support images per class.")] = 5,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value for any config field.")] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the numbers as JSON here (its folder must exist).")
    ] = None,
) -> None:
    """Trainable parameters and FLOPs of one training step (one episode) of a method's recipe; VtT beside its paper."""
    from cdfsl.analysis.cost import cost_header, cost_notes, flop_table, parameter_table, training_cost

    if json_path is not None:
        check_output_file(json_path, "--json")

    options = {
        "method": method, "recipe": recipe, "backbone": backbone, "pretrained": pretrained, "ways": ways,
        "shots": shots, "device": device,
    }  # fmt: skip
    config = config_from_options(options, set_ or [])
    with console.status(f"counting one training step of {method} on {backbone} …"):
        result = training_cost(config)
    out.print(cost_header(result), highlight=False)
    out.print(parameter_table(result))
    out.print(flop_table(result))
    for note in cost_notes(result):
        out.print(note, highlight=False)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2))
