"""What the `md-*` readers share: checking a source's files, naming classes, building an index of items."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from PIL import Image

from cdfsl.data.file_checks import warn_names
from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.builder import describe
from cdfsl.errors import DatasetError


def require(dataset: str, root: Path, *relative: str) -> None:
    """Raise one `DatasetError` naming every path of `relative` (a trailing `/` means a folder) missing under `root`."""
    missing = [
        name for name in relative if not ((root / name).is_dir() if name.endswith("/") else (root / name).is_file())
    ]
    if missing:
        raise DatasetError(f"{dataset}: missing under {root}: {', '.join(missing)} (see docs/benchmarks.md)")


def require_classes(dataset: str, wanted: Sequence[str], present: Iterable[str], where: str) -> None:
    """Raise one `DatasetError` naming the classes of `wanted` that are not in `present` (found in `where`)."""
    found = set(present)
    missing = [key for key in wanted if key not in found]
    if missing:
        raise DatasetError(
            f"{dataset}: {len(missing)} of the split's {len(wanted)} classes are missing from {where}: "
            f"{describe(missing)}"
        )


def numbered_name(key: str) -> str:
    """The prompt name of a numbered class key: `090.canna lily` -> `canna lily`, `001.Black_footed_Albatross` ->
    `Black footed Albatross` (the number and its dot dropped, `_` as spaces)."""
    number, dot, name = key.partition(".")
    text = name if dot and number.isdigit() and name else key
    return " ".join(text.replace("_", " ").split()) or key


def build(
    dataset: str,
    root: Path,
    class_keys: Sequence[str],
    class_names: Sequence[str],
    pairs: Iterable[tuple[int, str]],
    loader: Callable[..., Image.Image],
    skipped: Sequence[str] = (),
) -> ImageIndex:
    """The index of the (label, key) `pairs`, sorted by (label, key).

    Raises:
        DatasetError: a class has no item.
    """
    warn_names(list(skipped), f"{dataset}: skipped {{n}} item(s)")
    ordered = sorted(pairs)
    empty = sorted(set(range(len(class_keys))) - {label for label, _ in ordered})
    if empty:
        raise DatasetError(f"{dataset}: no image found for class(es) {describe([class_keys[c] for c in empty])}")
    return ImageIndex(
        name=dataset,
        class_keys=tuple(class_keys),
        class_names=tuple(class_names),
        items=tuple(key for _, key in ordered),
        labels=tuple(label for label, _ in ordered),
        loader=loader,
        root=root,
        skipped=tuple(skipped),
    )


def opener(function: Callable[..., Image.Image], root: Path) -> Callable[..., Image.Image]:
    """`function` bound to `root` (a picklable partial, as `IndexBuilder`'s loaders)."""
    return functools.partial(function, root)
