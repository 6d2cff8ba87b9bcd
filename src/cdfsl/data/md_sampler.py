"""Meta-Dataset's episode sampler: variable ways, variable shots per class, balanced queries (the `meta-dataset`
protocol).

The rules are those of Meta-Dataset's `EpisodeDescriptionSampler` (Triantafillou et al., ICLR 2020;
`meta_dataset/data/sampling.py`, defaults in `learn/gin/setups/data_config_common.gin`), for a dataset's evaluation
classes. With n_c the number of images of class c:

1. Classes. Plain sources: ways N uniform in [5, min(50, classes)], then N classes uniformly without replacement.
   A source with a class hierarchy (ILSVRC-2012, `ClassGroups.spans`): one internal node uniformly among those whose
   leaves (classes present) number between 5 and 392, its leaves sorted by key; more than 50 are sub-sampled to 50
   uniformly without replacement. A source with alphabets (Omniglot, `ClassGroups.alphabets`): one alphabet
   uniformly, N uniform in [5, min(50, its classes)], then N of its classes uniformly without replacement.
2. Queries per class: q = min(10, min_c ⌊n_c / 2⌋), the same for every class.
3. Support size: β ~ U[0, 1) and S = min(500, Σ_c ⌊β · min(100, n_c − q) + 1⌋), so N ≤ S ≤ 500.
4. Shots per class: w_c = n_c · exp(u_c), u_c ~ U[log 0.5, log 2), and k_c = min(⌊w_c / Σw · (S − N)⌋ + 1, n_c − q).
5. Images: for each class in episode order, k_c + q distinct images uniformly; the first k_c are its support.

Determinism: episode `i` is a pure function of (index content, class groups, limits, seed, i), drawn from its own
stream `cdfsl.seeding.numpy_stream(seed, i, "episode")` in the order above, as `cdfsl.data.sampler` is. Classes with
fewer than 2 images can never give a query and a support image; they are excluded (and reported) rather than refused.
Changing the order of the draws changes every stored result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cdfsl.data.index import Episode, ImageIndex
from cdfsl.errors import ConfigError, DatasetError

if TYPE_CHECKING:
    from cdfsl.data.protocols import EpisodeSettings, EpisodeShape

META_DATASET = "meta-dataset"
DEFAULT_EPISODES = 600
"""Test episodes per source in Meta-Dataset's evaluation."""
MIN_IMAGES = 2
"""A class needs one query and one support image (Meta-Dataset's `compute_num_query` refuses fewer)."""


@dataclass(frozen=True)
class EpisodeLimits:
    """The sampler's bounds; the defaults are Meta-Dataset's (`data_config_common.gin`, `sampling.py`).

    Attributes:
        min_ways, max_ways: the range of N (`min_ways`, `max_ways_upper_bound`).
        max_queries: the cap on queries per class (`max_num_query`).
        max_support: the cap on the support set size S (`max_support_set_size`).
        max_support_per_class: the cap on one class's contribution to S (`max_support_size_contrib_per_class`).
        min_log_weight, max_log_weight: the range of the log imbalance weights (log 0.5, log 2).
        max_spanning_leaves: the most leaves an eligible hierarchy node may span (`MAX_SPANNING_LEAVES_ELIGIBLE`).
    """

    min_ways: int = 5
    max_ways: int = 50
    max_queries: int = 10
    max_support: int = 500
    max_support_per_class: int = 100
    min_log_weight: float = math.log(0.5)
    max_log_weight: float = math.log(2.0)
    max_spanning_leaves: int = 392

    def __post_init__(self) -> None:
        if not 1 <= self.min_ways <= self.max_ways:
            raise ConfigError(f"episode limits need 1 <= min_ways <= max_ways, got {self.min_ways}, {self.max_ways}")
        if self.max_support < self.max_ways:
            raise ConfigError(f"max_support={self.max_support} is below max_ways={self.max_ways}: one shot each")
        if min(self.max_queries, self.max_support_per_class) < 1 or self.min_log_weight > self.max_log_weight:
            raise ConfigError("episode limits need max_queries, max_support_per_class >= 1 and ordered log weights")

    @property
    def largest(self) -> EpisodeShape:
        """The largest episode, per field: `max_ways` classes, `max_support` supports, `max_queries` queries each."""
        from cdfsl.data.protocols import EpisodeShape

        return EpisodeShape(self.max_ways, self.max_support, self.max_ways * self.max_queries)


