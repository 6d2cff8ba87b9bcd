"""The shared training loop's settings: `train` (steps, optimizer, schedule, logit scale, template, precision) and
`augment` (the support views), with their rules. Every trained base runs the one loop (`cdfsl.methods.training`), so
these sections belong to the loop rather than to a base; each base says which of their fields it reads. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cdfsl.errors import ConfigError
from cdfsl.registry import Section, register_section
from cdfsl.rules import (
    DECAY_WHY,
    LR_WHY,
    MAX_HORIZON,
    MAX_ITERATIONS,
    MAX_LR,
    Rule,
    batch_size_allows,
    check_choice,
    integer,
    number,
)

if TYPE_CHECKING:
    from cdfsl.config import RunConfig

SCHEDULES = ("cosine", "none")
PRECISIONS = ("auto", "fp32", "bf16")


DEFAULT_CROP_SCALE = (0.08, 1.0)


@dataclass
class AugmentConfig:
    """Support views, one per entry: `plain` or `+`-joined `crop`, `rotate`, `jitter`, `flip` (docs/protocol.md).

    `views` is the recipe's when `None`: the benchmark's five views (`plain, rotate+jitter+flip, rotate, jitter, flip`)
    for the VtT and TIR releases, eight `crop+flip` views for clip-lora-release (docs/recipes.md).
    """

    views: tuple[str, ...] | None = None
    rotation: float = 45.0
    jitter: float = 0.4
    flip_p: float = 0.5
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE  # area share of a random resized crop, low and high


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
    schedule_horizon: float | None = None  # cosine T_max = schedule_horizon x iterations; release loops 8, clip-lora 1
    min_lr: float = 1e-6
    logit_scale: float | None = None  # vtt-release 100; tir-release 4 (5-shot) / 2 (1-shot)
    template: str = "a photo of a {}."
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU


def _check_train(train: TrainConfig, config: RunConfig) -> None:
    check_choice("train.schedule", train.schedule, SCHEDULES)
    check_choice("train.precision", train.precision, PRECISIONS)


def _check_augment(augment: AugmentConfig, config: RunConfig) -> None:
    if augment.views is not None and not augment.views:
        raise ConfigError("augment.views needs at least one view, e.g. plain")
    _crop_scale(augment.crop_scale)  # a pair of numbers (its bounds: the section's rule)


def crop_scale_allows(value: object) -> bool:
    """Whether `value` is two area shares 0 < low <= high <= 1."""
    try:
        low, high = value  # type: ignore[misc]
        return 0 < float(low) <= float(high) <= 1
    except (TypeError, ValueError):
        return False


def _crop_scale(value: object) -> tuple[float, float]:
    """`augment.crop_scale` as two floats (a `ConfigError` if it is not a pair of numbers)."""
    try:
        low, high = value  # type: ignore[misc]
        return float(low), float(high)
    except (TypeError, ValueError):
        raise ConfigError(f"augment.crop_scale must be two numbers low,high (e.g. 0.08,1); got {value!r}") from None


TRAIN = register_section(
    Section(
        "train",
        TrainConfig,
        (
            integer("train.iterations", 0, MAX_ITERATIONS),
            Rule("train.batch_size", batch_size_allows, "a positive integer or 'all'"),
            number("train.lr", 0, MAX_LR, low_open=True, why=LR_WHY),
            number("train.weight_decay", 0, MAX_LR, why=DECAY_WHY),
            number("train.beta1", 0, 1, high_open=True),
            number("train.beta2", 0, 1, high_open=True),
            number(
                "train.schedule_horizon", 0, MAX_HORIZON, low_open=True, why="the cosine period in train.iterations"
            ),
            number("train.min_lr", 0, MAX_LR, why=LR_WHY),
            number("train.logit_scale", 0, low_open=True),
        ),
        _check_train,
    )
)
AUGMENT = register_section(
    Section(
        "augment",
        AugmentConfig,
        (
            number("augment.rotation", 0, 180, why="degrees either way"),
            number("augment.jitter", 0, 1),
            number("augment.flip_p", 0, 1),
            Rule("augment.crop_scale", crop_scale_allows, "two area shares low,high with 0 < low <= high <= 1"),
        ),
        _check_augment,
    )
)

# The fields of the loop a step reads, whatever the base (the optimizer of the trained tensors and the schedule).
_STEP_FIELDS = ("iterations", "batch_size", "lr", "weight_decay", "beta1", "beta2", "schedule", "precision")


def augment_reads(config: RunConfig) -> tuple[str, ...]:
    """`augment.views`, and each transform's strength only where a view uses the transform (the random draws are
    made either way, `cdfsl.data.augment.support_views`, so an unused strength changes nothing). Needs a resolved
    config (`augment.views` set)."""
    used = {part for view in config.augment.views or () for part in view.split("+")}
    strengths = {
        "crop": "augment.crop_scale",
        "rotate": "augment.rotation",
        "jitter": "augment.jitter",
        "flip": "augment.flip_p",
    }
    return ("augment.views", *(key for transform, key in strengths.items() if transform in used))


def loop_reads(config: RunConfig) -> tuple[str, ...]:
    """The `train` fields of the step-counted loop (LoRA, CoOp): steps, batches, AdamW, the logit scale, the
    template, precision, and the cosine schedule's horizon and floor where `train.schedule` is cosine."""
    keys = [f"train.{name}" for name in _STEP_FIELDS] + ["train.logit_scale", "train.template"]
    if config.train.schedule == "cosine":
        keys += ["train.schedule_horizon", "train.min_lr"]
    return tuple(keys)
