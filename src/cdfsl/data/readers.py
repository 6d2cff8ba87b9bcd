"""Dataset readers: turn a downloaded dataset (or scikit-learn's digits) into an `ImageIndex`.

Layouts accepted under the data root (`docs/protocol.md`, "Datasets and their on-disk layouts"):

- `eurosat`: class folders of RGB JPEGs (`AnnualCrop/`, `Forest/`, ...), directly under the root or under
  `root/2750/` (preferred when it exists). The folders present must be known EuroSAT class names, at least 2.
- `cropdiseases`: PlantVillage class folders (`Apple___Apple_scab/`, ...), directly under the root or under
  `root/dataset/train/` (preferred when it exists). Prompt name = folder name by the folder rule
  (`cdfsl.data.classnames.folder_prompt`: underscores as spaces, runs of them and of spaces as one space).
- `isic2018`: `ISIC2018_Task3_Training_Input/<image>.jpg` and
  `ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv` with exactly the columns
  `image,MEL,NV,BCC,AKIEC,BKL,DF,VASC` (one-hot `1.0`/`0.0`). Rows that are not exactly one-hot, or whose
  image is missing, are skipped with one warning for each kind.
- `chestx`: `Data_Entry_2017.csv` (columns `Image Index`, `Finding Labels`, labels joined by `|`) and the PNGs
  in `images/` and/or `images_001/images/` ... `images_012/images/` (all are searched). Only rows with exactly
  one label among the seven classes are kept; the others are left out silently, as the protocol says. The VtT
  release's 256x256 pre-resize of ChestX images is not the reader's: it is the run's `pre_resize` (a recipe
  value), applied in `cdfsl.data.images`.
- `imagefolder`: the immediate non-hidden subfolders of the root are the classes; a class's images are the
  image files directly in its folder and, recursively, in every folder below it. Files directly in the root
  are ignored. Prompt names follow the folder rule, as for `cropdiseases`; an optional `root/classnames.json`
  (`{"folder": "prompt name"}`) gives any class its own.
- `digits`: scikit-learn's 8x8 handwritten digits, embedded; the data root is ignored.

Common rules (the user-facing description is in `docs/protocol.md`): image files are those with extension .jpg
.jpeg .png .bmp .tif .tiff .webp (any case); hidden files and folders (name starting with `.`, such as `.DS_Store` or
macOS `._x.jpg`) are ignored. Item keys are POSIX paths relative to the data root, items are sorted by (label, key)
and folder-class keys are sorted, so the filesystem's listing order never matters. A class that ends up with no
images stays in the class list (the episode sampler excludes and reports it).

What is left out, never shifting other labels: each kind below is listed in `ImageIndex.skipped` and reported in one
`DatasetWarning` per reader call that names up to five entries (with `repr`, so any name prints).

- Unreadable files. Every image file gets a cheap check at indexing: Pillow must identify it as one of
  `IMAGE_FORMATS` (JPEG, PNG, BMP, TIFF, WebP; no other Pillow parser ever runs, whatever the extension says) from
  its header, and a PNG must end with its IEND chunk and a JPEG with its EOI marker (trailing zero bytes allowed;
  only the last 4 KiB are read), so a file cut short is left out here rather than stopping a run half-way. Files
  damaged in the middle pass this check; `deep_check` decodes every item to find them.
- Folder layouts: entries named like images that are not regular files (a FIFO would hang the reader, a device,
  a broken symlink), and symlinks whose target resolves outside both the data root and the class folder they are
  listed in (a class folder that is itself a symlink is followed). Subfolder symlinks are not followed. A folder
  that cannot be listed (permission denied) is reported, not silently counted as empty.
- A file name read from a CSV must resolve (symlinks followed) inside the image folder it is looked up in, which
  lies in the data root; `../x.png`, an absolute path, or a name holding a control character (NUL, newline, ...)
  is skipped with a warning naming it.
- File and folder names that are not valid UTF-8 (Python sees them with surrogate escapes) are skipped in every
  reader; `skipped` holds them with the undecodable bytes written as `\\udcXX`.

Loaders open an item as RGB at its stored size, turned upright as its EXIF orientation tag says (`upright`).
16-bit and 32-bit integer grey images (modes `I;16*`, `I`) are scaled from 0..65535 to 0..255 (rounded, higher
values clipped), and float images (mode `F`) are scaled by 255 when all values lie in [0, 1], else clipped to
[0, 255] with one warning per file; Pillow's own `convert("RGB")` would make them all white or all black. Other
modes convert as Pillow does. A file that fails to decode raises one of `DECODE_ERRORS` (the image cache turns it into
a `DatasetError` naming it).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import struct
import threading
import warnings
from collections.abc import Callable, Container, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from cdfsl.data.classnames import folder_prompt
from cdfsl.data.fingerprint import Content, open_regular
from cdfsl.data.index import ImageIndex
from cdfsl.errors import DatasetError, DatasetWarning

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")
"""The Pillow formats images are opened with (`Image.open(..., formats=IMAGE_FORMATS)`); no other parser runs."""
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes PIL.UnidentifiedImageError and "image file is truncated"
    SyntaxError,  # Pillow's "broken PNG file" and other parser errors
    ValueError,
    EOFError,
    IndexError,
    struct.error,
    Image.DecompressionBombError,
)
"""What opening or decoding a bad image file raises: such a file is unreadable, never a crash."""

EUROSAT_CLASSES: dict[str, str] = {
    "AnnualCrop": "annual crop land",
    "Forest": "forest",
    "HerbaceousVegetation": "herbaceous vegetation land",
    "Highway": "highway or road",
    "Industrial": "industrial buildings",
    "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings",
    "River": "river",
    "SeaLake": "sea or lake",
}

ISIC_INPUT_DIR = "ISIC2018_Task3_Training_Input"
ISIC_CSV = "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv"
ISIC_IMAGE_COLUMN = "image"
ISIC_CLASSES: dict[str, str] = {
    "MEL": "melanoma",
    "NV": "melanocytic nevus",
    "BCC": "basal cell carcinoma",
    "AKIEC": "actinic keratosis",
    "BKL": "benign keratosis",
    "DF": "dermatofibroma",
    "VASC": "vascular lesion",
}

CHESTX_CSV = "Data_Entry_2017.csv"
CHESTX_IMAGE_COLUMN = "Image Index"
CHESTX_LABEL_COLUMN = "Finding Labels"
CHESTX_CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax")

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

CLASSNAMES_FILE = "classnames.json"
_HEADER_CHECK_WORKERS = 8
_NAMES_IN_WARNING = 5
_TAIL_BYTES = 4096  # how much of a file's end the indexing check reads
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: zero length, type, CRC
_JPEG_END = b"\xff\xd9"  # the EOI marker


# ----------------------------------------------------------------------------------------------------
# entry point


def load_index(dataset: str, data_root: str | Path | None) -> ImageIndex:
    """Index `dataset` found under `data_root` (ignored for datasets that need no root, such as `digits`).

    Raises:
        DatasetError: unknown dataset name, or a missing/malformed dataset; the message says what was expected
            and what was found.
    """
    spec = DATASETS.get(dataset)
    if spec is None:
        raise DatasetError(f"unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)}")
    if not spec.needs_root:
        return spec.read(None)
    return spec.read(_require_root(dataset, data_root))


# ----------------------------------------------------------------------------------------------------
# readers


def read_eurosat(root: Path) -> ImageIndex:
    """EuroSAT RGB: class folders directly under `root` or under `root/2750/`."""
    base = root / "2750" if (root / "2750").is_dir() else root
    folders = _class_folders(base, "eurosat")
    unknown = sorted(set(folders) - set(EUROSAT_CLASSES))
    if unknown:
        raise DatasetError(
            f"eurosat: unknown class folder(s) {', '.join(unknown)} in {base}; "
            f"expected EuroSAT class folders among: {', '.join(sorted(EUROSAT_CLASSES))}"
        )
    if len(folders) < 2:
        raise DatasetError(
            f"eurosat: expected at least 2 class folders among {', '.join(sorted(EUROSAT_CLASSES))} "
            f"in {root} or {root / '2750'}; found {_describe(folders)}"
        )
    builder = _IndexBuilder("eurosat", root, folders, [EUROSAT_CLASSES[f] for f in folders])
    for label, folder in enumerate(folders):
        builder.add_folder(label, base / folder)
    return builder.build()


def read_cropdiseases(root: Path) -> ImageIndex:
    """PlantVillage (CropDiseases): class folders directly under `root` or under `root/dataset/train/`."""
    nested = root / "dataset" / "train"
    base = nested if nested.is_dir() else root
    folders = _class_folders(base, "cropdiseases")
    if len(folders) < 2:
        raise DatasetError(
            f"cropdiseases: expected PlantVillage class folders (such as Apple___Apple_scab) in {root} or "
            f"{nested}; found {_describe(folders)}"
        )
    builder = _IndexBuilder("cropdiseases", root, folders, [folder_prompt(f) for f in folders])
    for label, folder in enumerate(folders):
        builder.add_folder(label, base / folder)
    return builder.build()


def read_isic2018(root: Path) -> ImageIndex:
    """ISIC 2018 task 3: one-hot ground-truth CSV plus an input folder of `<image>.jpg`."""
    input_dir = root / ISIC_INPUT_DIR
    csv_path = root / ISIC_CSV
    if not csv_path.is_file():
        raise DatasetError(f"isic2018: ground-truth CSV not found: expected {csv_path}")
    if not input_dir.is_dir():
        raise DatasetError(f"isic2018: image folder not found: expected {input_dir}")
    columns = (ISIC_IMAGE_COLUMN, *ISIC_CLASSES)
    header, rows = _read_csv(csv_path, "isic2018")
    if set(header) != set(columns):
        raise DatasetError(
            f"isic2018: {csv_path.name} has unexpected columns; expected {', '.join(columns)}; "
            f"found {', '.join(header) or 'no header'} "
            f"(missing: {_describe(sorted(set(columns) - set(header)))}; "
            f"unknown: {_describe(sorted(set(header) - set(columns)))})"
        )
    builder = _IndexBuilder("isic2018", root, list(ISIC_CLASSES), list(ISIC_CLASSES.values()))
    present = builder.file_names(input_dir)
    not_one_hot: list[str] = []
    for row in rows:
        name = row[ISIC_IMAGE_COLUMN]
        label = _one_hot_label([row[c] for c in ISIC_CLASSES])
        if label is None:
            not_one_hot.append(name)
        else:
            builder.add_csv_entry(label, input_dir, f"{name}.jpg", present)
    _warn_list(not_one_hot, "isic2018: skipped {n} CSV row(s) whose label columns are not exactly one 1.0")
    return builder.build()


def read_chestx(root: Path) -> ImageIndex:
    """NIH ChestX-ray14: `Data_Entry_2017.csv` plus PNGs in `images/` and/or `images_0NN/images/`."""
    csv_path = root / CHESTX_CSV
    if not csv_path.is_file():
        raise DatasetError(f"chestx: label CSV not found: expected {csv_path}")
    folders = _chestx_image_folders(root)
    if not folders:
        raise DatasetError(
            f"chestx: no image folder found: expected {root / 'images'} or {root / 'images_001' / 'images'} "
            f"... {root / 'images_012' / 'images'}"
        )
    header, rows = _read_csv(csv_path, "chestx")
    missing = [c for c in (CHESTX_IMAGE_COLUMN, CHESTX_LABEL_COLUMN) if c not in header]
    if missing:
        raise DatasetError(
            f"chestx: {csv_path.name} lacks column(s) {', '.join(missing)}; expected columns including "
            f"{CHESTX_IMAGE_COLUMN!r} and {CHESTX_LABEL_COLUMN!r}; found {', '.join(header) or 'no header'}"
        )
    builder = _IndexBuilder("chestx", root, list(CHESTX_CLASSES), list(CHESTX_CLASSES))
    locations = _chestx_locations(builder, folders)
    for row in rows:
        labels = [part.strip() for part in row[CHESTX_LABEL_COLUMN].split("|")]
        if len(labels) != 1 or labels[0] not in CHESTX_CLASSES:
            continue  # the protocol keeps single-label rows of the seven classes only
        name = row[CHESTX_IMAGE_COLUMN]
        builder.add_csv_entry(CHESTX_CLASSES.index(labels[0]), locations.get(name, folders[0]), name, locations)
    return builder.build()


def read_imagefolder(root: Path, min_classes: int = 2) -> ImageIndex:
    """Generic class-folder tree; class = immediate subfolder, images directly in it or anywhere below it.
    `min_classes`: the class folders with images it needs (1 for a classifier's test folder)."""
    folders = _class_folders(root, "imagefolder")
    if len(folders) < min_classes:
        least = f"at least {min_classes} class folders" if min_classes > 1 else "a class folder"
        raise DatasetError(f"imagefolder: expected {least} in {root}; found {_describe(folders)}")
    names = _imagefolder_names(root, folders)
    builder = _IndexBuilder("imagefolder", root, folders, names)
    for label, folder in enumerate(folders):
        builder.add_folder(label, root / folder)
    return builder.build(min_classes)


def read_digits() -> ImageIndex:
    """scikit-learn's handwritten digits: 1797 8x8 images, grey 0..16 scaled to uint8 and shown as RGB."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(np.asarray(digits.images, dtype=np.float64) * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    keys = [f"digits/{i:05d}" for i in range(len(pixels))]
    pairs = sorted(zip((int(t) for t in digits.target), keys, strict=True))
    return ImageIndex(
        name="digits",
        class_keys=tuple(str(d) for d in range(10)),
        class_names=DIGIT_NAMES,
        items=tuple(key for _, key in pairs),
        labels=tuple(label for label, _ in pairs),
        loader=DigitsLoader(pixels),
        root=None,
    )


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset name, its reader (given the data root, or None when it needs none) and whether it needs a root."""

    name: str
    read: Callable[[Path | None], ImageIndex]
    needs_root: bool = True


def _rooted(reader: Callable[[Path], ImageIndex]) -> Callable[[Path | None], ImageIndex]:
    def read(root: Path | None) -> ImageIndex:
        assert root is not None
        return reader(root)

    return read


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("eurosat", _rooted(read_eurosat)),
        DatasetSpec("isic2018", _rooted(read_isic2018)),
        DatasetSpec("cropdiseases", _rooted(read_cropdiseases)),
        DatasetSpec("chestx", _rooted(read_chestx)),
        DatasetSpec("imagefolder", _rooted(read_imagefolder)),
        DatasetSpec("digits", lambda _root: read_digits(), needs_root=False),
    )
}
"""Every dataset `--dataset` accepts: the one table the config, the CLI and the tests read."""


