"""Every layout's index fingerprint (which enters every run id) is the one the readers gave before they were split into
one module per layout: the values below were recorded on the single-module readers, on the same generated trees."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from cdfsl.data.readers import load_index
from layouts import make_chestx, make_cropdiseases, make_eurosat, make_imagefolder, make_isic2018
from suite_trees import make_fgvc_tree, make_imagenet_tree, make_split_tree

SUITE_COUNTS = {"train": [3, 1], "val": 1, "test": 4}  # the CLIP few-shot suite's trees; episodes read the test split

CASES: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    "eurosat": ("eurosat", make_eurosat, "fdbe64c13c5086a8"),
    "eurosat-nested": ("eurosat", lambda root: make_eurosat(root, nested=True), "beacfaba0091419b"),
    "cropdiseases": ("cropdiseases", make_cropdiseases, "503a501c1cc31eef"),
    "cropdiseases-nested": ("cropdiseases", lambda root: make_cropdiseases(root, nested=True), "2760d24607496f02"),
    "isic2018": ("isic2018", make_isic2018, "c309c9192d70f25b"),
    "chestx": ("chestx", make_chestx, "da8dc2bd516c7bbf"),
    "chestx-spread": ("chestx", lambda root: make_chestx(root, spread=True), "b1c4c4ac6e2747a8"),
    "imagefolder": ("imagefolder", make_imagefolder, "ad131b55d60778ee"),
    "imagefolder-classnames": (
        "imagefolder",
        lambda root: make_imagefolder(root, classnames={"cat": "tabby cat"}),
        "494f4565ed44cecc",
    ),
    "dtd": ("dtd", lambda root: make_split_tree(root, ["banded", "honey_combed"], SUITE_COUNTS), "c8b1e59ea03a57ab"),
    "fgvc_aircraft": (
        "fgvc_aircraft",
        lambda root: make_fgvc_tree(root, ["707-320", "A300B4"], SUITE_COUNTS),
        "a3fe42375f52f77d",
    ),
    "imagenet": (
        "imagenet",
        lambda root: make_imagenet_tree(root, {"n01": "tench", "n02": "goldfish"}, SUITE_COUNTS),
        "f61312eafd8f063b",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layout_fingerprint_is_unchanged(case: str, tmp_path: Path) -> None:
    dataset, make, recorded = CASES[case]
    root = make(tmp_path / case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the generated trees are clean: nothing is skipped
        index = load_index(dataset, root)
    assert index.skipped == ()
    assert index.fingerprint() == recorded


def test_digits_fingerprint_is_unchanged() -> None:
    assert load_index("digits", None).fingerprint() == "c3df271a3a8591cb"
