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
import reprlib
import string
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdfsl.data.readers import DATASETS as DATASET_SPECS
from cdfsl.errors import ConfigError
from cdfsl.recipes import RECIPES, Recipe
from cdfsl.registry import MethodSpec, default_recipe, method_names, parse_method

DATASETS = tuple(DATASET_SPECS)
METHODS = method_names()  # every name `cdfsl methods` lists; others of the grammar are accepted too
TIR_VARIANTS = ("full", "inhibit", "enhance", "simplified")
VTT_FUSIONS = ("release", "ssm", "attention", "lstm", "gru", "none")
VTT_SCANS = ("deep_to_shallow", "shallow_to_deep", "bidirectional")
LORA_TOWERS = ("vision", "text", "both", "none")  # none: the coop base
SCHEDULES = ("cosine", "none")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")  # cuda:N: the GPU of index N
ACTIVATIONS = ("auto", "gelu", "quickgelu")
ALL_SUPPORT = "all"
MAX_EPISODES = 10_000_000  # the to-do list and the store grow with it; the paper protocol is 400 or 800
MAX_SEED = 2**63 - 1  # the result store keeps the seed in an SQLite INTEGER, which is signed 64-bit
MAX_ITERATIONS = 1_000_000  # the recipes train 100 or 250 steps; beyond this a typo, not a run
MAX_HORIZON = 1e6  # cosine period / iterations (8 in the recipes); from about 1e3 on the rate is constant anyway
MAX_LR = 1e6  # an optimizer's step is lr / bias correction in float32: far larger rates overflow it
LR_WHY = "a larger rate overflows the optimizer's float32 step"
DECAY_WHY = "a larger decay overflows the optimizer's float32 step"
MAX_WIDTH = 4096  # LoRA rank and VtT widths allocate per episode and block; wider than any CLIP's projections
MAX_DEPTH = 64  # VtT's sequence layers and convolution kernel (2 and 4 in the recipes)
MAX_LORA_ALPHA = 1e4  # the recipes use 8; training the tiny model overflows float32 from about 1e7
LORA_ALPHA_WHY = "alpha / sqrt(rank) scales the update; a larger one overflows training, the recipes use 8"
MAX_PRE_RESIZE = 8192  # pixels; the VtT release pre-resizes ChestX to 256, and ChestX's own images are 1024


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
class MapleConfig:
    """MaPLe (multi-modal prompt learning, Khattak et al., CVPR 2023): learnable text context in the first `depth`
    text blocks and vision prompts coupled from it by per-block linear maps (docs/methods.md). Defaults are the
    release's (muzairkhattak/multimodal-prompt-learning, `configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml`)."""

    context: str = "a photo of a"  # CTX_INIT; its first `tokens` token embeddings initialise the context
    tokens: int = 2  # N_CTX
    depth: int = 9  # PROMPT_DEPTH: blocks (from the first) that get learned prompts, in both towers
    lr: float = 0.0035
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 4  # support views per step
    epochs: int = 5  # passes over the support views
    warmup_epochs: int = 1  # constant-rate warm-up, then cosine
    warmup_lr: float = 1e-5


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

    `method` is a base and plug-ins (`cdfsl.registry`: `lora`, `coop+lora+tir`, `maple`, ...). `recipe` names the
    training loop (docs/recipes.md); `None` is the method's default (`cdfsl.registry.default_recipe`).
    """

    dataset: str = "digits"
    data_root: str | None = None
    pre_resize: int | None = None  # square side images are first resized to when opened, 0: none; None: the recipe's
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
    tokenizer: str | None = None  # a local Hugging Face tokenizer folder; None: the backbone's own (docs/backbones.md)
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
    maple: MapleConfig = field(default_factory=MapleConfig)

    def __post_init__(self) -> None:
        # Sections given as mappings (`RunConfig(train={"lr": 1e-3})`) become their dataclasses.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mapping) and f.default_factory is not dataclasses.MISSING:
                setattr(self, f.name, _filled(f.default_factory(), value, f"{f.name}.", "config"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> RunConfig:
        """A config from a nested mapping, as a TOML or JSON file or a `--json` summary's `config` holds it: top-level
        keys, sections as mappings (or dotted keys), lists where a field holds a tuple. Keys left out keep their
        defaults; an unknown key or a value of the wrong type (`check_field`) is a `ConfigError` naming it (and
        `source`). Ranges and choices are checked by `validate`."""
        return update_from_dict(cls(), data, source)

    # ------------------------------------------------------------------ recipe
    @property
    def recipe_name(self) -> str:
        """The recipe this run follows: `recipe`, or the method's default."""
        return self.recipe if self.recipe is not None else default_recipe(self.method)

    @property
    def spec(self) -> MethodSpec:
        """The method's base and plug-ins (raises `ConfigError` for an unknown name or an impossible combination)."""
        return parse_method(self.method, self.recipe_name)

    def resolved(self) -> RunConfig:
        """A copy with the base's own fields and every unset (`None`) recipe field filled, and `recipe` named.

        Idempotent; fields the user set (by `--set` or in Python) are kept, except that a field the base decides
        (`lora` has no learned context, `coop` no LoRA) may only be set to the base's value.
        """
        _check_choice("recipe", self.recipe_name, tuple(RECIPES))
        base = self.spec.base
        config = copy.deepcopy(self)
        config.recipe = self.recipe_name
        for key, decided in base.decides.items():
            section, _, name = key.rpartition(".")
            owner = getattr(config, section)
            if getattr(owner, name) not in (None, decided):
                raise ConfigError(
                    f"{key}={getattr(owner, name)!r} does not fit method {self.method}: the {base.name} base has "
                    f"{key}={decided!r}; choose the base that has it (see `cdfsl methods`)"
                )
            setattr(owner, name, decided)
        for key, default in base.defaults.items():
            section, _, name = key.rpartition(".")
            if getattr(getattr(config, section), name) is None:
                setattr(getattr(config, section), name, default)
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
        """Raise `ConfigError` naming the first bad field (checked on the resolved values); return self.

        Numeric fields follow `NUMERIC_RULES`; fields left to the recipe are checked once the recipe has filled them.
        """
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("recipe", self.recipe_name, tuple(RECIPES))
        parse_method(self.method, self.recipe_name)  # refuses an unknown method or an impossible combination
        check_device(self.device)
        _check_choice("activation", self.activation, ACTIVATIONS)
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer.strip()):
            raise ConfigError(
                f"tokenizer must be a folder path (or unset for the backbone's own); got {self.tokenizer!r}"
            )
        check_numbers(self, unset_ok=True)  # recipe values are computed from shots and dataset
        check_template(self.train.template)
        if DATASET_SPECS[self.dataset].needs_root and not self.data_root:
            raise ConfigError(f"--data-root is required for dataset {self.dataset!r}")
        resolved = self.resolved()
        check_numbers(resolved)
        _validate_training(resolved)
        _validate_vtt(resolved)
        return self

    @property
    def uses_tir(self) -> bool:
        return self.spec.uses("tir")

    @property
    def uses_vtt(self) -> bool:
        return self.spec.uses("vtt")

    @property
    def trains(self) -> bool:
        return self.spec.base.trains_anything

    def trains_text(self) -> bool:
        """Whether the text side learns (the base's own prompts, a prompt context, or LoRA on the text tower); needs a
        resolved config."""
        return self.spec.base.learns_text or bool(self.prompt.context) or self.lora.towers in ("text", "both")

    def resolved_episodes(self) -> int:
        if self.episodes is not None:
            return self.episodes
        return 800 if self.shots == 1 else 400

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(
        self,
        precision: str,
        index_fingerprint: str,
        activation: str,
        device: str = "cpu",
        images: str = "",
        weights: str | None = None,
        tokenizer: str | None = None,
    ) -> dict[str, Any]:
        """The fields that determine per-episode results, on the resolved config; `run_id` hashes them.

        Besides the config: the resolved precision, the dataset index fingerprint, the resolved activation, the device
        type of trained methods (their dropout masks come from generators on the compute device, which draw differently
        on CPU and CUDA), the image preprocessing rule, and `weights`: what identifies the pretrained weights (a
        checkpoint file's content digest; defaults to `pretrained` itself, right for tags and `none`), and
        `tokenizer`: the digest of a `--tokenizer` folder's files (present only when one is given, so runs with the
        model's own tokenizer keep the identity they had before the option existed). Leaves out what
        never changes an episode's outcome (how many episodes, the episode batch, where results go) and the sections
        of methods the run does not use.
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
            "pretrained": config.pretrained if weights is None else weights,
            "activation": activation,
            "precision": precision,
            "images": images,
            "train": {**dataclasses.asdict(config.train), "precision": precision},
        }
        if config.tokenizer is not None:
            ident["tokenizer"] = tokenizer or config.tokenizer
        if config.trains:
            ident["device"] = device
        else:
            ident["train"] = {"template": config.train.template, "logit_scale": config.train.logit_scale}
        for section in config.spec.sections:
            ident[section] = dataclasses.asdict(getattr(config, section))
        return ident


def _validate_training(config: RunConfig) -> None:
    """Checks of the resolved training fields."""
    _check_choice("lora.towers", config.lora.towers, LORA_TOWERS)
    _check_choice("train.schedule", config.train.schedule, SCHEDULES)
    _check_choice("train.precision", config.train.precision, PRECISIONS)
    _check_choice("tir.variant", config.tir.variant, TIR_VARIANTS)
    if not config.augment.views:
        raise ConfigError("augment.views needs at least one view, e.g. plain")
    base = config.spec.base.name
    if config.lora.towers == "none" and base in ("lora", "coop+lora"):
        raise ConfigError(f"lora.towers=none leaves method {config.method} without LoRA; use the coop base for that")
    if base in ("coop", "coop+lora") and not config.prompt.context:
        raise ConfigError(f"method {config.method} learns a prompt context: prompt.context needs its first words")
    bad_targets = set(config.lora.targets) - {"q", "k", "v"}
    if bad_targets or not config.lora.targets:
        raise ConfigError(f"lora.targets must be a non-empty subset of q,k,v, got {config.lora.targets}")
    tir = config.tir
    if config.uses_tir and tir.alpha is not None and tir.beta is None and tir.alpha >= config.ways:
        raise ConfigError(
            f"tir.alpha={tir.alpha:g} with tir.beta=auto (1 / (ways - alpha)) needs alpha < ways = {config.ways}; "
            "set tir.beta too, or a smaller tir.alpha"
        )
    if config.prompt.context is not None and config.prompt.context != config.prompt.context.strip():
        raise ConfigError(f"prompt.context must not start or end with spaces, got {config.prompt.context!r}")


def _validate_vtt(config: RunConfig) -> None:
    """Checks of the resolved VtT fields (of every run: a bad value is refused even where VtT is unused)."""
    vtt = config.vtt
    _check_choice("vtt.fusion", vtt.fusion, VTT_FUSIONS)
    _check_choice("vtt.scan", vtt.scan, VTT_SCANS)
    if config.uses_vtt and vtt.fusion == "none" and not vtt.tia:
        raise ConfigError("vtt.fusion=none with vtt.tia=false leaves VtT nothing to learn (-cos(f, f) is constant)")


def run_id_of(identity: dict[str, Any]) -> str:
    """A short stable hash of a run identity (see `RunConfig.identity`)."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# ------------------------------------------------------------------------------------------- numeric rules


