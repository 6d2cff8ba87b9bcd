"""`--episode-batch auto`: how many episodes to train at once.

On CUDA, two short trial fits (E = 1 and E = 2, two iterations on random images of the largest episode shape the run's
protocol may yield, `EpisodeProtocol.largest`) give the memory a run needs per episode and for everything else; E is
then the largest batch that fits in 85% of the free memory, capped by `MAX_EPISODE_BATCH` and the number of episodes.
On CPU the backbone's matrix work is already large enough per episode that batching buys little, so `auto` means
`CPU_EPISODE_BATCH`.
"""

from __future__ import annotations

import copy

import torch

from cdfsl.config import RunConfig
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.data.index import Episode
from cdfsl.data.protocols import EpisodeSettings, EpisodeShape, get_protocol, protocol_of

CPU_EPISODE_BATCH = 4
MAX_EPISODE_BATCH = 64
MEMORY_SHARE = 0.85


def largest_shape(config: RunConfig) -> EpisodeShape:
    """The largest episode shape the protocol of `config`'s dataset may yield under its ways, shots and queries."""
    settings = EpisodeSettings(config.ways, config.shots, config.queries)
    return get_protocol(protocol_of(config.dataset)).largest(settings)


def synthetic_batch(
    config: RunConfig, episodes: int, image_size: int, device: torch.device, shape: EpisodeShape | None = None
) -> EpisodeBatch:
    """Random normalized images with the shapes of `episodes` real episodes of `config` (for trials and benchmarks):
    `shape`, or by default `ways` classes of `shots` supports and `queries` queries each. Supports and queries are
    spread over the classes as evenly as they go (the first classes get one more)."""
    shape = shape or EpisodeShape(config.ways, config.ways * config.shots, config.ways * config.queries)
    ways = shape.ways
    views = len(config.resolved().augment.views) if config.trains else 1  # the recipe's views when unset
    support = shape.supports * views
    query = shape.queries
    generator = torch.Generator().manual_seed(0)
    labels_s = (torch.arange(shape.supports) % ways).sort().values.repeat_interleave(views)
    labels_q = (torch.arange(shape.queries) % ways).sort().values
    specs = [Episode(i, tuple(range(ways)), (), ()) for i in range(episodes)]
    return EpisodeBatch(
        episodes=specs,
        class_names=[[f"class {c}" for c in range(ways)] for _ in range(episodes)],
        support=torch.randn((episodes, support, 3, image_size, image_size), generator=generator).to(device),
        support_labels=labels_s.expand(episodes, -1).to(device),
        query=torch.randn((episodes, query, 3, image_size, image_size), generator=generator).to(device),
        query_labels=labels_q.expand(episodes, -1).to(device),
        seed=config.seed,
    )


def _peak_bytes(config: RunConfig, episodes: int) -> int:
    """Peak CUDA memory in bytes of a two-iteration fit and a prediction of `episodes` synthetic episodes of `config`
    on its device (the backbone's weights included; each trial loads its own backbone)."""
    from cdfsl.engine.context import build_context
    from cdfsl.methods import build_method

    trial = copy.deepcopy(config)
    trial.train.iterations = 2
    # Memory does not depend on the weights' values: every backbone but the embedded tiny one gets random weights
    # (`none`) on purpose, so a trial never downloads or reads the run's checkpoint.
    if trial.backbone != "tiny":
        trial.pretrained = "none"
    context = build_context(trial, load_data=False)  # no dataset: the images are synthetic
    device = context.device
    method = build_method(context.config, context.backbone, context.autocast_dtype)
    shape = largest_shape(context.config)
    batch = synthetic_batch(context.config, episodes, context.backbone.image_size, device, shape)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    method.fit(batch)
    method.predict(batch)
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def auto_episode_batch(config: RunConfig) -> int:
    """The episode batch for `config` on its device (see module docstring)."""
    from cdfsl.engine.context import resolve_device

    device = resolve_device(config.device)
    limit = min(MAX_EPISODE_BATCH, config.resolved_episodes())
    if device.type != "cuda":
        return min(CPU_EPISODE_BATCH, limit)
    one, two = _peak_bytes(config, 1), _peak_bytes(config, 2)
    per_episode = max(two - one, 1)
    base = one - per_episode
    free, _ = torch.cuda.mem_get_info(device)
    fits = int((free * MEMORY_SHARE - base) // per_episode)
    return max(1, min(limit, fits))
