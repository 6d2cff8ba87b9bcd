"""The `cdfsl` command line: parses options, builds configs, calls the API, owns the terminal.

User mistakes (`CdfslError`) print one line and exit 2; anything else is a bug and exits 1 with its traceback.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from cdfsl.config import DATASETS, METHODS, RunConfig, apply_override, read_data_file
from cdfsl.errors import CdfslError, ConfigError
from cdfsl.files import same_file
from cdfsl.recipes import RECIPES

try:  # typer 0.2x carries its own copy of click; older releases use click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors  # type: ignore[no-redef]

if TYPE_CHECKING:
    from cdfsl.data.index import ImageIndex

INTERRUPTED = "interrupted; nothing more was done (a run's stored episodes are kept: the same command resumes it)"


class CdfslGroup(TyperGroup):
    """The root `cdfsl` group. A parse error anywhere below it (an unknown option or command, a value of the wrong
    type, a missing option) is one `error:` line and exit 2, like every other refusal, instead of click's usage box;
    Ctrl-C says that finished episodes are kept. Every help text is printed as written: typer reads help as rich
    markup, which would swallow a `[word]` such as `cdfsl[tensorboard]`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _escape_help(self)

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _one_line_usage_errors():
            try:
                return super().invoke(ctx)
            except KeyboardInterrupt:
                console.print(INTERRUPTED)
                raise typer.Exit(130) from None


