"""`eurosat`: EuroSAT RGB, class folders of RGB JPEGs (`AnnualCrop/`, `Forest/`, ...), directly under the root or
under `root/2750/` (preferred when it exists). The folders present must be known EuroSAT class names, at least 2;
prompt names are `EUROSAT_CLASSES`'."""

from __future__ import annotations

from pathlib import Path

from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.builder import IndexBuilder, class_folders, describe
from cdfsl.data.readers.registry import Reader, register_reader
from cdfsl.errors import DatasetError

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
"""Class folder -> prompt name."""


def read_eurosat(root: Path) -> ImageIndex:
    """EuroSAT RGB: class folders directly under `root` or under `root/2750/`."""
    base = root / "2750" if (root / "2750").is_dir() else root
    folders = class_folders(base, "eurosat")
    unknown = sorted(set(folders) - set(EUROSAT_CLASSES))
    if unknown:
        raise DatasetError(
            f"eurosat: unknown class folder(s) {', '.join(unknown)} in {base}; "
            f"expected EuroSAT class folders among: {', '.join(sorted(EUROSAT_CLASSES))}"
        )
    if len(folders) < 2:
        raise DatasetError(
            f"eurosat: expected at least 2 class folders among {', '.join(sorted(EUROSAT_CLASSES))} "
            f"in {root} or {root / '2750'}; found {describe(folders)}"
        )
    builder = IndexBuilder("eurosat", root, folders, [EUROSAT_CLASSES[f] for f in folders])
    for label, folder in enumerate(folders):
        builder.add_folder(label, base / folder)
    return builder.build()


register_reader(
    Reader("eurosat", read_eurosat, layout="EuroSAT RGB class folders (AnnualCrop/, ...), under the root or 2750/")
)
