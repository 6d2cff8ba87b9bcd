"""`md-mscoco`: MS-COCO 2017 as downloaded (`mscoco/`): `train2017/<id:012d>.jpg` and the instances annotations
`annotations/instances_train2017.json` (or `instances_train2017.json` directly in the root). Every annotation is one
item, key `train2017/<file>#<annotation id>`: its box scaled 1.2× about its centre, rounded as Meta-Dataset's
conversion rounds it, and clipped to the image (an empty crop is skipped). Class = category name (also the prompt
name)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cdfsl.data.file_checks import check_files
from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.meta_dataset.common import build, require, require_classes
from cdfsl.data.readers.meta_dataset.fungi import read_json
from cdfsl.data.readers.meta_dataset.items import Box, CropLoader, clip_box, part_key
from cdfsl.errors import DatasetError

NAME = "md-mscoco"
IMAGES = "train2017"
ANNOTATIONS = ("annotations/instances_train2017.json", "instances_train2017.json")
BOX_SCALE = 1.2


def read_mscoco(root: Path, classes: Sequence[str]) -> ImageIndex:
    """The categories `classes` (names; label order: sorted), one cropped item per annotation."""
    annotations = next((root / name for name in ANNOTATIONS if (root / name).is_file()), None)
    if annotations is None:
        raise DatasetError(f"{NAME}: missing under {root}: {ANNOTATIONS[0]} (or {ANNOTATIONS[1]})")
    require(NAME, root, f"{IMAGES}/")
    data = read_json(annotations, NAME)
    try:
        categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        images = {int(i["id"]): (str(i["file_name"]), int(i["width"]), int(i["height"])) for i in data["images"]}
        entries = [
            (int(a["id"]), int(a["image_id"]), int(a["category_id"]), [float(v) for v in a["bbox"]])
            for a in data["annotations"]
        ]
        if any(len(bbox) != 4 for *_, bbox in entries):
            raise ValueError("a bbox is not [x, y, width, height]")
    except (KeyError, TypeError, ValueError) as error:
        raise DatasetError(f"{NAME}: {annotations.name} is not COCO instances JSON ({error!r})") from None
    keys = sorted(classes)
    require_classes(NAME, keys, categories.values(), f"the categories of {annotations}")
    label_of = {cid: keys.index(name) for cid, name in categories.items() if name in keys}
    boxes: dict[str, Box] = {}
    pairs: list[tuple[int, str]] = []
    skipped: list[str] = []
    for annotation_id, image_id, category_id, bbox in entries:
        label = label_of.get(category_id)
        if label is None or image_id not in images:
            continue
        file_name, width, height = images[image_id]
        key = part_key(f"{IMAGES}/{file_name}", str(annotation_id))
        box = scaled_box(bbox)
        try:
            clip_box(box, (width, height))
        except DatasetError:
            skipped.append(key)
            continue
        boxes[key] = box
        pairs.append((label, key))
    files = sorted({key.rsplit("#", 1)[0] for _, key in pairs})
    readable = dict(zip(files, check_files(root, files), strict=True))
    skipped += [key for _, key in pairs if not readable[key.rsplit("#", 1)[0]]]
    kept = [(label, key) for label, key in pairs if readable[key.rsplit("#", 1)[0]]]
    return build(NAME, root, keys, list(keys), kept, CropLoader(root, boxes), sorted(skipped))


def scaled_box(bbox: Sequence[float], scale: float = BOX_SCALE) -> Box:
    """A COCO box `(x, y, width, height)` scaled `scale`× about its centre, as the pixel box (left, top, right,
    bottom) Meta-Dataset's conversion crops before clipping it to the image: `round(x - 0.5)` to
    `round(x + w - 0.5) + 1` (Python's rounding, half to even, as the conversion's)."""
    x, y, w, h = (float(v) for v in bbox)
    x -= 0.5 * w * (scale - 1.0)
    y -= 0.5 * h * (scale - 1.0)
    w *= scale
    h *= scale
    return (round(x - 0.5), round(y - 0.5), round(x + w - 0.5) + 1, round(y + h - 0.5) + 1)
