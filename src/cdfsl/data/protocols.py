"""Episode protocols: how a benchmark draws its episodes, one registry entry per protocol name.

A protocol is a name, a factory that builds the run's episode sampler from the dataset's image index, the run's
episode shape settings (`EpisodeSettings`: ways, shots, queries) and the seed, and the label a report gives its
column. A benchmark's entry names its protocol (`protocol_of`); the run context builds the sampler through the
registry (`build_sampler`), so nothing else knows a sampler by its class.

Every sampler (`Sampler`) keeps the determinism contract of `cdfsl.data.sampler`: episode `i` is a pure function of
(index content, settings, seed, i), drawn from its own stream, so it is the same images for any method, episode
batch, worker count or resume point. A sampler may yield episodes of different shapes (ways, support and query
counts) in one run; the engine groups a batch of them by `EpisodeShape` so every method sees uniform tensors
(`docs/protocol.md`, "Episodes of different shapes").

`fixed-way` (today's N-way K-shot Q-query sampler, `cdfsl.data.sampler.EpisodeSampler`) is the protocol of every
built-in dataset. Its runs keep the identity they always had; a run under any other protocol adds the protocol's
name to its identity (`engine.runner.run_identity`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cdfsl.data.index import Episode, ImageIndex
from cdfsl.errors import ConfigError

FIXED_WAY = "fixed-way"


@dataclass(frozen=True)
class EpisodeSettings:
    """A run's episode shape settings (its config's `ways`, `shots`, `queries`); a protocol may read them as bounds."""

    ways: int
    shots: int
    queries: int


@dataclass(frozen=True, order=True)
class EpisodeShape:
    """What must agree for episodes to share a batch: K classes, S support images and Q query images in all.

    S and Q are totals over the episode's classes (a protocol may give its classes different shot counts)."""

    ways: int
    supports: int
    queries: int

    @classmethod
    def of(cls, episode: Episode) -> EpisodeShape:
        return cls(
            episode.ways, sum(len(items) for items in episode.support), sum(len(items) for items in episode.query)
        )


@runtime_checkable
class Sampler(Protocol):
    """Draws the episodes of a run (see the module docstring for the determinism contract).

    Attributes:
        excluded_classes: class keys of the classes too small to appear in any episode (the run warns once).
    """

    excluded_classes: tuple[str, ...]

    def episode(self, i: int) -> Episode:
        """Episode number `i` (a non-negative integer)."""
        ...

    def episodes(self, indices: Iterable[int]) -> list[Episode]:
        """`[self.episode(i) for i in indices]`."""
        ...


SamplerFactory = Callable[[ImageIndex, EpisodeSettings, int], Sampler]


@dataclass(frozen=True)
class EpisodeProtocol:
    """A registered protocol.

    Attributes:
        name: what a benchmark entry names (`fixed-way`).
        build: (index, settings, seed) → the run's sampler.
        column: (settings) → a report column's heading after the dataset name, e.g. `1-shot` or `3/5/7-way`.
        largest: (settings) → the largest shape (per field) an episode can have: what `--episode-batch auto` sizes
            memory for.
        description: one line for listings and docs.
        fewest_ways: (settings) → the fewest classes an episode can have (what TIR's auto beta needs), or None.
        varies_shots: whether its episodes' shots per class vary (are not the run's `shots`).
    """

    name: str
    build: SamplerFactory
    column: Callable[[EpisodeSettings], str]
    largest: Callable[[EpisodeSettings], EpisodeShape]
    description: str = ""
    fewest_ways: Callable[[EpisodeSettings], int] | None = None
    varies_shots: bool = False


PROTOCOLS: dict[str, EpisodeProtocol] = {}
"""Every registered protocol by name (`register_protocol`)."""


def register_protocol(protocol: EpisodeProtocol, *, replace: bool = False) -> EpisodeProtocol:
    """Add `protocol` to `PROTOCOLS`; a name already taken is a `ValueError` unless `replace`."""
    if protocol.name in PROTOCOLS and not replace:
        raise ValueError(f"episode protocol {protocol.name!r} is registered already")
    PROTOCOLS[protocol.name] = protocol
    return protocol


def get_protocol(name: str) -> EpisodeProtocol:
    """The registered protocol `name`; an unknown name is a `ConfigError` naming the known ones."""
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown episode protocol {name!r}: one of {', '.join(sorted(PROTOCOLS))}")
    return PROTOCOLS[name]


def protocol_of(dataset: str) -> str:
    """The protocol name of benchmark `dataset` (its entry's `protocol`; `fixed-way` for an entry without one)."""
    from cdfsl.data.readers import DATASETS

    spec = DATASETS.get(dataset)
    return str(getattr(spec, "protocol", FIXED_WAY)) if spec is not None else FIXED_WAY


def build_sampler(protocol: str, index: ImageIndex, settings: EpisodeSettings, seed: int) -> Sampler:
    """The sampler of a run under `protocol` (a registered name)."""
    return get_protocol(protocol).build(index, settings, seed)


def _fixed_way(index: ImageIndex, settings: EpisodeSettings, seed: int) -> Sampler:
    from cdfsl.data.sampler import EpisodeSampler

    return EpisodeSampler(index, settings.ways, settings.shots, settings.queries, seed)


register_protocol(
    EpisodeProtocol(
        FIXED_WAY,
        _fixed_way,
        column=lambda settings: f"{settings.shots}-shot",
        largest=lambda s: EpisodeShape(s.ways, s.ways * s.shots, s.ways * s.queries),
        description="N-way K-shot Q-query episodes, classes and images drawn uniformly (the CD-FSL benchmark's)",
        fewest_ways=lambda s: s.ways,
    )
)

import cdfsl.data.md_sampler  # noqa: E402,F401  (registers the `meta-dataset` protocol)
