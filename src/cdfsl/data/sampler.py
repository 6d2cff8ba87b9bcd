"""Deterministic few-shot episode sampling.

Determinism contract: `EpisodeSampler(index, ways, shots, queries, seed).episode(i)` is a pure function of
(index content, ways, shots, queries, seed, i), where the index content is its classes and its (key, label)
items in index order. It never depends on which other episodes were drawn, in which order, by how many
workers, or by which method, so a resumed or re-batched run sees exactly the same episodes. Each episode draws
from its own generator, `cdfsl.seeding.numpy_stream(seed, i, "episode")`:

1. `ways` classes, uniformly without replacement, among the eligible classes (in label order); the drawn
   order gives the episode labels;
2. for each drawn class in that order, `shots + queries` distinct positions, uniformly without replacement,
   among that class's items (in index order); the first `shots` are the support set, the rest the query set.

Changing this algorithm changes every stored result: do not reorder the draws.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from cdfsl.data.index import Episode, ImageIndex
from cdfsl.errors import ConfigError, DatasetError
from cdfsl.seeding import numpy_stream


class EpisodeSampler:
    """Draws episode `i` of a run; see the module docstring for the determinism contract. The `fixed-way` protocol's
    sampler (`cdfsl.data.protocols`): every episode has the same shape.

    Attributes:
        ways, shots, queries, seed: the episode shape and the run seed.
        eligible_classes: dataset labels with at least `shots + queries` images, ascending.
        excluded_classes: class keys of the classes with fewer images; reported once by the caller.
    """

    def __init__(self, index: ImageIndex, ways: int, shots: int, queries: int, seed: int) -> None:
        _check_shape(ways, shots, queries, seed)
        self.index = index
        self.ways = ways
        self.shots = shots
        self.queries = queries
        self.seed = seed
        needed = shots + queries
        groups = index.items_by_class()
        self._groups = [np.asarray(group, dtype=np.int64) for group in groups]
        self.eligible_classes: tuple[int, ...] = tuple(c for c, g in enumerate(groups) if len(g) >= needed)
        excluded = [c for c, g in enumerate(groups) if len(g) < needed]
        self.excluded_classes: tuple[str, ...] = tuple(index.class_keys[c] for c in excluded)
        if len(self.eligible_classes) < ways:
            raise DatasetError(_too_few_classes_message(index, excluded, groups, ways, shots, queries))
        self._eligible = np.asarray(self.eligible_classes, dtype=np.int64)

    def episode(self, i: int) -> Episode:
        """Episode number `i` (a non-negative integer)."""
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or i < 0:
            raise ValueError(f"episode index must be a non-negative integer, got {i!r}")
        rng = numpy_stream(self.seed, int(i), "episode")
        classes = rng.choice(self._eligible, self.ways, replace=False)
        support: list[tuple[int, ...]] = []
        query: list[tuple[int, ...]] = []
        for label in classes:
            group = self._groups[int(label)]
            picks = group[rng.choice(len(group), self.shots + self.queries, replace=False)]
            support.append(tuple(int(p) for p in picks[: self.shots]))
            query.append(tuple(int(p) for p in picks[self.shots :]))
        return Episode(index=int(i), classes=tuple(int(c) for c in classes), support=tuple(support), query=tuple(query))

    def episodes(self, indices: Iterable[int]) -> list[Episode]:
        """`[self.episode(i) for i in indices]`."""
        return [self.episode(i) for i in indices]


def _check_shape(ways: int, shots: int, queries: int, seed: int) -> None:
    for name, value, low in (
        ("ways", ways, 1),
        ("shots", shots, 1),
        ("queries", queries, 1),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _too_few_classes_message(
    index: ImageIndex, excluded: list[int], groups: list[list[int]], ways: int, shots: int, queries: int
) -> str:
    needed = shots + queries
    eligible = index.num_classes - len(excluded)
    shown = ", ".join(f"{index.class_keys[c]} ({len(groups[c])})" for c in excluded[:20])
    if len(excluded) > 20:
        shown += f", ... ({len(excluded)} in all)"
    return (
        f"{index.name}: a {ways}-way episode with {shots} shots + {queries} queries needs {ways} classes "
        f"with at least {needed} images each, but only {eligible} of {index.num_classes} classes have "
        f"that many; "
        f"excluded (images): {shown or 'none'}. Use fewer ways, shots or queries."
    )
