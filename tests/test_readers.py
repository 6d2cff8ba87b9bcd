"""Dataset readers on generated trees in the real layouts, and on every bad input `docs/protocol.md` names."""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdfsl.data.images import resize_square
from cdfsl.data.index import ImageIndex
from cdfsl.data.readers import load_index
from cdfsl.errors import DatasetError, DatasetWarning
from layouts import (
    CHESTX_CLASSES,
    EUROSAT_FOLDERS,
    PLANTVILLAGE_FOLDERS,
    make_chestx,
    make_cropdiseases,
    make_eurosat,
    make_imagefolder,
    make_isic2018,
)

EUROSAT_PROMPTS = {
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
ISIC_PROMPTS = (
    "melanoma",
    "melanocytic nevus",
    "basal cell carcinoma",
    "actinic keratosis",
    "benign keratosis",
    "dermatofibroma",
    "vascular lesion",
)


def load_quietly(dataset: str, root: Path | None) -> ImageIndex:
    """Load, failing the test on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_index(dataset, root)


def assert_well_formed(index: ImageIndex, per_class: int | None = None) -> None:
    """Sorted by (label, key), POSIX relative keys, loader gives RGB, optional equal class counts."""
    pairs = list(zip(index.labels, index.items, strict=True))
    assert pairs == sorted(pairs)
    assert len(set(index.items)) == len(index.items)
    for key in index.items[:: max(1, len(index.items) // 7)]:
        assert not key.startswith("/") and "\\" not in key and ".." not in key.split("/")
        image = index.loader(key)
        assert image.mode == "RGB"
    if per_class is not None:
        assert index.counts() == [per_class] * index.num_classes


def folder_of(key: str, depth: int) -> str:
    return key.split("/")[depth]


# real layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
def test_eurosat_layouts(tmp_path: Path, nested: bool) -> None:
    root = make_eurosat(tmp_path, per_class=3, nested=nested)
    index = load_quietly("eurosat", root)
    assert index.name == "eurosat"
    assert index.class_keys == tuple(sorted(EUROSAT_FOLDERS))
    assert index.class_names == tuple(EUROSAT_PROMPTS[k] for k in index.class_keys)
    assert_well_formed(index, per_class=3)
    depth = 1 if nested else 0
    assert all(key.startswith("2750/") == nested for key in index.items)
    assert all(
        folder_of(key, depth) == index.class_keys[label] for key, label in zip(index.items, index.labels, strict=True)
    )
    assert index.root == tmp_path.resolve()
    assert index.skipped == ()


def test_eurosat_subset_of_classes_and_unknown_folder(tmp_path: Path) -> None:
    root = make_eurosat(tmp_path, per_class=2)
    for folder in EUROSAT_FOLDERS[2:]:
        for file in (root / folder).iterdir():
            file.unlink()
        (root / folder).rmdir()
    assert load_quietly("eurosat", root).class_keys == ("AnnualCrop", "Forest")
    (root / "Clouds").mkdir()
    with pytest.raises(DatasetError, match=r"Clouds.*expected.*AnnualCrop.*SeaLake"):
        load_index("eurosat", root)


def test_eurosat_needs_two_class_folders(tmp_path: Path) -> None:
    (tmp_path / "Forest").mkdir()
    with pytest.raises(DatasetError, match=r"at least 2 class folders.*found Forest"):
        load_index("eurosat", tmp_path)


@pytest.mark.parametrize("nested", [False, True])
def test_cropdiseases_layouts(tmp_path: Path, nested: bool) -> None:
    root = make_cropdiseases(tmp_path, per_class=3, nested=nested)
    index = load_quietly("cropdiseases", root)
    assert index.class_keys == tuple(sorted(PLANTVILLAGE_FOLDERS))
    expected = {
        "Apple___Apple_scab": "Apple Apple scab",
        "Apple___healthy": "Apple healthy",
        "Corn_(maize)___Cercospora_leaf_spot Gray_leaf_spot": ("Corn (maize) Cercospora leaf spot Gray leaf spot"),
        "Pepper,_bell___Bacterial_spot": "Pepper, bell Bacterial spot",
        "Tomato___Tomato_Yellow_Leaf_Curl_Virus": "Tomato Tomato Yellow Leaf Curl Virus",
        "Tomato___healthy": "Tomato healthy",
    }
    assert index.class_names == tuple(expected[k] for k in index.class_keys)
    assert_well_formed(index, per_class=3)
    assert all(key.endswith(".JPG") for key in index.items)  # extensions match case-insensitively
    assert all(key.startswith("dataset/train/") == nested for key in index.items)


def test_isic2018_layout_and_one_hot(tmp_path: Path) -> None:
    root = make_isic2018(tmp_path, per_class=3)
    index = load_quietly("isic2018", root)
    assert index.class_keys == ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
    assert index.class_names == ISIC_PROMPTS
    assert_well_formed(index, per_class=3)
    # make_isic2018 numbers images class-major: image ISIC_(24306 + 3 * label + n)
    for key, label in zip(index.items, index.labels, strict=True):
        number = int(Path(key).stem.split("_")[1])
        assert (number - 24306) // 3 == label
        assert key.startswith("ISIC2018_Task3_Training_Input/")


def test_isic2018_skips_rows_that_are_not_one_hot(tmp_path: Path) -> None:
    rows = [
        "ISIC_0024306,1.0,1.0,0.0,0.0,0.0,0.0,0.0",  # two ones (duplicate of a valid row's image, too)
        "ISIC_0024307,0.0,0.0,0.0,0.0,0.0,0.0,0.0",  # no one
        "ISIC_0024308,0.5,0.5,0.0,0.0,0.0,0.0,0.0",  # not one-hot
        "ISIC_0024309,x,0.0,0.0,0.0,0.0,0.0,0.0",  # not a number
    ]
    root = make_isic2018(tmp_path, per_class=2, extra_rows=rows)
    with pytest.warns(DatasetWarning, match=r"4 CSV row\(s\).*not exactly one") as record:
        index = load_index("isic2018", root)
    assert len(record) == 1
    assert index.counts() == [2] * 7


def test_isic2018_missing_images_warn_once_with_count(tmp_path: Path) -> None:
    rows = [f"ISIC_9{n:06d},0.0,1.0,0.0,0.0,0.0,0.0,0.0" for n in range(40)]
    root = make_isic2018(tmp_path, per_class=2, extra_rows=rows)
    with pytest.warns(DatasetWarning) as record:
        index = load_index("isic2018", root)
    assert len(record) == 1
    message = str(record[0].message)
    assert "40 CSV row(s) whose image file is missing" in message
    assert "ISIC_9000000.jpg" in message and "and 35 more" in message
    assert index.counts() == [2] * 7
    assert len(index.skipped) == 40


@pytest.mark.parametrize("spread", [False, True])
def test_chestx_keeps_single_label_rows_of_seven_classes(tmp_path: Path, spread: bool) -> None:
    root = make_chestx(tmp_path, per_class=3, spread=spread)
    index = load_quietly("chestx", root)  # dropped rows are the protocol: no warning
    assert index.class_keys == CHESTX_CLASSES
    assert index.class_names == CHESTX_CLASSES
    assert_well_formed(index, per_class=3)
    if spread:
        assert {key.split("/")[0] for key in index.items} >= {"images_001", "images_012"}
        assert all(key.split("/")[1] == "images" for key in index.items)
    else:
        assert all(key.startswith("images/") for key in index.items)
    # make_chestx numbers rows class-major from 1; rows 22.. (No Finding, Pneumonia, multi-label) are dropped
    numbers = {int(Path(key).name[:8]) for key in index.items}
    assert numbers == set(range(1, 22))
    for key, label in zip(index.items, index.labels, strict=True):
        assert (int(Path(key).name[:8]) - 1) // 3 == label
    gray = Image.open(root / index.items[0])
    assert gray.mode == "L" and index.open(0).mode == "RGB"


def test_chestx_pre_resize_gives_the_release_loaders_pixels(tmp_path: Path) -> None:
    """The ChestX loader opens an image at its stored size; `pre_resize=256` (vtt-release on ChestX) then gives what
    the VtT loader gives, `Image.open(p).resize((256, 256)).convert("RGB")`, before the resize to the model's size."""
    root = make_chestx(tmp_path / "chestx", per_class=2)
    key = "images/00000003_000.png"  # rows are numbered class-major from 1, two per class: a Cardiomegaly image
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (37, 61), dtype=np.uint8), mode="L").save(root / key)  # non-square grey
    index = load_quietly("chestx", root)
    image = index.open(index.items.index(key))
    assert image.mode == "RGB" and image.size == (61, 37)
    with Image.open(root / key) as opened:
        assert opened.mode == "L" and opened.size == (61, 37)
        released = opened.resize((256, 256)).convert("RGB")
        bilinear = np.asarray(opened.convert("RGB").resize((256, 256), Image.Resampling.BILINEAR))
    assert not np.array_equal(np.asarray(released), bilinear)  # the filter matters: Pillow's default here is bicubic
    expected = np.asarray(released.resize((64, 64), Image.Resampling.BILINEAR))
    assert np.array_equal(resize_square(image, 64, pre_resize=256), expected)
    # The loader pickles (data-loader workers) and opens the same image after a round trip.
    assert np.array_equal(np.asarray(pickle.loads(pickle.dumps(index.loader))(key)), np.asarray(image))
    # Other datasets keep their stored size too.
    other = load_quietly("imagefolder", make_imagefolder(tmp_path / "folder", classes=("a", "b"), per_class=1))
    assert other.open(0).size == (12, 12)
    assert pickle.loads(pickle.dumps(other.loader))(other.items[0]).size == (12, 12)


