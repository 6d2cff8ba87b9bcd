"""`md-traffic_sign`: GTSRB's training images as extracted (`GTSRB/`): `Final_Training/Images/<nnnnn>/*.ppm`, one
folder per class; the `GT-<nnnnn>.csv` files are not read. Whole images (no crop). Class key `<nn>.<name>` as
Meta-Dataset names the 43 signs (prompt name: the sign's name). All 43 are test classes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from cdfsl.data.decode import to_8bit
from cdfsl.data.file_checks import is_hidden
from cdfsl.data.fingerprint import open_regular
from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.meta_dataset.common import build, numbered_name, opener, require, require_classes

NAME = "md-traffic_sign"
IMAGES = "Final_Training/Images"


def read_traffic_sign(root: Path, classes: Sequence[str]) -> ImageIndex:
    """The signs `classes` (`00.Speed limit (20km/h)`; label order: sorted)."""
    require(NAME, root, f"{IMAGES}/")
    keys = sorted(classes)
    folders = {key: f"{IMAGES}/{int(key.split('.', 1)[0]):05d}" for key in keys}
    require_classes(NAME, keys, [k for k, f in folders.items() if (root / f).is_dir()], f"{root / IMAGES}")
    pairs: list[tuple[int, str]] = []
    skipped: list[str] = []
    for label, key in enumerate(keys):
        for path in sorted((root / folders[key]).iterdir()):
            if path.suffix.lower() != ".ppm" or is_hidden(path.name):
                continue
            item = f"{folders[key]}/{path.name}"
            if readable_ppm(path):
                pairs.append((label, item))
            else:
                skipped.append(item)
    return build(NAME, root, keys, [numbered_name(key) for key in keys], pairs, opener(open_ppm, root), skipped)


def readable_ppm(path: Path) -> bool:
    """A regular file Pillow identifies as PPM from its header."""
    try:
        with open_regular(path) as handle, Image.open(handle, formats=("PPM",)) as image:
            return image.size[0] > 0
    except (OSError, SyntaxError, ValueError):
        return False


def open_ppm(root: Path, key: str, data: bytes | None = None) -> Image.Image:
    """The PPM image `root/key` as RGB (from `data` when given, as `ImageIndex.open` passes it).

    Raises:
        One of `cdfsl.data.decode.DECODE_ERRORS`: the file is not a PPM image.
    """
    path = root / key
    source = io.BytesIO(data) if data is not None else open_regular(path)
    with source as handle, Image.open(handle, formats=("PPM",)) as image:
        image.load()
        return to_8bit(image, path).convert("RGB")
