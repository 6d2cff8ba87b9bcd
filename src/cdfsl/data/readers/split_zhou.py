"""The CLIP few-shot suite's split files: `split_zhou_<Name>.json`, as CoOp publishes them (its `DATASETS.md`) and the
CLIP-LoRA release reads them, for Caltech101, OxfordPets, StanfordCars, Flowers102, Food101, SUN397, DTD, UCF101 and
EuroSAT.

A split file is a JSON object with the lists `train`, `val` and `test`, each entry `[relative path, label, class
name]`, the path relative to the dataset's image folder (`images/` for DTD, `jpg/` for Flowers102, the dataset folder
itself for StanfordCars, ...; `SplitLayout.image_folder`). The data root is the dataset's own folder holding the
split file and the image folder (`dtd/` with `images/` and `split_zhou_DescribableTextures.json`); a root one level
up, holding the dataset under CoOp's folder name or the CLIP-LoRA release's (`caltech-101/` or `Caltech101/`), is
accepted too.

Classes are the labels of the split file, in label order; a class's key is its name as the split file writes it and
its prompt name follows the dataset's rule (`SplitLayout.prompt_name`): CoOp's renamings where a dataset has them
(Caltech101's `airplanes` → `airplane`, EuroSAT's `AnnualCrop` → `Annual Crop Land`; the published split files already
carry the new names), then underscores as spaces (what CoOp and CLIP-LoRA do to every class name before the prompt).
Caltech101's excluded classes (`BACKGROUND_Google`, `Faces_easy`) are never read, even where their folders are present.
UCF101's images are the middle frames of its videos (`UCF-101-midframes/<Action>/<video>.jpg`) and SUN397's sit in
nested folders (`SUN397/a/abbey/...`): both are what their split files list, read as any other entry.

Every item carries its split (`ImageIndex.splits`). What the split file says must hold on disk: a split file that is
missing or not the JSON described, an entry that is malformed, a label given two names (or a name two labels), an
image listed twice or missing from its folder, each is one `DatasetError` line naming the file and the layout expected.
Images that are present but unreadable are left out with a warning, as by every reader (`IndexBuilder`).
"""

from __future__ import annotations

import functools
import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdfsl.data import file_checks
from cdfsl.data.classnames import folder_prompt
from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.builder import IndexBuilder, describe
from cdfsl.data.readers.registry import Reader, register_reader
from cdfsl.errors import DatasetError

SPLITS = ("train", "val", "test")
"""The lists of a split file, in the order items are tagged."""

CALTECH_EXCLUDED = frozenset({"BACKGROUND_Google", "Faces_easy"})
"""Caltech101 class folders CoOp leaves out (its `caltech101.py`, `IGNORED`)."""

CALTECH_RENAMED: Mapping[str, str] = {
    "airplanes": "airplane",
    "Faces": "face",
    "Leopards": "leopard",
    "Motorbikes": "motorbike",
}
"""Caltech101 folder -> class name (CoOp's `caltech101.py`, `NEW_CNAMES`)."""

EUROSAT_COOP_NAMES: Mapping[str, str] = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}
"""EuroSAT folder -> CoOp's descriptive class name (CoOp's `eurosat.py`, `NEW_CNAMES`; the same in CLIP-LoRA)."""


@dataclass(frozen=True)
class SplitLayout:
    """One dataset read from a `split_zhou_*.json` file.

    Attributes:
        dataset: the benchmark's name (`dtd`), also the reader's suffix (`split_zhou_dtd`).
        split_file: the split file's name, in the dataset folder.
        image_folder: the folder the split file's paths are relative to, under the dataset folder (`.`: itself).
        folder_names: the dataset folder's names in CoOp's `DATASETS.md` and in the CLIP-LoRA release, accepted
            under a data root one level up.
        renamed: raw class name -> prompt name before the underscore rule (CoOp's renamings).
        excluded: first path components (class folders) whose entries are never read.
        extra: what else the download holds, for the layout line (not read).
    """

    dataset: str
    split_file: str
    image_folder: str
    folder_names: tuple[str, ...]
    renamed: Mapping[str, str] = field(default_factory=dict)
    excluded: frozenset[str] = frozenset()
    extra: str = ""

    @property
    def reader(self) -> str:
        return f"split_zhou_{self.dataset}"

    @property
    def layout(self) -> str:
        """What the reader needs on disk, in one line."""
        images = "the dataset folder itself" if self.image_folder == "." else f"{self.image_folder}/"
        names = " or ".join(f"{name}/" for name in self.folder_names)
        extra = f" ({self.extra})" if self.extra else ""
        return f"{names} holding {self.split_file} and the images under {images}{extra}"

    def prompt_name(self, raw: str) -> str:
        """The prompt name of the class the split file names `raw`: renamed, then underscores as spaces."""
        return folder_prompt(self.renamed.get(raw, raw))


