"""`zeroshot`: CLIP with class-name prompts, no training."""

from __future__ import annotations

import torch
from torch import Tensor

from cdfsl.data.episodes import EpisodeBatch
from cdfsl.methods.base import Method


class ZeroShot(Method):
    name = "zeroshot"

    def fit(self, batch: EpisodeBatch) -> None:
        """Nothing to adapt."""

    @torch.no_grad()
    def predict(self, batch: EpisodeBatch) -> Tensor:
        text = self.class_text(batch.class_names)
        with self.autocast():
            features = self.backbone.encode_images(batch.query).features
        return self.logits(features, text)