@dataclass(frozen=True)
class Rule:
    """What one numeric config field accepts: `allows(value)` decides, `allowed` says the same in words.

    Build rules with `integer`, `number` or `integers`, which derive both from one set of bounds, so the message can
    never disagree with the check.
    """

    key: str
    allows: Callable[[Any], bool]
    allowed: str

    def check(self, value: Any) -> None:
        """Raise `ConfigError` naming the key, the value and the allowed range unless `allows(value)`."""
        if not self.allows(value):
            raise ConfigError(f"{self.key} must be {self.allowed}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def integer(
    key: str, low: int | None = None, high: int | None = None, *, optional: bool = False, why: str = ""
) -> Rule:
    """An integer in `[low, high]` (either side may be open-ended); `optional`: None (automatic) is allowed too."""

    def allows(value: Any) -> bool:
        if value is None:
            return optional
        return _is_int(value) and (low is None or value >= low) and (high is None or value <= high)

    if high is not None:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(low) if low is not None else None
        words = f"{kind} <= {high:,}" if kind else f"an integer in [{low}, {high}]"
    elif low not in (None, 0, 1):
        words, why = f"at least {low}", "a whole number" + (f"; {why}" if why else "")
    else:
        words = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}[low]
    return Rule(key, allows, _words(words, optional, why))