SPLIT_LAYOUTS: dict[str, SplitLayout] = {
    layout.dataset: layout
    for layout in (
        SplitLayout(
            "caltech101",
            "split_zhou_Caltech101.json",
            "101_ObjectCategories",
            ("caltech-101", "Caltech101"),
            renamed=CALTECH_RENAMED,
            excluded=CALTECH_EXCLUDED,
            extra="BACKGROUND_Google/ and Faces_easy/ are never read",
        ),
        SplitLayout(
            "oxford_pets", "split_zhou_OxfordPets.json", "images", ("oxford_pets", "OxfordPets"), extra="annotations/"
        ),
        SplitLayout(
            "stanford_cars",
            "split_zhou_StanfordCars.json",
            ".",
            ("stanford_cars", "StanfordCars"),
            extra="cars_train/, cars_test/",
        ),
        SplitLayout(
            "oxford_flowers",
            "split_zhou_OxfordFlowers.json",
            "jpg",
            ("oxford_flowers", "Flower102"),
            extra="imagelabels.mat, cat_to_name.json",
        ),
        SplitLayout("food101", "split_zhou_Food101.json", "images", ("food-101", "Food101"), extra="meta/"),
        SplitLayout(
            "sun397", "split_zhou_SUN397.json", "SUN397", ("sun397", "SUN397"), extra="nested: SUN397/a/abbey/..."
        ),
        SplitLayout("dtd", "split_zhou_DescribableTextures.json", "images", ("dtd", "DTD"), extra="imdb/, labels/"),
        SplitLayout(
            "ucf101",
            "split_zhou_UCF101.json",
            "UCF-101-midframes",
            ("ucf101", "UCF101"),
            extra="one middle frame per video",
        ),
        SplitLayout(
            "eurosat_coop",
            "split_zhou_EuroSAT.json",
            "2750",
            ("eurosat",),
            renamed=EUROSAT_COOP_NAMES,
            extra="the images of the CDFSL eurosat",
        ),
    )
}
"""Every split-file dataset, by benchmark name."""


def read_split_zhou(layout: SplitLayout, root: Path) -> ImageIndex:
    """The index of `layout`'s dataset under `root`, every item tagged with its split.

    Raises:
        DatasetError: a missing split file or image folder, a malformed split file, a label/name disagreement, or an
            image listed twice or missing (one line naming the file and the layout expected).
    """
    folder = dataset_folder(layout, root)
    split_path = folder / layout.split_file
    image_dir = folder / layout.image_folder if layout.image_folder != "." else folder
    if not image_dir.is_dir():
        raise DatasetError(f"{layout.dataset}: image folder not found: expected {image_dir} (layout: {layout.layout})")
    entries = [entry for entry in parse_split_file(layout, split_path) if not _excluded(layout, entry[1])]
    labels = class_labels(layout, split_path, entries)
    order = sorted(labels)  # labels as published; gaps (a class no entry keeps) are closed up
    position = {label: i for i, label in enumerate(order)}
    keys = [labels[label] for label in order]
    builder = IndexBuilder(layout.dataset, folder, keys, [layout.prompt_name(key) for key in keys])
    listed: dict[Path, frozenset[str]] = {}
    for split, path, label, _ in entries:
        if file_checks.unsafe_name(path):  # `..` anywhere, an absolute path, a control character
            builder.unsafe.append(path)
            continue
        parent, name = posixpath.split(path)
        where = image_dir / parent if parent else image_dir
        if where not in listed:
            listed[where] = builder.file_names(where) if where.is_dir() else frozenset()
        builder.add_csv_entry(position[label], where, name, listed[where], split)
    _refuse_inconsistent(layout, split_path, image_dir, builder)
    return builder.build()