# ----------------------------------------------------------------------------------------------------
# loaders (module-level classes/partials so an index can be pickled into data-loader workers)


def open_rgb(root: Path, key: str, data: bytes | None = None) -> Image.Image:
    """Open `root/key` (one of `IMAGE_FORMATS`) and return it decoded as RGB (wide modes scaled, see `to_8bit`).

    `data`: the file's bytes, already read (and checked) by the caller (`ImageIndex.open`); they are decoded
    instead of reading the file. An EXIF orientation is applied (`upright`), so the image is the way viewers show it.

    Raises:
        One of `DECODE_ERRORS`: the file cannot be opened or decoded.
    """
    path = root / key
    source = io.BytesIO(data) if data is not None else open_regular(path)
    with source as handle, Image.open(handle, formats=IMAGE_FORMATS) as image:
        image.load()  # a damaged file fails here, as a decode error, before its EXIF block is looked for
        return to_8bit(upright(image, path), path).convert("RGB")


def upright(image: Image.Image, path: str | Path) -> Image.Image:
    """`image` turned as its EXIF orientation tag says (Pillow's `ImageOps.exif_transpose`; the tag is dropped from
    the result), so a phone photo stored sideways is seen upright. An EXIF block Pillow cannot parse is named in one
    `DatasetWarning` per file and the image is used as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except DECODE_ERRORS as error:
        _warn_once_per_file(
            path, f"cannot read the EXIF orientation of {os.fsdecode(path)!r} ({error}); used the image as stored"
        )
        return image


def to_8bit(image: Image.Image, path: str | Path) -> Image.Image:
    """Wide grey modes as 8-bit grey (`L`); any other image unchanged.

    `I;16*` and `I`: values 0..65535 map linearly to 0..255 (rounded half up; negative values become 0, values
    above 65535 become 255). `F`: values are multiplied by 255 when all lie in [0, 1]; otherwise they are clipped
    to [0, 255] (NaN becomes 0) with one `DatasetWarning` per file naming `path`.
    """
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    if image.mode == "F":
        values = np.asarray(image).astype(np.float64)
        finite = np.isfinite(values)
        if finite.all() and values.size and values.min() >= 0.0 and values.max() <= 1.0:
            scaled = values * 255.0
        else:
            scaled = np.clip(np.where(finite, values, 0.0), 0.0, 255.0)
            scaled[np.isposinf(values)] = 255.0
            _warn_once_per_file(
                path,
                f"float image {os.fsdecode(path)!r} has values outside [0, 1]; used them as 0..255 levels, clipped; "
                "convert it to 8-bit to control how it looks",
            )
        return Image.fromarray(np.floor(scaled + 0.5).astype(np.uint8))
    return image


_warned_files: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once_per_file(path: str | Path, message: str) -> None:
    key = os.fsdecode(path)
    with _warned_lock:
        if key in _warned_files:
            return
        _warned_files.add(key)
    warnings.warn(message, DatasetWarning, stacklevel=3)


@dataclass(frozen=True, eq=False)
class DigitsLoader:
    """Loads `digits/NNNNN` from the uint8 pixel array as an 8x8 RGB image."""

    pixels: np.ndarray = field(repr=False)

    def __call__(self, key: str) -> Image.Image:
        return Image.fromarray(self.pixels[self._number(key)]).convert("RGB")

    def item_contents(self, keys: Sequence[str]) -> list[Content]:
        """(byte count, sha256) of each key's uint8 pixels: the content `ImageIndex.fingerprint` hashes."""
        contents = []
        for key in keys:
            pixels = np.ascontiguousarray(self.pixels[self._number(key)], dtype=np.uint8)
            contents.append(Content(pixels.nbytes, hashlib.sha256(pixels.tobytes()).hexdigest()))
        return contents

    def _number(self, key: str) -> int:
        prefix, _, number = key.partition("/")
        if prefix != "digits" or not number.isdigit() or int(number) >= len(self.pixels):
            raise KeyError(f"not a digits key: {key!r}")
        return int(number)


