"""Dataset readers: one module per source layout, each registering its reader (`registry.READERS`, as timm's
`data/readers/`); `create_reader(name, root)` turns a downloaded layout (or embedded data) into an `ImageIndex`.

Layouts accepted under the data root (`docs/protocol.md`, "Datasets and their on-disk layouts"), each described in its
module: `eurosat`, `cropdiseases`, `isic2018`, `chestx`, `imagefolder`, `digits` (embedded; no root), and the CLIP
few-shot suite's `split_zhou_<dataset>` (the split files), `fgvc_aircraft` and `imagenet`. What they
share (collecting items, leaving out and reporting what the file checks refuse) is `builder.IndexBuilder`; which files
are safe and readable is `cdfsl.data.file_checks`; opening an item is `cdfsl.data.decode`.

Benchmarks by name (`DATASETS`, `load_index`) are `cdfsl.data.benchmarks`; they and the file-check and decoding names
are re-exported here because callers have imported them from this module.
"""

from __future__ import annotations

from typing import Any

from cdfsl.data.decode import DECODE_ERRORS, IMAGE_FORMATS, DigitsLoader, open_rgb, to_8bit, upright
from cdfsl.data.file_checks import IMAGE_EXTENSIONS, deep_check, image_files, readable_images
from cdfsl.data.readers.chestx import CHESTX_CLASSES, read_chestx
from cdfsl.data.readers.cropdiseases import read_cropdiseases
from cdfsl.data.readers.digits import DIGIT_NAMES, read_digits
from cdfsl.data.readers.eurosat import EUROSAT_CLASSES, read_eurosat
from cdfsl.data.readers.fgvc_aircraft import read_fgvc_aircraft
from cdfsl.data.readers.imagefolder import CLASSNAMES_FILE, read_imagefolder
from cdfsl.data.readers.imagenet import read_imagenet
from cdfsl.data.readers.isic2018 import ISIC_CLASSES, read_isic2018
from cdfsl.data.readers.registry import READERS, Reader, create_reader, register_reader
from cdfsl.data.readers.split_zhou import SPLIT_LAYOUTS, read_split_zhou

__all__ = [
    "CHESTX_CLASSES",
    "CLASSNAMES_FILE",
    "DATASETS",
    "DECODE_ERRORS",
    "DIGIT_NAMES",
    "EUROSAT_CLASSES",
    "IMAGE_EXTENSIONS",
    "IMAGE_FORMATS",
    "ISIC_CLASSES",
    "READERS",
    "SPLIT_LAYOUTS",
    "DigitsLoader",
    "Reader",
    "create_reader",
    "deep_check",
    "image_files",
    "load_index",
    "open_rgb",
    "read_chestx",
    "read_cropdiseases",
    "read_digits",
    "read_eurosat",
    "read_fgvc_aircraft",
    "read_imagefolder",
    "read_imagenet",
    "read_isic2018",
    "read_split_zhou",
    "readable_images",
    "register_reader",
    "to_8bit",
    "upright",
]

_FROM_BENCHMARKS = ("DATASETS", "load_index")


def __getattr__(name: str) -> Any:
    # Loaded on first use: `cdfsl.data.benchmarks` imports this package's registry, so importing it here, at the top,
    # would be a cycle.
    if name in _FROM_BENCHMARKS:
        from cdfsl.data import benchmarks

        return getattr(benchmarks, name)
    raise AttributeError(f"module 'cdfsl.data.readers' has no attribute {name!r}")
