"""`zeroshot`: CLIP with class-name prompts, no training."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cdfsl.backbone.adapter import ClipAdapter, VisionOutput
from cdfsl.config import RunConfig
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.methods.base import Method, Observer, observed
from cdfsl.methods.text_side import ClassText


class ZeroShot(Method):
    name = "zeroshot"

    def __init__(self, backbone: ClipAdapter, config: RunConfig, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__(backbone, config, autocast_dtype)
        self._text: dict[int | None, ClassText] = {}

    def fit(self, batch: EpisodeBatch) -> None:
        """Nothing to adapt."""

    def class_features(self, class_names: Sequence[Sequence[str]], layer: int | None = None) -> Tensor:
        if layer not in self._text:
            self._text[layer] = ClassText(self.backbone, self.config.train.template, layer)
        return self._text[layer](class_names)

    @torch.no_grad()
    def encode(
        self,
        images: Tensor,
        class_names: Sequence[Sequence[str]],
        observe: Observer | None = None,
        keep_cls_attention: bool = False,
    ) -> VisionOutput:
        with self.autocast():
            return self.backbone.encode_images(
                images, block_input_hook=observed(observe, None), keep_cls_attention=keep_cls_attention
            )
