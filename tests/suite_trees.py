"""Tiny generated trees in the CLIP few-shot suite's download layouts, for tests (not a test module).

Every `make_*` writes under `root` and returns the data root to pass to the benchmark (`DATASETS[name].read(root)`).
Images are 8x8 PNGs: either a class colour plus noise seeded by (class, split, image) (`images_from="colours"`), or
scikit-learn's handwritten digits (`images_from="digits"`: class `c` shows digit `c % 10`, each image a different one of
that digit's pictures, so splits never share a picture), so a run on them can learn. A file's bytes never depend on the
order files are written in.

`per_split_counts` gives the images of each split, `{"train": 4, "val": 1, "test": 6}` for every class alike, or a
list per split with one count per class (`{"train": [4, 1], ...}`: the second class has a single training image).
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cdfsl.data.readers.split_zhou import SPLIT_LAYOUTS

SIDE = 8
SPLITS = ("train", "val", "test")
Counts = Mapping[str, int | Sequence[int]]
ClassSpec = str | tuple[str, str]
"""A class as its folder (path under the image folder, may be nested: `a/abbey`) and the name the split file gives it;
a plain string is both."""


def make_split_tree(
    root: str | Path,
    classes: Sequence[ClassSpec],
    per_split_counts: Counts,
    images_from: str = "colours",
    dataset: str = "dtd",
    extra_folders: Mapping[str, int] | None = None,
    raw_entries: Mapping[str, list[list[object]]] | None = None,
) -> Path:
    """A `split_zhou_*.json` tree of `dataset`'s layout (default `dtd`: `images/<class>/` and
    `split_zhou_DescribableTextures.json`) under `root`.

    Args:
        classes: the classes in label order (`ClassSpec`).
        per_split_counts: images per split (see the module docstring); a split left out has none.
        images_from: `colours` or `digits`.
        dataset: a split-file dataset (`cdfsl.data.readers.split_zhou.SPLIT_LAYOUTS`).
        extra_folders: class folders written with that many images but never listed in the split file (Caltech's
            excluded classes).
        raw_entries: entries added to the split lists as given (to list what the disk lacks, or other names).
    """
    root = Path(root)
    layout = SPLIT_LAYOUTS[dataset]
    image_dir = root if layout.image_folder == "." else root / layout.image_folder
    split: dict[str, list[list[object]]] = {name: [] for name in SPLITS}
    for label, spec in enumerate(classes):
        folder, name = (spec, spec) if isinstance(spec, str) else spec
        for split_name in SPLITS:
            for number in range(_count(per_split_counts, split_name, label)):
                relative = f"{folder}/{folder.rsplit('/', 1)[-1]}_{split_name}_{number:03d}.png"
                _write(image_dir / relative, images_from, label, split_name, number)
                split[split_name].append([relative, label, name])
    for offset, (folder, count) in enumerate((extra_folders or {}).items()):
        for number in range(count):
            _write(image_dir / folder / f"image_{number:04d}.png", images_from, len(classes) + offset, "extra", number)
    for split_name, entries in (raw_entries or {}).items():
        split[split_name].extend(entries)
    (root / layout.split_file).write_text(json.dumps(split, indent=1))
    return root


def make_fgvc_tree(
    root: str | Path, variants: Sequence[str], per_split_counts: Counts, images_from: str = "colours"
) -> Path:
    """FGVC-Aircraft's `data/` folder: `variants.txt`, `images_variant_{train,val,test}.txt`, `images/<id>.jpg`
    (PNG bytes under the `.jpg` name the layout requires; readers go by content)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "variants.txt").write_text("".join(f"{v}\n" for v in variants))
    image_id = 1000000
    for split_name in SPLITS:
        lines = []
        for label, variant in enumerate(variants):
            for number in range(_count(per_split_counts, split_name, label)):
                image_id += 1
                _write(root / "images" / f"{image_id}.jpg", images_from, label, split_name, number)
                lines.append(f"{image_id} {variant}\n")
        (root / f"images_variant_{split_name}.txt").write_text("".join(lines))
    return root


def make_imagenet_tree(
    root: str | Path,
    classes: Mapping[str, str],
    per_split_counts: Counts,
    images_from: str = "colours",
    coop_layout: bool = True,
    write_classnames: bool = True,
) -> Path:
    """ImageNet: `images/train/<wnid>/`, `images/val/<wnid>/` (CoOp) or `train/`, `val/` (the CLIP-LoRA release,
    `coop_layout=False`), and `classnames.txt` (`classes`: wnid -> name). The `test` count is val's images; `val`
    counts are ignored (ImageNet has no val split of its own)."""
    root = Path(root)
    base = root / "images" if coop_layout else root
    for label, wnid in enumerate(classes):
        for split_name, folder in (("train", "train"), ("test", "val")):
            for number in range(_count(per_split_counts, split_name, label)):
                _write(base / folder / wnid / f"{wnid}_{number:05d}.JPEG", images_from, label, split_name, number)
    if write_classnames:
        (root / "classnames.txt").write_text("".join(f"{wnid} {name}\n" for wnid, name in classes.items()))
    return root


def _count(counts: Counts, split: str, label: int) -> int:
    value = counts.get(split, 0)
    return value if isinstance(value, int) else value[label]


def _write(path: Path, images_from: str, label: int, split: str, number: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if images_from == "digits":
        pixels = _digit_image(label % 10, SPLITS.index(split) if split in SPLITS else 3, number)
    elif images_from == "colours":
        rng = np.random.default_rng([label, zlib.crc32(split.encode()), number])
        colour = np.array([(label * 67) % 256, (label * 131 + 40) % 256, (label * 29 + 90) % 256], dtype=np.int16)
        noise = rng.integers(-30, 31, size=(SIDE, SIDE, 3), dtype=np.int16)
        pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"images_from must be colours or digits, not {images_from!r}")
    Image.fromarray(pixels).save(path, format="PNG")


def _digit_image(digit: int, split_position: int, number: int) -> np.ndarray:
    """One picture of `digit` as 8x8 RGB; splits take disjoint pictures (every 4th from their own start)."""
    pictures = _digit_pictures(digit)
    position = split_position + 4 * number
    if position >= len(pictures):
        raise ValueError(f"digit {digit} has {len(pictures)} pictures: at most {len(pictures) // 4} a split")
    return np.repeat(pictures[position][:, :, None], 3, axis=2)


def _digit_pictures(digit: int) -> np.ndarray:
    pixels, targets = _digits()
    return pixels[targets == digit]


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 pictures (as the `digits` reader scales them) and their digits, loaded once."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(np.asarray(digits.images, dtype=np.float64) * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    return pixels, np.asarray(digits.target)
