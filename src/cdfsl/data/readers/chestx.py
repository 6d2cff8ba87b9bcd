"""`chestx`: NIH ChestX-ray14, `Data_Entry_2017.csv` (columns `Image Index`, `Finding Labels`, labels joined by `|`)
and the PNGs in `images/` and/or `images_001/images/` ... `images_012/images/` (all are searched). Only rows with
exactly one label among the seven classes are kept; the others are left out silently, as the protocol says. Prompt
names are the class names as written. The VtT release's 256x256 pre-resize of ChestX images is not the reader's: it is
the run's `pre_resize` (a recipe value), applied in `cdfsl.data.images`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.builder import IndexBuilder, read_csv
from cdfsl.data.readers.registry import Reader, register_reader
from cdfsl.errors import DatasetError

CHESTX_CSV = "Data_Entry_2017.csv"
CHESTX_IMAGE_COLUMN = "Image Index"
CHESTX_LABEL_COLUMN = "Finding Labels"
CHESTX_CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax")


def read_chestx(root: Path) -> ImageIndex:
    """NIH ChestX-ray14: `Data_Entry_2017.csv` plus PNGs in `images/` and/or `images_0NN/images/`."""
    csv_path = root / CHESTX_CSV
    if not csv_path.is_file():
        raise DatasetError(f"chestx: label CSV not found: expected {csv_path}")
    folders = image_folders(root)
    if not folders:
        raise DatasetError(
            f"chestx: no image folder found: expected {root / 'images'} or {root / 'images_001' / 'images'} "
            f"... {root / 'images_012' / 'images'}"
        )
    header, rows = read_csv(csv_path, "chestx")
    missing = [c for c in (CHESTX_IMAGE_COLUMN, CHESTX_LABEL_COLUMN) if c not in header]
    if missing:
        raise DatasetError(
            f"chestx: {csv_path.name} lacks column(s) {', '.join(missing)}; expected columns including "
            f"{CHESTX_IMAGE_COLUMN!r} and {CHESTX_LABEL_COLUMN!r}; found {', '.join(header) or 'no header'}"
        )
    builder = IndexBuilder("chestx", root, list(CHESTX_CLASSES), list(CHESTX_CLASSES))
    locations = _locations(builder, folders)
    for row in rows:
        labels = [part.strip() for part in row[CHESTX_LABEL_COLUMN].split("|")]
        if len(labels) != 1 or labels[0] not in CHESTX_CLASSES:
            continue  # the protocol keeps single-label rows of the seven classes only
        name = row[CHESTX_IMAGE_COLUMN]
        builder.add_csv_entry(CHESTX_CLASSES.index(labels[0]), locations.get(name, folders[0]), name, locations)
    return builder.build()


def image_folders(root: Path) -> list[Path]:
    """`images/` and every `images_NNN/images/` under `root`, in sorted order."""
    folders = [root / "images"] if (root / "images").is_dir() else []
    spread = sorted(p for p in root.glob("images_[0-9][0-9][0-9]/images") if p.is_dir())
    return folders + spread


def _locations(builder: IndexBuilder, folders: Sequence[Path]) -> dict[str, Path]:
    """File name -> the first folder (in the given order) holding a file of that name."""
    locations: dict[str, Path] = {}
    for folder in folders:
        for name in builder.file_names(folder):
            locations.setdefault(name, folder)
    return locations


register_reader(
    Reader("chestx", read_chestx, layout="Data_Entry_2017.csv and the PNGs in images/ and/or images_0NN/images/")
)
