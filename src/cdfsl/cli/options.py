"""The options commands share and the one way they become a run config (`config_from_options`)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from cdfsl.config import DATASETS, RunConfig, apply_override, read_data_file
from cdfsl.errors import ConfigError
from cdfsl.spec import RunSpec

# Options several commands share: one definition, one default.
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

# Options that set a config field, by parameter name: (config key, how the option's value is stored). A command
# passes those it has; `iterations` and `lr` left unset (None) keep the recipe's value.
CONFIG_OPTIONS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "dataset": ("dataset", str),
    "data_root": ("data_root", lambda v: str(v) if v else None),
    "method": ("method", str),
    "recipe": ("recipe", lambda v: v),
    "protocol": ("protocol", str),
    "ways": ("ways", int),
    "shots": ("shots", int),
    "queries": ("queries", int),
    "episodes": ("episodes", lambda v: v),
    "seed": ("seed", int),
    "backbone": ("backbone", str),
    "pretrained": ("pretrained", str),
    "tokenizer": ("tokenizer", lambda v: str(v) if v else None),
    "device": ("device", str),
    "deterministic": ("deterministic", bool),
    "db": ("db", str),
    "run_name": ("run_name", lambda v: v),
    "cache_dir": ("cache_dir", lambda v: str(v) if v else None),
    "iterations": ("train.iterations", lambda v: v),
    "lr": ("train.lr", lambda v: v),
}
_RECIPE_WHEN_UNSET = ("iterations", "lr")


def config_from_options(
    options: Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    base: RunConfig | None = None,
    typed: Collection[str] = (),
    episode_batch: str | None = None,
    required: Collection[str] = (),
    refuse_zero_iterations: bool = False,
) -> RunConfig:
    """The `RunConfig` a command's options describe, validated once: every command that builds a config builds it
    here (`spec_from_options` for the command that hands it on as a `RunSpec`, so it is not validated again).

    `options` maps parameter names to values; those named in `CONFIG_OPTIONS` set their field (others are ignored).
    The config starts from `base` (a `--config` file) or the defaults; with a `base`, only the options in `typed`
    (those typed on the command line) override it. Then every `--set key=value` of `overrides`, in order. An option of
    `required` left unset (None) is refused. `episode_batch` is `--episode-batch` (an integer, or `auto`: found
    after validation, by trial fits of this config); giving it with `--set episode_batch` is refused.
    With `refuse_zero_iterations` (a run that is stored), a trained method with zero iterations is refused.
    """
    config = _options_config(options, overrides, base, typed, episode_batch, required)
    resolved = config.validated()
    _refuse_zero_iterations(resolved, refuse_zero_iterations)
    if episode_batch == "auto":  # trial fits of the validated config; the batch found is valid by construction
        config.episode_batch = parse_episode_batch(episode_batch, config)
    return config


def spec_from_options(
    options: Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    base: RunConfig | None = None,
    typed: Collection[str] = (),
    episode_batch: str | None = None,
    required: Collection[str] = (),
    refuse_zero_iterations: bool = False,
) -> RunSpec:
    """The run spec of `config_from_options`'s config (same arguments): validated and resolved once, its method
    parsed once, for a command that runs it (`Runner.run` takes the spec as it is)."""
    spec = RunSpec.of(_options_config(options, overrides, base, typed, episode_batch, required))
    _refuse_zero_iterations(spec.config, refuse_zero_iterations)
    if episode_batch == "auto":  # trial fits of the validated config; the batch found is valid by construction
        spec = spec.replaced(episode_batch=parse_episode_batch(episode_batch, spec.config))
    return spec


def _options_config(
    options: Mapping[str, Any],
    overrides: Sequence[str],
    base: RunConfig | None,
    typed: Collection[str],
    episode_batch: str | None,
    required: Collection[str],
) -> RunConfig:
    """The config the options describe, not validated yet."""
    config = copy.deepcopy(base) if base is not None else RunConfig()
    for name, value in options.items():
        if name not in CONFIG_OPTIONS or (base is not None and name not in typed):
            continue
        if value is None and name in required:
            raise ConfigError(f"--{name.replace('_', '-')} is required (or a --config file that sets {name})")
        if value is None and name in _RECIPE_WHEN_UNSET:
            continue
        key, convert = CONFIG_OPTIONS[name]
        section, _, field = key.rpartition(".")
        setattr(getattr(config, section) if section else config, field, convert(value))
    for assignment in overrides:
        apply_override(config, assignment)
    config.select_protocol({*typed, *(a.split("=", 1)[0].strip() for a in overrides)})  # md-*: fixed-shape variant
    set_batch = [a for a in overrides if a.split("=", 1)[0].strip() == "episode_batch"]
    if episode_batch is not None and set_batch:
        raise ConfigError(
            f"--episode-batch {episode_batch} and --set {set_batch[-1].strip()} both set the episode batch; "
            "give only one of them"
        )
    if episode_batch is not None and episode_batch != "auto":
        config.episode_batch = parse_episode_batch(episode_batch, config)
    return config


def _refuse_zero_iterations(resolved: RunConfig, refuse: bool) -> None:
    # a recipe never trains for zero iterations: only a value the user set can be 0, so the field is read as given
    if refuse and resolved.train.iterations == 0 and resolved.trains:
        raise ConfigError(
            f"train.iterations=0 (--iterations 0) trains nothing: method {resolved.method} would be stored with "
            "zero-shot's accuracy as if trained; give 1 or more iterations, or run --method zeroshot"
        )


def typed_options(ctx: typer.Context) -> set[str]:
    """The options of the command being run that were given on the command line (not defaults)."""
    typed = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name == "COMMANDLINE":
            typed.add(name)
    return typed


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