def _escape_help(command: Any) -> None:
    """Escape the rich markup in the help texts of `command`, its parameters and every command below it."""
    for holder in (command, *command.params):
        for field in ("help", "short_help", "epilog"):
            text = getattr(holder, field, None)
            if isinstance(text, str):
                setattr(holder, field, escape(text))
    for sub in getattr(command, "commands", {}).values():
        _escape_help(sub)


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except click_errors.ClickException as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # a group called alone: its help is the answer
            raise
        console.print(f"[red]error:[/red] {escape(shown(usage_error_line(error)))}", highlight=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None


def usage_error_line(error: Any) -> str:
    """A click parse error (unknown option or command, bad or missing value) as one line that says what to do: the
    rejected value, when click's message does not quote it, and the command whose `--help` lists the options."""
    message = " ".join(error.format_message().split()).rstrip(".")
    # typer checks values with pydantic, whose message ("Input should be a valid integer") omits the value
    errors = getattr(error.__cause__, "errors", None)
    items = errors() if callable(errors) else []
    given = repr(str(items[0]["input"])) if items and "input" in items[0] else None
    if given is not None and given not in message:
        message += f" (got {given})"
    ctx = getattr(error, "ctx", None)
    if ctx is not None:
        message += f" (see `{ctx.command_path} --help`)"
    return message[:1].lower() + message[1:]


app = typer.Typer(
    help="Source-free cross-domain few-shot learning with CLIP: a base (zeroshot, lora, coop, coop+lora, maple) with "
    "plug-ins (tir, vtt) on a dataset's episodes; `cdfsl methods` lists them.",
    name="cdfsl",
    cls=CdfslGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
datasets_app = typer.Typer(help="Inspect dataset layouts.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
diagnose_app = typer.Typer(help="Probes behind TIR and VtT: attention sink, lost layers, CKA.", no_args_is_help=True)
app.add_typer(diagnose_app, name="diagnose")
sweep_app = typer.Typer(
    help="A grid of runs from one TOML file: plan, run (locally or on Ray), status.", no_args_is_help=True
)
app.add_typer(sweep_app, name="sweep")
console = Console(stderr=True)
out = Console()

F = TypeVar("F", bound=Callable[..., Any])
DEMO_METHODS = ("zeroshot", "lora", "tir", "vtt")
MethodOption = Annotated[
    str, typer.Option(help="A base and plug-ins, e.g. lora, coop+lora+tir, maple, lora+vtt; see `cdfsl methods`.")
]
DEMO_FULL_ITERATIONS = 250  # `demo --iterations` is given for a recipe of this many iterations


def shown(text: object) -> str:
    r"""`text` as valid UTF-8 for the terminal: a name that is not valid UTF-8 (surrogate-escaped by the filesystem
    layer) keeps its undecodable bytes as `\udcff`-style escapes instead of crashing the print."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def counted(number: int, noun: str) -> str:
    """`1 figure`, `2 figures`."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def plain(text: object) -> Text:
    """A table cell or message part with user-supplied text: printable (`shown`) and never read as rich markup."""
    return Text(shown(text))


def user_errors(function: F) -> F:
    """Turn `CdfslError` into a one-line message and exit code 2; show warnings as one line each."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        def show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
            text = escape(shown(message))
            console.print(f"[yellow]warning:[/yellow] {text}", highlight=False, soft_wrap=True)

        warnings.showwarning = show  # type: ignore[assignment]
        try:
            return function(*args, **kwargs)
        except CdfslError as error:
            console.print(f"[red]error:[/red] {escape(shown(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def check_output_file(path: Path, option: str, store: Path | None = None) -> None:
    """Refuse, before any work, a file output that could not be written afterwards.

    The parent folder must exist (it is never created) and be writable, `path` must not be a folder, and it must
    not be the result store `store`; an existing file is overwritten.
    """
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file path (an existing file is overwritten)")
    _check_parent(path, option)
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{option} {path} is not writable; change its permissions or choose another path")
    if store is not None and same_file(path, store):
        raise ConfigError(f"{option} {path} is the result store (--db); choose another path")


def check_output_folder(path: Path, option: str) -> None:
    """Refuse, before any work, a folder output that could not be written afterwards.

    `path` must be a folder or not exist; when it does not exist its parent must be an existing, writable folder
    (the output folder itself is created, deeper trees are not).
    """
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{option} {path} is a file, not a folder; remove it or choose another folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{option} folder {path} is not writable; change its permissions or choose another")
        return
    _check_parent(path, option)


def _check_parent(path: Path, option: str) -> None:
    parent = path.parent
    if not parent.exists():
        raise ConfigError(f"{option} {path}: folder {parent} does not exist; create it or choose another path")
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: {parent} is a file, not a folder; choose another path")
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: folder {parent} is not writable; choose another path")


# `run` options that set a config field, by parameter name: (config key, how the option's value is stored).
RUN_OPTIONS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "dataset": ("dataset", str),
    "data_root": ("data_root", lambda v: str(v) if v else None),
    "method": ("method", str),
    "recipe": ("recipe", lambda v: v),
    "ways": ("ways", int),
    "shots": ("shots", int),
    "queries": ("queries", int),
    "episodes": ("episodes", lambda v: v),
    "seed": ("seed", int),
    "backbone": ("backbone", str),
    "pretrained": ("pretrained", str),
    "tokenizer": ("tokenizer", lambda v: str(v) if v else None),
    "device": ("device", str),
    "db": ("db", str),
    "run_name": ("run_name", lambda v: v),
    "cache_dir": ("cache_dir", lambda v: str(v) if v else None),
    "iterations": ("train.iterations", lambda v: v),
}


def build_config(
    options: dict[str, Any],
    overrides: list[str],
    episode_batch: str | None = None,
    base: RunConfig | None = None,
    given: set[str] | None = None,
) -> RunConfig:
    """The `RunConfig` the `run` options describe: `base` (a `--config` file) or the defaults, then the options
    (with a `base`, only those in `given`, the ones typed on the command line), then `--set`.

    The episode batch comes from `--episode-batch` when given (an integer or `auto`), else from `--set
    episode_batch=N` or the file, else 1; giving both `--episode-batch` and `--set episode_batch` is refused.
    """
    config = copy.deepcopy(base) if base is not None else RunConfig()
    for name, (key, convert) in RUN_OPTIONS.items():
        value = options.get(name)
        if base is not None and name not in (given or set()):
            continue
        if value is None and name in ("dataset", "method"):
            raise ConfigError(f"--{name} is required (or a --config file that sets {name})")
        if value is None and name == "iterations":
            continue
        section, _, field = key.rpartition(".")
        setattr(getattr(config, section) if section else config, field, convert(value))
    for assignment in overrides:
        apply_override(config, assignment)
    set_batch = [a for a in overrides if a.split("=", 1)[0].strip() == "episode_batch"]
    if episode_batch is not None and set_batch:
        raise ConfigError(
            f"--episode-batch {episode_batch} and --set {set_batch[-1].strip()} both set the episode batch; "
            "give only one of them"
        )
    config.validate()  # before `auto`, which runs trial fits of this config
    if config.trains and config.resolved().train.iterations == 0:
        raise ConfigError(
            f"train.iterations=0 (--iterations 0) trains nothing: method {config.method} would be stored with "
            "zero-shot's accuracy as if trained; give 1 or more iterations, or run --method zeroshot"
        )
    if episode_batch is not None:
        config.episode_batch = parse_episode_batch(episode_batch, config)
    return config.validate()


def _typed(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` was given on the command line (not a default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def load_config_file(path: Path) -> RunConfig:
    """A `RunConfig` from a TOML or JSON file: the config's keys (sections as tables), or a `cdfsl run --json`
    summary, whose `config` reproduces the run."""
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    if path.suffix not in (".toml", ".json"):
        raise ConfigError(f"--config {path}: give a .toml or .json file")
    data = read_data_file(path, f"--config {path}", path.suffix[1:])
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "run_id" in data:
        data = data["config"]  # a --json summary
    return RunConfig.from_dict(data, source=f"--config {path}")


def parse_episode_batch(value: str, config: RunConfig) -> int:
    """An integer, or `auto`: the largest batch the device's free memory allows (see `engine.autobatch`)."""
    if value == "auto":
        from cdfsl.engine.autobatch import auto_episode_batch

        return auto_episode_batch(config)
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--episode-batch expects a positive integer or 'auto', got {value!r}") from None


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


def run_with_progress(config: RunConfig, runner: Any = None, on_stored: Any = None) -> Any:
    """Run `config` with a live bar: episodes done, running mean ± 95% interval, elapsed and ETA; `on_stored` as
    `Runner`'s."""
    from cdfsl.engine.runner import Runner

    interrupted: KeyboardInterrupt | None = None
    with progress_bar() as bar:
        task = bar.add_task(f"{config.method} · {config.dataset}", total=config.resolved_episodes(), accuracy="")

        def update(p: Any) -> None:
            bar.update(task, completed=p.done, accuracy=f"{p.mean:.2f} ± {p.ci95:.2f}%")

        def waiting(holders: Any) -> None:
            bar.console.print(waiting_line(holders), markup=False, highlight=False, soft_wrap=True)

        runner = runner or Runner()
        runner.progress = update
        runner.on_stored = on_stored
        runner.on_wait = waiting
        try:
            result = runner.run(config)
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


# Options `run` and the `diagnose` commands share: one definition, one default.
DatasetOption = Annotated[str | None, typer.Option(help=f"One of: {', '.join(DATASETS)}.")]
DataRootOption = Annotated[Path | None, typer.Option(help="Dataset folder (not needed for digits).")]
BackboneOption = Annotated[str, typer.Option(help="open_clip model name, or 'tiny' for the embedded model.")]
PretrainedOption = Annotated[str, typer.Option(help="Weights: a tag (openai, ...), a checkpoint PATH, or none.")]
TokenizerOption = Annotated[
    Path | None,
    typer.Option(help="A local Hugging Face tokenizer folder (SigLIP2 offline); default: the backbone's own."),
]
ShotsOption = Annotated[int, typer.Option(help="Support images per class.")]
IterationsOption = Annotated[
    int | None, typer.Option(help="Training iterations per episode (default: the recipe's, 250 or 100).")
]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="key=value for any config field.")]
DEFAULT_BACKBONE, DEFAULT_PRETRAINED, DEFAULT_SHOTS = "ViT-B-16", "openai", 1


@app.command("run")
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
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
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
    """Run a method on a dataset's episodes; finished episodes are stored and skipped on re-runs."""
    base = load_config_file(config_file) if config_file is not None else None
    given = {name for name in ctx.params if _typed(ctx, name)}
    if json_path is not None:
        store = db if base is None or "db" in given else Path(base.db)
        check_output_file(json_path, "--json", store=store)
    sink = None
    if tensorboard is not None:
        from cdfsl.engine.tensorboard import TensorBoardSink

        check_output_folder(tensorboard, "--tensorboard")
        sink = TensorBoardSink(tensorboard)
    options = {name: value for name, value in ctx.params.items() if name in RUN_OPTIONS}
    config = build_config(options, set_ or [], episode_batch, base, given)
    result = run_with_progress(config, on_stored=sink)
    trained = result.trained_episodes
    resumed = len(result.per_episode) - trained
    done = "trained" if result.config.trains else "evaluated"  # zero-shot trains nothing
    out.print(
        f"{config.method} ({result.config.recipe}) on {config.dataset} ({config.ways}-way {config.shots}-shot, "
        f"{len(result.per_episode)} "
        f"episodes): [bold]{result.mean_acc:.2f} ± {result.ci95:.2f}%[/bold]  "
        f"(run {result.run_id}; {trained} {done}, {resumed} from {config.db})",
        highlight=False,
    )
    if json_path is not None:
        json_path.write_text(json.dumps(result.to_json(), indent=2))


@app.command("demo")
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
        config = RunConfig(
            dataset="digits", method=method, backbone="tiny", pretrained=pretrained, shots=shots,
            episodes=episodes, episode_batch=episode_batch, db=str(db),
        )  # fmt: skip
        recipe_iterations = config.resolved().train.iterations or DEMO_FULL_ITERATIONS
        config.train.iterations = max(1, round(recipe_iterations * share))
        config.train.lr = lr
        result = run_with_progress(config.validate(), runner)
        seconds = result.seconds / max(result.trained_episodes, 1)
        resolved = result.config
        trained = resolved.trains
        table.add_row(  # zero-shot's recipe is shown as run, report and methods show it: it is part of the run
            method, resolved.recipe, str(resolved.train.iterations) if trained else "–",
            f"{result.mean_acc:.2f}", f"± {result.ci95:.2f}", f"{seconds:.2f}",
        )  # fmt: skip
    out.print(table)


@app.command("report")
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
) -> None:
    """One row per (method, backbone), one column per (dataset, shots): mean ± 95% interval; paired tests. With
    --per-class or --curves: per-class accuracy and confusion matrices, or training curves, per run.

    Reads the store only: it is opened read-only and never changed.
    """
    from cdfsl.analysis.report import FORMATS, build_report, render, rich_table
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
    if per_class or curves:
        _run_detail_report("per-class" if per_class else "curves", db, format_, run, output, plot)
        return
    with ResultStore(db, read_only=True) as store:
        report = build_report(store, paired=paired, with_paper_results=with_paper_results)
    if format_ == "table" and output is None:
        out.print(rich_table(report))
    else:
        text = render(report, format_)
        if output is not None:
            output.write_text(text + "\n")
        else:
            out.print(text, markup=False, highlight=False, soft_wrap=True)
    if plot is not None:
        from cdfsl.analysis.plots import plot_report

        written = plot_report(report, plot)
        console.print(f"wrote {counted(len(written), 'figure')} to {plot}")


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


