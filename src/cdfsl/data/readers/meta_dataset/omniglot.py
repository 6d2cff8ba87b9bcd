"""`md-omniglot`: Omniglot as downloaded, `images_background/` and `images_evaluation/`, each holding alphabet folders
of character folders of images. Class key `alphabet/character` (the alphabet under either folder); prompt name
`<alphabet> character <n>` (`_` as spaces). Images are used as drawn (Meta-Dataset's conversion also inverts them;
a CLIP model sees the original black strokes on white)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cdfsl.data.classnames import folder_prompt
from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.builder import IndexBuilder, class_folders
from cdfsl.data.readers.meta_dataset.common import require, require_classes

NAME = "md-omniglot"
SETS = ("images_background", "images_evaluation")


def read_omniglot(root: Path, classes: Sequence[str]) -> ImageIndex:
    """The characters `classes` (`alphabet/character`; label order: sorted)."""
    require(NAME, root, *(f"{name}/" for name in SETS))
    folders: dict[str, Path] = {}
    for name in SETS:
        for alphabet in class_folders(root / name, NAME):
            for character in class_folders(root / name / alphabet, NAME):
                folders[f"{alphabet}/{character}"] = root / name / alphabet / character
    keys = sorted(classes)
    require_classes(NAME, keys, folders, f"{root}/images_*/<alphabet>/<character>/")
    builder = IndexBuilder(NAME, root, keys, [character_prompt(key) for key in keys])
    for label, key in enumerate(keys):
        builder.add_folder(label, folders[key])
    return builder.build()


def character_prompt(key: str) -> str:
    """`Early_Aramaic/character07` -> `Early Aramaic character 7`."""
    alphabet, _, character = key.partition("/")
    number = character.removeprefix("character")
    return f"{folder_prompt(alphabet)} character {int(number) if number.isdigit() else folder_prompt(character)}"
