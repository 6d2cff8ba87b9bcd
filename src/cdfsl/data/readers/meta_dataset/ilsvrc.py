"""`md-ilsvrc_2012`: ILSVRC-2012's training images as Meta-Dataset converts them. Under the data root (the extracted
`ILSVRC2012_img_train/`): one class folder per wnid (`n01440764/`, ...), directly or under `train/`, and ImageNet's
WordNet files `wordnet.is_a.txt` and `words.txt`. The images Meta-Dataset lists as duplicates of Caltech-101,
Caltech-256 and CUB-200-2011 images are skipped. Prompt name: the first of the wnid's words in `words.txt` (all of
them when two classes share the first, the wnid added when they still do)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from cdfsl.data.index import ImageIndex
from cdfsl.data.md_hierarchy import read_words, wordnet_files
from cdfsl.data.readers.builder import IndexBuilder, class_folders
from cdfsl.data.readers.meta_dataset.common import require_classes
from cdfsl.data.readers.meta_dataset.splits import ilsvrc_duplicates

NAME = "md-ilsvrc_2012"


def class_base(root: Path) -> Path:
    """The folder holding the wnid folders: `root/train/` when it exists, else `root`."""
    return root / "train" if (root / "train").is_dir() else root


def read_ilsvrc(root: Path, classes: Sequence[str]) -> ImageIndex:
    """The images of the wnids `classes` (label order: sorted wnids), duplicates skipped."""
    _, words_path = wordnet_files(root)
    base = class_base(root)
    keys = sorted(classes)
    require_classes(NAME, keys, class_folders(base, NAME), f"{base} (one folder per wnid)")
    words = read_words(words_path)
    builder = IndexBuilder(NAME, root, keys, prompt_names(keys, words))
    for label, wnid in enumerate(keys):
        builder.add_folder(label, base / wnid)
    duplicates = ilsvrc_duplicates()
    prefix = "" if base == root else "train/"
    builder.pairs[:] = [(label, key) for label, key in builder.pairs if key.removeprefix(prefix) not in duplicates]
    return builder.build()


def prompt_names(wnids: Sequence[str], words: dict[str, str]) -> list[str]:
    """Each wnid's first word; its whole words where another class has the same first; the wnid added if still equal."""
    first = [words.get(w, w).split(",")[0].strip() or w for w in wnids]
    counts = Counter(first)
    names = [words.get(w, w).strip() if counts[f] > 1 else f for w, f in zip(wnids, first, strict=True)]
    counts = Counter(names)
    return [f"{n} ({w})" if counts[n] > 1 else n for w, n in zip(wnids, names, strict=True)]
