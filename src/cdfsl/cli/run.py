"""`cdfsl run` and `cdfsl demo`: train and store a method's episodes."""

from __future__ import annotations

import json
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
    load_config_file,
    spec_from_options,
    typed_options,
)
from cdfsl.cli.output import check_output_file, check_output_folder, console, out
from cdfsl.cli.progress import run_with_progress
from cdfsl.config import RunConfig
from cdfsl.errors import ConfigError
from cdfsl.recipes import RECIPES

DEMO_METHODS = ("zeroshot", "lora", "tir", "vtt")
DEMO_FULL_ITERATIONS = 250  # `demo --iterations` is given for a recipe of this many iterations


@user_errors
def run_command(
    ctx: typer.Context,
    dataset: DatasetOption = None,
    method: Annotated[
        str | None,
        typer.Option(help="A base and plug-ins, e.g. lora, coop+lora+tir, maple; see `cdfsl methods`."),
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A TOML or JSON file of config keys (sections as tables), or a --json summary to reproduce; options "
            "typed here and --set override it.",
        ),
    ] = None,
    data_root: DataRootOption = None,
    recipe: Annotated[
        str | None,
        typer.Option(help=f"Training recipe: {', '.join(RECIPES)} (default: the method's; see `cdfsl recipes`)."),
    ] = None,
    protocol: Annotated[
        str,
        typer.Option(
            help="episodic (the dataset's episodes) or all-way (one fit on --shots train images of every class, "
            "tested on the whole test split; needs a dataset with train and test splits)."
        ),
    ] = "episodic",
    ways: Annotated[int, typer.Option(help="Classes per episode.")] = 5,
    shots: ShotsOption = DEFAULT_SHOTS,
    queries: Annotated[int, typer.Option(help="Query images per class.")] = 15,
    episodes: Annotated[int | None, typer.Option(help="Episodes (default: 800 for 1-shot, 400 otherwise).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the episode sequence and every random stream.")] = 0,
    backbone: BackboneOption = DEFAULT_BACKBONE,
    pretrained: PretrainedOption = DEFAULT_PRETRAINED,
    tokenizer: TokenizerOption = None,
    iterations: IterationsOption = None,
    episode_batch: Annotated[
        str | None,
        typer.Option(
            help="Episodes trained at once, or 'auto' (default 1). `--set episode_batch=N` also sets it when this "
            "option is not given; giving both is an error."
        ),
    ] = None,
    eval_batch: Annotated[
        int,
        typer.Option(
            help="Query images predicted at once under --protocol all-way (memory is bounded by it, whatever the "
            "test split's size); not part of the run's identity."
        ),
    ] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    deterministic: Annotated[
        bool,
        typer.Option(
            help="Deterministic GPU kernels and the math attention path: repeatable on one GPU model, slower "
            "(docs/protocol.md, Reproducibility). Not part of the run id."
        ),
    ] = False,
    db: Annotated[Path, typer.Option(help="SQLite result store.")] = Path("results.sqlite"),
    run_name: Annotated[str | None, typer.Option(help="A label for reports.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Folder for a disk cache of decoded images.")] = None,
    set_: SetOption = None,
    tensorboard: Annotated[
        Path | None,
        typer.Option(
            help="Also write each trained episode's accuracy and training curves as TensorBoard event files under "
            "this folder (needs pip install 'cdfsl[tensorboard]')."
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write a JSON summary here (its folder must exist).")
    ] = None,
) -> None:
    """Run a method on a dataset's episodes, or one all-way fit (--protocol all-way); finished episodes are stored and
    skipped on re-runs."""
    from cdfsl.engine.runner import Runner

    if eval_batch < 1:
        raise ConfigError(f"--eval-batch must be at least 1 image, got {eval_batch}")
    if deterministic:  # before anything reaches cuBLAS (the trial fits of --episode-batch auto)
        from cdfsl.engine.reproducibility import set_cublas_workspace

        set_cublas_workspace()
    base = load_config_file(config_file) if config_file is not None else None
    given = typed_options(ctx)
    if json_path is not None:
        store = db if base is None or "db" in given else Path(base.db)
        check_output_file(json_path, "--json", store=store)
    sink = None
    if tensorboard is not None:
        from cdfsl.engine.tensorboard import TensorBoardSink

        check_output_folder(tensorboard, "--tensorboard")
        sink = TensorBoardSink(tensorboard)
    spec = spec_from_options(
        ctx.params, set_ or [], base=base, typed=given, episode_batch=episode_batch, required=("dataset", "method"),
        refuse_zero_iterations=True,
    )  # fmt: skip
    config = spec.config
    result = run_with_progress(spec, Runner(eval_batch=eval_batch), on_stored=sink)
    trained = result.trained_episodes
    resumed = len(result.per_episode) - trained
    done = "trained" if spec.trains else "evaluated"  # zero-shot trains nothing
    if config.protocol == "all-way":
        out.print(_all_way_line(result, done), highlight=False)
    else:
        out.print(
            f"{config.method} ({result.config.recipe}) on {config.dataset} ({_episode_kind(config)}, "
            f"{len(result.per_episode)} "
            f"episodes): [bold]{result.mean_acc:.2f} ± {result.ci95:.2f}%[/bold]  "
            f"(run {result.run_id}; {trained} {done}, {resumed} from {config.db})",
            highlight=False,
        )
    if json_path is not None:
        json_path.write_text(json.dumps(result.to_json(), indent=2))