def number(
    key: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
    why: str = "",
) -> Rule:
    """A finite number between `low` and `high` (each bound closed unless `*_open`, either may be absent)."""

    def allows(value: Any) -> bool:
        if value is None:
            return optional
        if not _is_real(value):
            return False
        above = low is None or (value > low if low_open else value >= low)
        below = high is None or (value < high if high_open else value <= high)
        return above and below

    if low is not None and high is not None:
        words = f"a number in {'(' if low_open else '['}{_shown(low)}, {_shown(high)}{')' if high_open else ']'}"
    elif low is not None:
        words = f"a finite number {'>' if low_open else '>='} {_shown(low)}"
    elif high is not None:
        words = f"a finite number {'<' if high_open else '<='} {_shown(high)}"
    else:
        words = "a finite number"
    return Rule(key, allows, _words(words, optional, why))


def _shown(bound: float) -> str:
    """A bound as a message shows it: `0`, `180`, `1,000,000`, `0.5`."""
    return f"{int(bound):,}" if float(bound).is_integer() else f"{bound:g}"


def integers(key: str, why: str) -> Rule:
    """A tuple of integers (block indices whose range depends on the backbone: checked when the method is built)."""
    return Rule(key, lambda v: isinstance(v, tuple) and all(_is_int(i) for i in v), f"a list of integers ({why})")


