"""`--episode-batch auto`: how many episodes to train at once.

On CUDA, two short trial fits (E = 1 and E = 2, two iterations on random images of the largest episode shape the run's
protocol may yield, `EpisodeProtocol.largest`) give the memory a run needs per episode and for everything else. The
trials share one backbone (random weights of the run's architecture), loaded once before them; each trial starts from
an emptied allocator cache and a reset peak counter, and the free memory is read with the cache emptied too (memory
PyTorch holds in its cache but no tensor uses is free for the run). E is then the largest batch that fits in 85% of the
free memory, capped by `MAX_EPISODE_BATCH` and the number of episodes. A trial that runs out of memory gives E = 1;
an estimate that proves too large is split by the run itself (`runner`: a batch out of memory is retried in halves).
On CPU the backbone's matrix work is already large enough per episode that batching buys little, so `auto` means
`CPU_EPISODE_BATCH`.
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch

from cdfsl.config import RunConfig
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.data.index import Episode
from cdfsl.data.protocols import EpisodeSettings, EpisodeShape, get_protocol
from cdfsl.engine.context import LoadCache, RunContext

CPU_EPISODE_BATCH = 4
MAX_EPISODE_BATCH = 64
MEMORY_SHARE = 0.85


def largest_shape(config: RunConfig) -> EpisodeShape:
    """The largest episode shape the protocol of `config`'s dataset may yield under its ways, shots and queries."""
    settings = EpisodeSettings(config.ways, config.shots, config.queries)
    return get_protocol(config.episode_protocol).largest(settings)


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


class DeviceMemory(Protocol):
    """What a trial reads of a device's memory, in bytes (`CudaMemory`; tests give their own)."""

    def clear(self) -> None:
        """Return dead tensors' memory to the device (the allocator's cache emptied) and reset the peak counter."""

    def allocated(self) -> int:
        """Bytes held by live tensors now."""

    def peak(self) -> int:
        """The most bytes held by live tensors since the last `clear`."""

    def free(self) -> int:
        """Bytes the device has free (outside this process's live tensors and cache)."""


class CudaMemory:
    """`DeviceMemory` of a CUDA device, from PyTorch's caching allocator and the driver."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def clear(self) -> None:
        from cdfsl.engine.runner import free_device_memory

        torch.cuda.synchronize(self.device)
        free_device_memory(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    def free(self) -> int:
        return int(torch.cuda.mem_get_info(self.device)[0])


def auto_episode_batch(config: RunConfig, loads: LoadCache | None = None, memory: DeviceMemory | None = None) -> int:
    """The episode batch for `config` on its device (see module docstring). `loads`: where the trials' backbone is
    loaded once (a fresh `LoadCache` by default); `memory`: the device's memory (`CudaMemory` on CUDA; given, the
    trials run on `config`'s device whatever it is)."""
    from cdfsl.engine.context import build_context, resolve_device

    device = resolve_device(config.device)
    limit = min(MAX_EPISODE_BATCH, config.resolved_episodes())
    if memory is None:
        if device.type != "cuda":
            return min(CPU_EPISODE_BATCH, limit)
        memory = CudaMemory(device)
    trial = copy.deepcopy(config)
    trial.train.iterations = 2
    # Memory does not depend on the weights' values: every backbone but the embedded tiny one gets random weights
    # (`none`) on purpose, so a trial never downloads or reads the run's checkpoint.
    if trial.backbone != "tiny":
        trial.pretrained = "none"
    # One backbone for every trial, loaded before the first measurement: its weights count in neither trial's extra
    # memory, and stay loaded while the free memory is read, as the run's own will.
    context = build_context(trial, loads or LoadCache(), load_data=False)  # no dataset: the images are synthetic
    context.load()
    one = _extra_bytes(context, 1, memory)
    two = _extra_bytes(context, 2, memory) if one is not None else None
    if one is None or two is None:
        return 1  # two episodes (or even one) ran out of memory: one at a time
    per_episode = max(two - one, 1)
    base = max(one - per_episode, 0)
    memory.clear()
    fits = int((memory.free() * MEMORY_SHARE - base) // per_episode)
    return max(1, min(limit, fits))


def _extra_bytes(context: RunContext, episodes: int, memory: DeviceMemory) -> int | None:
    """Peak memory in bytes, above what was allocated before (the backbone), of a two-iteration fit and a prediction
    of `episodes` synthetic episodes of the protocol's largest shape; None when it ran out of memory."""
    from cdfsl.methods import build_method

    memory.clear()
    start = memory.allocated()
    try:
        method = build_method(context.spec, context.backbone, context.autocast_dtype)
        shape = largest_shape(context.config)
        batch = synthetic_batch(context.config, episodes, context.backbone.image_size, context.device, shape)
        method.fit(batch)
        method.predict(batch)
        return memory.peak() - start
    except torch.OutOfMemoryError:
        return None
    finally:
        method = batch = None  # type: ignore[assignment]
        memory.clear()