def _episode_kind(config: RunConfig) -> str:
    """`N-way K-shot` for fixed-way episodes, else the protocol's own words (`variable-way variable-shot`)."""
    from cdfsl.data.protocols import FIXED_WAY, EpisodeSettings, get_protocol

    protocol = config.episode_protocol
    if protocol == FIXED_WAY:
        return f"{config.ways}-way {config.shots}-shot"
    return get_protocol(protocol).column(EpisodeSettings(config.ways, config.shots, config.queries))


def _all_way_line(result: Any, done: str) -> str:
    """The summary line of an all-way run (`result`: a `RunResult`): its one fit's accuracy on the test split."""
    config = result.config
    where = f"{done} now" if result.trained_episodes else f"from {config.db}"
    return (
        f"{config.method} ({config.recipe}) on {config.dataset} (all-way {config.shots}-shot, seed {config.seed}, "
        f"{result.classes} classes, {result.test_images} test images): [bold]{result.mean_acc:.2f}%[/bold]  "
        f"(run {result.run_id}; {where})"
    )


@user_errors
def demo_command(
    episodes: Annotated[int, typer.Option(help="Episodes per method.")] = 24,
    iterations: Annotated[
        int,
        typer.Option(
            help="Training iterations of a 250-iteration recipe; other recipes get the same share of theirs "
            "(tir-release: 100 → 16 at the default 40)."
        ),
    ] = 40,
    shots: Annotated[int, typer.Option(help="Support images per class.")] = 5,
    episode_batch: Annotated[int, typer.Option(help="Episodes trained at once.")] = 8,
    lr: Annotated[float | None, typer.Option(help="LoRA learning rate (default: each method's recipe).")] = None,
    db: Annotated[Path, typer.Option(help="SQLite result store.")] = Path("demo.sqlite"),
) -> None:
    """The main job on the embedded default: the tiny CLIP on digits, every method, a results table."""
    from cdfsl.backbone.tiny import CHECKPOINT_PATH
    from cdfsl.engine.runner import Runner

    if iterations < 1:
        raise ConfigError(f"--iterations must be at least 1 (a demo of trained methods), got {iterations}")
    pretrained = "openai"
    if not CHECKPOINT_PATH.is_file():
        console.print("[yellow]warning:[/yellow] the tiny model's weights are not installed; using random weights")
        pretrained = "none"
    runner = Runner()
    share = iterations / DEMO_FULL_ITERATIONS
    title = f"digits, tiny CLIP, 5-way {shots}-shot, {episodes} episodes, {share:.0%} of each recipe's iterations"
    table = Table(title=title)
    for column in ("method", "recipe", "iterations", "accuracy (%)", "95% CI", "s / episode"):
        table.add_column(column, justify="left" if column in ("method", "recipe") else "right", no_wrap=True)
    for method in DEMO_METHODS:
        default = RunConfig(dataset="digits", method=method, shots=shots).resolved()  # the recipe's iterations
        recipe_iterations = default.train.iterations or DEMO_FULL_ITERATIONS
        options = {
            "dataset": "digits", "method": method, "backbone": "tiny", "pretrained": pretrained, "shots": shots,
            "episodes": episodes, "db": str(db), "iterations": max(1, round(recipe_iterations * share)), "lr": lr,
        }  # fmt: skip
        result = run_with_progress(spec_from_options(options, episode_batch=str(episode_batch)), runner)
        seconds = result.seconds / max(result.trained_episodes, 1)
        resolved = result.config
        trained = resolved.trains
        table.add_row(  # zero-shot's recipe is shown as run, report and methods show it: it is part of the run
            method, resolved.recipe, str(resolved.train.iterations) if trained else "–",
            f"{result.mean_acc:.2f}", f"± {result.ci95:.2f}", f"{seconds:.2f}",
        )  # fmt: skip
    out.print(table)