def _batch_size_allows(value: Any) -> bool:
    return value == ALL_SUPPORT or (_is_int(value) and value >= 1)


def _words(words: str, optional: bool, why: str) -> str:
    return words + (" or none (auto)" if optional else "") + (f" ({why})" if why else "")


BLOCK_RANGE = "negative from the end; checked against the backbone's depth when the method is built"

NUMERIC_RULES: dict[str, Rule] = {
    rule.key: rule
    for rule in (
        integer("ways", 2, why="an episode needs classes to tell apart"),
        integer("shots", 1),
        integer("queries", 1),
        integer("episodes", 1, MAX_EPISODES, optional=True),
        integer("seed", 0, MAX_SEED, why="2**63 - 1, the largest the result store holds"),
        integer("episode_batch", 1),
        integer("pre_resize", 0, MAX_PRE_RESIZE, why="0 for none"),
        integer("lora.rank", 1, MAX_WIDTH),
        number("lora.alpha", 0, MAX_LORA_ALPHA, low_open=True, why=LORA_ALPHA_WHY),
        number("lora.dropout", 0, 1, high_open=True),
        number("prompt.lr", 0, MAX_LR, low_open=True, why=LR_WHY),
        number("prompt.momentum", 0, 1, high_open=True),
        number("prompt.weight_decay", 0, MAX_LR, why=DECAY_WHY),
        number("augment.rotation", 0, 180, why="degrees either way"),
        number("augment.jitter", 0, 1),
        number("augment.flip_p", 0, 1),
        integer("train.iterations", 0, MAX_ITERATIONS),
        Rule("train.batch_size", _batch_size_allows, f"a positive integer or '{ALL_SUPPORT}'"),
        number("train.lr", 0, MAX_LR, low_open=True, why=LR_WHY),
        number("train.weight_decay", 0, MAX_LR, why=DECAY_WHY),
        number("train.beta1", 0, 1, high_open=True),
        number("train.beta2", 0, 1, high_open=True),
        number("train.schedule_horizon", 0, MAX_HORIZON, low_open=True, why="the cosine period in train.iterations"),
        number("train.min_lr", 0, MAX_LR, why=LR_WHY),
        number("train.logit_scale", 0, low_open=True),
        integers("tir.blocks", f"vision block indices, {BLOCK_RANGE}"),
        number("tir.ratio", 0, 1, low_open=True),
        number("tir.alpha", optional=True),
        number("tir.beta", optional=True),
        integer("tir.text_layer", why=f"a text block index, {BLOCK_RANGE}"),
        number("vtt.beta", 0),
        integer("vtt.window", 1),
        number("vtt.lr", 0, MAX_LR, low_open=True, why=LR_WHY),
        integer("vtt.hidden", 1, MAX_WIDTH, optional=True),
        integer("vtt.state", 1, MAX_WIDTH, optional=True),
        integer("vtt.dt_rank", 1, MAX_WIDTH, optional=True),
        integer("vtt.conv", 1, MAX_DEPTH),
        integer("vtt.ssm_layers", 1, MAX_DEPTH),
        integer("maple.tokens", 1, MAX_DEPTH),
        integer("maple.depth", 1, MAX_DEPTH, why="checked against the backbone's depth when the method is built"),
        number("maple.lr", 0, MAX_LR, low_open=True, why=LR_WHY),
        number("maple.momentum", 0, 1, high_open=True),
        number("maple.weight_decay", 0, MAX_LR, why=DECAY_WHY),
        integer("maple.batch_size", 1),
        integer("maple.epochs", 1, MAX_ITERATIONS),
        integer("maple.warmup_epochs", 0, MAX_ITERATIONS),
        number("maple.warmup_lr", 0, MAX_LR, low_open=True, why=LR_WHY),
    )
}
"""The bounds of every numeric config field, by dotted key; `check_numbers` applies them (a test checks that every
numeric field has one)."""


