"""Typed run configuration, recipes, and `--set key=value` overrides.

The CLI and the Python API build the same `RunConfig`. Every knob a spec names is a field here; `apply_override`
reaches any field by its dotted name (`tir.ratio`, `vtt.beta`, `lora.dropout`, `train.iterations`, `shots`).
Fields that a recipe decides (docs/recipes.md) default to `None`; `RunConfig.resolved()` fills them from the run's
recipe (`recipe`, or the method's default), and everything downstream runs on the resolved config.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from cdfsl.errors import ConfigError
from cdfsl.recipes import DEFAULT_RECIPE, RECIPES, Recipe

DATASETS = ("eurosat", "isic2018", "cropdiseases", "chestx", "imagefolder", "digits")
METHODS = ("zeroshot", "lora", "tir", "vtt", "tir+vtt")
TIR_VARIANTS = ("full", "inhibit", "enhance", "simplified")
VTT_FUSIONS = ("release", "ssm", "attention", "lstm", "gru", "none")
VTT_SCANS = ("deep_to_shallow", "shallow_to_deep", "bidirectional")
LORA_TOWERS = ("vision", "text", "both")
SCHEDULES = ("cosine", "none")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
ACTIVATIONS = ("auto", "gelu", "quickgelu")
ALL_SUPPORT = "all"


@dataclass
class LoraConfig:
    """LoRA on the attention projections of every block of one or both towers (docs/methods.md).

    The update is scaled by `alpha / sqrt(rank)` (2 for rank 16, alpha 8), as in the released LoRA layers.
    """

    rank: int = 16
    alpha: float = 8.0
    dropout: float = 0.25
    targets: tuple[str, ...] = ("q", "k", "v")
    towers: str | None = None  # vision, text or both; None: the recipe's
    merge_for_prediction: bool = True


@dataclass
class PromptConfig:
    """A CoOp-style learnable prompt context shared by an episode's classes (recipe tir-release).

    `context` holds the words whose token embeddings initialise the context vectors; the class prompt is
    `"{context} {class name}."`. An empty string means no learned context: the fixed `train.template` is used.
    """

    context: str | None = None  # None: the recipe's ("" or "a photo of a")
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass
class AugmentConfig:
    """Support views, one per entry: `plain` or `+`-joined `rotate`, `jitter`, `flip` (the benchmark's five views,
    docs/protocol.md)."""

    views: tuple[str, ...] = ("plain", "rotate+jitter+flip", "rotate", "jitter", "flip")
    rotation: float = 45.0
    jitter: float = 0.4
    flip_p: float = 0.5


@dataclass
class TrainConfig:
    """The shared training loop of every trained method; `None` fields come from the recipe."""

    iterations: int | None = None  # vtt-release 250, tir-release 100
    batch_size: int | str | None = None  # support views per step, or "all"; vtt-release 25, tir-release all
    lr: float | None = None  # LoRA learning rate (AdamW); vtt-release 2e-4 (4e-4 on ISIC2018, ChestX)
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    schedule: str | None = None  # cosine or none
    schedule_horizon: float = 8.0  # cosine T_max = schedule_horizon x iterations
    min_lr: float = 1e-6
    logit_scale: float | None = None  # vtt-release 100; tir-release 4 (5-shot) / 2 (1-shot)
    template: str = "a photo of a {}."
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU


@dataclass
class TirConfig:
    """Token Importance Recalibration (docs/tir.md)."""

    blocks: tuple[int, ...] = (-4, -2)
    ratio: float = 0.3
    alpha: float | None = None  # None: auto, (K+1)/2
    beta: float | None = None  # None: auto, 1/(K - alpha)
    text_layer: int = -2
    variant: str = "full"
    at_prediction: bool = True


@dataclass
class VttConfig:
    """VtT: fusion, absorption and DGSO (docs/vtt.md). `tia`, `fusion=none`, `correction` and `dlc` each remove one
    piece (the paper's ablation rows)."""

    beta: float = 7.0
    window: int = 50
    fusion: str | None = None  # release (vtt-release) | ssm (paper) | attention | lstm | gru | none
    scan: str = "deep_to_shallow"  # the paper-style fusions' scan order
    lr: float | None = None  # fusion learning rate; vtt-release 5e-4 (1e-3 on ISIC2018, ChestX)
    hidden: int | None = None  # paper-style fusions' width; None: the joint embedding width C
    state: int | None = None  # SSM state size N; None: 256 (the release, at C = 512), at most C/2 on narrower models
    dt_rank: int | None = None  # release fusion: rank of the step-size projection; None: equal to the state size
    conv: int = 4  # release fusion: causal convolution kernel
    ssm_layers: int = 2  # paper-style fusions' sequence layers
    tia: bool = True  # absorb through the text encoder; false: L_VtT compares the fused token with f directly
    correction: bool = True  # DGSO: project out the part of the combined gradient that opposes L_ce's
    dlc: bool = True  # DGSO: switch L_VtT off for the episode once the recent gradient agreement is <= 0
    placeholder: str = "X"


@dataclass
class RunConfig:
    """One run: a method on a dataset's episodes. Field names are the public `--set` names.

    `recipe` names the training loop (docs/recipes.md); `None` is the method's default (`DEFAULT_RECIPE`).
    """

    dataset: str = "digits"
    data_root: str | None = None
    method: str = "lora"
    recipe: str | None = None
    ways: int = 5
    shots: int = 1
    queries: int = 15
    episodes: int | None = None  # None: the paper protocol, 800 for 1-shot and 400 otherwise
    seed: int = 0
    backbone: str = "ViT-B-16"
    pretrained: str = "openai"
    activation: str = "auto"  # gelu or quickgelu; auto: from the model name, tag or checkpoint (docs/protocol.md)
    device: str = "auto"
    episode_batch: int = 1
    db: str = "results.sqlite"
    run_name: str | None = None
    cache_dir: str | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tir: TirConfig = field(default_factory=TirConfig)
    vtt: VttConfig = field(default_factory=VttConfig)

    # ------------------------------------------------------------------ recipe
    @property
    def recipe_name(self) -> str:
        """The recipe this run follows: `recipe`, or the method's default."""
        return self.recipe if self.recipe is not None else DEFAULT_RECIPE.get(self.method, "vtt-release")

    def resolved(self) -> RunConfig:
        """A copy with every unset (`None`) recipe field filled from the recipe, and `recipe` named.

        Idempotent; fields the user set (by `--set` or in Python) are kept.
        """
        _check_choice("method", self.method, METHODS)
        _check_choice("recipe", self.recipe_name, tuple(RECIPES))
        config = copy.deepcopy(self)
        config.recipe = self.recipe_name
        for value in RECIPES[config.recipe].values:
            section, _, name = value.key.rpartition(".")
            owner = getattr(config, section) if section else config
            if getattr(owner, name) is None:
                setattr(owner, name, value.resolve(config))
        return config

    def recipe_spec(self) -> Recipe:
        return RECIPES[self.recipe_name]

    # ------------------------------------------------------------------ validation
    def validate(self) -> RunConfig:
        """Raise `ConfigError` naming the first bad field (checked on the resolved values); return self."""
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("method", self.method, METHODS)
        _check_choice("recipe", self.recipe_name, tuple(RECIPES))
        _check_choice("device", self.device, DEVICES)
        _check_choice("activation", self.activation, ACTIVATIONS)
        for name in ("ways", "shots", "queries", "episode_batch"):
            _check_positive(name, getattr(self, name))
        if self.episodes is not None:
            _check_positive("episodes", self.episodes)
        if self.ways < 2:
            raise ConfigError("ways must be at least 2: an episode needs classes to tell apart")
        if "{}" not in self.train.template:
            raise ConfigError(f"train.template must contain '{{}}' for the class name, got {self.train.template!r}")
        if self.dataset not in ("digits",) and not self.data_root:
            raise ConfigError(f"--data-root is required for dataset {self.dataset!r}")
        resolved = self.resolved()
        _validate_training(resolved)
        _validate_vtt(resolved)
        return self

    @property
    def uses_tir(self) -> bool:
        return self.method in ("tir", "tir+vtt")

    @property
    def uses_vtt(self) -> bool:
        return self.method in ("vtt", "tir+vtt")

    @property
    def trains(self) -> bool:
        return self.method != "zeroshot"

    def trains_text(self) -> bool:
        """Whether the text side learns (a prompt context, or LoRA on the text tower); needs a resolved config."""
        return bool(self.prompt.context) or self.lora.towers in ("text", "both")

    def resolved_episodes(self) -> int:
        if self.episodes is not None:
            return self.episodes
        return 800 if self.shots == 1 else 400

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(
        self, precision: str, index_fingerprint: str, activation: str, device: str = "cpu", images: str = ""
    ) -> dict[str, Any]:
        """The fields that determine per-episode results, on the resolved config; `run_id` hashes them.

        Besides the config: the resolved precision, the dataset index fingerprint, the resolved activation, the device
        type of trained methods (their dropout masks come from generators on the compute device, which draw differently
        on CPU and CUDA) and the image preprocessing rule. Leaves out what never changes an episode's outcome (how many
        episodes, the episode batch, where results go) and the sections of methods the run does not use.
        """
        config = self.resolved()
        ident: dict[str, Any] = {
            "dataset": config.dataset,
            "index": index_fingerprint,
            "method": config.method,
            "recipe": config.recipe,
            "ways": config.ways,
            "shots": config.shots,
            "queries": config.queries,
            "seed": config.seed,
            "backbone": config.backbone,
            "pretrained": config.pretrained,
            "activation": activation,
            "precision": precision,
            "images": images,
            "train": {**dataclasses.asdict(config.train), "precision": precision},
        }
        if config.trains:
            ident["device"] = device
            ident["lora"] = dataclasses.asdict(config.lora)
            ident["prompt"] = dataclasses.asdict(config.prompt)
            ident["augment"] = dataclasses.asdict(config.augment)
        else:
            ident["train"] = {"template": config.train.template, "logit_scale": config.train.logit_scale}
        if config.uses_tir:
            ident["tir"] = dataclasses.asdict(config.tir)
        if config.uses_vtt:
            ident["vtt"] = dataclasses.asdict(config.vtt)
        return ident


def _validate_training(config: RunConfig) -> None:
    """Checks of the resolved training fields."""
    _check_choice("lora.towers", config.lora.towers, LORA_TOWERS)
    _check_choice("train.schedule", config.train.schedule, SCHEDULES)
    _check_choice("train.precision", config.train.precision, PRECISIONS)
    _check_choice("tir.variant", config.tir.variant, TIR_VARIANTS)
    _check_positive("lora.rank", config.lora.rank)
    _check_positive("train.iterations", config.train.iterations, allow_zero=True)
    batch = config.train.batch_size
    if batch != ALL_SUPPORT and not (isinstance(batch, int) and batch >= 1):
        raise ConfigError(f"train.batch_size must be a positive integer or '{ALL_SUPPORT}', got {batch!r}")
    if not config.augment.views:
        raise ConfigError("augment.views needs at least one view, e.g. plain")
    if not 0.0 <= config.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {config.lora.dropout}")
    if not 0.0 < config.tir.ratio <= 1.0:
        raise ConfigError(f"tir.ratio must be in (0, 1], got {config.tir.ratio}")
    bad_targets = set(config.lora.targets) - {"q", "k", "v"}
    if bad_targets or not config.lora.targets:
        raise ConfigError(f"lora.targets must be a non-empty subset of q,k,v, got {config.lora.targets}")
    if not (math.isfinite(config.train.schedule_horizon) and config.train.schedule_horizon > 0):
        raise ConfigError(f"train.schedule_horizon must be a positive number, got {config.train.schedule_horizon}")
    if config.prompt.context is not None and config.prompt.context != config.prompt.context.strip():
        raise ConfigError(f"prompt.context must not start or end with spaces, got {config.prompt.context!r}")


def _validate_vtt(config: RunConfig) -> None:
    """Checks of the resolved VtT fields (of every run: a bad value is refused even where VtT is unused)."""
    vtt = config.vtt
    _check_choice("vtt.fusion", vtt.fusion, VTT_FUSIONS)
    _check_choice("vtt.scan", vtt.scan, VTT_SCANS)
    _check_positive("vtt.window", vtt.window)
    for name in ("state", "dt_rank", "conv", "ssm_layers", "hidden"):
        if getattr(vtt, name) is not None:
            _check_positive(f"vtt.{name}", getattr(vtt, name))
    if config.uses_vtt and config.trains_text():
        raise ConfigError(
            f"{config.method} trains the vision tower only (VtT reads per-layer features of a frozen text tower), but "
            f"recipe {config.recipe} trains the text side (lora.towers={config.lora.towers}, "
            f"prompt.context={config.prompt.context!r}); use --recipe vtt-release or paper, or "
            "--set lora.towers=vision --set prompt.context="
        )
    if config.uses_vtt and vtt.fusion == "none" and not vtt.tia:
        raise ConfigError("vtt.fusion=none with vtt.tia=false leaves VtT nothing to learn (-cos(f, f) is constant)")


def run_id_of(identity: dict[str, Any]) -> str:
    """A short stable hash of a run identity (see `RunConfig.identity`)."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(name: str, value: int | None, allow_zero: bool = False) -> None:
    if not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ConfigError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value}")


def apply_override(config: RunConfig, assignment: str) -> None:
    """Apply one `key=value` (dotted key) to `config` in place, converting the value to the field's type."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    key, raw = key.strip(), raw.strip()
    target: Any = config
    parts = key.split(".")
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(target) or part not in _field_types(target):
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(config_keys())}")
        target = getattr(target, part)
    name = parts[-1]
    types_of = _field_types(target) if dataclasses.is_dataclass(target) else {}
    if name not in types_of or dataclasses.is_dataclass(getattr(target, name)):
        raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(config_keys())}")
    setattr(target, name, _parse_value(key, raw, types_of[name]))