# ----------------------------------------------------------------------------------------------------
# checks


def deep_check(index: ImageIndex, workers: int = 4) -> list[tuple[str, str]]:
    """Decode every item of `index` fully, with its loader, on `workers` threads.

    Finds what the cheap indexing check cannot: files damaged in the middle (header and end intact). Slow: it costs
    one full decode per image.

    Returns:
        (item key, reason) for each item that fails to decode, in index order; empty when all decode.
    """

    def failure(key: str) -> str | None:
        try:
            index.loader(key)
        except DECODE_ERRORS as error:
            return f"{type(error).__name__}: {error}"
        return None

    if workers > 1 and len(index.items) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = list(pool.map(failure, index.items))
    else:
        reasons = [failure(key) for key in index.items]
    return [(key, reason) for key, reason in zip(index.items, reasons, strict=True) if reason is not None]


# ----------------------------------------------------------------------------------------------------
# shared helpers


def _require_root(dataset: str, data_root: str | Path | None) -> Path:
    if data_root is None:
        raise DatasetError(f"{dataset}: a data root is needed (--data-root); none was given")
    root = Path(data_root).expanduser()
    if not root.exists():
        raise DatasetError(f"{dataset}: data root not found: {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{dataset}: data root must be a folder; {root} is a file")
    return root.resolve()