def test_chestx_searches_both_folder_layouts(tmp_path: Path) -> None:
    root = make_chestx(tmp_path, per_class=2, spread=True)
    moved = root / "images_003" / "images"
    (root / "images").mkdir()
    for file in sorted(moved.iterdir()):
        file.rename(root / "images" / file.name)
    index = load_quietly("chestx", root)
    assert index.counts() == [2] * 7
    assert any(key.startswith("images/") for key in index.items)


def test_imagefolder_recursive_and_classnames(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path, classes=("b_dog", "a_cat"), per_class=2, classnames={"a_cat": "tabby cat"})
    deep = root / "b_dog" / "extra" / "deeper"
    deep.mkdir(parents=True)
    Image.new("RGB", (5, 5), (1, 2, 3)).save(deep / "late.webp")
    Image.new("RGB", (5, 5)).save(root / "stray.png")  # directly in the root: not in any class
    (root / "b_dog" / "notes.txt").write_text("not an image")
    (root / "b_dog" / ".DS_Store").write_bytes(b"\0\0junk")
    (root / "b_dog" / "._img_000.png").write_bytes(b"\0\5\26\7 AppleDouble")
    (root / ".ipynb_checkpoints").mkdir()
    index = load_quietly("imagefolder", root)
    assert index.class_keys == ("a_cat", "b_dog")
    assert index.class_names == ("tabby cat", "b dog")  # no classnames.json entry: underscores as spaces
    assert index.counts() == [2, 3]
    assert "b_dog/extra/deeper/late.webp" in index.items
    assert_well_formed(index)


