"""`cropdiseases`: PlantVillage class folders (`Apple___Apple_scab/`, ...), directly under the root or under
`root/dataset/train/` (preferred when it exists). Prompt name = folder name by the folder rule
(`cdfsl.data.classnames.folder_prompt`: underscores as spaces, runs of them and of spaces as one space)."""

from __future__ import annotations

from pathlib import Path

from cdfsl.data.classnames import folder_prompt
from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.builder import IndexBuilder, class_folders, describe
from cdfsl.data.readers.registry import Reader, register_reader
from cdfsl.errors import DatasetError


def read_cropdiseases(root: Path) -> ImageIndex:
    """PlantVillage (CropDiseases): class folders directly under `root` or under `root/dataset/train/`."""
    nested = root / "dataset" / "train"
    base = nested if nested.is_dir() else root
    folders = class_folders(base, "cropdiseases")
    if len(folders) < 2:
        raise DatasetError(
            f"cropdiseases: expected PlantVillage class folders (such as Apple___Apple_scab) in {root} or "
            f"{nested}; found {describe(folders)}"
        )
    builder = IndexBuilder("cropdiseases", root, folders, [folder_prompt(f) for f in folders])
    for label, folder in enumerate(folders):
        builder.add_folder(label, base / folder)
    return builder.build()


register_reader(
    Reader("cropdiseases", read_cropdiseases, layout="PlantVillage class folders, under the root or dataset/train/")
)
