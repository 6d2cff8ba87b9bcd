"""The LoRA bases (`lora`, `coop`, `coop+lora`): per-episode LoRA on the vision tower, the text tower or both,
optionally a CoOp context, trained by the shared loop (`cdfsl.methods.training`; docs/methods.md, docs/recipes.md).

What this base supplies to the loop (`TrainedBase`): fresh vision LoRA (each episode's `lora_init` and `dropout`
streams) and a fresh text side (`TextSide`: text LoRA, context) per fit; its class texts, fixed once when the text
side is frozen and recomputed with gradients when it learns; the vision pass with its LoRA; its trained tensors (the
LoRA factors of both towers, then the context) and its absorption through the text side's own prompt
(`TextSide.absorber`) for VtT; AdamW over the LoRA factors (with VtT's groups) and SGD over the context; the recipe's
cosine schedule (`learning_rate_schedules`) stepped once per iteration; `train.iterations` steps of
`train.batch_size` views.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from cdfsl.backbone.adapter import ClipAdapter, VisionOutput
from cdfsl.backbone.lora import EpisodeLoRA
from cdfsl.backbone.towers import BlockInputHook, QkvProjection, plain_qkv
from cdfsl.config import ALL_SUPPORT, RunConfig
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.methods.base import Observer, check_state_fits, observed
from cdfsl.methods.plugins import (
    Absorb,
    Recalibration,
    TrainedTensor,
    TrainingExtension,
    plugin_text_layers,
    split_plugin_texts,
)
from cdfsl.methods.text_side import TextSide
from cdfsl.methods.training import StepPlan, TrainedBase
from cdfsl.seeding import torch_stream


def learning_rate_schedules(
    optimizers: Sequence[torch.optim.Optimizer], config: RunConfig
) -> list[torch.optim.lr_scheduler.LRScheduler]:
    """The recipe's schedule for each optimizer: cosine with `T_max = schedule_horizon × iterations` and `eta_min =
    min_lr`, stepped once per iteration (so with the VtT release's horizon 8 the rate ends near 96% of its start), or
    none."""
    train = config.train
    if train.schedule == "none":
        return []
    assert train.iterations is not None
    horizon = max(1, round(train.schedule_horizon * train.iterations))
    return [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=horizon, eta_min=train.min_lr) for o in optimizers]


class LoraMethod(TrainedBase):
    """A LoRA base with optional CoOp context, token recalibration and training extension."""

    name = "lora"
    state_parts: ClassVar[dict[str, str]] = {
        "vision_lora": "vision_lora",
        "text_lora": "text_lora",
        "context": "prompt_context",
    }
    part_labels: ClassVar[dict[str, str]] = {
        "vision_lora": "vision-tower LoRA",
        "text_lora": "text-tower LoRA",
        "prompt_context": "prompt context",
    }

    def __init__(
        self,
        backbone: ClipAdapter,
        config: RunConfig,
        autocast_dtype: torch.dtype | None = None,
        recalibration: Recalibration | None = None,
        extension: TrainingExtension | None = None,
    ) -> None:
        super().__init__(backbone, config, autocast_dtype, recalibration, extension)
        self.text_side = TextSide(backbone, config)
        self.lora: EpisodeLoRA | None = None
        self._training_lora: EpisodeLoRA | None = None  # the vision LoRA of the fit under way
        self._text_params: tuple[list[Tensor], list[Tensor]] = ([], [])  # its text LoRA and context tensors

    def learning_rates(self) -> list[str]:
        """AdamW's `train.lr`, and the SGD rate of a learned prompt context."""
        prompt = self.config.prompt
        return [f"train.lr={self.config.train.lr:g}", *([f"prompt.lr={prompt.lr:g}"] if prompt.context else [])]

    @property
    def trains_vision(self) -> bool:
        return self.config.lora.towers in ("vision", "both")

    @property
    def learns_text(self) -> bool:
        return self.text_side.trainable

    def _new_vision_lora(self, batch: EpisodeBatch) -> EpisodeLoRA:
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

    def _texts(self, class_names: Sequence[Sequence[str]]) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Final class features `[E, K, C]` (normalized), TIR's texts after its text layer (normalized `[E, K, C]`)
        and VtT's raw per-layer texts `[E, K, L, C]` (None without the plug-in)."""
        layers = plugin_text_layers(self.recalibration, self.extension)
        final, at_layers = self.text_side.features(class_names, layers)
        return final, *split_plugin_texts(at_layers, self.recalibration, self.extension)

    # ------------------------------------------------------------------ the pieces of the shared loop
    def start(self, batch: EpisodeBatch) -> None:
        lora = self._new_vision_lora(batch) if self.trains_vision else None
        if lora is not None:
            lora.train()
        self._training_lora = lora
        self._text_params = self.text_side.start(batch.seed, batch.indices)

    def trained_tensors(self) -> list[TrainedTensor]:
        """Every tensor this base trains (vision LoRA, then the text side's), for DGSO."""
        lora = self._training_lora
        vision = [(t, t.shape[1]) for t in lora.tensors()] if lora is not None else []
        return vision + self.text_side.trained_tensors()

    def absorber(self) -> Absorb:
        return self.text_side.absorber(self.config.vtt.placeholder)

    def optimizers(self, plugin_groups: list[dict[str, Any]]) -> list[torch.optim.Optimizer]:
        """AdamW over the LoRA factors of both towers (and the extension's groups), SGD over a prompt context."""
        train, prompt = self.config.train, self.config.prompt
        text_lora, context = self._text_params
        lora = self._training_lora
        lora_params = [*(lora.parameters() if lora is not None else ()), *text_lora]
        groups: list[dict[str, Any]] = [{"params": lora_params, "lr": train.lr}, *plugin_groups]
        optimizers: list[torch.optim.Optimizer] = [
            torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), weight_decay=train.weight_decay)
        ]
        if context:
            optimizers.append(
                torch.optim.SGD(context, lr=prompt.lr, momentum=prompt.momentum, weight_decay=prompt.weight_decay)
            )
        return optimizers

    def schedules(
        self, optimizers: Sequence[torch.optim.Optimizer], plan: StepPlan
    ) -> list[torch.optim.lr_scheduler.LRScheduler]:
        return learning_rate_schedules(optimizers, self.config)

    def plan(self, views: int) -> StepPlan:
        train = self.config.train
        assert train.iterations is not None and train.batch_size is not None
        batch_size = views if train.batch_size == ALL_SUPPORT else min(int(train.batch_size), views)
        return StepPlan(train.iterations, batch_size)

    @classmethod
    def one_step(cls, config: RunConfig, batch: EpisodeBatch) -> tuple[EpisodeBatch, int]:
        views = batch.support.shape[1]
        assert config.train.batch_size is not None
        size = views if config.train.batch_size == ALL_SUPPORT else int(config.train.batch_size)
        return batch, min(size, views)

    def step_texts(self, class_names: Sequence[Sequence[str]], layers: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        return self.text_side.features(class_names, layers)

    def step_encode(self, images: Tensor, hook: BlockInputHook | None, layer_features: bool) -> VisionOutput:
        lora = self._training_lora
        projection: QkvProjection = lora if lora is not None else plain_qkv
        return self.backbone.encode_images(images, projection, hook, layer_features=layer_features)

    def end(self) -> list[dict[str, Any]]:
        self.text_side.train(False)
        self.lora = self._training_lora
        return []

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def class_features(self, class_names: Sequence[Sequence[str]], layer: int | None = None) -> Tensor:
        with self.autocast():
            final, at_layers = self.text_side.features(class_names, () if layer is None else (layer,))
        return final if layer is None else F.normalize(at_layers[0], dim=-1)

    @torch.no_grad()
    def varied_class_features(
        self,
        class_names: Sequence[Sequence[str]],
        skip_blocks: Sequence[int] = (),
        block_scale: dict[int, float] | None = None,
    ) -> Tensor | None:
        if not self.text_side.trainable:
            return None
        with self.autocast():
            return self.text_side.features(class_names, skip_blocks=skip_blocks, block_scale=block_scale)[0]

    @torch.no_grad()
    def encode(
        self,
        images: Tensor,
        class_names: Sequence[Sequence[str]],
        observe: Observer | None = None,
        keep_cls_attention: bool = False,
    ) -> VisionOutput:
        self._refuse_after_failure()
        lora = self.lora
        hook = self._prediction_hook(class_names)
        merged = lora is not None and self.config.lora.merge_for_prediction
        if lora is not None:
            lora.eval()
            if merged:
                lora.merge(self.backbone.vision_qkv_weights())
        try:
            with self.autocast():
                return self.backbone.encode_images(
                    images,
                    lora if lora is not None else plain_qkv,
                    observed(observe, hook),
                    keep_cls_attention=keep_cls_attention,
                )
        finally:
            if merged and lora is not None:
                lora.unmerge()

    def weight_updates(self) -> list[tuple[Tensor, Tensor]]:
        """The q, k, v weights of each tower with LoRA, merged with the first episode's factors."""
        towers = [
            (self.lora, self.backbone.vision_qkv_weights()),
            (self.text_side.lora, self.backbone.text_qkv_weights()),
        ]
        updates: list[tuple[Tensor, Tensor]] = []
        for lora, weights in towers:
            if lora is None:
                continue
            with torch.no_grad():
                for weight, merged in zip(weights, lora.merged_weights(weights), strict=True):
                    updates.append((weight, merged[0]))
        return updates

    def trained_state(self) -> dict[str, Tensor]:
        parts = {"vision_lora": self.lora, "text_lora": self.text_side.lora}
        state = {
            f"{part}.{k}": v
            for part, module in parts.items()
            if module is not None
            for k, v in module.state_dict().items()
        }
        if self.text_side.context is not None:
            state["context"] = self.text_side.context.detach()
        return {name: tensor.detach() for name, tensor in state.items()}

    def load_trained_state(self, state: dict[str, Tensor]) -> None:
        episodes = 1 if not state else next(iter(state.values())).shape[0]
        device = self.backbone.device
        self.text_side.start(0, list(range(episodes)))  # shells of the learned text side, overwritten below
        self.lora = self._lora_shell(episodes) if self.trains_vision else None
        expected = self.trained_state()
        check_state_fits(state, expected, self.config.method)
        with torch.no_grad():
            for name, tensor in state.items():
                expected[name].copy_(tensor.to(device))
        self.text_side.train(False)
        self._failure = None

    def _lora_shell(self, episodes: int) -> EpisodeLoRA:
        """A vision-tower LoRA for `episodes` episodes whose values are about to be overwritten."""
        cfg = self.config.lora
        generators = [torch.Generator().manual_seed(0) for _ in range(episodes)]
        lora = EpisodeLoRA(cfg, self.backbone.num_vision_blocks, self.backbone.vision_width, generators)
        return lora.to(self.backbone.device)