def _describe(names: Sequence[str], limit: int = 10) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image_name(name: str) -> bool:
    return not _hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _decodable(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (surrogate escapes from the OS listing)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(name: str) -> str:
    """`name` with undecodable bytes written as `\\udcXX`, safe to print anywhere."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _class_folders(base: Path, dataset: str) -> list[str]:
    """Sorted names of the non-hidden subfolders of `base` (symlinks followed); undecodable names warned about.

    Raises:
        DatasetError: `base` cannot be listed.
    """
    if not base.is_dir():
        return []
    names: list[str] = []
    undecodable: list[str] = []
    try:
        with os.scandir(base) as entries:
            for entry in entries:
                if _hidden(entry.name) or not _is_dir(entry):
                    continue
                (names if _decodable(entry.name) else undecodable).append(entry.name)
    except OSError as error:
        raise DatasetError(f"{dataset}: cannot list {base}: {error.strerror or error}; check its permissions") from None
    _warn_list(sorted(undecodable), f"{dataset}: skipped {{n}} class folder(s) whose name is not valid UTF-8")
    return sorted(names)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _read_csv(path: Path, dataset: str) -> tuple[list[str], list[dict[str, str]]]:
    """Header (stripped names) and rows (stripped values) of a CSV file."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            rows = [
                {name: value.strip() for name, value in zip(header, line, strict=False)}
                for line in reader
                if any(value.strip() for value in line)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"{dataset}: cannot read {path}: {error}") from error
    for row in rows:
        for name in header:
            row.setdefault(name, "")
    return header, rows


