"""The `Method` interface: a support step (`fit`) and a query step (`predict`) over E episodes at once."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.config import RunConfig
from cdfsl.data.episodes import EpisodeBatch


class ClassText:
    """Class prompt features of the frozen text tower, computed once per class name and reused across episodes.

    Args:
        backbone: the adapter.
        template: prompt template with one `{}`.
        layer: `None` for the final text feature, or a text block index (negative counts from the end) for the EOS
            feature after that block through the final norm and projection.
    """

    def __init__(self, backbone: ClipAdapter, template: str, layer: int | None = None) -> None:
        self.backbone = backbone
        self.template = template
        self.layer = layer
        self._cache: dict[str, Tensor] = {}

    @torch.no_grad()
    def __call__(self, class_names: Sequence[Sequence[str]]) -> Tensor:
        """Per-episode class names `[E][K]` → L2-normalized features `[E, K, C]` (fp32)."""
        missing = sorted({name for names in class_names for name in names} - self._cache.keys())
        if missing:
            prompts = [self.template.format(name) for name in missing]
            if self.layer is None:
                features = self.backbone.text_features(prompts)
            else:
                features = self.backbone.text_layer_features(prompts)[self.layer]
            self._cache.update(zip(missing, F.normalize(features.float(), dim=-1), strict=True))
        return torch.stack([torch.stack([self._cache[n] for n in names]) for names in class_names])


class Method(ABC):
    """A few-shot classifier over E episodes.

    `fit(batch)` adapts per-episode state on the support sets; `predict(batch)` returns query logits `[E, Q, K]`.
    """

    name: str = "method"

    def __init__(self, backbone: ClipAdapter, config: RunConfig, autocast_dtype: torch.dtype | None = None) -> None:
        self.backbone = backbone
        self.config = config
        self.autocast_dtype = autocast_dtype
        self.class_text = ClassText(backbone, config.train.template)

    def autocast(self) -> AbstractContextManager[object]:
        """bf16 autocast on GPU when configured; a no-op in fp32."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.backbone.device.type, dtype=self.autocast_dtype)

    def logits(self, image_features: Tensor, text: Tensor) -> Tensor:
        """`logit_scale · cos`: image features `[E, N, C]`, normalized text `[E, K, C]` → `[E, N, K]` (fp32)."""
        images = F.normalize(image_features.float(), dim=-1)
        return self.config.train.logit_scale * images @ text.transpose(1, 2)

    @abstractmethod
    def fit(self, batch: EpisodeBatch) -> None:
        """Adapt to the support sets of `batch` (E episodes)."""

    @abstractmethod
    def predict(self, batch: EpisodeBatch) -> Tensor:
        """Query logits `[E, Q, K]` for the episodes last given to `fit`."""
