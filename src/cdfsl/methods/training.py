"""What every base's training loop shares: the order of support views, and the interfaces through which the plug-ins
(TIR's recalibration, VtT's training extension) attach to any base (docs/methods.md "Plug-ins on any base").

A base that takes plug-ins (`LoraMethod` for lora, coop and coop+lora; `MapleMethod`) gives them, at every step:
- TIR: its class texts after TIR's text block (normalized, `[E, K, C]`), from which `Recalibration.hook` makes the
  block-input hook of that step's vision pass;
- VtT: the step's vision output with per-layer CLS features, its raw per-layer class texts `[E, K, L, C]`, and at the
  start of a fit its trained tensors (which DGSO corrects) and its absorption (`Absorb`: the base's own class prompt
  with the class name replaced by a token, through its text tower as it stands at that step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from cdfsl.backbone.adapter import BlockInputHook, VisionOutput
from cdfsl.data.episodes import EpisodeBatch

Absorb = Callable[[Tensor], Tensor]
"""Tokens `[E, B, W]` (text width) → text features `[E, B, C]`: each token in place of the class name of the base's
class prompt (e.g. "a photo of a X."), through the base's text tower."""

TrainedTensor = tuple[Tensor, int]
"""A trained tensor `[E, ...]` and how many of the releases' parameter tensors it stacks along dim 1 (1: the whole
tensor after the episode axis is one parameter). DGSO measures one cosine per (episode, parameter)."""


class Recalibration(Protocol):
    """Token recalibration attached to a base (TIR)."""

    at_prediction: bool
    text_layer: int

    def hook(self, text: Tensor) -> BlockInputHook:
        """A block-input hook for E episodes with these normalized class texts `[E, K, C]` (after `text_layer`)."""
        ...


class TrainingExtension(Protocol):
    """An objective extension (VtT): its own per-episode modules, optimizer groups and backward pass."""

    wants_layer_features: bool
    text_layers: Sequence[int]
    """Text blocks whose raw class features `backward` needs, in order (non-negative)."""

    def start(self, batch: EpisodeBatch, tensors: list[TrainedTensor], absorb: Absorb) -> list[dict[str, Any]]:
        """Create per-episode state for `batch`; `tensors` are the base's trained tensors, `absorb` its absorption.
        Returns AdamW parameter groups of its own modules."""
        ...

    def backward(self, loss_ce: Tensor, output: VisionOutput, labels: Tensor, class_layers: Tensor) -> Tensor:
        """Fill `.grad` of every trained tensor from the per-episode CE losses `[E]`, the vision output, the labels
        `[E, B]` and the raw per-layer class texts `[E, K, L, C]` (at `text_layers`); return the per-episode loss
        `[E]` whose gradients it filled (the loop checks that it stays finite)."""
        ...

    def finish(self) -> list[dict[str, Any]]:
        """Drop per-episode state (nothing of it is needed at prediction); return per-episode records."""
        ...


def plugin_text_layers(recalibration: Recalibration | None, extension: TrainingExtension | None) -> list[int]:
    """The text blocks whose class features a step computes for the plug-ins: TIR's, then VtT's."""
    tir = [recalibration.text_layer] if recalibration is not None else []
    return tir + (list(extension.text_layers) if extension is not None else [])


def split_plugin_texts(
    at_layers: Sequence[Tensor], recalibration: Recalibration | None, extension: TrainingExtension | None
) -> tuple[Tensor | None, Tensor | None]:
    """Raw class features `[E, K, C]`, one per block of `plugin_text_layers` → (TIR's texts, normalized `[E, K, C]`,
    or None; VtT's per-layer texts `[E, K, L, C]`, raw, or None)."""
    rest = list(at_layers)
    tir = F.normalize(rest.pop(0), dim=-1) if recalibration is not None else None
    return tir, torch.stack(rest, dim=2) if extension is not None else None


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