def test_imagefolder_classnames_with_unknown_folder(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path, classes=("x", "y"), per_class=1, classnames={"x": "ex", "z": "zed"})
    with pytest.raises(DatasetError, match=r"classnames.json.*\bz\b.*class folders: x, y"):
        load_index("imagefolder", root)


def test_imagefolder_malformed_classnames(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path, classes=("x", "y"), per_class=1)
    (root / "classnames.json").write_text('["x", "y"]')
    with pytest.raises(DatasetError, match="JSON object"):
        load_index("imagefolder", root)
    (root / "classnames.json").write_text("{not json")
    with pytest.raises(DatasetError, match="cannot read"):
        load_index("imagefolder", root)


def test_digits_from_sklearn(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    index = load_quietly("digits", None)
    assert load_quietly("digits", tmp_path / "ignored").fingerprint() == index.fingerprint()
    assert index.class_keys == tuple("0123456789")
    assert index.class_names[0] == "zero" and index.class_names[9] == "nine" and index.num_classes == 10
    assert len(index.items) == 1797 and index.root is None
    assert index.items[:1] == ("digits/00000",)  # first item of label 0 is sklearn's first image, a zero
    digits = load_digits()
    for position in (0, 500, 1796):
        key, label = index.items[position], index.labels[position]
        number = int(key.split("/")[1])
        assert key == f"digits/{number:05d}" and digits.target[number] == label
        image = index.open(position)
        assert image.mode == "RGB" and image.size == (8, 8)
        expected = np.rint(digits.images[number] * 255 / 16).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(image)[:, :, 0], expected)
        np.testing.assert_array_equal(np.asarray(image)[:, :, 2], expected)
    pairs = list(zip(index.labels, index.items, strict=True))
    assert pairs == sorted(pairs)


