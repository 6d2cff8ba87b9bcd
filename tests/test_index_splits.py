"""`ImageIndex.splits`: one split's index, and the fingerprint of an index with and without splits."""

from __future__ import annotations

import pytest
from PIL import Image

from cdfsl.data.index import ImageIndex
from cdfsl.errors import DatasetError


def _index(splits: tuple[str, ...] = ()) -> ImageIndex:
    colours = {"a0": 10, "a1": 20, "b0": 30, "b1": 40}
    return ImageIndex(
        name="toy",
        class_keys=("a", "b"),
        class_names=("apple", "banana"),
        items=("a0", "a1", "b0", "b1"),
        labels=(0, 0, 1, 1),
        loader=lambda key: Image.new("RGB", (2, 2), (colours[key], 0, 0)),
        splits=splits,
    )


def test_split_keeps_that_splits_items_in_order() -> None:
    index = _index(("train", "test", "test", "train"))
    test = index.split("test")
    assert test.items == ("a1", "b0") and test.labels == (0, 1) and test.splits == ("test", "test")
    assert test.class_names == index.class_names and index.split_names == ("train", "test")
    assert test.fingerprint() != index.fingerprint() != index.split("train").fingerprint()


def test_fingerprint_without_splits_is_unchanged_and_splits_count() -> None:
    plain = _index()
    assert plain.fingerprint() == "e4e87f204d0c2b03"  # taken before `splits` existed
    assert _index(("train",) * 4).fingerprint() != _index(("test",) * 4).fingerprint() != plain.fingerprint()


def test_unknown_split_is_one_clear_error() -> None:
    with pytest.raises(DatasetError, match="no 'val' split; splits present: train, test"):
        _index(("train", "test", "test", "train")).split("val")
    with pytest.raises(DatasetError, match="publishes no splits"):
        _index().split("test")
    with pytest.raises(ValueError, match="splits and items differ"):
        _index(("train",))
