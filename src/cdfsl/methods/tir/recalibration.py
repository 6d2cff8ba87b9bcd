"""TIR — Token Importance Recalibration against attention sinks (docs/tir.md).

At the input of chosen vision blocks, every patch token is projected into the joint space with the tower's own final
norm and projection (on attention-pooled towers, PE-Core and SigLIP: each token through the pooling head alone;
`ClipAdapter.project_tokens`), each class text marks its top `k = floor(ratio · M)` tokens, and `Sum` counts how many
classes marked each token. Tokens claimed by every class (sinks) are cut, tokens claimed by one class amplified:
`w = 1 − β · (Sum − α)` clamped at 0, `w = 1` where `Sum = 0`. Weights are constants for autograd; the CLS token is
never touched, nor are prompt tokens after the patches (MaPLe's): TIR's weights are defined over the M patches.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.backbone.towers import BlockInputHook
from cdfsl.config import TIR_VARIANTS, RunConfig, TirConfig
from cdfsl.errors import ConfigError
from cdfsl.methods.plugins import Remedies
from cdfsl.methods.text_side import text_block_index


def auto_alpha_beta(classes: int, alpha: float | None = None, beta: float | None = None) -> tuple[float, float]:
    """Resolve "auto" (None) values: α = (K+1)/2, β = 1/(K − α); K = 5 gives the paper's α = 3, β = 0.5."""
    if alpha is None:
        alpha = (classes + 1) / 2
    if beta is None:
        if classes <= alpha:
            raise ConfigError(f"tir.beta 'auto' needs more classes than alpha ({classes} <= {alpha}); set tir.beta")
        beta = 1.0 / (classes - alpha)
    return float(alpha), float(beta)


def class_votes(similarity: Tensor, ratio: float = 0.3) -> Tensor:
    """`Sum`: how many classes rank each token in their top `floor(ratio · M)`.

    Args: similarity `[..., K, M]`. Returns integer counts `[..., M]` in {0, …, K} (ties as `torch.topk` breaks them).
    """
    tokens = similarity.shape[-1]
    k = math.floor(ratio * tokens)
    votes = torch.zeros((*similarity.shape[:-2], tokens), dtype=torch.int64, device=similarity.device)
    if k > 0:
        # Counted from the top-k indices, without a [..., K, M] mark tensor (half the memory at 1,000 classes).
        marked = similarity.topk(k, dim=-1).indices.flatten(-2)  # [..., K·k]
        votes.scatter_add_(-1, marked, torch.ones((), dtype=torch.int64, device=votes.device).expand_as(marked))
    return votes


def token_weights(
    similarity: Tensor,
    ratio: float = 0.3,
    alpha: float | None = None,
    beta: float | None = None,
    variant: str = "full",
) -> Tensor:
    """TIR weights per token.

    Args:
        similarity: class × patch-token cosine similarities `[..., K, M]` (any leading axes, e.g. episode and batch).
        ratio: share of tokens each class marks.
        alpha, beta: the rule's constants; `None` means "auto" (α = (K+1)/2, β = 1/(K − α)).
        variant: `full` (the rule), `inhibit` (only Sum = K tokens reweighted), `enhance` (only Sum = 1), or
            `simplified` (Sum = K → 0, Sum = 1 → 1 + β(α − 1), others 1).

    Returns:
        weights `[..., M]` (float, no gradient).
    """
    if variant not in TIR_VARIANTS:
        raise ConfigError(f"tir.variant must be one of {', '.join(TIR_VARIANTS)}; got {variant!r}")
    classes = similarity.shape[-2]
    alpha, beta = auto_alpha_beta(classes, alpha, beta)
    votes = class_votes(similarity.detach(), ratio).to(torch.float32)
    rule = (1.0 - beta * (votes - alpha)).clamp(min=0.0)
    ones = torch.ones_like(rule)
    if variant == "full":
        return torch.where(votes == 0, ones, rule)
    if variant == "inhibit":
        return torch.where(votes == classes, rule, ones)
    if variant == "enhance":
        return torch.where(votes == 1, rule, ones)
    simplified = torch.where(votes == classes, torch.zeros_like(rule), ones)
    return torch.where(votes == 1, torch.full_like(rule, 1.0 + beta * (alpha - 1.0)), simplified)


