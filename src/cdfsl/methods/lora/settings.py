"""The LoRA bases `lora`, `coop` and `coop+lora` declared: the `lora` and `prompt` sections, their rules and checks,
the fields each base reads. Torch-free: the config and the CLI's help import it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cdfsl.errors import ConfigError
from cdfsl.methods.training_settings import augment_reads, loop_reads
from cdfsl.registry import Base, Section, register_base, register_section
from cdfsl.rules import DECAY_WHY, LR_WHY, MAX_LR, MAX_WIDTH, check_choice, integer, number

if TYPE_CHECKING:
    from cdfsl.config import RunConfig
    from cdfsl.registry import MethodSpec

LORA_TOWERS = ("vision", "text", "both", "none")  # none: the coop base
MAX_LORA_ALPHA = 1e4  # the recipes use 8; training the tiny model overflows float32 from about 1e7
LORA_ALPHA_WHY = "alpha / sqrt(rank) scales the update; a larger one overflows training, the recipes use 8"


@dataclass
class LoraConfig:
    """LoRA on the attention projections of every block of one or both towers (docs/methods.md).

    The update is scaled by `alpha / sqrt(rank)` (2 for rank 16, alpha 8), as in the released LoRA layers.
    """

    rank: int | None = None  # None: the recipe's (16 in the VtT and TIR releases, 2 in clip-lora-release)
    alpha: float | None = None  # None: the recipe's (8 in the VtT and TIR releases, 1 in clip-lora-release)
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


def _check_lora(lora: LoraConfig, config: RunConfig) -> None:
    check_choice("lora.towers", lora.towers, LORA_TOWERS)
    bad_targets = set(lora.targets) - {"q", "k", "v"}
    if bad_targets or not lora.targets:
        raise ConfigError(f"lora.targets must be a non-empty subset of q,k,v, got {lora.targets}")


def _check_prompt(prompt: PromptConfig, config: RunConfig) -> None:
    if prompt.context is not None and prompt.context != prompt.context.strip():
        raise ConfigError(f"prompt.context must not start or end with spaces, got {prompt.context!r}")


register_section(
    Section(
        "lora",
        LoraConfig,
        (
            integer("lora.rank", 1, MAX_WIDTH),
            number("lora.alpha", 0, MAX_LORA_ALPHA, low_open=True, why=LORA_ALPHA_WHY),
            number("lora.dropout", 0, 1, high_open=True),
        ),
        _check_lora,
    )
)
register_section(
    Section(
        "prompt",
        PromptConfig,
        (
            number("prompt.lr", 0, MAX_LR, low_open=True, why=LR_WHY),
            number("prompt.momentum", 0, 1, high_open=True),
            number("prompt.weight_decay", 0, MAX_LR, why=DECAY_WHY),
        ),
        _check_prompt,
    )
)


def lora_reads(config: RunConfig, spec: MethodSpec) -> tuple[str, ...]:
    """What the LoRA bases read: the loop's `train` fields and the support views; `lora.towers`, and LoRA's shape
    where a tower has LoRA (merging only on the vision tower); the prompt context, and its SGD where it is learned
    (`lora`, with no context, reads no `prompt` field)."""
    keys = [*loop_reads(config), *augment_reads(config), "lora.towers"]
    towers = config.lora.towers
    if towers != "none":
        keys += ["lora.rank", "lora.alpha", "lora.dropout", "lora.targets"]
    if towers in ("vision", "both"):
        keys.append("lora.merge_for_prediction")
    if config.prompt.context:
        keys += ["prompt.context", "prompt.lr", "prompt.momentum", "prompt.weight_decay"]
    return tuple(keys)


def _needs_lora(config: RunConfig, spec: MethodSpec) -> None:
    if config.lora.towers == "none":
        raise ConfigError(f"lora.towers=none leaves method {config.method} without LoRA; use the coop base for that")


def _needs_context(config: RunConfig, spec: MethodSpec) -> None:
    if not config.prompt.context:
        raise ConfigError(f"method {config.method} learns a prompt context: prompt.context needs its first words")


def _needs_both(config: RunConfig, spec: MethodSpec) -> None:
    _needs_lora(config, spec)
    _needs_context(config, spec)


_SECTIONS = ("lora", "prompt", "augment")  # what earlier versions' identities held besides `train`

register_base(
    Base(
        "lora",
        "LoRA on the attention projections of the vision tower, the text tower or both (lora.towers)",
        "LoRA (q, k, v) in every block of lora.towers",
        "Zanella & Ben Ayed, CVPRW 2024 (MaxZanella/CLIP-LoRA)",
        _SECTIONS,
        {"prompt.context": ""},
        reads=lora_reads,
        validate=_needs_lora,
    )
)
register_base(
    Base(
        "coop",
        "CoOp: a learned prompt context shared by the classes, the class name at the end; the towers frozen",
        "the prompt context (prompt.context words initialise it)",
        "Zhou et al., IJCV 2022 (KaiyangZhou/CoOp)",
        _SECTIONS,
        {"lora.towers": "none"},
        {"prompt.context": "a photo of a"},
        learns_text=True,
        reads=lora_reads,
        validate=_needs_context,
    )
)
register_base(
    Base(
        "coop+lora",
        "CoOp's learned context plus LoRA on lora.towers: the base of the TIR release",
        "the prompt context and LoRA in every block of lora.towers",
        "shuaiyi308/TIR (coop_lora_trainer.py)",
        _SECTIONS,
        defaults={"prompt.context": "a photo of a"},
        learns_text=True,
        reads=lora_reads,
        validate=_needs_both,
    )
)