def _one_hot_label(values: Sequence[str]) -> int | None:
    """Position of the single 1 in a one-hot row of `1.0`/`0.0` strings, or None if the row is not one-hot."""
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return None
    ones = [i for i, x in enumerate(numbers) if x == 1.0]
    if len(ones) != 1 or any(x != 0.0 for i, x in enumerate(numbers) if i != ones[0]):
        return None
    return ones[0]


def _unsafe_name(name: str) -> bool:
    """True for names that are empty, hold a control character, are absolute (POSIX or Windows style), or climb
    with `..`."""
    if not name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return True
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute():
        return True
    return PureWindowsPath(name).drive != "" or ".." in PurePosixPath(name.replace("\\", "/")).parts


def _chestx_image_folders(root: Path) -> list[Path]:
    """`images/` and every `images_NNN/images/` under `root`, in sorted order."""
    folders = [root / "images"] if (root / "images").is_dir() else []
    spread = sorted(p for p in root.glob("images_[0-9][0-9][0-9]/images") if p.is_dir())
    return folders + spread


def _chestx_locations(builder: _IndexBuilder, folders: Sequence[Path]) -> dict[str, Path]:
    """File name -> the first folder (in the given order) holding a file of that name."""
    locations: dict[str, Path] = {}
    for folder in folders:
        for name in builder.file_names(folder):
            locations.setdefault(name, folder)
    return locations