@app.command("compare")
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

    from cdfsl.analysis.compare import compare_runs
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
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2))


ListingFormat = Annotated[str, typer.Option("--format", help="table, or json for scripts.")]


def check_listing_format(format_: str) -> None:
    if format_ not in ("table", "json"):
        raise ConfigError(f"--format must be table or json, not {format_!r}")


def print_json(data: Any) -> None:
    out.print(json.dumps(data, indent=2), markup=False, highlight=False, soft_wrap=True)


def print_listing(table: Table) -> None:
    """Print a listing without breaking a word: a `no_wrap` column (names) is never wrapped, the others wrap between
    words only. The table takes the console's width, or more when its names and longest words need it (stdout to a
    pipe gets 80 columns, and a script greps for a whole model name)."""
    columns = table.columns
    lowest, highest = [], []
    for column in columns:
        texts = [str(cell) for cell in (column.header, *column.cells)]
        longest = max(cell_len(text) for text in texts)
        lowest.append(longest if column.no_wrap else max(cell_len(w) for text in texts for w in text.split() or [""]))
        highest.append(longest)
    frame = 3 * len(columns) + 1  # a space each side of a cell, a rule after it, and the left edge
    width = max(out.width, sum(lowest) + frame)
    widths, spare = list(lowest), width - sum(lowest) - frame
    # share the spare width out evenly, a column that needs less than its share taking just what it needs
    pending = sorted(range(len(columns)), key=lambda i: highest[i] - lowest[i])
    while pending:
        share = spare // len(pending)
        need = highest[pending[0]] - lowest[pending[0]]
        if need > share:
            for i in pending:
                widths[i] += share
            break
        widths[pending.pop(0)] += need
        spare -= need
    for column, column_width in zip(columns, widths, strict=True):
        column.width = column_width
    Console(width=width).print(table)  # `out.print(width=)` would not go beyond the console's width


