"""`imagefolder`: a generic class-folder tree. The immediate non-hidden subfolders of the root are the classes; a
class's images are the image files directly in its folder and, recursively, in every folder below it. Files directly
in the root are ignored. Prompt names follow the folder rule (`cdfsl.data.classnames.folder_prompt`); an optional
`root/classnames.json` (`{"folder": "prompt name"}`) gives any class its own. Also the reader of `cdfsl fit --data`
and of the classifier's folders."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from cdfsl.data.classnames import folder_prompt
from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.builder import IndexBuilder, class_folders, describe
from cdfsl.data.readers.registry import Reader, register_reader
from cdfsl.errors import DatasetError

CLASSNAMES_FILE = "classnames.json"


def read_imagefolder(root: Path, min_classes: int = 2) -> ImageIndex:
    """Generic class-folder tree; class = immediate subfolder, images directly in it or anywhere below it.
    `min_classes`: the class folders with images it needs (1 for a classifier's test folder)."""
    folders = class_folders(root, "imagefolder")
    if len(folders) < min_classes:
        least = f"at least {min_classes} class folders" if min_classes > 1 else "a class folder"
        raise DatasetError(f"imagefolder: expected {least} in {root}; found {describe(folders)}")
    names = prompt_names(root, folders)
    builder = IndexBuilder("imagefolder", root, folders, names)
    for label, folder in enumerate(folders):
        builder.add_folder(label, root / folder)
    return builder.build(min_classes)


def prompt_names(root: Path, folders: Sequence[str]) -> list[str]:
    """Prompt names: `root/classnames.json`'s name where it has an entry, else the folder's by `folder_prompt`.

    Raises:
        DatasetError: `classnames.json` cannot be read, is not a flat object of non-empty strings, or names a folder
            that is not a class folder.
    """
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
            f"class folders: {describe(list(folders))}"
        )
    return [mapping[folder].strip() if folder in mapping else folder_prompt(folder) for folder in folders]


register_reader(Reader("imagefolder", read_imagefolder, layout="one folder per class; optional classnames.json"))