def resolve_blocks(blocks: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Block indices (negative count from the end) → sorted non-negative indices; out of range is a `ConfigError`."""
    resolved = set()
    for block in blocks:
        if not -depth <= block < depth:
            raise ConfigError(
                f"tir.blocks has {block}, outside the {depth}-block vision tower (use 0..{depth - 1} or -{depth}..-1)"
            )
        resolved.add(block % depth)
    return tuple(sorted(resolved))


class TokenRecalibration:
    """TIR as a component: gives block-input hooks that reweight patch tokens for E episodes.

    The method supplies the class texts (`hook(text)`): the frozen template prompts' features after text block
    `text_layer`, or, with a learned text side (coop, coop+lora, maple), the learned prompts' features from the same
    step.

    Args:
        config: TIR knobs.
        backbone: the adapter (its final norm and projection project the tokens).
    """

    role: ClassVar[str] = "recalibration"

    def __init__(self, config: TirConfig, backbone: ClipAdapter) -> None:
        self.config = config
        self.backbone = backbone
        self.blocks = resolve_blocks(config.blocks, backbone.num_vision_blocks)
        self.text_layer = text_block_index(config.text_layer, backbone.num_text_blocks, "tir.text_layer")
        self.at_prediction = config.at_prediction
        self.measure_sinks = False
        self._sink_shares: list[Tensor] = []

    @classmethod
    def build(
        cls, config: RunConfig, backbone: ClipAdapter, autocast_dtype: torch.dtype | None = None
    ) -> TokenRecalibration:
        """The plug-in of a run (`build_method`): TIR with the run's `tir` section."""
        return cls(config.tir, backbone)

    def export_refusal(self) -> str | None:
        if not self.at_prediction:
            return None
        return (
            "TIR reweights tokens at prediction, which a plain open_clip model cannot do; fit with "
            "--set tir.at_prediction=false to export, or predict with cdfsl"
        )

    def remedies(self) -> Remedies:
        """Automatic strengths when the run fixed them."""
        fixed = self.config.alpha is not None or self.config.beta is not None
        return [], ["tir.alpha=auto tir.beta=auto"] if fixed else []

    def take_sink_share(self) -> Tensor | None:
        """The mean share `[E]` of patch tokens claimed by every class (`Sum = K`), over the images and blocks
        measured since the last call (while `measure_sinks` was on); None when none were. Forgets them."""
        shares, self._sink_shares = self._sink_shares, []
        return torch.stack(shares).mean(dim=0) if shares else None

    def weights(self, tokens: Tensor, text: Tensor) -> Tensor:
        """Patch tokens `[E, B, M, D]` and normalized class texts `[E, K, C]` → weights `[E, B, M]`.

        Similarities and top-k run in fp32 with autocast off, so bf16 rounding cannot change which tokens are marked.
        """
        with torch.no_grad(), torch.autocast(tokens.device.type, enabled=False):
            projected = self.backbone.project_tokens(tokens.detach().float()).float()  # [E, B, M, C]
            projected = F.normalize(projected, dim=-1)
            similarity = torch.einsum("ebmc,ekc->ebkm", projected, text.float())
            cfg = self.config
            if self.measure_sinks:
                sinks = class_votes(similarity, cfg.ratio) == similarity.shape[-2]  # [E, B, M]
                self._sink_shares.append(sinks.float().mean(dim=(1, 2)))
            return token_weights(similarity, cfg.ratio, cfg.alpha, cfg.beta, cfg.variant)

    def hook(self, text: Tensor) -> BlockInputHook:
        """A block-input hook for E episodes whose normalized class texts after `text_layer` are `text` `[E, K, C]`."""
        text = text.detach()

        start, end = self.backbone.patch_start, self.backbone.image_tokens

        def recalibrate(layer: int, x: Tensor) -> Tensor:
            if layer not in self.blocks:
                return x
            weights = self.weights(x[:, :, start:end], text)
            patches = x[:, :, start:end] * weights[..., None].to(x.dtype)
            return torch.cat([x[:, :, :start], patches, x[:, :, end:]], dim=2)

        return recalibrate