def dataset_folder(layout: SplitLayout, root: Path) -> Path:
    """`root` when it holds the split file, else its subfolder of one of the dataset's folder names that does.

    Raises:
        DatasetError: no split file in either place.
    """
    for folder in (root, *(root / name for name in layout.folder_names)):
        if (folder / layout.split_file).is_file():
            return folder
    raise DatasetError(
        f"{layout.dataset}: split file not found: expected {root / layout.split_file} (layout: {layout.layout}; "
        "the split files are linked from CoOp's DATASETS.md)"
    )


def parse_split_file(layout: SplitLayout, path: Path) -> list[tuple[str, str, int, str]]:
    """The entries of a split file as (split, relative path, label, class name), splits in `SPLITS` order.

    Raises:
        DatasetError: the file cannot be read, is not JSON, lacks a split list, or holds a malformed entry.
    """
    expected = 'a JSON object {"train": [...], "val": [...], "test": [...]} of [relative path, label, class name]'
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = "it nests too deep" if isinstance(error, RecursionError) else str(error)
        raise DatasetError(f"{layout.dataset}: cannot read {path}: {reason}; expected {expected}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{layout.dataset}: {path} is not {expected}")
    missing = [split for split in SPLITS if not isinstance(data.get(split), list)]
    if missing:
        raise DatasetError(f"{layout.dataset}: {path} has no {', '.join(missing)} list; expected {expected}")
    entries = []
    for split in SPLITS:
        for number, entry in enumerate(data[split]):
            if not _well_formed(entry):
                raise DatasetError(
                    f"{layout.dataset}: {path}: entry {number} of {split!r} is {_shown(entry)}, not "
                    "[relative path, integer label >= 0, class name]"
                )
            entries.append((split, entry[0], int(entry[1]), entry[2]))
    return entries


def class_labels(layout: SplitLayout, path: Path, entries: Sequence[tuple[str, str, int, str]]) -> dict[int, str]:
    """label -> class name as the split file writes it.

    Raises:
        DatasetError: a label given two names, or a name given two labels.
    """
    names: dict[int, str] = {}
    labels: dict[str, int] = {}
    for _, item, label, name in entries:
        if names.setdefault(label, name) != name:
            raise DatasetError(
                f"{layout.dataset}: {path} gives label {label} two class names, {names[label]!r} and {name!r} "
                f"(at {item!r}); every entry of a class must carry the same label and name"
            )
        if labels.setdefault(name, label) != label:
            raise DatasetError(
                f"{layout.dataset}: {path} gives class {name!r} two labels, {labels[name]} and {label} "
                f"(at {item!r}); every entry of a class must carry the same label and name"
            )
    if not names:
        raise DatasetError(f"{layout.dataset}: {path} lists no image (its train, val and test lists are empty)")
    return names


def _refuse_inconsistent(layout: SplitLayout, split_path: Path, image_dir: Path, builder: IndexBuilder) -> None:
    """Raise for what the split file lists but the disk does not hold (the builder would only warn)."""
    problems = (
        (builder.unsafe, "path(s) that are unsafe or lead outside the image folder"),
        (builder.duplicate, "image(s) more than once"),
        (builder.missing, "image(s) that are missing"),
    )
    for names, what in problems:
        if names:
            raise DatasetError(
                f"{layout.dataset}: {split_path.name} lists {len(names)} {what}: "
                f"{describe([file_checks.printable(n) for n in sorted(names)], 3)}; expected every listed image "
                f"under {image_dir} (layout: {layout.layout})"
            )


def _excluded(layout: SplitLayout, path: str) -> bool:
    return bool(layout.excluded) and path.split("/", 1)[0] in layout.excluded


def _well_formed(entry: Any) -> bool:
    return (
        isinstance(entry, list)
        and len(entry) == 3
        and isinstance(entry[0], str)
        and bool(entry[0])
        and isinstance(entry[1], int)
        and not isinstance(entry[1], bool)
        and entry[1] >= 0
        and isinstance(entry[2], str)
        and bool(entry[2].strip())
    )


def _shown(value: Any, limit: int = 80) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


for _layout in SPLIT_LAYOUTS.values():
    register_reader(Reader(_layout.reader, functools.partial(read_split_zhou, _layout), layout=_layout.layout))
