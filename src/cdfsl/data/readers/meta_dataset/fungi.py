"""`md-fungi`: the FGVCx 2018 fungi images and annotations as extracted together (`fungi/`): `images/`, `train.json`
and `val.json` (COCO-style `images`, `annotations`, `categories`). Class key `<id:04d>.<name>` as Meta-Dataset labels
them (prompt name: the species name); each image's class is its annotation's category."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.builder import IndexBuilder
from cdfsl.data.readers.meta_dataset.common import numbered_name, require, require_classes
from cdfsl.errors import DatasetError

NAME = "md-fungi"


def read_fungi(root: Path, classes: Sequence[str]) -> ImageIndex:
    """The species `classes` (`0226.Cortinarius malicorius`; label order: sorted)."""
    require(NAME, root, "images/", "train.json", "val.json")
    files: dict[int, str] = {}
    category_of: dict[int, int] = {}
    names: dict[int, str] = {}
    for part in ("train.json", "val.json"):
        data = read_json(root / part, NAME)
        try:
            files.update({int(image["id"]): str(image["file_name"]) for image in data["images"]})
            category_of.update({int(a["image_id"]): int(a["category_id"]) for a in data["annotations"]})
            names.update({int(c["id"]): str(c["name"]) for c in data["categories"]})
        except (KeyError, TypeError, ValueError) as error:
            raise DatasetError(f"{NAME}: {part} is not COCO-style images/annotations/categories ({error!r})") from None
    labels_of = {f"{cid:04d}.{name}": cid for cid, name in names.items()}
    keys = sorted(classes)
    require_classes(NAME, keys, labels_of, f"the categories of {root}/train.json and val.json")
    label_of = {labels_of[key]: label for label, key in enumerate(keys)}
    builder = IndexBuilder(NAME, root, keys, [numbered_name(key) for key in keys])
    for image_id, file_name in files.items():
        label = label_of.get(category_of.get(image_id, -1))
        if label is None:
            continue
        if PurePosixPath(file_name).is_absolute() or ".." in PurePosixPath(file_name).parts:
            builder.unsafe.append(file_name)
        else:
            builder.add_files(label, [file_name])
    return builder.build()


def read_json(path: Path, dataset: str) -> Any:
    """The JSON document at `path`.

    Raises:
        DatasetError: it cannot be read or parsed.
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{dataset}: cannot read {path}: {error}") from None