@app.command("methods")
@user_errors
def methods_command(format_: ListingFormat = "table") -> None:
    """Every method name: its base, plug-ins, default recipe and one line on what it does (docs/methods.md)."""
    from cdfsl.registry import BASES, PLUGINS, default_recipe, describe, parse_method

    check_listing_format(format_)
    methods = []
    for name in METHODS:
        recipe = default_recipe(name)
        spec = parse_method(name, recipe)
        methods.append({
            "method": name, "base": spec.base.name, "plugins": [p.name for p in spec.plugins], "recipe": recipe,
            "description": describe(name),
        })  # fmt: skip
    bases = [{"name": base.name, "trains": base.trains, "source": base.source} for base in BASES.values()]
    plugins = [{"name": p.name, "section": p.section, "source": p.source} for p in PLUGINS.values()]
    if format_ == "json":
        print_json({"methods": methods, "bases": bases, "plugins": plugins})
        return
    table = Table(title="methods: a base, then plug-ins joined by + (e.g. coop+lora+tir)", title_justify="left")
    for column in ("method", "base", "plug-ins", "recipe", "what it does"):
        table.add_column(column, no_wrap=column != "what it does")
    for method in methods:
        plugin_names = ", ".join(method["plugins"]) or "–"
        table.add_row(method["method"], method["base"], plugin_names, method["recipe"], method["description"])
    print_listing(table)
    sources = Table(title="sources", title_justify="left")
    for column in ("name", "trains", "source"):
        sources.add_column(column, no_wrap=column == "name")
    for base in bases:
        sources.add_row(base["name"], base["trains"], base["source"])
    for plugin in plugins:
        sources.add_row(plugin["name"], f"plug-in (config section {plugin['section']})", plugin["source"])
    print_listing(sources)