def _imagefolder_names(root: Path, folders: Sequence[str]) -> list[str]:
    """Prompt names: `root/classnames.json`'s name where it has an entry, else the folder's by `folder_prompt`."""
    path = root / CLASSNAMES_FILE
    if not path.is_file():
        return [folder_prompt(folder) for folder in folders]
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"imagefolder: cannot read {path}: {error}") from error
    except RecursionError:
        raise DatasetError(f"imagefolder: {path} nests deeper than JSON can be read; write one flat object") from None
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in mapping.items()
    ):
        raise DatasetError(
            f'imagefolder: {path} must be a JSON object {{"folder": "prompt name"}} of non-empty strings'
        )
    unknown = sorted(set(mapping) - set(folders))
    if unknown:
        raise DatasetError(
            f"imagefolder: {path.name} names folder(s) {', '.join(unknown)} that are not class folders; "
            f"class folders: {_describe(list(folders))}"
        )
    return [mapping[folder].strip() if folder in mapping else folder_prompt(folder) for folder in folders]


def _readable(path: Path) -> bool:
    """Cheap readability check: a regular file that Pillow identifies as one of `IMAGE_FORMATS` from its header,
    and, for PNG and JPEG, whose end is the format's end marker (`_ends_complete`)."""
    try:
        with open_regular(path) as handle, Image.open(handle, formats=IMAGE_FORMATS) as image:
            image.size  # noqa: B018 - touching the header is the point
            return _ends_complete(handle, image.format)
    except DECODE_ERRORS:
        return False


def _ends_complete(handle: BinaryIO, image_format: str | None) -> bool:
    """True unless a PNG's last bytes are not the IEND chunk or a JPEG's are not the EOI marker (trailing zero bytes
    allowed); other formats are not checked. Reads at most the last `_TAIL_BYTES` bytes."""
    marker = {"PNG": _PNG_END, "JPEG": _JPEG_END, "MPO": _JPEG_END}.get(image_format or "")
    if marker is None:
        return True
    size = os.fstat(handle.fileno()).st_size
    handle.seek(max(0, size - _TAIL_BYTES))
    return handle.read(_TAIL_BYTES).rstrip(b"\0").endswith(marker)


def image_files(folder: Path) -> list[Path]:
    """Every image file (by extension, not hidden, a regular file) in `folder` and below it, sorted."""
    found = []
    for current, folders, files in os.walk(folder):
        folders[:] = sorted(f for f in folders if not _hidden(f))
        found += [Path(current) / name for name in files if _decodable(name) and _is_image_name(name)]
    return sorted(p for p in found if p.is_file())


def readable_images(root: Path, keys: Sequence[str]) -> list[bool]:
    """Whether each `root/key` is an image Pillow can identify as one of `IMAGE_FORMATS`; the others are named in one
    `DatasetWarning` (they are left out, never guessed at)."""
    readable = _check_files(root, keys)
    _warn_list([key for key, ok in zip(keys, readable, strict=True) if not ok], "skipped {n} unreadable image file(s)")
    return readable


def _check_files(root: Path, keys: Sequence[str]) -> list[bool]:
    """`_readable(root/key)` for each key, in the same order, on a thread pool."""
    if not keys:
        return []
    with ThreadPoolExecutor(max_workers=_HEADER_CHECK_WORKERS) as pool:
        return list(pool.map(_readable, (root / key for key in keys), chunksize=64))


