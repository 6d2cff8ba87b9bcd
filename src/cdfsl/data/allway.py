"""Protocol 2, all-way K-shot (CoOp's and CLIP-LoRA's): one fit on K images of every class, tested on the test split.

For an index with `train` and `test` splits (the CLIP few-shot suite's readers fill `ImageIndex.splits`):

- the support set: K images per class from the `train` split, uniformly without replacement; a class with fewer
  than K train images is drawn with replacement (as CoOp's `generate_fewshot_dataset` with `repeat=True`), so every
  class has exactly K supports;
- the validation set: min(K, 4) images per class from the `val` split, drawn the same way (empty without a `val`
  split); it is kept for a recipe that selects on it, and none does (CLIP-LoRA's release sets `VALIDATION = False`);
- the test set: every item of the `test` split.

Determinism: the draw is a pure function of (index content, K, seed). Class `c` draws from its own stream,
`cdfsl.seeding.numpy_stream(seed, c, "allway_train")` (`"allway_val"` for the validation draw), over its train items
in index order, so it is the same for every method, and a class added to the index leaves the other classes' draws
unchanged. Changing this algorithm changes every stored all-way result: do not reorder the draws.

A run reads only the drawn items and the test split, so it runs on `AllWaySampler.run_index`, the index narrowed
to them; its fingerprint (`AllWaySampler.index_fingerprint`) hashes the listing of the whole index (keys, labels,
splits, no content) and the contents of the narrowed index's items: ImageNet's 1.28 million train files are listed,
never read.

This module imports no torch itself (the seeded streams come from `cdfsl.seeding`, imported when a draw is made).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from cdfsl.data.index import Episode, ImageIndex
from cdfsl.errors import ConfigError, DatasetError

TRAIN, VAL, TEST = "train", "val", "test"
VALIDATION_SHOTS = 4  # CoOp's and CLIP-LoRA's `min(num_shots, 4)` validation images per class


@dataclass(frozen=True)
class AllWayDraw:
    """The items of one all-way run, as positions in the full index, per class (label order).

    Attributes:
        support: per class, its K drawn train positions (a position repeats only for a class with fewer than K).
        val: per class, its min(K, 4) drawn val positions (empty tuples without a `val` split).
        test: per class, every test position of the class, in index order.
        repeated: class keys of the classes drawn with replacement (fewer than K train images).
    """

    support: tuple[tuple[int, ...], ...]
    val: tuple[tuple[int, ...], ...]
    test: tuple[tuple[int, ...], ...]
    repeated: tuple[str, ...] = ()


def draw_all_way(index: ImageIndex, shots: int, seed: int) -> AllWayDraw:
    """The all-way K-shot draw of `index` (see the module docstring).

    Raises:
        ConfigError: `shots` or `seed` is not a valid integer.
        DatasetError: the index has no train or no test split, or a class has no train image.
    """
    _check_integer("shots", shots, 1)
    _check_integer("seed", seed, 0)
    check_splits(index)
    train = _positions_by_class(index, TRAIN)
    empty = [index.class_keys[c] for c, group in enumerate(train) if not group]
    if empty:
        raise DatasetError(
            f"{index.name}: classes without a train image cannot be drawn for all-way {shots}-shot: "
            f"{_listed(empty)}; check the split file"
        )
    support = tuple(_draw(group, shots, seed, c, "allway_train") for c, group in enumerate(train))
    val_shots = min(shots, VALIDATION_SHOTS)
    val_groups = _positions_by_class(index, VAL) if VAL in index.splits else [[] for _ in index.class_keys]
    val = tuple(_draw(group, val_shots, seed, c, "allway_val") if group else () for c, group in enumerate(val_groups))
    repeated = tuple(index.class_keys[c] for c, group in enumerate(train) if len(group) < shots)
    test = tuple(tuple(group) for group in _positions_by_class(index, TEST))
    return AllWayDraw(support, val, test, repeated)


def check_splits(index: ImageIndex) -> None:
    """Raise `DatasetError` unless `index` has both a train and a test split (what an all-way run needs)."""
    missing = [name for name in (TRAIN, TEST) if name not in index.splits]
    if missing:
        present = ", ".join(index.split_names) or "none"
        raise DatasetError(
            f"{index.name}: --protocol all-way needs a dataset with train and test splits (the CLIP few-shot suite's "
            f"split files); this one has no {' and no '.join(missing)} split (splits present: {present}). "
            "Use --protocol episodic for it"
        )


class AllWaySampler:
    """The `all-way` protocol's sampler: one episode (number 0) of every class, K supports per class from the train
    split and the whole test split as its queries, over the narrowed index `index`.

    Attributes:
        full_index: the dataset's whole index.
        run_index: the index narrowed to the drawn train and val items and the test split (in index order); the run's
            episodes, image cache and fingerprint refer to it.
        draw: the draw, in positions of `full_index`.
        excluded_classes: always empty (every class takes part; a class short of train images is drawn with
            replacement, `draw.repeated`).
    """

    excluded_classes: tuple[str, ...] = ()

    def __init__(self, index: ImageIndex, shots: int, seed: int) -> None:
        self.full_index = index
        self.shots = shots
        self.seed = seed
        self.draw = draw_all_way(index, shots, seed)
        kept = sorted({p for part in (self.draw.support, self.draw.val, self.draw.test) for g in part for p in g})
        moved = {position: i for i, position in enumerate(kept)}
        self.run_index = dataclasses.replace(
            index,
            items=tuple(index.items[p] for p in kept),
            labels=tuple(index.labels[p] for p in kept),
            splits=tuple(index.splits[p] for p in kept),
        )
        self._support = tuple(tuple(moved[p] for p in group) for group in self.draw.support)
        self._val = tuple(tuple(moved[p] for p in group) for group in self.draw.val)
        self._test = tuple(tuple(moved[p] for p in group) for group in self.draw.test)

    @property
    def test_images(self) -> int:
        """The number of test images (the queries of the run's one episode)."""
        return sum(len(group) for group in self._test)

    def episode(self, i: int) -> Episode:
        """The run's one episode (`i` must be 0): every class in label order, positions in `run_index`."""
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or i != 0:
            raise ValueError(f"an all-way run has one episode, number 0; got {i!r}")
        classes = tuple(range(self.run_index.num_classes))
        return Episode(index=0, classes=classes, support=self._support, query=self._test)

    def episodes(self, indices: Iterable[int]) -> list[Episode]:
        """`[self.episode(i) for i in indices]`."""
        return [self.episode(i) for i in indices]

    def validation(self) -> tuple[tuple[int, ...], ...]:
        """Per class, the drawn validation positions in `run_index` (for a recipe that selects on them)."""
        return self._val

    def index_fingerprint(self) -> str:
        """What the run identity hashes for the dataset: the whole index's listing and the narrowed index's
        fingerprint (names, keys, labels, splits and the contents of the items the run reads)."""
        return self._fingerprint

    @functools.cached_property
    def _fingerprint(self) -> str:
        digest = hashlib.sha256(f"all-way\0{listing_digest(self.full_index)}\0".encode())
        digest.update(self.run_index.fingerprint().encode())
        return digest.hexdigest()[:16]


def listing_digest(index: ImageIndex) -> str:
    """sha256 of the index's name, classes and every item's key, label and split: no file is read."""
    digest = hashlib.sha256(f"{index.name}\0{len(index.items)}".encode())
    for key, name in zip(index.class_keys, index.class_names, strict=True):
        digest.update(f"\0class\0{key}\0{name}".encode())
    splits = index.splits or ("",) * len(index.items)
    for item, label, split in zip(index.items, index.labels, splits, strict=True):
        digest.update(f"\0item\0{item}\0{label}\0{split}".encode())
    return digest.hexdigest()


def _positions_by_class(index: ImageIndex, split: str) -> list[list[int]]:
    groups: list[list[int]] = [[] for _ in index.class_keys]
    for position, (label, name) in enumerate(zip(index.labels, index.splits, strict=True)):
        if name == split:
            groups[label].append(position)
    return groups


def _draw(group: list[int], count: int, seed: int, label: int, purpose: str) -> tuple[int, ...]:
    from cdfsl.seeding import numpy_stream

    rng = numpy_stream(seed, label, purpose)
    picks = rng.choice(len(group), count, replace=len(group) < count)
    return tuple(group[int(p)] for p in picks)


def _check_integer(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _listed(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
