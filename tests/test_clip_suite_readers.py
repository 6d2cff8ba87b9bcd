"""The CLIP few-shot suite's readers, benchmarks, templates and listing, on tiny generated trees (`suite_trees`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cdfsl.cli import app
from cdfsl.config import RunConfig, run_id_of
from cdfsl.data.benchmarks import DATASETS
from cdfsl.data.clip_suite import COOP_TEMPLATES, SUITE_ORDER
from cdfsl.data.readers import READERS, SPLIT_LAYOUTS
from cdfsl.errors import ConfigError, DatasetError, DatasetWarning
from suite_trees import make_fgvc_tree, make_imagenet_tree, make_split_tree

COUNTS = {"train": 3, "val": 1, "test": 4}


def one_line_error(dataset: str, root: Path, *fragments: str) -> str:
    """The `DatasetError` reading `dataset` under `root` raises, checked to be one line holding every fragment."""
    with pytest.raises(DatasetError) as caught:
        DATASETS[dataset].read_splits(root)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


# -------------------------------------------------------------------------------------------------- registration


def test_the_eleven_are_registered_with_their_reader_template_and_test_split() -> None:
    suite = [name for name, benchmark in DATASETS.items() if benchmark.suite == "clip-fewshot"]
    assert suite == list(SUITE_ORDER) == [
        "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft", "sun397", "dtd",
        "ucf101", "imagenet", "eurosat_coop",
    ]  # fmt: skip
    for name in suite:
        benchmark = DATASETS[name]
        assert benchmark.needs_root and benchmark.episodic_split == "test"
        assert (benchmark.ways, benchmark.queries, benchmark.episodes_for(1), benchmark.episodes_for(5)) == (
            5,
            15,
            800,
            400,
        )
        assert benchmark.template == "a photo of a {}."
        assert benchmark.coop_template == COOP_TEMPLATES[name]
    assert DATASETS["dtd"].coop_template == "{} texture."
    assert DATASETS["eurosat_coop"].coop_template == "a centered satellite photo of {}."
    assert [DATASETS[n].suite for n in ("eurosat", "isic2018", "cropdiseases", "chestx")] == ["cdfsl"] * 4
    assert all(READERS[b.reader].layout for b in DATASETS.values())  # every reader says what it needs on disk


# -------------------------------------------------------------------------------------------------- split files


def test_a_split_file_tree_gives_classes_names_and_splits(tmp_path: Path) -> None:
    # the second class has a single training image: fewer than K shots is read fine
    classes = ["banded", "honey_combed", "zigzagged"]
    root = make_split_tree(tmp_path / "dtd", classes, {"train": [3, 1, 3], "val": 1, "test": 4})
    index = DATASETS["dtd"].read_splits(root)
    assert index.class_keys == tuple(classes)
    assert index.class_names == ("banded", "honey combed", "zigzagged")  # underscores as spaces, as CoOp does
    assert index.root == root.resolve()
    per_split = {
        split: [sum(1 for item, s in zip(index.labels, index.splits, strict=True) if s == split and item == c)
                for c in range(3)]
        for split in ("train", "val", "test")
    }  # fmt: skip
    assert per_split == {"train": [3, 1, 3], "val": [1, 1, 1], "test": [4, 4, 4]}
    assert index.items[0] == "images/banded/banded_test_000.png"
    assert all(
        item.split("/")[-1].split("_")[-2] == split for item, split in zip(index.items, index.splits, strict=True)
    )


def test_episodes_read_the_test_split_and_read_splits_the_whole(tmp_path: Path) -> None:
    root = make_split_tree(tmp_path / "dtd", ["a", "b"], COUNTS)
    whole, episodic = DATASETS["dtd"].read_splits(root), DATASETS["dtd"].read(root)
    assert episodic == whole.split("test")
    assert set(episodic.splits) == {"test"} and len(episodic.items) == 8 and len(whole.items) == 16
    assert episodic.fingerprint() != whole.fingerprint()


@pytest.mark.parametrize(
    ("dataset", "classes", "names"),
    [
        ("oxford_pets", ["abyssinian", "american_bulldog"], ("abyssinian", "american bulldog")),
        ("stanford_cars", [("cars_train", "2000 AM General Hummer SUV"), ("cars_test", "2012 Acura RL Sedan")], None),
        ("oxford_flowers", ["pink primrose", "hard-leaved pocket orchid"], None),
        ("food101", ["apple_pie", "baby_back_ribs"], ("apple pie", "baby back ribs")),
        # SUN397's nested folders, the name the split file gives (indoor/outdoor first)
        ("sun397", [("a/abbey", "abbey"), ("b/bakery/shop", "shop bakery")], ("abbey", "shop bakery")),
        ("ucf101", [("Apply_Eye_Makeup", "Apply_Eye_Makeup"), ("Archery", "Archery")], ("Apply Eye Makeup", "Archery")),
        # CoOp's descriptive EuroSAT names, even where a split file gives the folder's
        (
            "eurosat_coop",
            [("AnnualCrop", "Annual Crop Land"), ("SeaLake", "SeaLake")],
            ("Annual Crop Land", "Sea or Lake"),
        ),
    ],
)
def test_each_split_file_layout_reads_its_image_folder(
    dataset: str, classes: list, names: tuple[str, ...] | None, tmp_path: Path
) -> None:
    layout = SPLIT_LAYOUTS[dataset]
    root = make_split_tree(tmp_path / dataset, classes, COUNTS, dataset=dataset)
    index = DATASETS[dataset].read_splits(root)
    prefix = "" if layout.image_folder == "." else layout.image_folder + "/"
    folders = [c if isinstance(c, str) else c[0] for c in classes]
    assert [index.items[index.labels.index(c)].rsplit("/", 1)[0] for c in range(2)] == [prefix + f for f in folders]
    assert index.class_names == (names or tuple(c if isinstance(c, str) else c[1] for c in classes))
    assert index.counts() == [8, 8] and set(index.splits) == {"train", "val", "test"}


def test_a_caltech_tree_with_its_excluded_classes_present_drops_them(tmp_path: Path) -> None:
    classes = [("airplanes", "airplane"), ("Faces", "face"), ("Leopards", "Leopards"), "ant"]
    listed_anyway = {"train": [["BACKGROUND_Google/image_0000.png", 7, "BACKGROUND_Google"]]}
    root = make_split_tree(
        tmp_path / "caltech-101", classes, COUNTS, dataset="caltech101",
        extra_folders={"BACKGROUND_Google": 3, "Faces_easy": 2}, raw_entries=listed_anyway,
    )  # fmt: skip
    index = DATASETS["caltech101"].read_splits(root)
    assert index.class_keys == ("airplane", "face", "Leopards", "ant")
    assert index.class_names == ("airplane", "face", "leopard", "ant")  # CoOp's renaming, where the file has the folder
    assert not any(item.split("/")[1] in ("BACKGROUND_Google", "Faces_easy") for item in index.items)
    assert len(index.items) == 4 * 8


@pytest.mark.parametrize("folder", ["dtd", "DTD"])
def test_a_root_one_level_up_finds_coop_and_clip_lora_folder_names(folder: str, tmp_path: Path) -> None:
    make_split_tree(tmp_path / folder, ["a", "b"], COUNTS)
    index = DATASETS["dtd"].read_splits(tmp_path)
    assert index.root == (tmp_path / folder).resolve() and len(index.items) == 16


def test_a_digits_split_tree_has_disjoint_pictures_per_split(tmp_path: Path) -> None:
    root = make_split_tree(tmp_path / "dtd", ["zero", "one"], {"train": 2, "test": 3}, images_from="digits")
    index = DATASETS["dtd"].read_splits(root)
    digests = {index.item_digest(i) for i in range(len(index.items))}
    assert len(digests) == 10 and set(index.splits) == {"train", "test"}


# -------------------------------------------------------------------------------------------------- split file errors


def test_a_corrupt_split_file_is_one_line(tmp_path: Path) -> None:
    root = make_split_tree(tmp_path / "dtd", ["a", "b"], COUNTS)
    split_file = root / SPLIT_LAYOUTS["dtd"].split_file
    split_file.write_text('{"train": [["a/x.png", 0, "a"]')
    one_line_error("dtd", root, "cannot read", str(split_file), "expected a JSON object")
    split_file.write_text('{"train": [], "test": []}')
    one_line_error("dtd", root, "has no val list")
    split_file.write_text('{"train": [["a/x.png", "0", "a"]], "val": [], "test": []}')
    one_line_error("dtd", root, "entry 0 of 'train'", "[relative path, integer label >= 0, class name]")


def test_a_missing_image_listed_in_a_split_is_one_line(tmp_path: Path) -> None:
    root = make_split_tree(tmp_path / "dtd", ["a", "b"], COUNTS, raw_entries={"test": [["b/gone.png", 1, "b"]]})
    one_line_error("dtd", root, "lists 1 image(s) that are missing", "images/b/gone.png", str(root / "images"))


def test_a_label_name_disagreement_is_one_line(tmp_path: Path) -> None:
    root = make_split_tree(tmp_path / "one", ["a", "b"], COUNTS, raw_entries={"val": [["a/a_train_000.png", 0, "b"]]})
    one_line_error("dtd", root, "gives label 0 two class names, 'a' and 'b'")
    root = make_split_tree(tmp_path / "two", ["a", "b"], COUNTS, raw_entries={"val": [["b/b_train_000.png", 2, "a"]]})
    one_line_error("dtd", root, "gives class 'a' two labels")


def test_what_else_the_split_file_and_disk_disagree_on_is_one_line(tmp_path: Path) -> None:
    twice = make_split_tree(
        tmp_path / "twice", ["a", "b"], COUNTS, raw_entries={"test": [["a/a_train_000.png", 0, "a"]]}
    )
    one_line_error("dtd", twice, "lists 1 image(s) more than once", "images/a/a_train_000.png")
    climbing = make_split_tree(tmp_path / "climb", ["a", "b"], COUNTS, raw_entries={"test": [["../x.png", 0, "a"]]})
    one_line_error("dtd", climbing, "unsafe or lead outside the image folder")
    one_line_error("dtd", tmp_path / "twice" / "images", "split file not found", "split_zhou_DescribableTextures.json")
    no_images = make_split_tree(tmp_path / "no-images", ["a", "b"], COUNTS)
    shutil.rmtree(no_images / "images")
    one_line_error("dtd", no_images, "image folder not found", str(no_images / "images"))


# -------------------------------------------------------------------------------------------------- FGVC, ImageNet


def test_fgvc_aircraft_reads_variants_and_its_three_lists(tmp_path: Path) -> None:
    variants = ["707-320", "A300B4", "Cessna 172"]
    root = make_fgvc_tree(tmp_path / "fgvc_aircraft", variants, {"train": [2, 1, 2], "val": 1, "test": 2})
    index = DATASETS["fgvc_aircraft"].read_splits(tmp_path)  # one level up: fgvc_aircraft/
    assert index.class_keys == tuple(variants) == index.class_names
    assert index.counts() == [5, 4, 5] and index.split("train").counts() == [2, 1, 2]
    assert all(item.startswith("images/") and item.endswith(".jpg") for item in index.items)
    assert len(DATASETS["fgvc_aircraft"].read(root).items) == 6
    with (root / "images_variant_test.txt").open("a") as handle:
        handle.write("9999999 A300B4\n")
    one_line_error("fgvc_aircraft", root, "1 image(s) that are missing", "images/9999999.jpg")
    with (root / "images_variant_test.txt").open("a") as handle:
        handle.write("1000001 Boeing 999\n")
    one_line_error("fgvc_aircraft", root, "variant 'Boeing 999' is not in variants.txt")
    (root / "variants.txt").unlink()
    one_line_error("fgvc_aircraft", root, "variants.txt not found")


@pytest.mark.parametrize("coop_layout", [True, False])
def test_imagenet_reads_class_folders_with_classnames_txt(coop_layout: bool, tmp_path: Path) -> None:
    names = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great_white shark"}
    root = make_imagenet_tree(tmp_path / "imagenet", names, {"train": [2, 3, 2], "test": 2}, coop_layout=coop_layout)
    index = DATASETS["imagenet"].read_splits(root)
    assert index.class_keys == tuple(names)
    assert index.class_names == ("tench", "goldfish", "great white shark")
    assert index.split("train").counts() == [2, 3, 2] and index.split("test").counts() == [2, 2, 2]
    assert set(index.splits) == {"train", "test"}  # val is the test split
    base = "images/" if coop_layout else ""
    assert index.split("test").items[0] == f"{base}val/n01440764/n01440764_00000.JPEG"


def test_imagenet_without_names_is_one_line(tmp_path: Path) -> None:
    names = {"n01": "tench", "n02": "goldfish"}
    root = make_imagenet_tree(tmp_path / "imagenet", names, {"train": 1, "test": 1}, write_classnames=False)
    one_line_error("imagenet", root, "class names not found", "classnames.txt")
    (root / "classnames.txt").write_text("n01 tench\n")
    one_line_error("imagenet", root, "has no line for 1 class folder(s): n02")
    (root / "classnames.txt").write_text("n01 tench\nn02\n")
    one_line_error("imagenet", root, "line 2: expected '<wnid> <class name>'")


def test_unreadable_images_are_left_out_with_a_warning_as_by_every_reader(tmp_path: Path) -> None:
    root = make_split_tree(tmp_path / "dtd", ["a", "b"], COUNTS)
    (root / "images/a/a_test_000.png").write_bytes(b"not a png")
    with pytest.warns(DatasetWarning, match="unreadable"):
        index = DATASETS["dtd"].read_splits(root)
    assert "images/a/a_test_000.png" in index.skipped and len(index.items) == 15


# -------------------------------------------------------------------------------------------------- templates


def identity(**changes: object) -> str:
    config = RunConfig(dataset="dtd", data_root=".", method="zeroshot", backbone="tiny", pretrained="none")
    for key, value in changes.items():
        setattr(config.train, key, value)
    return run_id_of(config.resolve().identity("fp32", "index", "gelu", "cpu", "images"))


def test_the_coop_template_resolves_and_enters_the_run_identity() -> None:
    config = RunConfig(dataset="dtd", data_root=".", method="lora")
    config.train.template = "coop"
    assert config.resolve().config.train.template == "{} texture."
    assert identity(template="coop") == identity(template="{} texture.")  # the resolved string is the identity
    assert identity(template="coop") != identity()  # two runs differing only by template
    assert identity() == identity(template="a photo of a {}.")


def test_the_coop_template_on_a_dataset_without_one_is_refused() -> None:
    config = RunConfig(dataset="digits", method="zeroshot")
    config.train.template = "coop"
    with pytest.raises(ConfigError, match="dataset 'digits' has no CoOp template"):
        config.validate()


# -------------------------------------------------------------------------------------------------- cdfsl datasets


@pytest.mark.parametrize("args", [["datasets"], ["datasets", "list"]])
def test_datasets_lists_every_benchmark(args: list[str]) -> None:
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    for name in DATASETS:
        assert f"│ {name} " in result.stdout
    assert "split_zhou_DescribableTextures.json" in result.stdout and "{} texture." in result.stdout


@pytest.mark.parametrize(
    "args", [["datasets", "list", "--json"], ["datasets", "list", "--format", "json"], ["datasets", "--json"]]
)
def test_datasets_list_as_json(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    listed = {entry["name"]: entry for entry in json.loads(result.stdout)}
    assert list(listed) == list(DATASETS)
    assert listed["dtd"]["suite"] == "clip-fewshot" and listed["dtd"]["reader"] == "split_zhou_dtd"
    assert listed["dtd"]["layout"] == READERS["split_zhou_dtd"].layout
    assert "images/train/<wnid>/" in listed["imagenet"]["layout"]
    assert (listed["dtd"]["episodic_split"], listed["dtd"]["coop_template"]) == ("test", "{} texture.")
    assert (listed["eurosat"]["episodic_split"], listed["eurosat"]["coop_template"]) == (None, None)
    assert listed["digits"]["needs_root"] is False
    bad = CliRunner().invoke(app, ["datasets", "list", "--format", "yaml"])
    assert bad.exit_code == 2 and "--format must be table or json" in bad.output
