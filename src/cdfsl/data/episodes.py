"""Episodes as tensors: support views and queries for E episodes of one shape, stacked on the episode axis.

A batch holds episodes of one `EpisodeShape` (classes, support and query counts); `group_by_shape` splits episodes of
several shapes into such groups, in order of first appearance, each keeping its episodes' order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cdfsl.data.augment import ViewSettings, support_views
from cdfsl.data.images import ImageCache
from cdfsl.data.index import Episode, ImageIndex
from cdfsl.data.protocols import EpisodeShape
from cdfsl.seeding import torch_stream


@dataclass
class EpisodeBatch:
    """E episodes ready for a method (all tensors on the compute device).

    Attributes:
        episodes: the episode specs, length E.
        class_names: per episode, the prompt names of its K classes in episode-label order.
        support: normalized support views `[E, S·V, 3, H, W]` (S support images, V views each, image-major).
        support_labels: `[E, S·V]` episode labels.
        query: normalized query images `[E, Q, 3, H, W]`.
        query_labels: `[E, Q]` episode labels.
        seed: the run seed (methods derive their per-episode streams from it).
    """

    episodes: list[Episode]
    class_names: list[list[str]]
    support: Tensor
    support_labels: Tensor
    query: Tensor
    query_labels: Tensor
    seed: int

    def __len__(self) -> int:
        return len(self.episodes)

    @property
    def indices(self) -> list[int]:
        return [episode.index for episode in self.episodes]


def build_batch(
    episodes: Sequence[Episode],
    index: ImageIndex,
    cache: ImageCache,
    augment: ViewSettings,
    normalize: Callable[[Tensor], Tensor],
    seed: int,
    device: torch.device,
    with_views: bool = True,
) -> EpisodeBatch:
    """Decode (through the cache), augment and normalize the images of `episodes`.

    `with_views=False` keeps only the plain support image (methods that do not train). The episodes must share one
    `EpisodeShape` (else a `ValueError`: split them with `group_by_shape` first). On CUDA the images and labels are
    copied from pinned host memory without waiting (`to_device`), so a batch built in a background thread
    (`engine.prefetch.BatchFeed`) never stalls the training thread on a copy.
    """
    shapes = sorted({EpisodeShape.of(episode) for episode in episodes})
    if len(shapes) > 1:
        found = ", ".join(f"{s.ways}-way/{s.supports} supports/{s.queries} queries" for s in shapes)
        raise ValueError(f"one batch needs episodes of one shape, got {found}: batch each group of group_by_shape")
    supports, support_labels, queries, query_labels = [], [], [], []
    views = augment.views if with_views else ("plain",)
    for episode in episodes:
        support_items = episode.support_items()
        images = to_device(cache.get([item for item, _ in support_items], pinned=_pins(device)), device)
        images = images.float() / 255.0
        generator = torch_stream(seed, episode.index, "views")
        viewed = support_views(
            images, views, generator, augment.rotation, augment.jitter, augment.flip_p, augment.crop_scale
        )
        supports.append(normalize(viewed.flatten(0, 1)))
        labels = to_device(torch.tensor([label for _, label in support_items]), device)
        support_labels.append(labels.repeat_interleave(len(views)))
        query_items = episode.query_items()
        query_images = to_device(cache.get([item for item, _ in query_items], pinned=_pins(device)), device)
        queries.append(normalize(query_images.float() / 255.0))
        query_labels.append(to_device(torch.tensor([label for _, label in query_items]), device))
    return EpisodeBatch(
        episodes=list(episodes),
        class_names=[[index.class_names[c] for c in episode.classes] for episode in episodes],
        support=stacked(supports),
        support_labels=stacked(support_labels),
        query=stacked(queries),
        query_labels=stacked(query_labels),
        seed=seed,
    )


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` (on the CPU) on `device`; to CUDA from page-locked memory without blocking the host: the copy is
    queued on the current stream, which every later use of the result on that stream follows."""
    if not _pins(device):
        return tensor.to(device)
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def _pins(device: torch.device) -> bool:
    return device.type == "cuda"


def stacked(tensors: list[Tensor]) -> Tensor:
    """`torch.stack(tensors)`, without a copy for a single tensor (an all-way fit's one episode: its support views
    may be tens of GiB, so a second copy of them must never exist, even for a moment)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def group_by_shape(episodes: Sequence[Episode]) -> list[list[Episode]]:
    """`episodes` split by `EpisodeShape`: one list per shape, in order of first appearance, episodes kept in order."""
    groups: dict[EpisodeShape, list[Episode]] = {}
    for episode in episodes:
        groups.setdefault(EpisodeShape.of(episode), []).append(episode)
    return list(groups.values())
