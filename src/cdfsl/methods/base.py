"""The `Method` interface: a support step (`fit`) and a query step (`predict`) over E episodes at once.

A fitted method also says how it encodes (`encode`, `class_features`), so probes see exactly what prediction sees
without reaching into its attributes, and answers what cost accounting and export ask (`cost_parts`,
`export_refusal`, `weight_updates`), so nothing outside `cdfsl.methods` branches on its class. A base that trains
runs the shared loop (`cdfsl.methods.training.TrainedBase`).

Prediction computes the class text features once per fit (`fitted_class_features`, kept per class-name set and
text layer): an all-way run predicts its test split in many batches over up to 1,000 classes, and TIR's prediction
hook needs its text-layer features for every batch. The cache is cleared whenever the fitted state changes: around
every subclass's `fit` and `load_trained_state` (wrapped once, in `__init_subclass__`).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from math import prod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from cdfsl.backbone.adapter import ClipAdapter, VisionOutput
from cdfsl.backbone.towers import BlockInputHook
from cdfsl.config import RunConfig
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.errors import TrainingError
from cdfsl.methods.plugins import Recalibration, Remedies, TrainingExtension, autocast_context

Observer = Callable[[int, Tensor], None]
"""Called with (layer, tokens `[E, B, T, D]` entering that vision block, before any recalibration)."""


class Method(ABC):
    """A few-shot classifier over E episodes.

    `fit(batch)` adapts per-episode state on the support sets; `predict(batch)` returns query logits `[E, Q, K]`.

    Args:
        backbone: the frozen adapter.
        config: the run config, resolved (`RunConfig.resolved()`): every recipe value filled in.
        autocast_dtype: bf16 on GPU, None for fp32.
        recalibration, extension: the plug-ins on a trained base (TIR, VtT; `cdfsl.methods.plugins`), or None.
    """

    name: str = "method"
    state_parts: ClassVar[dict[str, str]] = {}
    """The parameter-table part (`cdfsl cost`) of each tensor of `trained_state()`, by the name's first one or two
    dotted components (two are tried first)."""
    part_labels: ClassVar[dict[str, str]] = {}
    """The words `cdfsl cost` shows for each part of `state_parts` (a part without them is shown by its key)."""

    def __init__(
        self,
        backbone: ClipAdapter,
        config: RunConfig,
        autocast_dtype: torch.dtype | None = None,
        recalibration: Recalibration | None = None,
        extension: TrainingExtension | None = None,
    ) -> None:
        if config.recipe is None or config.train.logit_scale is None:
            raise ValueError("methods take a resolved config: pass config.resolved()")
        self.backbone = backbone
        self.config = config
        self.autocast_dtype = autocast_dtype
        self.recalibration = recalibration
        self.extension = extension
        self.on_step: Callable[[int, int], None] | None = None
        """Called with (step, steps) after each training step of `fit` (a progress bar); None: nothing."""
        self._failure: TrainingError | None = None  # the last fit diverged: predicting from it is refused

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap a subclass's own `fit` and `load_trained_state` so that they clear the class-feature cache."""
        super().__init_subclass__(**kwargs)
        for name in ("fit", "load_trained_state"):
            own = cls.__dict__.get(name)
            if own is not None and not getattr(own, "_clears_class_features", False):
                setattr(cls, name, _clearing_class_features(own))

    def fitted_class_features(self, class_names: Sequence[Sequence[str]], layer: int | None = None) -> Tensor:
        """`class_features(class_names, layer)` `[E, K, C]` of the current fit, computed once per fit (without
        autograd history) and kept until the next `fit` or `load_trained_state`."""
        key = (tuple(tuple(names) for names in class_names), layer)
        cache: dict[Any, Tensor] = self.__dict__.setdefault("_class_feature_cache", {})
        if key not in cache:
            with torch.no_grad():
                cache[key] = self.class_features(class_names, layer).detach()
        return cache[key]

    def clear_class_features(self) -> None:
        """Forget the class features of `fitted_class_features` (the fitted state changed)."""
        self.__dict__.pop("_class_feature_cache", None)

    def _end_fit(self, finite: Tensor, batch: EpisodeBatch) -> None:
        """Close a fit: raise `TrainingError` naming the episodes whose training loss was not finite (`finite` `[E]`)
        and remember it, so that predicting from the diverged fit is refused (`_refuse_after_failure`); `fit` clears
        it when it starts."""
        try:
            raise_unless_finite(finite, batch, "the training loss", self.remedies)
        except TrainingError as error:
            self._failure = error
            raise

    def _refuse_after_failure(self) -> None:
        """Raise `TrainingError` when the last fit diverged."""
        if self._failure is not None:
            raise TrainingError(f"cannot predict after a failed fit: {self._failure}")

    def autocast(self) -> AbstractContextManager[object]:
        """bf16 autocast on GPU when configured; a no-op in fp32."""
        return autocast_context(self.backbone.device, self.autocast_dtype)

    def logits(self, image_features: Tensor, text: Tensor) -> Tensor:
        """`logit_scale · cos`: image features `[E, N, C]`, normalized text `[E, K, C]` → `[E, N, K]` (fp32)."""
        images = F.normalize(image_features.float(), dim=-1)
        scale = self.config.train.logit_scale
        assert scale is not None
        return scale * images @ text.transpose(1, 2)

    @abstractmethod
    def fit(self, batch: EpisodeBatch) -> None:
        """Adapt to the support sets of `batch` (E episodes)."""

    @abstractmethod
    def class_features(self, class_names: Sequence[Sequence[str]], layer: int | None = None) -> Tensor:
        """Normalized class text features `[E, K, C]` as prediction uses them: final (`layer=None`) or the pooled
        token after text block `layer` through the final norm and projection."""

    def _prediction_hook(self, class_names: Sequence[Sequence[str]]) -> BlockInputHook | None:
        """TIR's block-input hook at prediction, from the fitted class texts after TIR's text layer; None without
        TIR or when it acts in training only."""
        tir = self.recalibration
        if tir is None or not tir.at_prediction:
            return None
        return tir.hook(self.fitted_class_features(class_names, tir.text_layer))

    def varied_class_features(
        self,
        class_names: Sequence[Sequence[str]],
        skip_blocks: Sequence[int] = (),
        block_scale: dict[int, float] | None = None,
    ) -> Tensor | None:
        """Normalized final class features `[E, K, C]` of the fitted episodes with text blocks `skip_blocks` removed
        and the residual update of the blocks in `block_scale` scaled (the lost-layer probe), for a method that
        learns its class texts; None for one whose class texts are the frozen template's (the probe varies those
        itself, once for the dataset)."""
        return None

    @abstractmethod
    def encode(
        self,
        images: Tensor,
        class_names: Sequence[Sequence[str]],
        observe: Observer | None = None,
        keep_cls_attention: bool = False,
    ) -> VisionOutput:
        """The prediction-time vision pass over normalized images `[E, B, 3, H, W]` of the fitted episodes;
        `observe` sees the tokens entering each block before any recalibration."""

    @torch.no_grad()
    def predict(self, batch: EpisodeBatch) -> Tensor:
        """Query logits `[E, Q, K]` for the episodes last given to `fit`.

        Raises `TrainingError` if any logit is nan or inf: argmax would turn it into a chance-level accuracy that
        looks like a result.
        """
        features = self.encode(batch.query, batch.class_names).features
        logits = self.logits(features, self.fitted_class_features(batch.class_names))
        raise_unless_finite(torch.isfinite(logits).flatten(1).all(dim=1), batch, "the query logits", self.remedies)
        return logits

    def learning_rates(self) -> list[str]:
        """The learning rates of this base's fit as `key=value` (the remedies name them); the shared loop's
        `train.lr` unless the base says otherwise."""
        return [f"train.lr={self.config.train.lr:g}"]

    def plugin_remedies(self) -> Remedies:
        """The attached plug-ins' advice (`Recalibration.remedies`, `TrainingExtension.remedies`): their learning
        rates, then what else to try (the extension's first)."""
        rates: list[str] = []
        tries: list[str] = []
        for plugin in (self.extension, self.recalibration):
            advice = getattr(plugin, "remedies", None)  # optional: a plug-in without it adds nothing
            if advice is not None:
                more_rates, more_tries = advice()
                rates += more_rates
                tries += more_tries
        return rates, tries

    def remedies(self) -> str:
        """What to try when an episode's numbers are not finite, with the values this run used: for a base that
        trains, its learning rates and the plug-ins' (`learning_rates`, `plugin_remedies`)."""
        config = self.config
        tries = []
        if config.trains:
            plugin_rates, plugin_tries = self.plugin_remedies()
            tries.append(f"a lower learning rate (now {', '.join([*self.learning_rates(), *plugin_rates])})")
            tries += plugin_tries
        else:
            tries.append(f"another checkpoint (--pretrained {config.pretrained})")
        tries.append(f"a smaller train.logit_scale (now {config.train.logit_scale:g})")
        if self.autocast_dtype is not None:
            tries.append("--set train.precision=fp32")
        return ", ".join(tries[:-1]) + " or " + tries[-1]

    def episode_records(self) -> list[dict[str, Any]]:
        """Per fitted episode, what training recorded beyond accuracy (e.g. VtT's `dlc_off_step`); stored as is."""
        return []

    def cost_parts(self) -> dict[str, int]:
        """Per-episode parameter counts of what the fitted method learned (`trained_state`), by part (`state_parts`):
        each tensor `[E, ...]` counts `prod(shape[1:])`."""
        parts: dict[str, int] = {}
        for name, tensor in self.trained_state().items():
            head = name.split(".")
            part = self.state_parts.get(".".join(head[:2])) or self.state_parts[head[0]]
            parts[part] = parts.get(part, 0) + prod(tensor.shape[1:])
        return parts

    def export_refusal(self) -> str | None:
        """Why the fitted method cannot become plain open_clip weights (a sentence saying what to do instead), or
        None when `weight_updates` and `class_features` describe it whole."""
        return self.recalibration.export_refusal() if self.recalibration is not None else None

    def weight_updates(self) -> list[tuple[Tensor, Tensor]]:
        """For an export: each frozen backbone weight the fitted method changes, with its merged replacement for the
        first episode (same shape); empty when it changes none."""
        return []

    def trained_state(self) -> dict[str, Tensor]:
        """What the fitted method predicts with, beyond the frozen backbone (LoRA factors, contexts, prompts), by
        name, each with its leading episode axis; empty for a method that trains nothing. `load_trained_state` takes
        it back (a saved classifier)."""
        return {}

    def load_trained_state(self, state: dict[str, Tensor]) -> None:
        """Restore `trained_state()` of a method built with the same config and backbone, as if `fit` had run.

        Raises `ValueError` when `state` is not what this method trains."""
        check_state_fits(state, {}, self.config.method)


