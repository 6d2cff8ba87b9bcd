"""`md-aircraft`: FGVC-Aircraft as extracted (`fgvc-aircraft-2013b/`): `data/images/<id>.jpg`, the boxes
`data/images_box.txt` (`<id> xmin ymin xmax ymax`) and the variant of each image in `data/images_variant_trainval.txt`
and `data/images_variant_test.txt` (`<id> <variant>`). Class = variant (prompt name: the variant). Every image is
cropped to its box, as Meta-Dataset's conversion does, and never below the top of the 20-pixel copyright banner at the
bottom of every image. Item key: the image's path; its box enters the item's content digest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cdfsl.data.file_checks import check_files
from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.meta_dataset.common import build, require, require_classes
from cdfsl.data.readers.meta_dataset.items import Box, CropLoader
from cdfsl.errors import DatasetError

NAME = "md-aircraft"
BANNER_ROWS = 20
"""Height of the copyright banner at the bottom of every FGVC-Aircraft image (the dataset's README)."""
FILES = ("data/images/", "data/images_box.txt", "data/images_variant_trainval.txt", "data/images_variant_test.txt")


def read_aircraft(root: Path, classes: Sequence[str]) -> ImageIndex:
    """The variants `classes` (label order: sorted), each image cropped to its box."""
    require(NAME, root, *FILES)
    variants: dict[str, str] = {}
    for name in FILES[2:]:
        for line in _lines(root / name):
            image, _, variant = line.partition(" ")
            variants[image] = variant.strip()
    boxes: dict[str, Box] = {}
    for line in _lines(root / FILES[1]):
        parts = line.split()
        try:
            boxes[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]), int(parts[4]))
        except (IndexError, ValueError):
            raise DatasetError(
                f"{NAME}: {FILES[1]} has a line that is not '<id> xmin ymin xmax ymax': {line!r}"
            ) from None
    keys = sorted(classes)
    require_classes(NAME, keys, set(variants.values()), f"{root / 'data'}/images_variant_*.txt")
    label_of = {key: label for label, key in enumerate(keys)}
    wanted = sorted((label_of[v], image) for image, v in variants.items() if v in label_of)
    no_box = [image for _, image in wanted if image not in boxes]
    if no_box:
        raise DatasetError(f"{NAME}: {len(no_box)} image(s) have no box in {FILES[1]}, e.g. {no_box[0]}")
    empty = [f"data/images/{image}.jpg" for _, image in wanted if not _has_area(boxes[image])]
    pairs = [(label, f"data/images/{image}.jpg") for label, image in wanted if _has_area(boxes[image])]
    readable = check_files(root, [key for _, key in pairs])
    skipped = empty + [key for (_, key), ok in zip(pairs, readable, strict=True) if not ok]
    kept = [pair for pair, ok in zip(pairs, readable, strict=True) if ok]
    loader = CropLoader(root, {f"data/images/{image}.jpg": boxes[image] for _, image in wanted}, BANNER_ROWS)
    return build(NAME, root, keys, list(keys), kept, loader, skipped)


def _has_area(box: Box) -> bool:
    return box[2] > box[0] and box[3] > box[1]


def _lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{NAME}: cannot read {path}: {error}") from None