@app.command("recipes")
@user_errors
def recipes_command(
    recipe: Annotated[str | None, typer.Option(help=f"Show only this recipe: {', '.join(RECIPES)}.")] = None,
    dataset: Annotated[str, typer.Option(help="Resolve dataset-dependent values for this dataset.")] = "eurosat",
    shots: Annotated[int, typer.Option(help="Resolve shot-dependent values for this many shots.")] = 5,
    format_: ListingFormat = "table",
) -> None:
    """Every recipe's values with the source of each (paper section or release file); docs/recipes.md explains."""
    from cdfsl.registry import BASES, DEFAULT_BASE, RECIPE_BASE, default_recipe

    check_listing_format(format_)
    if recipe is not None and recipe not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}; got {recipe!r}")
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")
    listed = []
    for spec in RECIPES.values():
        if recipe is not None and spec.name != recipe:
            continue
        defaults = [m for m in METHODS if default_recipe(m) == spec.name]
        # the base a plug-in alone (`tir`, `vtt`) runs on under this recipe: the values a base decides (`lora` has no
        # learned context) would otherwise hide the recipe's own (tir-release's context on its coop+lora base)
        base = BASES[RECIPE_BASE.get(spec.name, DEFAULT_BASE)].name
        example = RunConfig(dataset=dataset, data_root=".", shots=shots, method=base, recipe=spec.name).resolved()
        values = []
        for value in spec.values:
            section, _, name = value.key.rpartition(".")
            resolved = getattr(getattr(example, section) if section else example, name)
            values.append({"key": value.key, "value": resolved, "rule": value.rule, "source": value.source})
        listed.append({
            "name": spec.name, "summary": spec.summary, "default_for": defaults, "base": base, "dataset": dataset,
            "shots": shots, "values": values,
        })  # fmt: skip
        if format_ == "json":
            continue
        table = Table(
            title=f"{spec.name}: {spec.summary}\n(default for: {', '.join(defaults) or 'no method'}; values on the "
            f"{base} base)",
            title_justify="left",
        )
        table.add_column("key", no_wrap=True)
        table.add_column(f"value ({dataset}, {shots}-shot, {base} base)")
        table.add_column("source")
        for item in values:
            resolved = item["value"]
            text = ",".join(map(str, resolved)) if isinstance(resolved, tuple) else repr(resolved)
            table.add_row(item["key"], f"{text} ({item['rule']})" if item["rule"] else text, item["source"])
        print_listing(table)
    if format_ == "json":
        print_json(listed)


@app.command("cost")
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

    config = RunConfig(
        method=method, recipe=recipe, backbone=backbone, pretrained=pretrained, ways=ways, shots=shots, device=device
    )
    for assignment in set_ or []:
        apply_override(config, assignment)
    config.validate()
    with console.status(f"counting one training step of {method} on {backbone} …"):
        result = training_cost(config)
    out.print(cost_header(result), highlight=False)
    out.print(parameter_table(result))
    out.print(flop_table(result))
    for note in cost_notes(result):
        out.print(note, highlight=False)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2))


@app.command("pretrain-tiny")
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


@datasets_app.command("check")
@user_errors
def datasets_check(
    dataset: Annotated[str, typer.Option(help=f"One of: {', '.join(DATASETS)}.")],
    data_root: Annotated[Path | None, typer.Option(help="Dataset folder (not needed for digits).")] = None,
    deep: Annotated[
        bool,
        typer.Option(
            "--deep",
            help="Also decode every image and list those that do not decode (truncated, corrupt), so a run never "
            "stops half-way on one. Exits 1 when any image does not decode (their count is printed), for scripts.",
        ),
    ] = False,
) -> None:
    """Validate a dataset layout and print its classes, prompt names and image counts."""
    from cdfsl.data.readers import load_index

    if dataset not in DATASETS:
        raise ConfigError(f"--dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")
    index = load_index(dataset, data_root)
    table = Table(title=f"{dataset}: {len(index.items)} images, {index.num_classes} classes")
    table.add_column("label", justify="right")
    table.add_column("class")
    table.add_column("prompt name")
    table.add_column("images", justify="right")
    for label, (key, name, count) in enumerate(zip(index.class_keys, index.class_names, index.counts(), strict=True)):
        table.add_row(str(label), plain(key), plain(name), str(count))
    out.print(table)
    if index.skipped:
        out.print(f"{len(index.skipped)} files skipped (unreadable or outside the data root)")
    out.print(f"fingerprint {index.fingerprint()}")
    if deep and deep_check_report(index):
        raise typer.Exit(1)


