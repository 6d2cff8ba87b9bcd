"""Shared test helpers: the tiny model with `digits`, its episode batches, and configs changed by `section__name`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.config import RunConfig
from cdfsl.data.episodes import EpisodeBatch, build_batch
from cdfsl.data.images import ImageCache
from cdfsl.data.index import ImageIndex
from cdfsl.data.readers import load_index
from cdfsl.data.sampler import EpisodeSampler


@dataclass
class DigitsWorld:
    """A backbone with the `digits` index and an image cache at its input size."""

    backbone: ClipAdapter
    index: ImageIndex
    cache: ImageCache

    @classmethod
    def of(cls, backbone: ClipAdapter) -> DigitsWorld:
        index = load_index("digits", None)
        return cls(backbone, index, ImageCache(index, backbone.image_size))

    def batch(self, config: RunConfig, episodes: list[int]) -> EpisodeBatch:
        """Episodes `episodes` of `config` (support views and queries) on the CPU."""
        sampler = EpisodeSampler(self.index, config.ways, config.shots, config.queries, config.seed)
        return build_batch(
            sampler.episodes(episodes), self.index, self.cache, config.resolved().augment, self.backbone.normalize, 0,
            torch.device("cpu"),
        )  # fmt: skip


def configured(config: RunConfig, **changes: object) -> RunConfig:
    """`config` with fields set by `section__name=value` (`train__iterations=3`, `method="vtt"`)."""
    for key, value in changes.items():
        section, _, name = key.rpartition("__")
        setattr(getattr(config, section) if section else config, name, value)
    return config


def stored_run_config(db: Path, iterations: int, **changes: object) -> RunConfig:
    """A run for the runner: lora on digits, tiny with random weights, 5-way 1-shot, 4 episodes of `iterations`
    iterations on the CPU, stored in `db`; then `changes`."""
    config = RunConfig(
        dataset="digits", method="lora", backbone="tiny", pretrained="none", shots=1, episodes=4, device="cpu",
        db=str(db),
    )  # fmt: skip
    config.train.iterations = iterations
    return configured(config, **changes)


def tiny_config(method: str, **changes: object) -> RunConfig:
    """`method` on digits with the tiny model's random weights, 3 queries per class, 3 iterations; then `changes`."""
    config = RunConfig(dataset="digits", method=method, backbone="tiny", pretrained="none", queries=3)
    config.train.iterations = 3
    return configured(config, **changes)
