"""`md-cu_birds`: CUB-200-2011 as extracted (`CUB_200_2011/`): `images/<NNN.Name>/*.jpg` and `classes.txt`
(`<id> <NNN.Name>` per line). Prompt name: the folder name without its number, `_` as spaces."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.builder import IndexBuilder, class_folders
from cdfsl.data.readers.meta_dataset.common import numbered_name, require, require_classes
from cdfsl.errors import DatasetError

NAME = "md-cu_birds"


def read_cub(root: Path, classes: Sequence[str]) -> ImageIndex:
    """The species `classes` (folder names; label order: sorted)."""
    require(NAME, root, "images/", "classes.txt")
    try:
        listed = [line.split()[-1] for line in (root / "classes.txt").read_text(encoding="utf-8").splitlines() if line]
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{NAME}: cannot read {root / 'classes.txt'}: {error}") from None
    keys = sorted(classes)
    require_classes(NAME, keys, listed, f"{root / 'classes.txt'}")
    require_classes(NAME, keys, class_folders(root / "images", NAME), f"{root / 'images'}")
    builder = IndexBuilder(NAME, root, keys, [numbered_name(key) for key in keys])
    for label, key in enumerate(keys):
        builder.add_folder(label, root / "images" / key)
    return builder.build()
