"""`isic2018`: ISIC 2018 task 3, `ISIC2018_Task3_Training_Input/<image>.jpg` and
`ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv` with exactly the columns
`image,MEL,NV,BCC,AKIEC,BKL,DF,VASC` (one-hot `1.0`/`0.0`). Rows that are not exactly one-hot, or whose image is
missing, are skipped with one warning for each kind. Prompt names are `ISIC_CLASSES`'."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cdfsl.data.file_checks import warn_names
from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.builder import IndexBuilder, describe, read_csv
from cdfsl.data.readers.registry import Reader, register_reader
from cdfsl.errors import DatasetError

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
"""CSV label column -> prompt name, in label order."""


def read_isic2018(root: Path) -> ImageIndex:
    """ISIC 2018 task 3: one-hot ground-truth CSV plus an input folder of `<image>.jpg`."""
    input_dir = root / ISIC_INPUT_DIR
    csv_path = root / ISIC_CSV
    if not csv_path.is_file():
        raise DatasetError(f"isic2018: ground-truth CSV not found: expected {csv_path}")
    if not input_dir.is_dir():
        raise DatasetError(f"isic2018: image folder not found: expected {input_dir}")
    columns = (ISIC_IMAGE_COLUMN, *ISIC_CLASSES)
    header, rows = read_csv(csv_path, "isic2018")
    if set(header) != set(columns):
        raise DatasetError(
            f"isic2018: {csv_path.name} has unexpected columns; expected {', '.join(columns)}; "
            f"found {', '.join(header) or 'no header'} "
            f"(missing: {describe(sorted(set(columns) - set(header)))}; "
            f"unknown: {describe(sorted(set(header) - set(columns)))})"
        )
    builder = IndexBuilder("isic2018", root, list(ISIC_CLASSES), list(ISIC_CLASSES.values()))
    present = builder.file_names(input_dir)
    not_one_hot: list[str] = []
    for row in rows:
        name = row[ISIC_IMAGE_COLUMN]
        label = one_hot_label([row[c] for c in ISIC_CLASSES])
        if label is None:
            not_one_hot.append(name)
        else:
            builder.add_csv_entry(label, input_dir, f"{name}.jpg", present)
    warn_names(not_one_hot, "isic2018: skipped {n} CSV row(s) whose label columns are not exactly one 1.0")
    return builder.build()


def one_hot_label(values: Sequence[str]) -> int | None:
    """Position of the single 1 in a one-hot row of `1.0`/`0.0` strings, or None if the row is not one-hot."""
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return None
    ones = [i for i, x in enumerate(numbers) if x == 1.0]
    if len(ones) != 1 or any(x != 0.0 for i, x in enumerate(numbers) if i != ones[0]):
        return None
    return ones[0]


register_reader(Reader("isic2018", read_isic2018, layout=f"{ISIC_INPUT_DIR}/<image>.jpg and {ISIC_CSV}"))
