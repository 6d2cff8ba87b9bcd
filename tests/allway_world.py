"""Digits-derived split trees for the all-way tests: in-memory indexes with `train` / `val` / `test` splits."""

from __future__ import annotations

import dataclasses
import functools

from PIL import Image, ImageOps

from cdfsl.data.index import ImageIndex
from cdfsl.data.readers import load_index


@functools.cache
def _digits() -> ImageIndex:
    return load_index("digits", None)


def split_digits(train: int = 8, val: int = 2, test: int = 10, short: dict[int, int] | None = None) -> ImageIndex:
    """`digits` cut into splits: per class its first `train` items (`short[c]` for class c when given) are `train`,
    the next `val` are `val` and the next `test` are `test`; the rest are left out."""
    digits = _digits()
    keep: list[int] = []
    splits: list[str] = []
    for label, group in enumerate(digits.items_by_class()):
        n_train = (short or {}).get(label, train)
        for position, name in zip(group, ["train"] * n_train + ["val"] * val + ["test"] * test, strict=False):
            keep.append(position)
            splits.append(name)
    return dataclasses.replace(
        digits,
        items=tuple(digits.items[p] for p in keep),
        labels=tuple(digits.labels[p] for p in keep),
        splits=tuple(splits),
    )


class _Mirrored:
    """Opens `digits` keys, mirrored for the keys of the two extra classes (`m/` prefix)."""

    def __init__(self, digits: ImageIndex) -> None:
        self._digits = digits
        self._position = {key: i for i, key in enumerate(digits.items)}

    def __call__(self, key: str) -> Image.Image:
        mirrored = key.startswith("m/")
        image = self._digits.open(self._position[key.removeprefix("m/")])
        return ImageOps.mirror(image) if mirrored else image


@functools.cache
def twelve_classes(train: int = 2, test: int = 2) -> ImageIndex:
    """A 12-class split index: the ten digits and mirrored twos and threes, `train` + `test` items per class (one
    object per size, so its fingerprint is computed once)."""
    digits = _digits()
    groups = digits.items_by_class()
    names = (*digits.class_names, "mirrored two", "mirrored three")
    items: list[str] = []
    labels: list[int] = []
    splits: list[str] = []
    for label in range(12):
        group = groups[label] if label < 10 else groups[label - 8][-(train + test) :]
        for position, split in zip(group, ["train"] * train + ["test"] * test, strict=False):
            items.append(digits.items[position] if label < 10 else "m/" + digits.items[position])
            labels.append(label)
            splits.append(split)
    return ImageIndex(
        name="digits",
        class_keys=tuple(str(c) for c in range(12)),
        class_names=names,
        items=tuple(items),
        labels=tuple(labels),
        loader=_Mirrored(digits),
        splits=tuple(splits),
    )