def _clearing_class_features(change: Callable[..., Any]) -> Callable[..., Any]:
    """`change` (a method that changes the fitted state), clearing the class-feature cache before and after it."""

    @functools.wraps(change)
    def changed(self: Method, *args: Any, **kwargs: Any) -> Any:
        self.clear_class_features()
        try:
            return change(self, *args, **kwargs)
        finally:
            self.clear_class_features()

    changed._clears_class_features = True  # type: ignore[attr-defined]
    return changed


def check_state_fits(state: dict[str, Tensor], expected: dict[str, Tensor], method: str) -> None:
    """Raise `ValueError` naming what differs when `state` does not have exactly `expected`'s tensor names and
    shapes (the missing and unexpected names, or the first tensors whose shape differs, with both shapes)."""
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        parts = [f"{label} {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
                 for label, names in (("missing", missing), ("unexpected", extra)) if names]  # fmt: skip
        raise ValueError(f"the saved state does not fit {method} ({'; '.join(parts)})")
    shapes = [name for name in sorted(expected) if tuple(state[name].shape) != tuple(expected[name].shape)]
    if shapes:
        differ = ", ".join(f"{n} is {list(state[n].shape)}, not {list(expected[n].shape)}" for n in shapes[:3]) + (
            f" and {len(shapes) - 3} more" if len(shapes) > 3 else ""
        )
        raise ValueError(f"the saved state does not fit {method}: {differ}")


