"""`imagenet`: ILSVRC-2012 as class folders, read as CoOp and the CLIP-LoRA release do: the training images in
`images/train/<wnid>/` and the validation images in `images/val/<wnid>/` (CoOp's `DATASETS.md`), or `train/<wnid>/` and
`val/<wnid>/` directly in the dataset folder (the CLIP-LoRA release's `imagenet.py`), plus `classnames.txt` in the
dataset folder, one `<wnid> <class name>` per line (CLIP's names, linked from CoOp's `DATASETS.md`). The validation
images are the test split, as in both releases; there is no val split.

Classes are the wnid folders of train and val together, sorted (label order is wnid order, as `sorted` folders give
both releases); each must have a line in `classnames.txt` (lines for absent folders are ignored, so a part of ImageNet
reads as itself). Prompt names are `classnames.txt`'s, underscores as spaces. Listing uses `os.scandir` only (no
per-file `stat`), so 10^6 files list in seconds; the builder's readability check then opens each file once.
"""

from __future__ import annotations

from pathlib import Path

from cdfsl.data.classnames import folder_prompt
from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.builder import IndexBuilder, class_folders, describe
from cdfsl.data.readers.registry import Reader, register_reader
from cdfsl.errors import DatasetError

CLASSNAMES_TXT = "classnames.txt"
SPLIT_FOLDERS = {"train": "train", "test": "val"}
"""Our split -> the folder holding it (ImageNet's val set is the test split)."""
LAYOUT = (
    f"imagenet/ holding {CLASSNAMES_TXT} ('<wnid> <name>' lines) and images/train/<wnid>/, images/val/<wnid>/ "
    "(or train/, val/ directly)"
)


def read_imagenet(root: Path) -> ImageIndex:
    """ImageNet's class folders under `root/images` (or `root`) and the names of `root/classnames.txt`.

    Raises:
        DatasetError: no train/val folders, a missing or malformed `classnames.txt`, a wnid folder it does not name.
    """
    base = _image_base(root)
    folders = {split: class_folders(base / name, "imagenet") for split, name in SPLIT_FOLDERS.items()}
    wnids = sorted(set(folders["train"]) | set(folders["test"]))
    names = read_classnames(root / CLASSNAMES_TXT)
    unnamed = [wnid for wnid in wnids if wnid not in names]
    if unnamed:
        raise DatasetError(
            f"imagenet: {root / CLASSNAMES_TXT} has no line for {len(unnamed)} class folder(s): "
            f"{describe(unnamed, 3)}; expected '<wnid> <class name>' for every folder of train/ and val/"
        )
    builder = IndexBuilder("imagenet", root, wnids, [folder_prompt(names[wnid]) for wnid in wnids])
    label_of = {wnid: label for label, wnid in enumerate(wnids)}
    for split, name in SPLIT_FOLDERS.items():
        for wnid in folders[split]:
            builder.add_folder(label_of[wnid], base / name / wnid, split)
    return builder.build()


def read_classnames(path: Path) -> dict[str, str]:
    """wnid -> class name, from `classnames.txt` lines `<wnid> <class name>` (the name may hold spaces).

    Raises:
        DatasetError: the file is missing or unreadable, a line has no name, or a wnid appears twice.
    """
    if not path.is_file():
        raise DatasetError(f"imagenet: class names not found: expected {path} (layout: {LAYOUT})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"imagenet: cannot read {path}: {error}") from None
    names: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not name.strip():
            raise DatasetError(f"imagenet: {path}, line {number}: expected '<wnid> <class name>', got {line.strip()!r}")
        if wnid in names:
            raise DatasetError(f"imagenet: {path}, line {number}: wnid {wnid!r} is named a second time")
        names[wnid] = name.strip()
    return names


def _image_base(root: Path) -> Path:
    """`root/images` when it holds train/ or val/ (CoOp), else `root` when it does (CLIP-LoRA).

    Raises:
        DatasetError: neither does.
    """
    for base in (root / "images", root):
        if any((base / name).is_dir() for name in SPLIT_FOLDERS.values()):
            return base
    raise DatasetError(f"imagenet: no train/ or val/ folder under {root / 'images'} or {root} (layout: {LAYOUT})")


register_reader(Reader("imagenet", read_imagenet, layout=LAYOUT))
