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

`all-way` (`cdfsl.data.allway`, the CLIP few-shot suite's protocol 2) is chosen by the run (`--protocol all-way`,
`RunConfig.episode_protocol`), not by the benchmark: one episode of every class, K train images each as support and
the whole test split as queries. Its entry says so through the optional fields a protocol may set: a fixed episode count
(`episodes`), the run settings it does not read (`unread`, left out of the identity) and queries predicted in
streamed batches (`streamed`). Its sampler narrows the index to the items the run reads (`run_index`) and gives the
identity its own fingerprint of the dataset (`index_fingerprint`): both are optional sampler attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cdfsl.data.index import Episode, ImageIndex
from cdfsl.errors import ConfigError

FIXED_WAY = "fixed-way"
ALL_WAY = "all-way"


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
        episodes: the number of episodes of every run under it (all-way: 1), or None for the config's `episodes`.
        unread: run settings (`ways`, `queries`) its sampler does not read: left out of the run identity.
        streamed: its queries are predicted in batches of the run's evaluation batch, never all held at once.
        fewest_ways: (settings) → the fewest classes an episode can have (what TIR's auto beta needs), or None.
        varies_shots: whether its episodes' shots per class vary (are not the run's `shots`).
    """

    name: str
    build: SamplerFactory
    column: Callable[[EpisodeSettings], str]
    largest: Callable[[EpisodeSettings], EpisodeShape]
    description: str = ""
    episodes: int | None = None
    unread: tuple[str, ...] = ()
    streamed: bool = False
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


def run_index(sampler: Sampler, index: ImageIndex) -> ImageIndex:
    """The index a run reads: the sampler's narrowed one (`sampler.run_index`, all-way), else `index`."""
    narrowed = getattr(sampler, "run_index", None)
    return narrowed if isinstance(narrowed, ImageIndex) else index


def index_fingerprint(sampler: Sampler, index: ImageIndex) -> str:
    """The dataset's fingerprint in a run identity: the sampler's own (`sampler.index_fingerprint()`, all-way),
    else `index.fingerprint()`."""
    own = getattr(sampler, "index_fingerprint", None)
    return str(own()) if callable(own) else index.fingerprint()


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


def _all_way(index: ImageIndex, settings: EpisodeSettings, seed: int) -> Sampler:
    from cdfsl.data.allway import AllWaySampler

    return AllWaySampler(index, settings.shots, seed)


register_protocol(
    EpisodeProtocol(
        ALL_WAY,
        _all_way,
        column=lambda settings: f"{settings.shots}-shot all-way",
        largest=lambda s: EpisodeShape(s.ways, s.ways * s.shots, s.ways * s.queries),  # moot: a run has one episode
        description="K train images of every class, one fit, tested on the whole test split (CoOp's, CLIP-LoRA's)",
        episodes=1,
        unread=("ways", "queries"),
        streamed=True,
    )
)


import cdfsl.data.md_sampler  # noqa: E402,F401  (registers the `meta-dataset` protocol)