# bad inputs --------------------------------------------------------------------------------------


def test_unknown_dataset() -> None:
    with pytest.raises(DatasetError, match=r"unknown dataset 'mnist'.*eurosat"):
        load_index("mnist", None)


@pytest.mark.parametrize("dataset", ["eurosat", "cropdiseases", "isic2018", "chestx", "imagefolder"])
def test_missing_root(tmp_path: Path, dataset: str) -> None:
    with pytest.raises(DatasetError, match=r"data root not found.*nowhere"):
        load_index(dataset, tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="data root is needed"):
        load_index(dataset, None)


def test_missing_csvs_and_image_folders(tmp_path: Path) -> None:
    isic = make_isic2018(tmp_path / "isic", per_class=1)
    (isic / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv").unlink()
    with pytest.raises(DatasetError, match=r"CSV not found.*ISIC2018_Task3_Training_GroundTruth\.csv"):
        load_index("isic2018", isic)
    isic = make_isic2018(tmp_path / "isic2", per_class=1)
    (isic / "ISIC2018_Task3_Training_Input").rename(isic / "input")
    with pytest.raises(DatasetError, match=r"image folder not found.*ISIC2018_Task3_Training_Input"):
        load_index("isic2018", isic)
    chestx = make_chestx(tmp_path / "chestx", per_class=1)
    (chestx / "Data_Entry_2017.csv").unlink()
    with pytest.raises(DatasetError, match=r"CSV not found.*Data_Entry_2017\.csv"):
        load_index("chestx", chestx)
    chestx = make_chestx(tmp_path / "chestx2", per_class=1)
    (chestx / "images").rename(chestx / "pngs")
    with pytest.raises(DatasetError, match=r"no image folder.*images_001"):
        load_index("chestx", chestx)


def test_isic2018_wrong_columns(tmp_path: Path) -> None:
    root = make_isic2018(tmp_path, per_class=1)
    csv_path = root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(["image,MEL,NV,BCC,AKIEC,BKL,DF,SCC", *lines[1:]]) + "\n")
    with pytest.raises(DatasetError) as error:
        load_index("isic2018", root)
    message = str(error.value)
    assert "expected image, MEL, NV, BCC, AKIEC, BKL, DF, VASC" in message
    assert "found image, MEL, NV, BCC, AKIEC, BKL, DF, SCC" in message
    assert "missing: VASC" in message and "unknown: SCC" in message


def test_chestx_wrong_columns(tmp_path: Path) -> None:
    root = make_chestx(tmp_path, per_class=1)
    csv_path = root / "Data_Entry_2017.csv"
    csv_path.write_text(csv_path.read_text().replace("Finding Labels", "Labels", 1))
    with pytest.raises(DatasetError, match=r"lacks column\(s\) Finding Labels.*found Image Index, Labels"):
        load_index("chestx", root)


@pytest.mark.parametrize("dataset", ["eurosat", "cropdiseases", "imagefolder"])
def test_zero_images(tmp_path: Path, dataset: str) -> None:
    for folder in ("AnnualCrop", "Forest") if dataset == "eurosat" else ("a___b", "c___d"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="zero images"):
        load_index(dataset, tmp_path)


def test_zero_images_from_csv(tmp_path: Path) -> None:
    root = make_chestx(tmp_path, per_class=1)
    for file in (root / "images").iterdir():
        file.unlink()
    with pytest.warns(DatasetWarning, match="missing"), pytest.raises(DatasetError, match="zero images"):
        load_index("chestx", root)


def test_images_in_only_one_class(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path, classes=("a", "b"), per_class=2)
    for file in (root / "b").iterdir():
        file.unlink()
    with pytest.raises(DatasetError, match=r"at least 2 classes.*only in a\b"):
        load_index("imagefolder", root)