@dataclass(frozen=True)
class ClassGroups:
    """How a source relates its classes, by class key (at most one of the two is set).

    Attributes:
        spans: a class hierarchy: each internal node's id → the keys of the leaf classes under it (ILSVRC's WordNet
            nodes). Classes absent from the index are ignored.
        alphabets: each alphabet (a superclass) → the keys of its classes (Omniglot's characters).
    """

    spans: Mapping[str, Sequence[str]] = field(default_factory=dict)
    alphabets: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.spans and self.alphabets:
            raise ValueError("ClassGroups holds a hierarchy or alphabets, not both")

    @classmethod
    def of(cls, structure: object, class_keys: Sequence[str]) -> ClassGroups | None:
        """The groups of a Meta-Dataset source's class structure (`cdfsl.data.md_hierarchy`, labels of
        `class_keys`): a `ClassHierarchy` (`span_nodes`, `leaves_under`) gives every node above two or more leaves,
        an `Alphabets` (`labels_of`) its alphabets; None gives None."""
        if structure is None:
            return None
        if hasattr(structure, "labels_of"):
            labels_of: Mapping[str, Sequence[int]] = structure.labels_of  # type: ignore[attr-defined]
            return cls(alphabets={name: tuple(class_keys[c] for c in labels) for name, labels in labels_of.items()})
        nodes = structure.span_nodes(2, len(class_keys))  # type: ignore[attr-defined]
        leaves = structure.leaves_under  # type: ignore[attr-defined]
        return cls(spans={node: tuple(class_keys[c] for c in leaves(node)) for node in nodes})


GroupsReader = Callable[[ImageIndex], "ClassGroups | None"]
CLASS_GROUPS: dict[str, GroupsReader] = {}
"""Per dataset name, how to get its `ClassGroups` from its index (`register_class_groups`); a dataset without an entry
takes its Meta-Dataset structure (`md_structure`: ILSVRC's hierarchy, Omniglot's alphabets), or plain classes."""
MD_PREFIX = "md-"


def register_class_groups(dataset: str, reader: GroupsReader) -> None:
    """Let the `meta-dataset` protocol draw the ways of `dataset` within its hierarchy or alphabets: `reader(index)`
    gives them (or None for plain classes)."""
    CLASS_GROUPS[dataset] = reader


def class_groups_of(index: ImageIndex) -> ClassGroups | None:
    """The class groups of the index's dataset: its registered reader's, else for a Meta-Dataset source (`md-*`)
    those of its structure (`cdfsl.data.md_hierarchy.md_structure`), else None (plain classes)."""
    reader = CLASS_GROUPS.get(index.name)
    if reader is not None:
        return reader(index)
    if not index.name.startswith(MD_PREFIX):
        return None
    try:
        from cdfsl.data.md_hierarchy import md_structure  # type: ignore[import-not-found]
    except ImportError:  # the Meta-Dataset readers are not installed: plain classes
        return None
    return ClassGroups.of(md_structure(index.name, index, index.root), index.class_keys)


@dataclass(frozen=True)
class EpisodeDescription:
    """What an episode is made of before its images are drawn: dataset labels in episode order, shots per class
    (`[N]`) and queries per class (one number: queries are balanced)."""

    classes: tuple[int, ...]
    shots: tuple[int, ...]
    queries: int


