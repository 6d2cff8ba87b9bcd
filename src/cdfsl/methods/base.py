"""The `Method` interface: a support step (`fit`) and a query step (`predict`) over E episodes at once.

A fitted method also says how it encodes (`encode`, `class_features`), so probes see exactly what prediction sees
without reaching into its attributes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cdfsl.backbone.adapter import BlockInputHook, ClipAdapter, VisionOutput
from cdfsl.config import RunConfig
from cdfsl.data.episodes import EpisodeBatch

Observer = Callable[[int, Tensor], None]
"""Called with (layer, tokens `[E, B, T, D]` entering that vision block, before any recalibration)."""


class Method(ABC):
    """A few-shot classifier over E episodes.

    `fit(batch)` adapts per-episode state on the support sets; `predict(batch)` returns query logits `[E, Q, K]`.

    Args:
        backbone: the frozen adapter.
        config: the run config, resolved (`RunConfig.resolved()`): every recipe value filled in.
        autocast_dtype: bf16 on GPU, None for fp32.
    """

    name: str = "method"

    def __init__(self, backbone: ClipAdapter, config: RunConfig, autocast_dtype: torch.dtype | None = None) -> None:
        if config.recipe is None or config.train.logit_scale is None:
            raise ValueError("methods take a resolved config: pass config.resolved()")
        self.backbone = backbone
        self.config = config
        self.autocast_dtype = autocast_dtype

    def autocast(self) -> AbstractContextManager[object]:
        """bf16 autocast on GPU when configured; a no-op in fp32."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.backbone.device.type, dtype=self.autocast_dtype)

    def logits(self, image_features: Tensor, text: Tensor) -> Tensor:
        """`logit_scale · cos`: image features `[E, N, C]`, normalized text `[E, K, C]` → `[E, N, K]` (fp32)."""
        images = F.normalize(image_features.float(), dim=-1)
        scale = self.config.train.logit_scale
        assert scale is not None
        return scale * images @ text.transpose(1, 2)

    @abstractmethod
    def fit(self, batch: EpisodeBatch) -> None:
        """Adapt to the support sets of `batch` (E episodes)."""

    @abstractmethod
    def class_features(self, class_names: Sequence[Sequence[str]], layer: int | None = None) -> Tensor:
        """Normalized class text features `[E, K, C]` as prediction uses them: final (`layer=None`) or the pooled
        token after text block `layer` through the final norm and projection."""

    @abstractmethod
    def encode(
        self,
        images: Tensor,
        class_names: Sequence[Sequence[str]],
        observe: Observer | None = None,
        keep_cls_attention: bool = False,
    ) -> VisionOutput:
        """The prediction-time vision pass over normalized images `[E, B, 3, H, W]` of the fitted episodes;
        `observe` sees the tokens entering each block before any recalibration."""

    @torch.no_grad()
    def predict(self, batch: EpisodeBatch) -> Tensor:
        """Query logits `[E, Q, K]` for the episodes last given to `fit`."""
        features = self.encode(batch.query, batch.class_names).features
        return self.logits(features, self.class_features(batch.class_names))

    def episode_records(self) -> list[dict[str, Any]]:
        """Per fitted episode, what training recorded beyond accuracy (e.g. VtT's `dlc_off_step`); stored as is."""
        return []


def observed(observe: Observer | None, inner: BlockInputHook | None) -> BlockInputHook | None:
    """A block-input hook that shows the tokens to `observe` and then applies `inner` (either may be None)."""
    if observe is None:
        return inner

    def hook(layer: int, x: Tensor) -> Tensor:
        observe(layer, x)
        return inner(layer, x) if inner is not None else x

    return hook


__all__ = ["Method", "Observer", "observed"]
