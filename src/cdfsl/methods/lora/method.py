"""The trained methods: a LoRA base (vision tower, text tower or both; optionally a CoOp context) and its loop, into
which TIR and VtT plug (docs/methods.md, docs/recipes.md).

One step: a batch of support views per episode (or all of them), class text features (computed once when the text
side is frozen, recomputed with gradients when it learns), the vision pass with per-episode LoRA (and TIR's hook),
cross-entropy on `logit_scale · cos`, backward, AdamW on the LoRA factors (and VtT's modules), SGD on the context, and
the learning-rate schedule stepped once. E episodes train at once: the loss is the sum of per-episode mean losses, so
each episode's parameters get their own gradient and no other's, and AdamW and SGD act elementwise, so each episode's
trajectory is the one it would have alone, to float tolerance (docs/methods.md: batched kernels may round otherwise).

Plug-ins (`cdfsl.methods.training`):
- a `Recalibration` (TIR) rewrites the tokens entering chosen vision blocks, in training and optionally at prediction;
- a `TrainingExtension` (VtT) adds per-episode modules and optimizer groups and owns the backward pass; it absorbs
  through the text side's own prompt (`TextSide.absorber`) and corrects the LoRA factors of both towers and the
  context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cdfsl.backbone.adapter import ClipAdapter, VisionOutput
from cdfsl.backbone.lora import EpisodeLoRA
from cdfsl.backbone.towers import BlockInputHook, QkvProjection, plain_qkv
from cdfsl.config import ALL_SUPPORT, RunConfig
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.methods.base import Method, Observer, check_state_fits, observed
from cdfsl.methods.text_side import TextSide
from cdfsl.methods.training import (
    Curves,
    Recalibration,
    TrainedTensor,
    TrainingExtension,
    ViewOrder,
    merge_records,
    plugin_text_layers,
    split_plugin_texts,
)
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


class LoraMethod(Method):
    """A LoRA base with optional CoOp context, token recalibration and training extension."""

    name = "lora"

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
        self._records: list[dict[str, Any]] = []

    @property
    def trains_vision(self) -> bool:
        return self.config.lora.towers in ("vision", "both")

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

    def trained_tensors(self, lora: EpisodeLoRA | None) -> list[TrainedTensor]:
        """Every tensor this base trains (vision LoRA, then the text side's), for DGSO."""
        vision = [(t, t.shape[1]) for t in lora.tensors()] if lora is not None else []
        return vision + self.text_side.trained_tensors()

    def _start_extension(self, batch: EpisodeBatch, lora: EpisodeLoRA | None) -> list[dict[str, Any]]:
        """Start the extension on `batch` with this base's trained tensors and absorption; its optimizer groups."""
        assert self.extension is not None
        absorb = self.text_side.absorber(self.config.vtt.placeholder)
        return self.extension.start(batch, self.trained_tensors(lora), absorb)

    def _start_training(self, batch: EpisodeBatch, lora: EpisodeLoRA | None) -> list[torch.optim.Optimizer]:
        """Fresh per-episode state of the text side and the extension, and the optimizers: AdamW over the LoRA factors
        of both towers (and the extension's groups), SGD over a prompt context."""
        train, prompt = self.config.train, self.config.prompt
        text_lora, context = self.text_side.start(batch.seed, batch.indices)
        lora_params = [*(lora.parameters() if lora is not None else ()), *text_lora]
        groups: list[dict[str, Any]] = [{"params": lora_params, "lr": train.lr}]
        if self.extension is not None:
            groups += [g for g in self._start_extension(batch, lora) if g["params"]]
        optimizers: list[torch.optim.Optimizer] = [
            torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), weight_decay=train.weight_decay)
        ]
        if context:
            optimizers.append(
                torch.optim.SGD(context, lr=prompt.lr, momentum=prompt.momentum, weight_decay=prompt.weight_decay)
            )
        return optimizers

    def fit(self, batch: EpisodeBatch) -> None:
        """Train the episodes of `batch` (see the module docstring).

        Raises `TrainingError` naming the episodes whose loss (L_ce, or with an extension the loss it backpropagated)
        became nan or inf at any step. The check costs no host synchronisation per step: a per-episode flag on the
        device accumulates `isfinite` and is read once after the loop. After such a failure `predict` and `encode`
        refuse until the next successful `fit`.
        """
        train = self.config.train
        self._failure = None
        assert train.iterations is not None and train.batch_size is not None
        lora = self._new_vision_lora(batch) if self.trains_vision else None
        if lora is not None:
            lora.train()
        optimizers = self._start_training(batch, lora)
        schedules = learning_rate_schedules(optimizers, self.config)
        views = batch.support.shape[1]
        batch_size = views if train.batch_size == ALL_SUPPORT else min(int(train.batch_size), views)
        orders = [ViewOrder(views, batch_size, torch_stream(batch.seed, i, "batch_order")) for i in batch.indices]
        learns_text = self.text_side.trainable
        fixed = None if learns_text else self._texts(batch.class_names)
        fixed_hook = self._hook(fixed[1]) if fixed is not None else None
        rows = torch.arange(len(batch), device=batch.support.device)[:, None]
        projection: QkvProjection = lora if lora is not None else plain_qkv
        finite = torch.ones(len(batch), dtype=torch.bool, device=batch.support.device)  # [E], read after the loop
        curves = Curves(len(batch), train.iterations)
        for step in range(1, train.iterations + 1):
            curves.before_step(step, self.recalibration)
            positions = torch.stack([order.next() for order in orders]).to(batch.support.device)  # [E, b]
            images, labels = batch.support[rows, positions], batch.support_labels[rows, positions]
            with self.autocast():
                text, tir_text, class_layers = fixed if fixed is not None else self._texts(batch.class_names)
                hook = fixed_hook if fixed is not None else self._hook(tir_text)
                output = self.backbone.encode_images(
                    images,
                    projection,
                    hook,
                    layer_features=self.extension is not None and self.extension.wants_layer_features,
                )
            logits = self.logits(output.features, text)  # [E, b, K]
            loss_ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(dim=1)  # [E]
            if self.extension is not None:
                assert class_layers is not None
                loss = self.extension.backward(loss_ce, output, labels, class_layers)
            else:
                loss = loss_ce
                loss_ce.sum().backward()
            finite &= torch.isfinite(loss_ce.detach()) & torch.isfinite(loss.detach())
            curves.after_step(step, loss_ce, self.recalibration, self.extension)
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for schedule in schedules:
                schedule.step()
            if self.on_step is not None:
                self.on_step(step, train.iterations)
        plugin_records = self.extension.finish() if self.extension is not None else []
        self._records = merge_records(curves.records(), plugin_records)
        self.text_side.train(False)
        self.lora = lora
        self._end_fit(finite, batch)

    def _hook(self, tir_text: Tensor | None) -> BlockInputHook | None:
        if self.recalibration is None or tir_text is None:
            return None
        return self.recalibration.hook(tir_text)

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

    def episode_records(self) -> list[dict[str, Any]]:
        return self._records

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
