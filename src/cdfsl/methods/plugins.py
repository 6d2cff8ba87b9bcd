"""The interfaces through which plug-ins attach to any trained base (docs/methods.md "Plug-ins on any base").

A plug-in is built once per method by `build_method`, from its registry entry's `builder` (`module:Class`), with one
signature: `Class.build(config, backbone, autocast_dtype)`. Its class attribute `role` names the `Method` constructor
argument it fills: `"recalibration"` (a `Recalibration`, TIR) or `"extension"` (a `TrainingExtension`, VtT).

The shared training loop (`cdfsl.methods.training`) gives them, at every step:
- a recalibration: the base's class texts after its text block (normalized, `[E, K, C]`), from which `hook` makes the
  block-input hook of that step's vision pass;
- an extension: the step's vision output (per-layer CLS features when it `wants_layer_features`), the base's raw
  per-layer class texts `[E, K, L, C]`, and at the start of a fit the base's trained tensors (which DGSO corrects) and
  its absorption (`Absorb`: the base's own class prompt with the class name replaced by a token, through its text
  tower as it stands at that step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdfsl.backbone.adapter import VisionOutput
from cdfsl.backbone.towers import BlockInputHook
from cdfsl.data.episodes import EpisodeBatch

Absorb = Callable[[Tensor], Tensor]
"""Tokens `[E, B, W]` (text width) → text features `[E, B, C]`: each token in place of the class name of the base's
class prompt (e.g. "a photo of a X."), through the base's text tower."""

TrainedTensor = tuple[Tensor, int]
"""A trained tensor `[E, ...]` and how many of the releases' parameter tensors it stacks along dim 1 (1: the whole
tensor after the episode axis is one parameter). DGSO measures one cosine per (episode, parameter)."""

FlopCounter = Callable[[], AbstractContextManager[Any]]
"""A fresh FLOP-counting context (torch's `FlopCounterMode`, as `cdfsl.analysis.cost` configures it)."""

Remedies = tuple[list[str], list[str]]
"""A part's advice when a fit's numbers are not finite: (its learning rates as `key=value`, e.g. `vtt.lr=0.001`;
other things to try, each a phrase with the value the run used, e.g. `a smaller vtt.beta (now 0.5)`)."""


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    """bf16 (or `dtype`) autocast on `device`; a no-op for fp32 (`dtype` None)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class Recalibration(Protocol):
    """Token recalibration attached to a base (TIR)."""

    role: ClassVar[str]
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

    def export_refusal(self) -> str | None:
        """Why a classifier with this recalibration cannot become plain open_clip weights (a sentence saying what to
        do), or None when it can."""
        ...

    def remedies(self) -> Remedies:
        """What to try, with the run's values, when a fit's numbers are not finite (`Method.remedies`; optional: a
        plug-in without it adds nothing)."""
        ...


class TrainingExtension(Protocol):
    """An objective extension (VtT): its own per-episode modules, optimizer groups and backward pass."""

    role: ClassVar[str]
    cost_part: ClassVar[str]
    """The parameter-table part its modules count under (`cdfsl cost`)."""
    cost_label: ClassVar[str]
    """The words `cdfsl cost` shows for that part."""
    wants_layer_features: bool
    text_layers: Sequence[int]
    """Text blocks whose raw class features `backward` needs, in order (non-negative)."""

    def start(self, batch: EpisodeBatch, tensors: list[TrainedTensor], absorb: Absorb) -> list[dict[str, Any]]:
        """Create per-episode state for `batch`; `tensors` are the base's trained tensors, `absorb` its absorption.
        Returns AdamW parameter groups of its own modules."""
        ...

    def backward(self, loss_ce: Tensor, output: VisionOutput, labels: Tensor, class_layers: Tensor | None) -> Tensor:
        """Fill `.grad` of every trained tensor from the per-episode CE losses `[E]`, the vision output, the labels
        `[E, B]` and the raw per-layer class texts `[E, K, L, C]` (at `text_layers`; None when `text_layers` is
        empty); return the per-episode loss `[E]` whose gradients it filled (the loop checks that it stays finite)."""
        ...

    def finish(self) -> list[dict[str, Any]]:
        """Drop per-episode state (nothing of it is needed at prediction); return per-episode records."""
        ...

    def step_values(self) -> dict[str, Tensor]:
        """Per-episode values `[E]` of the last `backward` worth a training curve (e.g. `loss_vtt`, `dgso_cos`)."""
        ...

    def trained_modules(self) -> list[nn.Module]:
        """The modules it trains in the current fit (for the parameter count; empty between fits)."""
        ...

    def piece_flops(self, batch: EpisodeBatch, batch_size: int, absorb: Absorb, counter: FlopCounter) -> dict[str, int]:
        """FLOPs of its own pieces alone (forward + backward) on inputs of one step's shapes, by name."""
        ...

    def remedies(self) -> Remedies:
        """What to try, with the run's values, when a fit's numbers are not finite (`Method.remedies`; optional: a
        plug-in without it adds nothing)."""
        ...


def plugin_text_layers(recalibration: Recalibration | None, extension: TrainingExtension | None) -> list[int]:
    """The text blocks whose class features a step computes for the plug-ins: the recalibration's, then the
    extension's."""
    tir = [recalibration.text_layer] if recalibration is not None else []
    return tir + (list(extension.text_layers) if extension is not None else [])


def split_plugin_texts(
    at_layers: Sequence[Tensor], recalibration: Recalibration | None, extension: TrainingExtension | None
) -> tuple[Tensor | None, Tensor | None]:
    """Raw class features `[E, K, C]`, one per block of `plugin_text_layers` → (the recalibration's texts, normalized
    `[E, K, C]`, or None; the extension's per-layer texts `[E, K, L, C]`, raw, or None without an extension or for
    one that reads no text block)."""
    rest = list(at_layers)
    tir = F.normalize(rest.pop(0), dim=-1) if recalibration is not None else None
    return tir, torch.stack(rest, dim=2) if extension is not None and rest else None


__all__ = [
    "Absorb",
    "FlopCounter",
    "Recalibration",
    "Remedies",
    "TrainedTensor",
    "TrainingExtension",
    "autocast_context",
    "plugin_text_layers",
    "split_plugin_texts",
]
