"""`md-dtd`: the Describable Textures Dataset as extracted (`dtd/`): `images/<texture>/*.jpg`; stray files (such as
`waffled/.directory`) are skipped. Prompt name: the texture."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.builder import IndexBuilder, class_folders
from cdfsl.data.readers.meta_dataset.common import require, require_classes

NAME = "md-dtd"


def read_dtd(root: Path, classes: Sequence[str]) -> ImageIndex:
    """The textures `classes` (label order: sorted)."""
    require(NAME, root, "images/")
    keys = sorted(classes)
    require_classes(NAME, keys, class_folders(root / "images", NAME), f"{root / 'images'}")
    builder = IndexBuilder(NAME, root, keys, list(keys))
    for label, key in enumerate(keys):
        builder.add_folder(label, root / "images" / key)
    return builder.build()