def check_numbers(config: RunConfig, unset_ok: bool = False) -> None:
    """Apply `NUMERIC_RULES` to `config`; `unset_ok`: skip fields still `None` (before the recipe fills them)."""
    for key, rule in NUMERIC_RULES.items():
        section, _, name = key.rpartition(".")
        value = getattr(getattr(config, section) if section else config, name)
        if not (unset_ok and value is None):
            rule.check(value)


def check_device(device: object) -> None:
    """`device` must be `auto`, `cpu`, `cuda`, `cuda:N` (N a GPU index) or `mps`; whether it exists is checked when
    the run starts (`cdfsl.engine.context.resolve_device`)."""
    name = device if isinstance(device, str) else ""
    index = name.partition(":")[2] if name.startswith("cuda:") else None
    if name in ("auto", "cpu", "cuda", "mps") or (index is not None and index.isdigit() and index.isascii()):
        return
    raise ConfigError(f"device must be one of auto, cpu, cuda, cuda:N (a GPU index) or mps; got {device!r}")


def read_data_file(path: Path, label: str, kind: str) -> Any:
    """The data of the TOML (`kind="toml"`) or JSON (`"json"`) file at `path`; a `ConfigError` starting with `label`
    (`--config run.toml`, `sweep file grid.toml`) when it cannot be read, is not valid, or nests deeper than the
    parser can follow (a `RecursionError` inside `tomllib` or `json`)."""
    try:
        text = path.read_text(encoding="utf-8")
        return tomllib.loads(text) if kind == "toml" else json.loads(text)
    except OSError as error:
        raise ConfigError(f"cannot read {label}: {error.strerror or error}") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{label} is not valid {kind.upper()}: {error}") from None
    except RecursionError:
        raise ConfigError(
            f"{label} nests tables or lists too deeply to read (a config needs only a few levels)"
        ) from None


def check_template(template: str) -> None:
    """`train.template` must have exactly one `{}` (the class name) and no other format field (`{0}`, `{x}`, `{!r}`)."""
    hint = "use {{ and }} for literal braces"
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)]
    except ValueError as error:
        raise ConfigError(f"train.template is not a format string ({error}; {hint}), got {template!r}") from None
    fields = [field for field in fields if field[0] is not None]
    if fields != [("", "", None)]:
        raise ConfigError(
            f"train.template must contain exactly one {{}} for the class name and no other format field ({hint}), "
            f"got {template!r}"
        )


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


