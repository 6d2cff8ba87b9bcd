"""Episodes as tensors: support views and queries for E episodes, stacked on the episode axis."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cdfsl.config import AugmentConfig
from cdfsl.data.augment import support_views
from cdfsl.data.images import ImageCache
from cdfsl.data.index import Episode, ImageIndex
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
    augment: AugmentConfig,
    normalize: Callable[[Tensor], Tensor],
    seed: int,
    device: torch.device,
    with_views: bool = True,
) -> EpisodeBatch:
    """Decode (through the cache), augment and normalize the images of `episodes`.

    `with_views=False` keeps only the plain support image (methods that do not train).
    """
    supports, support_labels, queries, query_labels = [], [], [], []
    views = augment.views if with_views else ("plain",)
    for episode in episodes:
        support_items = episode.support_items()
        images = cache.get([item for item, _ in support_items]).to(device).float() / 255.0
        generator = torch_stream(seed, episode.index, "views")
        viewed = support_views(images, views, generator, augment.rotation, augment.jitter, augment.flip_p)
        supports.append(normalize(viewed.flatten(0, 1)))
        labels = torch.tensor([label for _, label in support_items], device=device)
        support_labels.append(labels.repeat_interleave(len(views)))
        query_items = episode.query_items()
        queries.append(normalize(cache.get([item for item, _ in query_items]).to(device).float() / 255.0))
        query_labels.append(torch.tensor([label for _, label in query_items], device=device))
    return EpisodeBatch(
        episodes=list(episodes),
        class_names=[[index.class_names[c] for c in episode.classes] for episode in episodes],
        support=torch.stack(supports),
        support_labels=torch.stack(support_labels),
        query=torch.stack(queries),
        query_labels=torch.stack(query_labels),
        seed=seed,
    )