def test_chestx_unsafe_names_skipped_with_warning(tmp_path: Path) -> None:
    outside = tmp_path / "x.png"
    Image.new("L", (4, 4)).save(outside)  # exists, so only the path check can reject it
    root = make_chestx(tmp_path / "data", per_class=2, extra_rows=[("../x.png", "Mass"), (str(outside), "Mass")])
    Image.new("L", (4, 4)).save(root / "x.png")  # `images/../x.png` would be inside the root, outside images/
    with pytest.warns(DatasetWarning) as record:
        index = load_index("chestx", root)
    assert len(record) == 1
    message = str(record[0].message)
    assert "'../x.png'" in message and repr(str(outside)) in message and "resolve inside" in message
    assert index.counts() == [2] * 7
    assert set(index.skipped) == {"../x.png", str(outside)}


def test_isic2018_unsafe_names_skipped_with_warning(tmp_path: Path) -> None:
    outside = tmp_path / "evil"
    Image.new("RGB", (4, 4)).save(outside.with_suffix(".jpg"))
    root = make_isic2018(
        tmp_path / "data",
        per_class=2,
        extra_rows=["../../evil,1.0,0.0,0.0,0.0,0.0,0.0,0.0", f"{outside},1.0,0.0,0.0,0.0,0.0,0.0,0.0"],
    )
    with pytest.warns(DatasetWarning, match=r"2 CSV entr\(ies\).*'\.\./\.\./evil\.jpg'") as record:
        index = load_index("isic2018", root)
    assert str(outside) + ".jpg" in str(record[0].message)
    assert index.counts() == [2] * 7


def test_symlink_escaping_image_folder_is_skipped(tmp_path: Path) -> None:
    outside = tmp_path / "secret.png"
    Image.new("L", (4, 4)).save(outside)
    root = make_chestx(tmp_path / "data", per_class=2, extra_rows=[("link.png", "Mass")])
    os.symlink(outside, root / "images" / "link.png")
    with pytest.warns(DatasetWarning, match="'link.png'"):
        index = load_index("chestx", root)
    assert "images/link.png" not in index.items


@pytest.mark.parametrize(
    ("dataset", "make"),
    [
        ("eurosat", lambda p: make_eurosat(p, per_class=3)),
        ("isic2018", lambda p: make_isic2018(p, per_class=3)),
        ("chestx", lambda p: make_chestx(p, per_class=3)),
    ],
)
def test_unreadable_image_skipped_without_shifting_labels(
    tmp_path: Path, dataset: str, make: Callable[[Path], Path]
) -> None:
    root = make(tmp_path)
    before = load_quietly(dataset, root)
    broken = before.items[4]
    (root / broken).write_bytes(b"this is not an image at all" * 10)
    with pytest.warns(DatasetWarning, match=rf"1 unreadable image file\(s\): '{broken}'") as record:
        after = load_index(dataset, root)
    assert len(record) == 1
    assert after.skipped == (broken,)
    expected = [(k, lab) for k, lab in zip(before.items, before.labels, strict=True) if k != broken]
    assert list(zip(after.items, after.labels, strict=True)) == expected
    assert after.class_keys == before.class_keys


def test_many_unreadable_images_warn_once(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path, classes=("a", "b"), per_class=9)
    for n in range(8):
        (root / "a" / f"img_{n:03d}.png").write_bytes(b"")
    with pytest.warns(DatasetWarning, match=r"8 unreadable.*'a/img_000.png'.*and 3 more") as record:
        index = load_index("imagefolder", root)
    assert len(record) == 1 and index.counts() == [1, 9]


# order -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "make"),
    [
        ("eurosat", lambda p, r: make_eurosat(p, per_class=3, nested=True, reverse_order=r)),
        ("cropdiseases", lambda p, r: make_cropdiseases(p, per_class=3, reverse_order=r)),
        ("isic2018", lambda p, r: make_isic2018(p, per_class=3, reverse_order=r)),
        ("chestx", lambda p, r: make_chestx(p, per_class=3, spread=True, reverse_order=r)),
        ("imagefolder", lambda p, r: make_imagefolder(p, per_class=3, reverse_order=r)),
    ],
)
def test_listing_order_does_not_matter(tmp_path: Path, dataset: str, make: Callable[[Path, bool], Path]) -> None:
    first = load_quietly(dataset, make(tmp_path / "forward", False))
    again = load_quietly(dataset, tmp_path / "forward")
    reverse = load_quietly(dataset, make(tmp_path / "reverse", True))
    assert first.fingerprint() == again.fingerprint() == reverse.fingerprint()
    assert first.items == reverse.items and first.labels == reverse.labels
    assert np.array_equal(np.asarray(first.open(5)), np.asarray(reverse.open(5)))
