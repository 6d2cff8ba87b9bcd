"""`cdfsl pretrain-tiny`: rebuild the embedded tiny CLIP."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cdfsl.cli.errors import user_errors
from cdfsl.cli.output import check_output_file, console, out
from cdfsl.errors import ConfigError


@user_errors
def pretrain_tiny_command(
    output: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Where to write the checkpoint (.safetensors; its folder must exist), and beside it the .meta.json.",
        ),
    ],
    steps: Annotated[int, typer.Option(help="Optimizer steps (supervised warm-up included).")] = 1200,
    supervised_steps: Annotated[int, typer.Option(help="Steps of the supervised warm-up of the vision tower.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the weights and the generated source domain.")] = 0,
    threads: Annotated[int, typer.Option(help="CPU threads; the shipped checkpoint used 1.")] = 1,
) -> None:
    """Pretrain the embedded tiny CLIP on the generated source domain (docs/embedded.md); logs loss and zero-shot."""
    from cdfsl.pretrain.train_tiny import pretrain_tiny

    if output.suffix != ".safetensors":
        raise ConfigError(f"--out must end in .safetensors, got {output}")
    check_output_file(output, "--out")
    check_output_file(output.with_suffix(".meta.json"), "--out's metadata file")

    def log(record: dict[str, Any]) -> None:
        console.print(" ".join(f"{k}={v}" for k, v in record.items()), highlight=False)

    meta = pretrain_tiny(output, steps, seed, threads, log, supervised_steps=supervised_steps)
    out.print(f"wrote {output}: zero-shot 5-way digits {100 * meta['zero_shot_digits_5way']:.2f}%")
