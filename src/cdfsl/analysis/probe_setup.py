"""What every diagnostic probe needs: a config's run context (backbone, episodes and batches), fitted methods, and
an observed vision pass.

`prepare` builds the probes' `ProbeSetup` around the engine's own run context (`engine.context.build_context`, which
`Runner.run` uses too, sharing backbones and image caches through the runner), and the probes use fitted methods
only through the `Method` interface; so a probe sees exactly the episodes, views and fine-tuning that `cdfsl run`
does for the same config.

"Layer l" of the vision tower means, in every probe, the hidden tokens entering vision block l (TIR's insertion
points are block inputs too); L layers for an L-block tower. With token recalibration active, the observed tokens are
the ones *before* recalibration, i.e. what the previous block produced and what TIR computes its Sum from.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cdfsl.backbone.adapter import ClipAdapter, VisionOutput
from cdfsl.config import RunConfig
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.data.index import ImageIndex
from cdfsl.engine.context import RunContext, build_context
from cdfsl.engine.runner import Runner
from cdfsl.errors import ConfigError
from cdfsl.methods import Method, build_method
from cdfsl.methods.base import Observer

IMAGE_SETS = ("query", "support")


@dataclass
class ProbeSetup:
    """A config's run context, loaded and ready for probing.

    Attributes:
        config: the config as given (validated, not resolved): `method(name)` builds each method from it, so a method
            other than `config.method` follows its own default recipe unless `config.recipe` names one.
        context: its run context (`build_context`; `context.config` is the resolved config): device, autocast dtype,
            dataset, episode sampler, and the backbone and image cache, both loaded.
    """

    config: RunConfig
    context: RunContext

    @property
    def backbone(self) -> ClipAdapter:
        """The frozen adapter."""
        return self.context.backbone

    @property
    def index(self) -> ImageIndex:
        """The dataset's image index."""
        return self.context.data()[0]

    @property
    def device(self) -> torch.device:
        """The compute device."""
        return self.context.device

    def batches(self, episodes: int, with_views: bool = True) -> Iterator[EpisodeBatch]:
        """Episodes `0 … episodes−1` as batches of `config.episode_batch` episodes (`RunContext.batches`)."""
        return self.context.batches(range(episodes), with_views)

    def method(self, name: str) -> Method:
        """The method `name` built from this config (its other knobs unchanged)."""
        return build_method(dataclasses.replace(self.config, method=name), self.backbone, self.context.autocast_dtype)


def prepare(config: RunConfig, runner: Runner | None = None) -> ProbeSetup:
    """Validate `config` and load what its probes need (the backbone and caches are shared through `runner`)."""
    context = build_context(config, runner.loads if runner is not None else None)
    context.load()
    return ProbeSetup(config, context)


def check_episodes(episodes: int) -> None:
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ConfigError(f"episodes must be a positive integer, got {episodes!r}")


def probe_images(batch: EpisodeBatch, which: str, views: int) -> tuple[Tensor, Tensor]:
    """Normalized images `[E, B, 3, H, W]` and labels `[E, B]` of the query set, or of the support set (first view
    of each support image, the plain one in the default recipe)."""
    if which == "query":
        return batch.query, batch.query_labels
    if which == "support":
        return batch.support[:, ::views], batch.support_labels[:, ::views]
    raise ConfigError(f"images must be one of {', '.join(IMAGE_SETS)}; got {which!r}")


def fit(setup: ProbeSetup, name: str, batch: EpisodeBatch) -> Method:
    """Build method `name` and fit it on `batch` (a no-op for `zeroshot`)."""
    method = setup.method(name)
    method.fit(batch)
    return method


def encode(
    method: Method,
    images: Tensor,
    class_names: list[list[str]],
    observe: Observer | None = None,
    keep_cls_attention: bool = False,
) -> VisionOutput:
    """Vision pass of a fitted method as prediction runs it (its LoRA and, when active at prediction, its
    recalibration) over `[E, B]` images; `observe` sees the tokens entering each block before recalibration."""
    return method.encode(images, class_names, observe, keep_cls_attention=keep_cls_attention)


def class_marks(backbone: ClipAdapter, patches: Tensor, text: Tensor, ratio: float) -> Tensor:
    """Which patch tokens each class ranks in its top `floor(ratio · M)` (as `class_votes`, before summing).

    Args: hidden patch tokens `[E, B, M, D]`, normalized class texts `[E, K, C]`. Returns bool `[E, B, K, M]`;
    `.sum(dim=-2)` is TIR's Sum.
    """
    projected = F.normalize(backbone.project_tokens(patches).float(), dim=-1)
    similarity = torch.einsum("ebmc,ekc->ebkm", projected, text.float())
    k = math.floor(ratio * similarity.shape[-1])
    marks = torch.zeros_like(similarity, dtype=torch.bool)
    if k > 0:
        marks.scatter_(-1, similarity.topk(k, dim=-1).indices, True)
    return marks


def accuracy(method: Method, features: Tensor, text: Tensor, labels: Tensor) -> Tensor:
    """Per-episode accuracy in [0, 1] `[E]` of image features `[E, B, C]` against normalized texts `[E, K, C]`."""
    predictions = method.logits(features, text).argmax(dim=-1)
    return (predictions == labels).double().mean(dim=1)


def resolve_layers(layers: Sequence[int], depth: int, what: str) -> list[int]:
    """Layer indices (negative count from the end) → non-negative, in the given order; out of range is an error."""
    resolved = []
    for layer in layers:
        if not -depth <= layer < depth:
            raise ConfigError(f"{what} {layer} is outside the {depth}-block tower (use 0..{depth - 1} or -{depth}..-1)")
        resolved.append(layer % depth)
    return resolved
