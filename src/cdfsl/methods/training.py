"""The one training loop of every trained base (`fit_episodes`), what a base supplies to it (`TrainedBase`), and what
the loop shares: the order of support views (`ViewOrder`) and the training curves (`Curves`).

One step: a batch of support views per episode (`ViewOrder`: a fresh permutation per pass, from each episode's own
`batch_order` stream; a fit's positions are all drawn before its first step and copied to the device at once), the
base's class texts (computed once when its text side is frozen, recomputed with gradients when it learns), the base's
vision pass with the recalibration's hook (TIR), cross-entropy on the base's logits, the backward pass (the extension's,
VtT with DGSO, or plain), the per-episode finite flag (read once after the loop), the curves, every optimizer's step,
the base's schedule stepped once, and `on_step`. After the last step: the base's own records, the curves and the
plug-ins' records, merged per episode (`Method.episode_records`).

A base supplies its pieces (`TrainedBase`): fresh trained state for a batch (`start`), its trained tensors for DGSO
and its absorption for VtT, its optimizers (given the extension's parameter groups) and its schedule (learning-rate
schedulers stepped once per step), its step plan from the support set (`plan`: steps and views per step), its class
texts at given text blocks (`step_texts`), its vision pass (`step_encode`), and at the end its fitted state and own
per-episode records (`end`). The plug-ins attach through `cdfsl.methods.plugins`.

A step never makes the host wait for the device (no value read back, no per-step copy from the host): everything the
host needs is read once per fit, before the first step or after the last (`tests/test_host_syncs.py` counts it for
every registered method).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cdfsl.backbone.adapter import VisionOutput
from cdfsl.backbone.towers import BlockInputHook
from cdfsl.config import RunConfig
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.methods.base import Method
from cdfsl.methods.plugins import (
    Absorb,
    Recalibration,
    TrainedTensor,
    TrainingExtension,
    plugin_text_layers,
    split_plugin_texts,
)
from cdfsl.seeding import torch_stream

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


def fit_positions(orders: Sequence[ViewOrder], steps: int, device: torch.device) -> list[Tensor]:
    """Every step's support-view positions `[E, b]` of a fit, drawn up front and moved to `device` in one copy.

    The draws are the ones `ViewOrder.next` makes step by step (each episode's own generator, in the same order), so
    a fit sees the same batches; made before the loop, no step copies positions from the host (a copy from pageable
    memory waits for the device). Each step's tensor is a view of one `[E, total]` device tensor.
    """
    if steps == 0:
        return []
    per_step = [torch.stack([order.next() for order in orders]) for _ in range(steps)]  # [E, b] each, on the CPU
    sizes = [positions.shape[1] for positions in per_step]
    return list(torch.cat(per_step, dim=1).to(device).split(sizes, dim=1))


@dataclass(frozen=True)
class StepPlan:
    """How a fit steps over a support set: `steps` training steps of `batch_size` views per episode."""

    steps: int
    batch_size: int


class TrainedBase(Method):
    """A base that trains: it supplies its pieces and `fit` runs the shared loop (`fit_episodes`).

    Subclasses implement `start`, `trained_tensors`, `absorber`, `optimizers`, `plan`, `step_texts`, `step_encode`
    and `end`; `schedules`, `observe_step` and `learns_text` have plain defaults.
    """

    def __init__(
        self,
        backbone: Any,
        config: RunConfig,
        autocast_dtype: torch.dtype | None = None,
        recalibration: Recalibration | None = None,
        extension: TrainingExtension | None = None,
    ) -> None:
        super().__init__(backbone, config, autocast_dtype, recalibration, extension)
        self._records: list[dict[str, Any]] = []

    @property
    def learns_text(self) -> bool:
        """Whether the class texts change while training (then the loop recomputes them every step)."""
        return True

    @abstractmethod
    def start(self, batch: EpisodeBatch) -> None:
        """Fresh trained state for the episodes of `batch`, in training mode."""

    @abstractmethod
    def trained_tensors(self) -> list[TrainedTensor]:
        """Every tensor the current fit trains, with its parameter count along dim 1 (for DGSO)."""

    @abstractmethod
    def absorber(self) -> Absorb:
        """The extension's absorption through this base's class prompt and text tower (as it stands at each step)."""

    @abstractmethod
    def optimizers(self, plugin_groups: list[dict[str, Any]]) -> list[torch.optim.Optimizer]:
        """The optimizers of the current fit, including the extension's non-empty AdamW parameter groups."""

    def schedules(
        self, optimizers: Sequence[torch.optim.Optimizer], plan: StepPlan
    ) -> list[torch.optim.lr_scheduler.LRScheduler]:
        """The learning-rate schedulers, each stepped once after every step (none: constant rates)."""
        return []

    @abstractmethod
    def plan(self, views: int) -> StepPlan:
        """Steps and views per step for a support set of `views` views per episode."""

    @abstractmethod
    def step_texts(self, class_names: Sequence[Sequence[str]], layers: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        """Class texts as this step sees them: final, normalized `[E, K, C]`, and one raw `[E, K, C]` per text block in
        `layers` (with gradients when they learn)."""

    @abstractmethod
    def step_encode(self, images: Tensor, hook: BlockInputHook | None, layer_features: bool) -> VisionOutput:
        """The training vision pass over support views `[E, b, 3, H, W]` with the current trained state."""

    def observe_step(self, step: int, loss_ce: Tensor, views: int) -> None:
        """See each step's per-episode cross-entropy `[E]` (detached) over `views` views per episode."""

    @abstractmethod
    def end(self) -> list[dict[str, Any]]:
        """Keep the fitted state for prediction (out of training mode) and return the base's own per-episode records
        (empty: none)."""

    @classmethod
    @abstractmethod
    def one_step(cls, config: RunConfig, batch: EpisodeBatch) -> tuple[EpisodeBatch, int]:
        """Make `config` (the caller's copy, `train.iterations` already 1) fit in exactly one training step on the
        returned batch (`batch` or part of its support), and return that batch with the views the step takes per
        episode (`cdfsl cost` counts that step)."""

    def fit(self, batch: EpisodeBatch) -> None:
        """Train the episodes of `batch` with the shared loop (`fit_episodes`)."""
        fit_episodes(self, batch)

    def episode_records(self) -> list[dict[str, Any]]:
        return self._records


def frozen_class_texts(
    base: TrainedBase, class_names: Sequence[Sequence[str]]
) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
    """The class texts every step of a fit reads when the base's text side is frozen, computed once (outside autocast,
    as a run computes them once per class name): final `[E, K, C]`, the recalibration's and the extension's; None
    when the text side learns."""
    if base.learns_text:
        return None
    final, at_layers = base.step_texts(class_names, plugin_text_layers(base.recalibration, base.extension))
    return final, *split_plugin_texts(at_layers, base.recalibration, base.extension)


def fit_episodes(base: TrainedBase, batch: EpisodeBatch) -> None:
    """Train the episodes of `batch` on `base` (the module docstring's step).

    E episodes train at once: the loss is the sum of per-episode mean losses, so each episode's tensors get their own
    gradient and no other's, and the optimizers act elementwise, so each episode's trajectory is the one it would have
    alone, to float tolerance.

    Raises `TrainingError` naming the episodes whose loss (L_ce, or with an extension the loss it backpropagated)
    became nan or inf at any step. The check costs no host synchronisation per step: a per-episode flag on the device
    accumulates `isfinite` and is read once after the loop. After such a failure `predict` and `encode` refuse until
    the next successful `fit`.
    """
    recalibration, extension = base.recalibration, base.extension
    base._failure = None
    base.start(batch)
    groups = extension.start(batch, base.trained_tensors(), base.absorber()) if extension is not None else []
    optimizers = base.optimizers([g for g in groups if g["params"]])
    views = batch.support.shape[1]
    plan = base.plan(views)
    schedules = base.schedules(optimizers, plan)
    orders = [ViewOrder(views, plan.batch_size, torch_stream(batch.seed, i, "batch_order")) for i in batch.indices]
    device = batch.support.device
    step_positions = fit_positions(orders, plan.steps, device)
    layers = plugin_text_layers(recalibration, extension)
    fixed = frozen_class_texts(base, batch.class_names)
    fixed_hook = _hook(recalibration, fixed[1]) if fixed is not None else None
    layer_features = extension is not None and extension.wants_layer_features
    rows = torch.arange(len(batch), device=device)[:, None]
    finite = torch.ones(len(batch), dtype=torch.bool, device=device)  # [E], read after the loop
    curves = Curves(len(batch), plan.steps)
    for step in range(1, plan.steps + 1):
        curves.before_step(step, recalibration)
        positions = step_positions[step - 1]  # [E, b]
        images, labels = batch.support[rows, positions], batch.support_labels[rows, positions]
        with base.autocast():
            if fixed is not None:
                (text, _, class_layers), hook = fixed, fixed_hook
            else:
                text, at_layers = base.step_texts(batch.class_names, layers)
                tir_text, class_layers = split_plugin_texts(at_layers, recalibration, extension)
                hook = _hook(recalibration, tir_text)
            output = base.step_encode(images, hook, layer_features)
        logits = base.logits(output.features, text)  # [E, b, K]
        loss_ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(dim=1)  # [E]
        if extension is not None:
            loss = extension.backward(loss_ce, output, labels, class_layers)
        else:
            loss = loss_ce
            loss_ce.sum().backward()
        finite &= torch.isfinite(loss_ce.detach()) & torch.isfinite(loss.detach())
        curves.after_step(step, loss_ce, recalibration, extension)
        base.observe_step(step, loss_ce.detach(), positions.shape[1])
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for schedule in schedules:
            schedule.step()
        if base.on_step is not None:
            base.on_step(step, plan.steps)
    own_records = base.end()
    plugin_records = extension.finish() if extension is not None else []
    base._records = merge_records(own_records, curves.records(), plugin_records)
    base._end_fit(finite, batch)


def _hook(recalibration: Recalibration | None, text: Tensor | None) -> BlockInputHook | None:
    """The recalibration's block-input hook for these class texts; None without one."""
    if recalibration is None or text is None:
        return None
    return recalibration.hook(text)


__all__ = [
    "CURVE_STRIDE",
    "Absorb",
    "Curves",
    "Recalibration",
    "StepPlan",
    "TrainedBase",
    "TrainedTensor",
    "TrainingExtension",
    "ViewOrder",
    "fit_episodes",
    "fit_positions",
    "frozen_class_texts",
    "merge_records",
    "plugin_text_layers",
    "split_plugin_texts",
]