def _warn_list(names: Sequence[str], message: str) -> None:
    """One warning for a whole list: `message` (with `{n}`) plus up to 5 of the names."""
    if not names:
        return
    shown = ", ".join(repr(n) for n in names[:_NAMES_IN_WARNING])
    more = f" and {len(names) - _NAMES_IN_WARNING} more" if len(names) > _NAMES_IN_WARNING else ""
    warnings.warn(f"{message.format(n=len(names))}: {shown}{more}", DatasetWarning, stacklevel=2)


@dataclass
class _IndexBuilder:
    """Collects (key, label) pairs, checks files, reports skipped entries and builds the `ImageIndex`.

    `opener(root, key)` opens one item as RGB; the index's loader is `functools.partial(opener, root)`, so the
    opener must be a module-level function for the index to pickle into data-loader workers.
    """

    name: str
    root: Path
    class_keys: Sequence[str]
    class_names: Sequence[str]
    opener: Callable[[Path, str], Image.Image] = open_rgb
    pairs: list[tuple[int, str]] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)
    special: list[str] = field(default_factory=list)  # named like images, not regular files
    escaping: list[str] = field(default_factory=list)  # symlinks resolving outside the data root
    unlistable: list[str] = field(default_factory=list)  # folders that could not be listed
    undecodable: list[str] = field(default_factory=list)  # names that are not UTF-8 (surrogate escapes)
    _seen: set[str] = field(default_factory=set)
    _resolved: dict[Path, Path] = field(default_factory=dict)

    def add_files(self, label: int, keys: Iterable[str]) -> None:
        for key in keys:
            self._add(label, key)

    def add_folder(self, label: int, folder: Path) -> None:
        """Add the image files directly in `folder` (a class folder under the root) and in every folder below it.

        Hidden entries are ignored; subfolder symlinks are not followed. An entry named like an image is left out
        (and reported) when it is not a regular file, when it is a symlink resolving outside both the data root and
        the resolved `folder`, or when its name is not UTF-8; a folder that cannot be listed is reported.
        """
        boundaries = (os.path.realpath(self.root), os.path.realpath(folder))
        pending = [(folder, Path(folder).relative_to(self.root).as_posix() + "/")]
        keys: list[str] = []
        while pending:
            current, prefix = pending.pop()
            try:
                with os.scandir(current) as listing:
                    entries = list(listing)
            except OSError:
                self.unlistable.append(prefix.rstrip("/"))
                continue
            for entry in entries:
                name = entry.name
                if _hidden(name):
                    continue
                if not _decodable(name):
                    self.undecodable.append(prefix + name)
                    continue
                kind = self._kind(entry, boundaries)
                if kind == "folder":
                    pending.append((Path(entry.path), prefix + name + "/"))
                elif kind == "file" and _is_image_name(name):
                    keys.append(prefix + name)
                elif kind == "escaping" and _is_image_name(name):
                    self.escaping.append(prefix + name)
                elif kind == "special" and _is_image_name(name):
                    self.special.append(prefix + name)
        self.add_files(label, sorted(keys))

    @staticmethod
    def _kind(entry: os.DirEntry[str], boundaries: Sequence[str]) -> str:
        """`folder` (a real subfolder), `file` (a regular file, or a symlink to one inside a boundary), `escaping`
        (a symlink resolving outside every boundary), `special` (anything else: FIFO, device, socket, broken or
        looping symlink), or `link` (a symlink to a folder, not followed)."""
        try:
            if not entry.is_symlink():
                if entry.is_dir(follow_symlinks=False):
                    return "folder"
                return "file" if entry.is_file(follow_symlinks=False) else "special"
            target = os.path.realpath(entry.path)
            if not any(target == b or target.startswith(b.rstrip(os.sep) + os.sep) for b in boundaries):
                return "escaping"
            if entry.is_dir():
                return "link"
            return "file" if entry.is_file() else "special"
        except OSError:
            return "special"

    def file_names(self, folder: Path) -> frozenset[str]:
        """Names of the regular files (symlinks followed) in `folder`; names that are not UTF-8 are left out and
        reported.

        Raises:
            DatasetError: `folder` cannot be listed.
        """
        names: set[str] = set()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if not _is_regular(entry):
                        continue
                    if _decodable(entry.name):
                        names.add(entry.name)
                    elif not _hidden(entry.name):
                        self.undecodable.append((folder / entry.name).relative_to(self.root).as_posix())
        except OSError as error:
            raise DatasetError(
                f"{self.name}: cannot list {folder}: {error.strerror or error}; check its permissions"
            ) from None
        return frozenset(names)

    def add_csv_entry(self, label: int, folder: Path, name: str, present: Container[str]) -> None:
        """Add `folder/name` named by a CSV row unless unsafe or missing (`present`: names in `folder`)."""
        if _unsafe_name(name) or not self._resolves_inside(folder, name):
            self.unsafe.append(name)
        elif name not in present:
            self.missing.append((folder / name).relative_to(self.root).as_posix())
        else:
            self._add(label, (folder / name).relative_to(self.root).as_posix())

    def _resolves_inside(self, folder: Path, name: str) -> bool:
        """True if `folder/name`, all symlinks resolved, lies inside the resolved `folder`."""
        if folder not in self._resolved:
            self._resolved[folder] = folder.resolve()
        return (folder / name).resolve().is_relative_to(self._resolved[folder])

    def _add(self, label: int, key: str) -> None:
        if key in self._seen:
            self.duplicate.append(key)
            return
        self._seen.add(key)
        self.pairs.append((label, key))

    def build(self, min_classes: int = 2) -> ImageIndex:
        pairs = sorted(self.pairs)
        readable = _check_files(self.root, [key for _, key in pairs])
        unreadable = [key for (_, key), ok in zip(pairs, readable, strict=True) if not ok]
        pairs = [pair for pair, ok in zip(pairs, readable, strict=True) if ok]
        self._report(unreadable)
        if not pairs:
            raise DatasetError(
                f"{self.name}: zero images found under {self.root} (expected image files with extensions "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}; {len(unreadable)} unreadable, "
                f"{len(self.missing)} missing, {len(self.unsafe)} unsafe, "
                f"{len(self.special) + len(self.escaping) + len(self.undecodable)} other skipped)"
            )
        with_images = sorted({label for label, _ in pairs})
        if len(with_images) < min_classes:
            raise DatasetError(
                f"{self.name}: expected images in at least {min_classes} classes; found images only in "
                f"{_describe([self.class_keys[c] for c in with_images])} under {self.root}"
            )
        return ImageIndex(
            name=self.name,
            class_keys=tuple(self.class_keys),
            class_names=tuple(self.class_names),
            items=tuple(key for _, key in pairs),
            labels=tuple(label for label, _ in pairs),
            loader=functools.partial(self.opener, self.root),
            root=self.root,
            skipped=(
                tuple(sorted(self.unsafe))
                + tuple(sorted(self.missing))
                + tuple(unreadable)
                + tuple(sorted(self.escaping))
                + tuple(sorted(self.special))
                + tuple(sorted(_printable(n) for n in self.undecodable))
            ),
        )

    def _report(self, unreadable: Sequence[str]) -> None:
        _warn_list(
            sorted(self.unsafe),
            f"{self.name}: skipped {{n}} CSV entr(ies) whose file name is unsafe (a control character) or does not "
            "resolve inside the image folder",
        )
        _warn_list(sorted(self.missing), f"{self.name}: skipped {{n}} CSV row(s) whose image file is missing")
        _warn_list(sorted(self.duplicate), f"{self.name}: ignored {{n}} repeated entr(ies) for the same file")
        _warn_list(
            sorted(self.unlistable),
            f"{self.name}: could not list {{n}} folder(s) (permission denied?), so their images are left out; "
            "fix the permissions to include them",
        )
        _warn_list(
            sorted(self.undecodable),
            f"{self.name}: skipped {{n}} file or folder name(s) that are not valid UTF-8; rename them to include them",
        )
        _warn_list(
            sorted(self.escaping),
            f"{self.name}: skipped {{n}} symlink(s) whose target lies outside the data root",
        )
        _warn_list(
            sorted(self.special),
            f"{self.name}: skipped {{n}} entr(ies) named like images that are not regular files "
            "(FIFO, device, socket, broken symlink)",
        )
        _warn_list(unreadable, f"{self.name}: skipped {{n}} unreadable image file(s)")


def _is_regular(entry: os.DirEntry[str]) -> bool:
    """True for a regular file, symlinks followed (a FIFO, device or broken link is not)."""
    try:
        return entry.is_file()
    except OSError:
        return False
