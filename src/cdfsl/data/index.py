"""What a dataset reader produces: an `ImageIndex` of items, labels and class prompt names.

Items are stable string keys (a path relative to the data root, or `digits/00042` for in-memory images), sorted so
that the filesystem's listing order never matters. The fingerprint hashes the index content; episode sampling is a
pure function of it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


@dataclass(frozen=True)
class ImageIndex:
    """A labelled image collection.

    Attributes:
        name: dataset name (`eurosat`, `digits`, ...).
        class_keys: the raw class identifiers (folder names, CSV columns), label `c` is `class_keys[c]`.
        class_names: the prompt name of each class, same order.
        items: image keys, sorted by (label, key).
        labels: label of each item, same length as `items`.
        loader: opens one item key as an RGB `PIL.Image`.
        root: data root, or None for embedded data.
        skipped: keys left out while indexing (unreadable files, paths escaping the root), for reporting.
    """

    name: str
    class_keys: tuple[str, ...]
    class_names: tuple[str, ...]
    items: tuple[str, ...]
    labels: tuple[int, ...]
    loader: Callable[[str], Image.Image] = field(compare=False, repr=False)
    root: Path | None = None
    skipped: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.items) != len(self.labels):
            raise ValueError("items and labels differ in length")
        if len(self.class_keys) != len(self.class_names):
            raise ValueError("class_keys and class_names differ in length")

    @property
    def num_classes(self) -> int:
        return len(self.class_keys)

    def items_by_class(self) -> list[list[int]]:
        """Item positions per label, each list in index order."""
        groups: list[list[int]] = [[] for _ in self.class_keys]
        for position, label in enumerate(self.labels):
            groups[label].append(position)
        return groups

    def counts(self) -> list[int]:
        return [len(g) for g in self.items_by_class()]

    def open(self, position: int) -> Image.Image:
        return self.loader(self.items[position])

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of name, classes, and (key, label) pairs."""
        digest = hashlib.sha256()
        digest.update(self.name.encode())
        for key, name in zip(self.class_keys, self.class_names, strict=True):
            digest.update(f"\0class\0{key}\0{name}".encode())
        for item, label in zip(self.items, self.labels, strict=True):
            digest.update(f"\0item\0{item}\0{label}".encode())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Episode:
    """One few-shot task. Episode label `j` is dataset label `classes[j]`.

    Attributes:
        index: episode number within the run's sequence.
        classes: dataset labels of the `ways` classes, in episode-label order.
        support: per episode class, item positions of its `shots` support images.
        query: per episode class, item positions of its `queries` query images.
    """

    index: int
    classes: tuple[int, ...]
    support: tuple[tuple[int, ...], ...]
    query: tuple[tuple[int, ...], ...]

    @property
    def ways(self) -> int:
        return len(self.classes)

    def support_items(self) -> list[tuple[int, int]]:
        """(item position, episode label) for the support set, class-major."""
        return [(item, label) for label, items in enumerate(self.support) for item in items]

    def query_items(self) -> list[tuple[int, int]]:
        """(item position, episode label) for the query set, class-major."""
        return [(item, label) for label, items in enumerate(self.query) for item in items]
