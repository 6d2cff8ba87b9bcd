"""`md-quickdraw`: QuickDraw's numpy bitmaps as downloaded (`quickdraw/`): one `<class>.npy` per class, an N×784
uint8 array whose rows are 28×28 drawings. Item key `<class>.npy#<row>` (row zero-padded to 6 digits); a row becomes a
28×28 RGB image when opened, read through a memory map. Prompt name: the class."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.meta_dataset.common import build, require_classes
from cdfsl.data.readers.meta_dataset.items import NpyRowLoader, part_key
from cdfsl.errors import DatasetError

NAME = "md-quickdraw"
ROW_DIGITS = 6


def read_quickdraw(root: Path, classes: Sequence[str]) -> ImageIndex:
    """The classes `classes` (label order: sorted), one item per row of `<class>.npy`."""
    keys = sorted(classes)
    present = [path.name.removesuffix(".npy") for path in root.glob("*.npy") if path.is_file()]
    require_classes(NAME, keys, present, f"{root} (one <class>.npy per class)")
    pairs: list[tuple[int, str]] = []
    for label, key in enumerate(keys):
        rows = bitmap_rows(root / f"{key}.npy")
        pairs.extend((label, part_key(f"{key}.npy", row, ROW_DIGITS)) for row in range(rows))
    return build(NAME, root, keys, list(keys), pairs, NpyRowLoader(root))


def bitmap_rows(path: Path) -> int:
    """The number of rows of a `.npy` of square bitmaps (read from its header only).

    Raises:
        DatasetError: not a readable `.npy` of N×(side·side) uint8 or bool values.
    """
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DatasetError(f"{NAME}: cannot read {path} as a .npy array: {error}") from None
    width = array.shape[1] if array.ndim == 2 else 0
    if array.dtype not in (np.uint8, np.bool_) or round(width**0.5) ** 2 != width or width == 0:
        raise DatasetError(
            f"{NAME}: {path} holds a {array.dtype} array of shape {array.shape}; expected N×784 uint8 bitmaps"
        )
    if array.shape[0] >= 10**ROW_DIGITS:
        raise DatasetError(f"{NAME}: {path} has {array.shape[0]} rows; at most {10**ROW_DIGITS - 1} are indexed")
    return int(array.shape[0])