def deep_check_report(index: ImageIndex) -> int:
    """Decode every image of `index`; print the ones that fail (key, reason) and which files to remove. Returns how
    many fail."""
    from cdfsl.data.readers import deep_check

    total = len(index.items)
    with console.status(f"decoding {total} images …"):
        failures = deep_check(index)
    if not failures:
        out.print(f"deep check: all {total} images decode")
        return 0
    table = Table(title=f"deep check: {len(failures)} of {total} images do not decode", title_justify="left")
    table.add_column("key", overflow="fold")
    table.add_column("reason")
    for key, reason in failures:
        table.add_row(plain(key), plain(reason))
    out.print(table)
    where = f" (keys are relative to {shown(index.root)})" if index.root is not None else ""
    message = (
        f"{len(failures)} of {total} images failed to decode: remove (or replace) the files listed above{where}, "
        "then run `cdfsl datasets check --deep` again"
    )
    out.print(plain(message), soft_wrap=True)
    return len(failures)


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
    config = RunConfig(
        dataset=dataset, data_root=str(data_root) if data_root else None, method=method, backbone=backbone,
        pretrained=pretrained, shots=shots, tokenizer=str(tokenizer) if tokenizer else None,
    )  # fmt: skip
    if iterations is not None:
        config.train.iterations = iterations
    for assignment in overrides or []:
        apply_override(config, assignment)
    return config.validate()


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

    config = probe_config(
        dataset, data_root, backbone, pretrained, shots, iterations, set_, method, tokenizer=tokenizer
    )
    other = None
    if other_dataset is not None:
        config.method = "zeroshot"
        other = probe_config(
            other_dataset,
            other_data_root,
            backbone,
            pretrained,
            shots,
            iterations,
            set_,
            "zeroshot",
            tokenizer=tokenizer,
        )
    result = cka_probe(config, other, tuple(m.strip() for m in masks.split(",")), episodes, output)
    table = Table(title=f"linear CKA per vision layer (n = {result['n']})")
    table.add_column("mask")
    table.add_column("layers 0 … L-1", justify="left")
    for mask, values in result["cka"].items():
        table.add_row(mask, " ".join(f"{float(v):.2f}" for v in values))
    out.print(table)
    print_figures(result, output)


@app.command("fit")
@user_errors
def fit_command(
    data: Annotated[Path, typer.Option(help="Folder of class folders (an optional classnames.json names them).")],
    output: Annotated[Path, typer.Option("--out", help="Folder for the saved classifier (created).")],
    method: Annotated[str, typer.Option(help="Any method of `cdfsl methods`.")] = "lora",
    backbone: BackboneOption = DEFAULT_BACKBONE,
    pretrained: PretrainedOption = DEFAULT_PRETRAINED,
    tokenizer: TokenizerOption = None,
    recipe: Annotated[str | None, typer.Option(help="Training recipe (default: the method's).")] = None,
    shots: Annotated[
        int | None, typer.Option(help="Use K images per class, drawn by --seed (default: every image).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the drawn shots, the augmented views and training.")] = 0,
    iterations: IterationsOption = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    set_: SetOption = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the classifier already saved in --out (whole, at once).")
    ] = False,
) -> None:
    """Fit a few-shot classifier on your own labelled images and save it (see `cdfsl predict`, `cdfsl evaluate`)."""
    from cdfsl.classifier import FewShotClassifier, check_save_folder
    from cdfsl.files import refuse_overwriting

    check_output_folder(output, "--out")
    check_save_folder(output, overwrite)
    refuse_overwriting(output, "--out", folders=[data])
    if Path(os.path.realpath(data)).is_relative_to(os.path.realpath(output)):
        raise ConfigError(f"--out {output} holds the --data folder {data}; choose another folder for the classifier")
    settings = dict(_assignment(a) for a in set_ or [])
    if iterations is not None:
        settings["train.iterations"] = str(iterations)
    if tokenizer is not None:
        settings["tokenizer"] = str(tokenizer)
    classifier = FewShotClassifier(method, backbone, pretrained, recipe, device, seed, settings)
    bar = progress_bar()
    task: Any = None

    def advance(step: int, steps: int) -> None:
        nonlocal task
        if task is None:  # the bar appears with the first training step: a refusal before it prints alone
            bar.start()
            task = bar.add_task(f"fit {method}", total=steps, accuracy="")
        bar.update(task, completed=step, total=steps)

    try:
        classifier.fit(data, shots=shots, on_step=advance)
    finally:
        if task is not None:
            bar.stop()
    classifier.save(output, overwrite=overwrite)
    out.print(f"saved {method} on {len(classifier.classes_)} classes to {output}/", highlight=False)


def _assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    return key.strip(), value


