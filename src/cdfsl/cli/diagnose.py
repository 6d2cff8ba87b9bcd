"""`cdfsl diagnose sink | lost-layers | cka`: the probes behind TIR and VtT."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cdfsl.cli.errors import user_errors
from cdfsl.cli.options import (
    DEFAULT_BACKBONE,
    DEFAULT_PRETRAINED,
    DEFAULT_SHOTS,
    BackboneOption,
    DataRootOption,
    DatasetOption,
    IterationsOption,
    PretrainedOption,
    SetOption,
    ShotsOption,
    TokenizerOption,
    config_from_options,
)
from cdfsl.cli.output import check_output_folder, out
from cdfsl.config import DATASETS, RunConfig
from cdfsl.errors import ConfigError

diagnose_app = typer.Typer(help="Probes behind TIR and VtT: attention sink, lost layers, CKA.", no_args_is_help=True)


ProbeOut = Annotated[
    Path, typer.Option("--out", help="Folder for the JSON and PNG figures (created; its parent must exist).")
]
ProbeEpisodes = Annotated[int, typer.Option(help="Episodes probed (0 … N-1 of the run's sequence).")]


def probe_config(
    dataset: str | None, data_root: Path | None, backbone: str, pretrained: str, shots: int, iterations: int | None,
    overrides: list[str] | None, method: str = "lora", tokenizer: Path | None = None,
) -> RunConfig:  # fmt: skip
    """The run config a probe prepares its episodes and training from (the defaults are `cdfsl run`'s)."""
    if dataset is None:
        raise ConfigError(
            f"--dataset is required: one of {', '.join(DATASETS)} (the embedded default: --dataset digits "
            "--backbone tiny)"
        )
    options = {
        "dataset": dataset, "data_root": data_root, "method": method, "backbone": backbone, "pretrained": pretrained,
        "shots": shots, "tokenizer": tokenizer, "iterations": iterations,
    }  # fmt: skip
    return config_from_options(options, overrides or [])


def print_figures(result: dict[str, Any], folder: Path) -> None:
    out.print(f"wrote {folder}/ with {', '.join(['*.json', *result.get('figures', [])])}", highlight=False)


@diagnose_app.command("sink")
@user_errors
def diagnose_sink(
    output: ProbeOut,
    dataset: DatasetOption = None,
    data_root: DataRootOption = None,
    backbone: BackboneOption = DEFAULT_BACKBONE,
    pretrained: PretrainedOption = DEFAULT_PRETRAINED,
    tokenizer: TokenizerOption = None,
    methods: Annotated[str, typer.Option(help="Comma-separated methods compared with the plain model.")] = "lora,tir",
    shots: ShotsOption = DEFAULT_SHOTS,
    episodes: ProbeEpisodes = 4,
    iterations: IterationsOption = None,
    set_: SetOption = None,
) -> None:
    """Sum scores, token norms by Sum, and CLS attention concentration per vision layer, before vs after tuning."""
    from cdfsl.analysis.probes import sink_probe

    check_output_folder(output, "--out")

    config = probe_config(dataset, data_root, backbone, pretrained, shots, iterations, set_, tokenizer=tokenizer)
    result = sink_probe(config, tuple(m.strip() for m in methods.split(",")), episodes, output)
    table = Table(title=f"attention sink: deepest layer ({result['layers']} vision layers)")
    for column in ("condition", "accuracy (%)", "Sum = K share", "mean norm", "top-1% attention"):
        table.add_column(column, justify="left" if column == "condition" else "right")
    for name, data in result["conditions"].items():
        accuracy = "–" if data["accuracy"] is None else f"{data['accuracy']:.2f}"
        row = [name, accuracy, f"{float(data['sum_fraction'][-1][-1]):.3f}", f"{float(data['mean_norm'][-1]):.2f}"]
        table.add_row(*row, f"{float(data['attention_top_share'][-1]):.3f}")
    out.print(table)
    print_figures(result, output)


@diagnose_app.command("lost-layers")
@user_errors
def diagnose_lost_layers(
    output: ProbeOut,
    dataset: DatasetOption = None,
    data_root: DataRootOption = None,
    backbone: BackboneOption = DEFAULT_BACKBONE,
    pretrained: PretrainedOption = DEFAULT_PRETRAINED,
    tokenizer: TokenizerOption = None,
    method: Annotated[str, typer.Option(help="The fine-tuned condition besides zero-shot.")] = "lora",
    gamma: Annotated[float, typer.Option(help="Factor on a block's residual update when emphasized.")] = 2.0,
    shots: ShotsOption = DEFAULT_SHOTS,
    episodes: ProbeEpisodes = 4,
    iterations: IterationsOption = None,
    set_: SetOption = None,
) -> None:
    """Accuracy with each text block removed or its residual update scaled by γ, zero-shot and after tuning."""
    from cdfsl.analysis.probes import lost_layers_probe

    check_output_folder(output, "--out")

    config = probe_config(dataset, data_root, backbone, pretrained, shots, iterations, set_, tokenizer=tokenizer)
    result = lost_layers_probe(config, method, gamma, episodes, output)
    table = Table(title=f"lost layers: accuracy (%) over {result['text_blocks']} text blocks")
    for column in ("condition", "unmodified", "best removal", "worst removal", f"best γ={gamma}"):
        table.add_column(column, justify="left" if column == "condition" else "right")
    for name, data in result["conditions"].items():
        removed, emphasized = list(data["removed"]), list(data["emphasized"])
        best = max(range(len(removed)), key=removed.__getitem__)
        worst = min(range(len(removed)), key=removed.__getitem__)
        top = max(range(len(emphasized)), key=emphasized.__getitem__)
        table.add_row(
            name, f"{data['unmodified']:.2f}", f"{removed[best]:.2f} (block {best})",
            f"{removed[worst]:.2f} (block {worst})", f"{emphasized[top]:.2f} (block {top})",
        )  # fmt: skip
    out.print(table)
    print_figures(result, output)


@diagnose_app.command("cka")
@user_errors
def diagnose_cka(
    output: ProbeOut,
    dataset: DatasetOption = None,
    data_root: DataRootOption = None,
    backbone: BackboneOption = DEFAULT_BACKBONE,
    pretrained: PretrainedOption = DEFAULT_PRETRAINED,
    tokenizer: TokenizerOption = None,
    method: Annotated[str, typer.Option(help="Without --other-dataset: compare before vs after this method.")] = "lora",
    other_dataset: Annotated[str | None, typer.Option(help="Compare with this dataset's images instead.")] = None,
    other_data_root: Annotated[Path | None, typer.Option(help="Folder of --other-dataset.")] = None,
    masks: Annotated[str, typer.Option(help="Comma-separated: none, sum_k, sum_1.")] = "none,sum_k,sum_1",
    shots: ShotsOption = DEFAULT_SHOTS,
    episodes: ProbeEpisodes = 4,
    iterations: IterationsOption = None,
    set_: SetOption = None,
) -> None:
    """Linear CKA per vision layer between two image sets, optionally masking Sum = K or Sum = 1 tokens."""
    from cdfsl.analysis.probes import cka_probe

    check_output_folder(output, "--out")

    # against another dataset, both image sets are zero-shot's; else before vs after `method`
    condition = method if other_dataset is None else "zeroshot"
    config = probe_config(
        dataset, data_root, backbone, pretrained, shots, iterations, set_, condition, tokenizer=tokenizer
    )
    other = None
    if other_dataset is not None:
        other = probe_config(
            other_dataset, other_data_root, backbone, pretrained, shots, iterations, set_, "zeroshot",
            tokenizer=tokenizer,
        )  # fmt: skip
    result = cka_probe(config, other, tuple(m.strip() for m in masks.split(",")), episodes, output)
    table = Table(title=f"linear CKA per vision layer (n = {result['n']})")
    table.add_column("mask")
    table.add_column("layers 0 … L-1", justify="left")
    for mask, values in result["cka"].items():
        table.add_row(mask, " ".join(f"{float(v):.2f}" for v in values))
    out.print(table)
    print_figures(result, output)
