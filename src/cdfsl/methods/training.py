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

from cdfsl.backbone.adapter import VisionOutput
from cdfsl.backbone.towers import BlockInputHook
from cdfsl.data.episodes import EpisodeBatch

Absorb = Callable[[Tensor], Tensor]
"""Tokens `[E, B, W]` (text width) → text features `[E, B, C]`: each token in place of the class name of the base's
class prompt (e.g. "a photo of a X."), through the base's text tower."""

TrainedTensor = tuple[Tensor, int]
"""A trained tensor `[E, ...]` and how many of the releases' parameter tensors it stacks along dim 1 (1: the whole
tensor after the episode axis is one parameter). DGSO measures one cosine per (episode, parameter)."""


CURVE_STRIDE = 10
"""Training curves keep every CURVE_STRIDE-th step (1, 11, 21, …) and the last one."""


class Curves:
    """Per-episode training curves of one fit, recorded at `CURVE_STRIDE`.

    Values are kept as device tensors `[E]` and read once in `records()`, so recording adds no host synchronisation
    to a step. A value that does not exist at a step (VtT's loss after DLC switched it off) is nan, stored as null.

    Args:
        episodes: E; steps: the fit's number of training steps.
    """

    def __init__(self, episodes: int, steps: int) -> None:
        self.episodes = episodes
        self.steps = sorted({*range(1, steps + 1, CURVE_STRIDE), steps}) if steps > 0 else []
        self._wanted = set(self.steps)
        self._values: dict[str, dict[int, Tensor]] = {}

    def wants(self, step: int) -> bool:
        """Whether step `step` (1-based) is recorded."""
        return step in self._wanted

    def add(self, step: int, name: str, values: Tensor | None) -> None:
        """Record `values` `[E]` of quantity `name` at `step` (ignored when None or not a recorded step)."""
        if values is not None and step in self._wanted:
            self._values.setdefault(name, {})[step] = values.detach().float().reshape(self.episodes)

    def before_step(self, step: int, recalibration: Recalibration | None) -> None:
        """Let TIR measure its sink share in this step's forward when the step is recorded."""
        if recalibration is not None:
            recalibration.measure_sinks = self.wants(step)

    def after_step(
        self,
        step: int,
        loss_ce: Tensor,
        recalibration: Recalibration | None,
        extension: TrainingExtension | None,
    ) -> None:
        """Record the step's `loss_ce` `[E]`, TIR's `sink_share` and the extension's values (when recorded)."""
        if not self.wants(step):
            return
        self.add(step, "loss_ce", loss_ce)
        if recalibration is not None:
            self.add(step, "sink_share", recalibration.take_sink_share())
            recalibration.measure_sinks = False
        if extension is not None:
            for name, values in extension.step_values().items():
                self.add(step, name, values)

    def records(self) -> list[dict[str, Any]]:
        """Per episode `{"curves": {"step": [...], name: [...]}}` (one host read for all values)."""
        names = sorted(self._values)
        if not names:
            return [{} for _ in range(self.episodes)]
        nan = torch.tensor(float("nan"))
        table = torch.stack(
            [torch.stack([self._values[n].get(t, nan.expand(self.episodes)).cpu() for t in self.steps]) for n in names]
        )  # [names, steps, E]
        rows = table.permute(2, 0, 1).tolist()
        return [
            {
                "curves": {
                    "step": list(self.steps),
                    **{n: [None if v != v else round(v, 6) for v in row[i]] for i, n in enumerate(names)},
                }
            }
            for row in rows
        ]


def merge_records(*parts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-episode records from several sources (the loop's curves, a plug-in's records) merged episode by episode;
    an empty source is skipped."""
    present = [p for p in parts if p]
    return [{k: v for record in records for k, v in record.items()} for records in zip(*present, strict=True)]


class Recalibration(Protocol):
    """Token recalibration attached to a base (TIR)."""

    at_prediction: bool
    text_layer: int
    measure_sinks: bool
    """While true, each hooked forward also measures the share of sink tokens (see `take_sink_share`)."""

    def take_sink_share(self) -> Tensor | None:
        """The mean share `[E]` of patch tokens claimed by every class, over the blocks measured since the last call
        (None when none were), and forget them."""
        ...

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

    def step_values(self) -> dict[str, Tensor]:
        """Per-episode values `[E]` of the last `backward` worth a training curve (e.g. `loss_vtt`, `dgso_cos`)."""
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