def update_from_dict(config: RunConfig, data: Mapping[str, Any], source: str) -> RunConfig:
    """Set the fields `data` names on `config` (in place; returned): a file's typed values, sections as mappings or
    dotted keys (`{"train": {"lr": 1e-3}}` or `{"train.lr": 1e-3}`). Each value must have its field's type
    (`check_field`); an unknown key or a wrong type is a `ConfigError` naming `source` and the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source} must hold a table of config keys, got {_shown_value(data)}")
    return _filled(config, data, "", source)


def _filled(target: Any, data: Mapping[str, Any], prefix: str, source: str) -> Any:
    """`target` (a config dataclass) with the fields in `data` set and type-checked; sections recurse."""
    types_of = _field_types(target)
    for name, value in data.items():
        key = prefix + str(name)
        head, dot, rest = str(name).partition(".")
        if name not in types_of and dot and dataclasses.is_dataclass(getattr(target, head, None)):
            _filled(getattr(target, head), {rest: value}, f"{prefix}{head}.", source)
            continue
        if name not in types_of:
            raise ConfigError(f"{source}: unknown config key {key!r}; known keys: {', '.join(config_keys())}")
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{source}: {key} is a section; give it as a table of keys, got {_shown_value(value)}"
                )
            _filled(current, value, key + ".", source)
        else:
            setattr(target, name, check_field(key, value, types_of[name], source))
    return target


# ------------------------------------------------------------------------------------------- field types
_WRONG = object()  # `_conformed`'s answer for a value of another type


def check_field(key: str, value: Any, annotation: Any, source: str = "config") -> Any:
    """`value` as field `key` of type `annotation` holds it, or a `ConfigError` naming `source` and `key`.

    The one type check of values read from files (TOML, JSON, sweep files, a classifier's model.json), driven by the
    config dataclasses' type hints: a bool field takes only true/false (never 1, "false" or "no"), an int field only
    an integer (not a bool), a float field an integer or a float, a str field only a string, a tuple field a list or
    tuple of items of its type (never a string, whose characters would be read as items; a list becomes a tuple),
    an optional field also None (JSON null), a `Literal` one of its values. Ranges are `NUMERIC_RULES`' business."""
    conformed = _conformed(value, annotation)
    if conformed is _WRONG:
        hint = ""
        options = _options(annotation)
        if isinstance(value, str) and bool in options and value.strip().lower() in ("true", "false"):
            hint = f"; write {value.strip().lower()} without quotes"
        elif isinstance(value, str) and any(typing.get_origin(option) is tuple for option in options):
            hint = f"; give a list, e.g. [{_shown_value(value)}]"
        raise ConfigError(
            f"{source}: {key} must be {_described(annotation)}, got {_shown_value(value)} ({_kind_of(value)}){hint}"
        )
    return conformed


def _conformed(value: Any, annotation: Any) -> Any:
    """`value` as a field of type `annotation` holds it (a list as a tuple), or `_WRONG`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        for option in args:
            conformed = _conformed(value, option)
            if conformed is not _WRONG:
                return conformed
        return _WRONG
    if origin is typing.Literal:
        return value if any(type(value) is type(a) and value == a for a in args) else _WRONG
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return _WRONG
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            return _WRONG
        items = [_conformed(item, kind) for item, kind in zip(value, item_types, strict=True)]
        return _WRONG if any(item is _WRONG for item in items) else tuple(items)
    if annotation is type(None):
        return value if value is None else _WRONG
    if annotation is bool:
        return value if isinstance(value, bool) else _WRONG
    if annotation is int:
        return value if _is_int(value) else _WRONG
    if annotation is float:
        # An integer is a number (`alpha = 16`), kept as given: the run identity of such files does not change.
        return value if isinstance(value, int | float) and not isinstance(value, bool) else _WRONG
    if annotation is str:
        return value if isinstance(value, str) else _WRONG
    if annotation is Any:
        return value
    raise TypeError(f"config fields of type {annotation!r} have no type check")  # a new field type: add it above


def _options(annotation: Any) -> tuple[Any, ...]:
    """The types a union holds, or `(annotation,)`."""
    is_union = typing.get_origin(annotation) in (types.UnionType, typing.Union)
    return typing.get_args(annotation) if is_union else (annotation,)


def _described(annotation: Any) -> str:
    """What a field of type `annotation` takes, in words: `true or false`, `an integer or none`, ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        words = [_described(option) for option in args if option is not type(None)]
        if type(None) in args:
            words.append("none (unset)")
        return ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        item = args[0] if args else Any
        return f"a list of {_PLURALS.get(item, _described(item))}"
    return _WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


_WORDS: dict[Any, str] = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    type(None): "none (unset)",
}
_PLURALS: dict[Any, str] = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _kind_of(value: Any) -> str:
    """The TOML/JSON kind of a value, for messages: `a string`, `a boolean`, `a list`, ..."""
    kinds = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"))
    for kind, words in kinds:
        if isinstance(value, kind):
            return words
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__


def _shown_value(value: Any) -> str:
    """A value as a one-line message shows it: nested and long values shortened with `...`."""
    return _SHORT_REPR.repr(value)


def _short_repr() -> reprlib.Repr:
    shortened = reprlib.Repr()  # keyword arguments need Python 3.12
    shortened.maxlevel, shortened.maxlist, shortened.maxtuple, shortened.maxdict = 2, 4, 4, 4
    shortened.maxstring, shortened.maxother, shortened.maxlong = 60, 60, 40
    return shortened


_SHORT_REPR = _short_repr()


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
            lowered = raw.lower()  # true/false only, as in a file: `no`, `off` or `0` might mean either to a reader
            if lowered in ("true", "false"):
                return lowered == "true"
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
    if annotation is bool:
        return "true or false"
    return getattr(annotation, "__name__", str(annotation))
