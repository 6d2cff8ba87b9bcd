"""Meta-Dataset's ten sources, each in its own download layout (one module per source), with the official class
splits (`splits.MD_CLASS_SPLITS`).

Each reader `md-<source>` indexes the source's TEST classes (what evaluation uses); `read_md_split(source, root,
split)` indexes the `train`, `valid` or `test` classes. Class splits are not item splits: the index's `splits` stay
empty. Items that are parts of files (MSCOCO's and FGVC-Aircraft's crops, QuickDraw's rows) are opened by the loaders
of `items`. The class structure Meta-Dataset's sampler needs is `cdfsl.data.md_hierarchy.md_structure`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.builder import describe
from cdfsl.data.readers.meta_dataset.aircraft import read_aircraft
from cdfsl.data.readers.meta_dataset.cub import read_cub
from cdfsl.data.readers.meta_dataset.dtd import read_dtd
from cdfsl.data.readers.meta_dataset.fungi import read_fungi
from cdfsl.data.readers.meta_dataset.ilsvrc import read_ilsvrc
from cdfsl.data.readers.meta_dataset.mscoco import read_mscoco
from cdfsl.data.readers.meta_dataset.omniglot import read_omniglot
from cdfsl.data.readers.meta_dataset.quickdraw import read_quickdraw
from cdfsl.data.readers.meta_dataset.splits import MD_CLASS_SPLITS, MD_SOURCES, SPLITS
from cdfsl.data.readers.meta_dataset.traffic_sign import read_traffic_sign
from cdfsl.data.readers.meta_dataset.vgg_flower import read_vgg_flower
from cdfsl.data.readers.registry import Reader, register_reader, require_root
from cdfsl.errors import DatasetError

__all__ = ["LAYOUTS", "MD_CLASS_SPLITS", "MD_SOURCES", "READ_CLASSES", "SPLITS", "read_md_split"]

READ_CLASSES: dict[str, Callable[[Path, Sequence[str]], ImageIndex]] = {
    "ilsvrc_2012": read_ilsvrc,
    "omniglot": read_omniglot,
    "aircraft": read_aircraft,
    "cu_birds": read_cub,
    "dtd": read_dtd,
    "quickdraw": read_quickdraw,
    "fungi": read_fungi,
    "vgg_flower": read_vgg_flower,
    "traffic_sign": read_traffic_sign,
    "mscoco": read_mscoco,
}
"""Source -> its reader of a given list of classes, `read(root, class_keys)`."""

LAYOUTS: dict[str, str] = {
    "ilsvrc_2012": "wnid folders (or train/<wnid>/) + wordnet.is_a.txt + words.txt",
    "omniglot": "images_background/ + images_evaluation/ <alphabet>/<character>/*.png",
    "aircraft": "data/images/*.jpg + data/images_box.txt + data/images_variant_{trainval,test}.txt (box crops)",
    "cu_birds": "images/<NNN.Name>/*.jpg + classes.txt",
    "dtd": "images/<texture>/*.jpg",
    "quickdraw": "<class>.npy (N×784 uint8 bitmaps) per class",
    "fungi": "images/ + train.json + val.json",
    "vgg_flower": "jpg/image_<nnnnn>.jpg + imagelabels.mat",
    "traffic_sign": "Final_Training/Images/<nnnnn>/*.ppm",
    "mscoco": "train2017/*.jpg + annotations/instances_train2017.json (1.2× box crops)",
}
"""Source -> its layout on disk, in one line."""


def read_md_split(source: str, root: str | Path | None, split: str = "test") -> ImageIndex:
    """The index of `source`'s `split` classes (`train`, `valid` or `test`) under `root`.

    `source` may carry the `md-` prefix. The index is named `md-<source>`; its `splits` are empty.

    Raises:
        DatasetError: unknown source or split, a split Meta-Dataset gives no classes (MSCOCO's and Traffic Signs'
            train), a missing root, or missing files (one line naming them).
    """
    name = source.removeprefix("md-")
    if name not in READ_CLASSES:
        raise DatasetError(f"unknown Meta-Dataset source {source!r}; sources: {', '.join(MD_SOURCES)}")
    if split not in SPLITS:
        raise DatasetError(f"md-{name}: unknown class split {split!r}; splits: {', '.join(SPLITS)}")
    classes = MD_CLASS_SPLITS[name][split]
    if not classes:
        having = [s for s in SPLITS if MD_CLASS_SPLITS[name][s]]
        raise DatasetError(f"md-{name}: Meta-Dataset gives it no {split} classes; it has {describe(having)} classes")
    return READ_CLASSES[name](require_root(f"md-{name}", root), classes)


for _source in MD_SOURCES:
    register_reader(
        Reader(f"md-{_source}", functools.partial(read_md_split, _source, split="test"), layout=LAYOUTS[_source])
    )
