"""The `maple` base declared: the `maple` section (the release's defaults), its rules, the fields it reads and its
per-episode records. Torch-free.

MaPLe runs its own epoch schedule (`maple.epochs` passes over the support views in batches of `maple.batch_size`,
SGD at `maple.lr` with warm-up then cosine) and scales logits by the backbone's learned scale, so it reads none of
the step-counted loop's `train` fields but the precision (and, with VtT, the `train` betas and weight decay of
VtT's AdamW, declared by `vtt`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cdfsl.methods.training_settings import augment_reads
from cdfsl.registry import Base, Record, Section, register_base, register_section
from cdfsl.rules import DECAY_WHY, LR_WHY, MAX_DEPTH, MAX_ITERATIONS, MAX_LR, integer, number

if TYPE_CHECKING:
    from cdfsl.config import RunConfig
    from cdfsl.registry import MethodSpec


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


register_section(
    Section(
        "maple",
        MapleConfig,
        (
            integer("maple.tokens", 1, MAX_DEPTH),
            integer("maple.depth", 1, MAX_DEPTH, why="checked against the backbone's depth when the method is built"),
            number("maple.lr", 0, MAX_LR, low_open=True, why=LR_WHY),
            number("maple.momentum", 0, 1, high_open=True),
            number("maple.weight_decay", 0, MAX_LR, why=DECAY_WHY),
            integer("maple.batch_size", 1),
            integer("maple.epochs", 1, MAX_ITERATIONS),
            integer("maple.warmup_epochs", 0, MAX_ITERATIONS),
            number("maple.warmup_lr", 0, MAX_LR, low_open=True, why=LR_WHY),
        ),
    )
)

_ALWAYS = ("context", "tokens", "depth", "lr", "momentum", "weight_decay", "batch_size", "epochs", "warmup_epochs")


def maple_reads(config: RunConfig, spec: MethodSpec) -> tuple[str, ...]:
    """Every `maple` field (`warmup_lr` only when there are warm-up epochs), the support views, and the precision."""
    keys = [f"maple.{name}" for name in _ALWAYS]
    if config.maple.warmup_epochs > 0:
        keys.append("maple.warmup_lr")
    return (*keys, *augment_reads(config), "train.precision")


register_base(
    Base(
        "maple",
        "MaPLe: learned prompts in the first maple.depth blocks of both towers, vision prompts coupled from text",
        "text prompts per block and the text-to-vision coupling maps",
        "Khattak et al., CVPR 2023 (muzairkhattak/multimodal-prompt-learning)",
        ("maple", "augment"),
        builder="cdfsl.methods.maple.method:MapleMethod",
        learns_text=True,
        reads=maple_reads,
        records=(
            Record("maple_first_epoch_loss", float, summary="the episode's mean cross-entropy over its first epoch"),
            Record("maple_last_epoch_loss", float, summary="the episode's mean cross-entropy over its last epoch"),
        ),
    )
)