@app.command("predict")
@user_errors
def predict_command(
    model: Annotated[Path, typer.Argument(help="A classifier saved by `cdfsl fit`.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders (every image below them).")],
    top_k: Annotated[int, typer.Option(help="Classes shown per image, most probable first.")] = 1,
    format_: Annotated[
        str | None,
        typer.Option(
            "--format", help="table, csv or json (default: table; with --out, json for a .json file, else csv)."
        ),
    ] = None,
    output: Annotated[Path | None, typer.Option("--out", help="Write the predictions to this file.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
) -> None:
    """Label new images with a saved classifier: the top-k classes and their probabilities. Unreadable images in a
    folder are named in a warning and left out; an unreadable image named on the command line is refused."""
    import numpy as np

    from cdfsl.classifier import FewShotClassifier
    from cdfsl.files import refuse_overwriting, write_text

    if format_ not in (None, "table", "csv", "json"):
        raise ConfigError(f"--format must be table, csv or json, not {format_!r}")
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    if output is not None:
        if format_ == "table":
            raise ConfigError("--format table is for the terminal; with --out choose --format csv or json")
        format_ = format_ or ("json" if output.suffix.lower() == ".json" else "csv")
        check_output_file(output, "--out")
        refuse_overwriting(output, "--out", folders=[model])
    paths = FewShotClassifier.image_paths(images)
    if output is not None:
        refuse_overwriting(output, "--out", inputs=paths)
    classifier = FewShotClassifier.load(model, device=device)
    probabilities = classifier.predict_proba(paths)
    rows = []
    for path, row in zip(paths, probabilities, strict=True):
        best = np.argsort(-row)[:top_k]
        rows.append({"image": str(path), "top": [(str(classifier.classes_[i]), float(row[i])) for i in best]})
    text = _predictions_text(rows, format_ or "table")
    if output is not None:
        write_text(output, text)
        console.print(f"wrote {len(rows)} predictions to {escape(shown(output))} as {format_}", highlight=False)
    elif format_ in (None, "table"):
        table = Table(title=f"{len(rows)} images", title_justify="left")
        table.add_column("image", overflow="fold")
        table.add_column("class (probability)")
        for row in rows:
            table.add_row(plain(row["image"]), ", ".join(f"{c} ({p:.3f})" for c, p in row["top"]))
        out.print(table)
    else:
        out.print(text, markup=False, highlight=False, soft_wrap=True, end="")


def _predictions_text(rows: list[dict[str, Any]], format_: str) -> str:
    if format_ == "json":
        return json.dumps(rows, indent=2) + "\n"
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "rank", "class", "probability"])
    for row in rows:
        writer.writerows([row["image"], r + 1, c, f"{p:.6f}"] for r, (c, p) in enumerate(row["top"]))
    return buffer.getvalue()


@app.command("evaluate")
@user_errors
def evaluate_command(
    model: Annotated[Path, typer.Argument(help="A classifier saved by `cdfsl fit`.")],
    data: Annotated[Path, typer.Option(help="Labelled test images: class folders named as at fit time.")],
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the numbers as JSON here.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
) -> None:
    """Accuracy, per-class accuracy and the confusion matrix of a saved classifier on a labelled folder (any of its
    classes, one or more; accuracies in percent)."""
    import numpy as np

    from cdfsl.classifier import FewShotClassifier
    from cdfsl.data.readers import read_imagefolder
    from cdfsl.files import refuse_overwriting, write_text

    if json_path is not None:
        check_output_file(json_path, "--json")
        refuse_overwriting(json_path, "--json", folders=[model])
    index = read_imagefolder(data, min_classes=1)
    assert index.root is not None
    paths = [index.root / key for key in index.items]
    if json_path is not None:
        refuse_overwriting(json_path, "--json", inputs=paths)
    classifier = FewShotClassifier.load(model, device=device)
    known = {str(c): i for i, c in enumerate(classifier.classes_)}
    unknown = [key for key in index.class_keys if key not in known]
    if unknown:
        raise ConfigError(
            f"{data} has class folder(s) {', '.join(unknown)} the classifier was not fitted on; it knows "
            f"{', '.join(known)}"
        )
    truth = np.array([known[index.class_keys[label]] for label in index.labels])
    predicted = classifier.predict_proba(paths).argmax(axis=1)
    k = len(classifier.classes_)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    correct = int(np.trace(confusion))
    per_class = [
        {"class": str(name), "images": int(confusion[i].sum()), "correct": int(confusion[i, i]),
         "accuracy": _percent(int(confusion[i, i]), int(confusion[i].sum()))}
        for i, name in enumerate(classifier.classes_)
    ]  # fmt: skip
    table = Table(title=f"{_percent(correct, len(truth)):.2f}% of {len(truth)} images correct", title_justify="left")
    for column in ("class", "images", "accuracy %", *(str(i + 1) for i in range(k))):
        table.add_column(column, justify="left" if column == "class" else "right", no_wrap=column == "class")
    for i, row in enumerate(per_class):
        share = "–" if row["accuracy"] is None else f"{row['accuracy']:.2f}"
        table.add_row(plain(f"{i + 1} {row['class']}"), str(row["images"]), share, *(str(int(n)) for n in confusion[i]))
    out.print(table)
    if json_path is not None:
        result = {
            "accuracy": _percent(correct, len(truth)), "correct": correct, "images": len(truth),
            "classes": [str(c) for c in classifier.classes_], "per_class": per_class, "confusion": confusion.tolist(),
        }  # fmt: skip
        write_text(json_path, json.dumps(result, indent=2) + "\n")


