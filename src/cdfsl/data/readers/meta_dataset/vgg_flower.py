"""`md-vgg_flower`: Oxford 102 Flowers as downloaded (`vgg_flower/`): `jpg/image_<nnnnn>.jpg` and `imagelabels.mat`
(`labels`, 1..102, one per image in file-number order). Class key `<nnn>.<name>` as Meta-Dataset names the classes
(prompt name: the flower's name)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.builder import IndexBuilder
from cdfsl.data.readers.meta_dataset.common import numbered_name, require
from cdfsl.errors import DatasetError

NAME = "md-vgg_flower"


def read_vgg_flower(root: Path, classes: Sequence[str]) -> ImageIndex:
    """The flowers `classes` (`090.canna lily`; label order: sorted)."""
    require(NAME, root, "jpg/", "imagelabels.mat")
    labels = image_labels(root / "imagelabels.mat")
    keys = sorted(classes)
    label_of = {int(key.split(".", 1)[0]): label for label, key in enumerate(keys)}
    builder = IndexBuilder(NAME, root, keys, [numbered_name(key) for key in keys])
    present = builder.file_names(root / "jpg")
    for position, original in enumerate(labels):
        label = label_of.get(original)
        if label is not None:
            builder.add_csv_entry(label, root / "jpg", f"image_{position + 1:05d}.jpg", present)
    return builder.build()


def image_labels(path: Path) -> list[int]:
    """The `labels` vector of `imagelabels.mat` (MATLAB v5, read with scipy).

    Raises:
        DatasetError: the file cannot be read or holds no `labels` vector.
    """
    from scipy.io import loadmat  # only this reader needs scipy

    try:
        labels = loadmat(str(path))["labels"]
    except (OSError, ValueError, KeyError, NotImplementedError, TypeError) as error:
        raise DatasetError(f"{NAME}: cannot read the 'labels' vector of {path}: {error!r}") from None
    return [int(v) for v in labels.ravel()]