class MetaDatasetSampler:
    """Draws episode `i` under Meta-Dataset's rules (module docstring).

    Attributes:
        limits: the bounds (`EpisodeLimits`, Meta-Dataset's by default).
        eligible_classes: labels with at least `MIN_IMAGES` images, ascending.
        excluded_classes: class keys of the others, reported once by the caller.
        min_images: the images a class needs to appear (`MIN_IMAGES`), named in the caller's report.
    """

    min_images = MIN_IMAGES

    def __init__(
        self, index: ImageIndex, seed: int, groups: ClassGroups | None = None, limits: EpisodeLimits | None = None
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
        self.index = index
        self.seed = int(seed)
        self.limits = limits or EpisodeLimits()
        item_groups = index.items_by_class()
        self._items = [np.asarray(group, dtype=np.int64) for group in item_groups]
        self._sizes = np.asarray([len(group) for group in item_groups], dtype=np.int64)
        self.eligible_classes: tuple[int, ...] = tuple(int(c) for c in np.flatnonzero(self._sizes >= MIN_IMAGES))
        self.excluded_classes: tuple[str, ...] = tuple(
            index.class_keys[c] for c in range(index.num_classes) if self._sizes[c] < MIN_IMAGES
        )
        self._eligible = np.asarray(self.eligible_classes, dtype=np.int64)
        groups = groups or ClassGroups()
        self._spans = self._eligible_spans(groups.spans) if groups.spans else None
        self._alphabets = self._eligible_alphabets(groups.alphabets) if groups.alphabets else None
        if self._spans is None and self._alphabets is None and len(self._eligible) < self.limits.min_ways:
            raise DatasetError(
                f"{index.name}: a Meta-Dataset episode needs at least {self.limits.min_ways} classes of "
                f"{MIN_IMAGES}+ images, but only {len(self._eligible)} of {index.num_classes} have that many; "
                "check the data root holds the source's test classes"
            )

    def _labels_of(self, keys: Iterable[str]) -> list[int]:
        """Labels of the eligible classes among `keys`, sorted by key (Meta-Dataset sorts leaves by WordNet id)."""
        label_of = {key: label for label, key in enumerate(self.index.class_keys)}
        eligible = set(self.eligible_classes)
        return [label_of[key] for key in sorted(set(keys)) if key in label_of and label_of[key] in eligible]

    def _eligible_spans(self, spans: Mapping[str, Sequence[str]]) -> list[np.ndarray]:
        limits = self.limits
        nodes = []
        for node in sorted(spans):
            labels = self._labels_of(spans[node])
            if limits.min_ways <= len(labels) <= limits.max_spanning_leaves:
                nodes.append(np.asarray(labels, dtype=np.int64))
        if not nodes:
            raise DatasetError(
                f"{self.index.name}: no node of the class hierarchy spans between {limits.min_ways} and "
                f"{limits.max_spanning_leaves} classes present; check the data root holds the source's test classes"
            )
        return nodes

    def _eligible_alphabets(self, alphabets: Mapping[str, Sequence[str]]) -> list[np.ndarray]:
        chosen = []
        for name in sorted(alphabets):
            labels = self._labels_of(alphabets[name])
            if len(labels) < self.limits.min_ways:  # Meta-Dataset refuses such a superclass too
                raise DatasetError(
                    f"{self.index.name}: alphabet {name!r} has {len(labels)} classes with {MIN_IMAGES}+ images, "
                    f"fewer than the {self.limits.min_ways} ways an episode needs; check its folder"
                )
            chosen.append(np.asarray(labels, dtype=np.int64))
        if not chosen:
            raise DatasetError(f"{self.index.name}: no alphabet to draw episodes from")
        return chosen

    def _ways_among(self, rng: np.random.Generator, available: np.ndarray) -> np.ndarray:
        """N uniform in [min_ways, min(max_ways, len(available))], then N of `available` without replacement."""
        top = min(self.limits.max_ways, len(available))
        ways = int(rng.integers(self.limits.min_ways, top + 1))
        return rng.choice(available, ways, replace=False)

    def _classes(self, rng: np.random.Generator) -> np.ndarray:
        if self._spans is not None:
            leaves = self._spans[int(rng.integers(len(self._spans)))]
            if len(leaves) > self.limits.max_ways:
                leaves = rng.choice(leaves, self.limits.max_ways, replace=False)
            return leaves
        if self._alphabets is not None:
            return self._ways_among(rng, self._alphabets[int(rng.integers(len(self._alphabets)))])
        return self._ways_among(rng, self._eligible)

    def _describe(self, rng: np.random.Generator) -> EpisodeDescription:
        limits = self.limits
        classes = self._classes(rng)
        sizes = self._sizes[classes]
        queries = int(min(limits.max_queries, int((sizes // 2).min())))
        remaining = sizes - queries
        beta = rng.random()
        contributions = np.minimum(limits.max_support_per_class, remaining)
        support = int(min(np.floor(beta * contributions + 1).sum(), limits.max_support))
        weights = sizes * np.exp(rng.uniform(limits.min_log_weight, limits.max_log_weight, size=len(classes)))
        desired = np.floor(weights / weights.sum() * (support - len(classes))).astype(np.int64) + 1
        shots = np.minimum(desired, remaining)
        return EpisodeDescription(tuple(int(c) for c in classes), tuple(int(k) for k in shots), queries)

    def describe(self, i: int) -> EpisodeDescription:
        """The classes, shots and queries of episode `i`, without drawing its images (the same stream as
        `episode(i)`, so they are its classes, shots and queries)."""
        return self._describe(_stream(self.seed, i))

    def episode(self, i: int) -> Episode:
        """Episode number `i` (a non-negative integer)."""
        rng = _stream(self.seed, i)
        description = self._describe(rng)
        support: list[tuple[int, ...]] = []
        query: list[tuple[int, ...]] = []
        for label, shots in zip(description.classes, description.shots, strict=True):
            group = self._items[label]
            picks = group[rng.choice(len(group), shots + description.queries, replace=False)]
            support.append(tuple(int(p) for p in picks[:shots]))
            query.append(tuple(int(p) for p in picks[shots:]))
        return Episode(index=int(i), classes=description.classes, support=tuple(support), query=tuple(query))

    def episodes(self, indices: Iterable[int]) -> list[Episode]:
        """`[self.episode(i) for i in indices]`."""
        return [self.episode(i) for i in indices]


def _stream(seed: int, i: int) -> np.random.Generator:
    """Episode `i`'s own stream, `cdfsl.seeding.numpy_stream(seed, i, "episode")` (imported here: `cdfsl.seeding`
    loads torch, and the protocol registry is read by commands that must not)."""
    if isinstance(i, bool) or not isinstance(i, int | np.integer) or i < 0:
        raise ValueError(f"episode index must be a non-negative integer, got {i!r}")
    from cdfsl.seeding import numpy_stream

    return numpy_stream(seed, int(i), "episode")


def _meta_dataset(index: ImageIndex, settings: EpisodeSettings, seed: int) -> MetaDatasetSampler:
    """The protocol's factory: Meta-Dataset's limits whatever the run's ways, shots and queries (those select the
    fixed-shape variant instead, `RunConfig.episode_protocol`)."""
    return MetaDatasetSampler(index, seed, class_groups_of(index))


def episode_column(_: EpisodeSettings) -> str:
    """The report column of a Meta-Dataset run: its shape varies, so the protocol names it."""
    return "variable-way variable-shot"


def _register() -> None:
    """Register the protocol. `cdfsl.data.protocols` imports this module at its end and this module imports it only
    here, so there is no import cycle and the registry is complete whichever of the two is imported first."""
    from cdfsl.data.protocols import EpisodeProtocol, register_protocol

    register_protocol(
        EpisodeProtocol(
            META_DATASET,
            _meta_dataset,
            column=episode_column,
            largest=lambda _: EpisodeLimits().largest,
            description="Meta-Dataset's episodes: 5-50 ways, imbalanced shots, up to 500 supports, 10 queries a class",
            fewest_ways=lambda _: EpisodeLimits().min_ways,
            varies_shots=True,
            unread=("ways", "shots", "queries"),  # its sampler draws its own shapes: not in the run identity
        )
    )


_register()