def _percent(part: int, whole: int) -> float | None:
    """`part` of `whole` in percent (None for no images)."""
    return None if whole == 0 else 100.0 * part / whole


@app.command("export")
@user_errors
def export_command(
    model: Annotated[Path, typer.Argument(help="A classifier saved by `cdfsl fit`.")],
    merged: Annotated[
        Path,
        typer.Option(
            help="Write the open_clip weights with LoRA merged here (.safetensors), and the class text features "
            "beside it (<stem>.classes.json)."
        ),
    ],
) -> None:
    """Export a saved classifier as plain open_clip weights plus class text features (`open_clip.create_model`
    loads them; the tiny and small test models need `import cdfsl` first)."""
    from cdfsl.classifier import FewShotClassifier
    from cdfsl.files import refuse_overwriting

    sidecar = merged.with_suffix(".classes.json")
    for path in (merged, sidecar):
        check_output_file(path, "--merged")
        refuse_overwriting(path, "--merged", folders=[model])
    weights, sidecar = FewShotClassifier.load(model, device="cpu").export_merged(merged)
    exported = json.loads(sidecar.read_text(encoding="utf-8"))
    name = exported["open_clip_model"]
    out.print(f"wrote {escape(shown(weights))} and {escape(shown(sidecar))}", highlight=False)
    if exported["needs_cdfsl"]:
        out.print(
            f"{name} is an architecture of cdfsl, not of open_clip: open_clip.create_model({name!r}, ...) works only "
            "after `import cdfsl` (exports of open_clip's own models, such as ViT-B-16, load with open_clip alone)",
            highlight=False,
        )


@app.command("backbones")
@user_errors
def backbones_command(
    all_: Annotated[bool, typer.Option("--all", help="Also list the models cdfsl cannot run yet, with why.")] = False,
    format_: ListingFormat = "table",
) -> None:
    """The open_clip models cdfsl runs (every method; the diagnostics each supports), their towers and weights."""
    import dataclasses

    from cdfsl.backbone.catalog import catalogue
    from cdfsl.registry import method_names

    check_listing_format(format_)
    entries = catalogue()
    supported = [e for e in entries if e.supported]
    if format_ == "json":
        print_json([dataclasses.asdict(e) for e in (entries if all_ else supported)])
        return
    table = Table(
        title=f"{len(supported)} of {len(entries)} open_clip models run in cdfsl, each with all "
        f"{len(method_names())} methods (`cdfsl methods`)",
        title_justify="left",
    )
    for column in ("name", "family", "vision", "text", "C", "VtT release fusion", "diagnostics", "pretrained tags"):
        table.add_column(column, no_wrap=column in ("name", "family"))
    for entry in supported:
        fusion = "yes" if entry.vtt_release_fusion else "no: ssm"
        row = [
            entry.name, entry.family, entry.vision, entry.text, str(entry.embed_dim), fusion,
            ", ".join(entry.diagnostics), ", ".join(entry.tags) or "–",
        ]  # fmt: skip
        table.add_row(*row)
    print_listing(table)
    if not all(entry.vtt_release_fusion for entry in supported):
        out.print("VtT on a model without the release fusion: --set vtt.fusion=ssm", highlight=False)
    others = [e for e in entries if not e.supported]
    if all_:
        rest = Table(title="not supported yet", title_justify="left")
        rest.add_column("name", no_wrap=True)
        rest.add_column("why")
        for entry in others:
            rest.add_row(entry.name, entry.reason)
        print_listing(rest)
    else:
        out.print(f"{len(others)} more (ResNets, ConvNeXt and EVA trunks, Hugging Face text towers): --all")


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
    gpus_per_task: Annotated[float, typer.Option(help="With ray: GPUs per task (0: CPU tasks).")] = 1.0,
    cpus_per_task: Annotated[float, typer.Option(help="With ray: CPUs per task.")] = 1.0,
) -> None:
    """Train every missing episode of the sweep's runs; finished episodes are stored and skipped on re-runs."""
    from cdfsl.engine.sweep import load_sweep, run_local, run_ray

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

    try:
        count = run_ray(sweep, address, gpus_per_task, cpus_per_task, on_stored=stored, on_wait=waiting)
    except KeyboardInterrupt as error:
        console.print(interrupted_line(error), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    out.print(f"stored {count} episodes; `cdfsl sweep status {file}` shows the results", highlight=False)


def show_version(value: bool) -> None:
    if value:
        from cdfsl import __version__

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


if __name__ == "__main__":
    main()
