"""`fgvc_aircraft`: FGVC-Aircraft 2013b as CoOp and the CLIP-LoRA release read it: the archive's `data/` folder (renamed
`fgvc_aircraft/` in CoOp's `DATASETS.md`) holding `variants.txt` (one variant per line: the classes, in label order),
`images_variant_train.txt`, `images_variant_val.txt` and `images_variant_test.txt` (`<image id> <variant>` per line,
the variant may hold spaces) and the images `images/<image id>.jpg`. A data root one level up, holding `fgvc_aircraft/`
or the archive's `data/`, is accepted too.

Prompt names are the variants as written (underscores as spaces, the rule of every suite dataset). Every item carries
its split. A missing file, a line naming a variant that `variants.txt` lacks, a listed image that is missing or listed
twice, each is one `DatasetError` line naming the file and the layout expected.
"""

from __future__ import annotations

from pathlib import Path

from cdfsl.data import file_checks
from cdfsl.data.classnames import folder_prompt
from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.builder import IndexBuilder, describe
from cdfsl.data.readers.registry import Reader, register_reader
from cdfsl.errors import DatasetError

VARIANTS_FILE = "variants.txt"
SPLIT_FILES = {"train": "images_variant_train.txt", "val": "images_variant_val.txt", "test": "images_variant_test.txt"}
IMAGE_FOLDER = "images"
FOLDER_NAMES = ("fgvc_aircraft", "data")
LAYOUT = (
    f"fgvc_aircraft/ (the archive's data/) holding {VARIANTS_FILE}, {', '.join(SPLIT_FILES.values())} "
    f"and {IMAGE_FOLDER}/<image id>.jpg"
)


def read_fgvc_aircraft(root: Path) -> ImageIndex:
    """FGVC-Aircraft's variants and split lists under `root` (or `root/fgvc_aircraft`, `root/data`).

    Raises:
        DatasetError: a missing or malformed file, an unknown variant, a missing or repeated image.
    """
    folder = _dataset_folder(root)
    variants = _read_lines(folder / VARIANTS_FILE)
    if not variants:
        raise DatasetError(f"fgvc_aircraft: {folder / VARIANTS_FILE} names no variant (layout: {LAYOUT})")
    repeated = sorted({v for v in variants if variants.count(v) > 1})
    if repeated:
        raise DatasetError(f"fgvc_aircraft: {folder / VARIANTS_FILE} names {describe(repeated)} more than once")
    label_of = {variant: label for label, variant in enumerate(variants)}
    image_dir = folder / IMAGE_FOLDER
    if not image_dir.is_dir():
        raise DatasetError(f"fgvc_aircraft: image folder not found: expected {image_dir} (layout: {LAYOUT})")
    builder = IndexBuilder("fgvc_aircraft", folder, variants, [folder_prompt(v) for v in variants])
    present = builder.file_names(image_dir)
    for split, name in SPLIT_FILES.items():
        path = folder / name
        if not path.is_file():
            raise DatasetError(f"fgvc_aircraft: split list not found: expected {path} (layout: {LAYOUT})")
        for number, line in enumerate(_read_lines(path), start=1):
            image_id, _, variant = line.partition(" ")
            variant = variant.strip()
            if not variant:
                raise DatasetError(
                    f"fgvc_aircraft: {path}, line {number}: expected '<image id> <variant>', got {line!r}"
                )
            if variant not in label_of:
                raise DatasetError(
                    f"fgvc_aircraft: {path}, line {number}: variant {variant!r} is not in {VARIANTS_FILE}"
                )
            builder.add_csv_entry(label_of[variant], image_dir, f"{image_id}.jpg", present, split)
    for names, what in (
        (builder.unsafe, "image id(s) that are unsafe"),
        (builder.duplicate, "image(s) more than once"),
        (builder.missing, "image(s) that are missing"),
    ):
        if names:
            shown = describe([file_checks.printable(n) for n in sorted(names)], 3)
            raise DatasetError(
                f"fgvc_aircraft: the split lists name {len(names)} {what}: {shown}; expected every listed image as "
                f"{image_dir}/<image id>.jpg"
            )
    return builder.build()


def _dataset_folder(root: Path) -> Path:
    for folder in (root, *(root / name for name in FOLDER_NAMES)):
        if (folder / VARIANTS_FILE).is_file():
            return folder
    raise DatasetError(f"fgvc_aircraft: {VARIANTS_FILE} not found: expected {root / VARIANTS_FILE} (layout: {LAYOUT})")


def _read_lines(path: Path) -> list[str]:
    """The non-blank lines of a text file, stripped.

    Raises:
        DatasetError: the file cannot be read as UTF-8 text.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"fgvc_aircraft: cannot read {path}: {error} (layout: {LAYOUT})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


register_reader(Reader("fgvc_aircraft", read_fgvc_aircraft, layout=LAYOUT))
