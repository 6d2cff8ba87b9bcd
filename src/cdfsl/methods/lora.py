"""`lora`: CLIP-LoRA-Vision, and the shared training loop that TIR and VtT plug into.

Recipe (protocol.md): LoRA on the vision tower's q, k, v; cross-entropy on `100 · cos(image, class text)`; AdamW with
cosine decay to `min_lr` over the run; batches of up to 25 support views, reshuffled each pass. E episodes train at
once: the loss is the sum of per-episode mean losses, so each episode's factors get exactly their own gradient, and
AdamW acts elementwise, so each episode's trajectory is the one it would have alone.

Extension points:
- a `Recalibration` (TIR) rewrites the tokens entering chosen vision blocks, in training and optionally at prediction;
- a `TrainingExtension` (VtT) adds per-episode modules and optimizer groups and owns the backward pass.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from cdfsl.backbone.adapter import BlockInputHook, ClipAdapter, VisionOutput
from cdfsl.backbone.lora import EpisodeLoRA
from cdfsl.config import RunConfig
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.methods.base import Method
from cdfsl.seeding import torch_stream


class Recalibration(Protocol):
    """Token recalibration attached to a method (TIR)."""

    at_prediction: bool

    def hook(self, class_names: list[list[str]]) -> BlockInputHook:
        """A block-input hook for E episodes with these per-episode class names `[E][K]`."""
        ...


class TrainingExtension(Protocol):
    """An objective extension (VtT): its own per-episode modules, optimizer groups and backward pass."""

    wants_layer_features: bool

    def start(self, batch: EpisodeBatch, lora: EpisodeLoRA) -> list[dict[str, Any]]:
        """Create per-episode state for `batch`; return extra AdamW parameter groups."""
        ...

    def backward(self, loss_ce: Tensor, output: VisionOutput, labels: Tensor, lora: EpisodeLoRA) -> None:
        """Fill `.grad` of every trainable tensor from the per-episode CE losses `[E]` and the vision output."""
        ...

    def finish(self) -> None:
        """Drop per-episode state (nothing of it is needed at prediction)."""
        ...


class ViewOrder:
    """Batches of support-view positions for one episode: a fresh permutation per pass, cut into `batch_size` chunks."""

    def __init__(self, views: int, batch_size: int, generator: torch.Generator) -> None:
        self.views, self.batch_size, self.generator = views, batch_size, generator
        self._pending: list[Tensor] = []

    def next(self) -> Tensor:
        """The next batch of positions `[b]` (b = batch_size, or the remainder at the end of a pass)."""
        if not self._pending:
            self._pending = list(torch.randperm(self.views, generator=self.generator).split(self.batch_size))
        return self._pending.pop(0)


class LoraMethod(Method):
    """CLIP-LoRA-Vision with optional token recalibration and training extension."""

    name = "lora"

    def __init__(
        self,
        backbone: ClipAdapter,
        config: RunConfig,
        autocast_dtype: torch.dtype | None = None,
        recalibration: Recalibration | None = None,
        extension: TrainingExtension | None = None,
    ) -> None:
        super().__init__(backbone, config, autocast_dtype)
        self.recalibration = recalibration
        self.extension = extension
        self.lora: EpisodeLoRA | None = None

    def _new_lora(self, batch: EpisodeBatch) -> EpisodeLoRA:
        device = self.backbone.device
        cfg = self.config.lora
        dropout = None
        if cfg.dropout > 0:
            dropout = [torch_stream(batch.seed, i, "dropout", device) for i in batch.indices]
        lora = EpisodeLoRA(
            cfg,
            self.backbone.num_vision_blocks,
            self.backbone.vision_width,
            [torch_stream(batch.seed, i, "lora_init") for i in batch.indices],
            dropout,
        )
        return lora.to(device)

    def fit(self, batch: EpisodeBatch) -> None:
        train = self.config.train
        lora = self._new_lora(batch)
        lora.train()
        groups: list[dict[str, Any]] = [{"params": list(lora.parameters()), "lr": self.config.resolved_lr()}]
        if self.extension is not None:
            groups += self.extension.start(batch, lora)
        optimizer = torch.optim.AdamW(
            groups,
            lr=self.config.resolved_lr(),
            betas=(train.beta1, train.beta2),
            weight_decay=train.weight_decay,
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(train.iterations, 1), eta_min=train.min_lr
        )
        orders = [
            ViewOrder(batch.support.shape[1], train.batch_size, torch_stream(batch.seed, i, "batch_order"))
            for i in batch.indices
        ]
        text = self.class_text(batch.class_names)
        hook = self.recalibration.hook(batch.class_names) if self.recalibration is not None else None
        rows = torch.arange(len(batch), device=batch.support.device)[:, None]
        for _ in range(train.iterations):
            positions = torch.stack([order.next() for order in orders]).to(batch.support.device)  # [E, b]
            images, labels = batch.support[rows, positions], batch.support_labels[rows, positions]
            with self.autocast():
                output = self.backbone.encode_images(
                    images,
                    lora,
                    hook,
                    layer_features=self.extension is not None and self.extension.wants_layer_features,
                )
            logits = self.logits(output.features, text)  # [E, b, K]
            loss_ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(dim=1)  # [E]
            if self.extension is not None:
                self.extension.backward(loss_ce, output, labels, lora)
            else:
                loss_ce.sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
        if self.extension is not None:
            self.extension.finish()
        self.lora = lora

    @torch.no_grad()
    def predict(self, batch: EpisodeBatch) -> Tensor:
        if self.lora is None:
            raise RuntimeError("predict called before fit")
        lora = self.lora
        lora.eval()
        if self.config.lora.merge_for_prediction:
            lora.merge([block.attn.in_proj_weight for block in self.backbone.vision_blocks])
        hook = None
        if self.recalibration is not None and self.recalibration.at_prediction:
            hook = self.recalibration.hook(batch.class_names)
        text = self.class_text(batch.class_names)
        with self.autocast():
            features = self.backbone.encode_images(batch.query, lora, hook).features
        lora.unmerge()
        return self.logits(features, text)