def raise_unless_finite(finite: Tensor, batch: EpisodeBatch, what: str, remedies: str | Callable[[], str]) -> None:
    """Raise `TrainingError` naming the episodes of `batch` whose entry of `finite` (`[E]` bool) is false.

    One host synchronisation: call it once per batch, not per step. `what` names the numbers (`"the query logits"`),
    `remedies` what to try (or a callable giving it, asked only when an episode failed).
    """
    bad = [i for i, ok in zip(batch.indices, finite.tolist(), strict=True) if not ok]
    if bad:
        several = len(bad) > 1
        raise TrainingError(
            f"episode{'s' if several else ''} {', '.join(map(str, bad))}: {what} became nan or inf, which would "
            f"count as a chance-level accuracy; no result is stored for this batch (episodes "
            f"{', '.join(map(str, batch.indices))}). Try {remedies if isinstance(remedies, str) else remedies()}"
        )


def observed(observe: Observer | None, inner: BlockInputHook | None) -> BlockInputHook | None:
    """A block-input hook that shows the tokens to `observe` and then applies `inner` (either may be None)."""
    if observe is None:
        return inner

    def hook(layer: int, x: Tensor) -> Tensor:
        observe(layer, x)
        return inner(layer, x) if inner is not None else x

    return hook


__all__ = ["Method", "Observer", "observed", "raise_unless_finite"]
