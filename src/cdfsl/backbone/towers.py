"""The interfaces between the adapter, its vision towers and the methods: q/k/v projections, block-input hooks and
what a vision tower provides (`VisionTower`). Kept apart so the tower implementations (`cdfsl.backbone.adapter` for
open_clip's ViTs, `cdfsl.backbone.timm_vision` for timm trunks) and the methods depend on these, not on each other."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch.nn.functional as F
from torch import Tensor, nn


class QkvProjection(Protocol):
    """Computes the fused q/k/v projection of vision block `layer` for E episodes.

    Args: `h` `[E, n, D]` (the block's normalized input, n = images × tokens), the frozen `weight` `[3D, D]` and
    `bias` `[3D]`. Returns `[E, n, 3D]`.
    """

    def __call__(self, layer: int, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor: ...


BlockInputHook = Callable[[int, Tensor], Tensor]
"""Called with (block index, tokens `[E, B, T, D]`) before each vision block; returns the tokens to use."""


def square_side(size: int | Sequence[int]) -> int:
    """A tower's input size (an int, or open_clip's `(height, width)` of a square input) as one side in pixels."""
    return int(size[0] if isinstance(size, tuple | list) else size)


def plain_qkv(layer: int, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The frozen projection: `[E, n, D]` → `[E, n, 3D]`."""
    return F.linear(h, weight, bias)


class VisionTower(Protocol):
    """What the adapter needs of a vision tower; `ClipVisionTower` (open_clip ViTs) and
    `cdfsl.backbone.timm_vision.TimmVisionTower` (timm trunks) give it.

    Attributes: `blocks`; `width` D; `image_size`; `num_patches` M; `prefix_tokens` (tokens before the patches: 1 for
    a CLS token, 0 without); `has_cls` (whether token 0 is a CLS token).
    """

    width: int
    image_size: int
    num_patches: int
    prefix_tokens: int
    has_cls: bool

    @property
    def blocks(self) -> nn.ModuleList: ...

    def qkv_parameters(self, layer: int) -> tuple[Tensor, Tensor | None]:
        """Frozen fused q/k/v weight `[3D, D]` and bias `[3D]` (or None) of block `layer`."""
        ...

    def embed(self, images: Tensor, prompts: Tensor | None = None) -> Tensor:
        """Normalized images `[N, 3, H, W]` (and prompts `[N, P, D]`) → tokens entering block 0 `[N, T, D]`."""
        ...

    def block(
        self, layer: int, x: Tensor, qkv_projection: QkvProjection, want_cls_attention: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Block `layer` over `[E, B, T, D]`; also the CLS query's attention `[E, B, heads, T]` when asked."""
        ...

    def pool(self, x: Tensor) -> Tensor:
        """Image tokens `[..., prefix + M, D]` → pooled features in the joint space `[..., C]` (not normalized)."""
        ...

    def project_tokens(self, tokens: Tensor) -> Tensor:
        """Hidden tokens `[..., D]` → per-token features in the joint space `[..., C]` (not normalized)."""
        ...