def config_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """All dotted keys `--set` accepts."""
    obj = RunConfig() if obj is None else obj
    keys: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(config_keys(value, f"{prefix}{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


def _field_types(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def _parse_value(key: str, raw: str, annotation: Any) -> Any:
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if raw == "" and str in inner:
            return ""  # an empty text, e.g. `prompt.context=` (no learned context)
        if type(None) in args and raw.lower() in ("none", "null", "auto", ""):
            return None  # unset: the recipe (or the field's documented rule) decides
        for option in inner[:-1]:
            try:
                return _parse_value(key, raw, option)
            except ConfigError:
                continue
        return _parse_value(key, raw, inner[-1])
    try:
        if annotation is bool:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if annotation is int:
            return int(raw)
        if annotation is float:
            return float(raw)
        if annotation is str:
            return raw
        if origin is tuple:
            items = [s.strip() for s in raw.strip("()[]").split(",") if s.strip()]
            return tuple(_parse_value(key, s, args[0]) for s in items)
    except ValueError:
        raise ConfigError(f"{key} expects {_type_name(annotation)}, got {raw!r}") from None
    raise ConfigError(f"{key} cannot be set from the command line")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is tuple:
        return f"a comma-separated list of {typing.get_args(annotation)[0].__name__}"
    return getattr(annotation, "__name__", str(annotation))
