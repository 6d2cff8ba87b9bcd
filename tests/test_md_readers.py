"""Meta-Dataset's ten readers on tiny trees in their download layouts: the right classes (the published test
classes by default, any split on request), the crops (MSCOCO's scaled and clipped boxes, FGVC-Aircraft's boxes above
the banner), QuickDraw's rows as 28×28 images, Omniglot's alphabets, ILSVRC's WordNet hierarchy, and one line naming
what is missing."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cdfsl.data.benchmarks import DATASETS, load_index
from cdfsl.data.md_hierarchy import Alphabets, ClassHierarchy, md_structure
from cdfsl.data.meta_dataset import MD_CLASS_SPLITS, MD_SOURCES, META_DATASET, md_benchmarks, read_md_split
from cdfsl.data.protocols import PROTOCOLS, register_protocol
from cdfsl.data.readers import READERS
from cdfsl.data.readers.meta_dataset import READ_CLASSES
from cdfsl.data.readers.meta_dataset.items import clip_box
from cdfsl.data.readers.meta_dataset.mscoco import scaled_box
from cdfsl.errors import DatasetError
from md_trees import AIRCRAFT_SIZE, make_aircraft, make_ilsvrc, make_md_tree, make_mscoco, make_quickdraw

PUBLISHED_COUNTS = {  # (train, valid, test) classes of each source in Meta-Dataset's published splits
    "ilsvrc_2012": (712, 158, 130),
    "omniglot": (883, 81, 659),
    "aircraft": (70, 15, 15),
    "cu_birds": (140, 30, 30),
    "dtd": (33, 7, 7),
    "quickdraw": (241, 52, 52),
    "fungi": (994, 200, 200),
    "vgg_flower": (71, 15, 16),
    "traffic_sign": (0, 0, 43),
    "mscoco": (0, 40, 40),
}


def test_the_published_splits_have_their_sizes_and_do_not_overlap() -> None:
    for source, counts in PUBLISHED_COUNTS.items():
        splits = MD_CLASS_SPLITS[source]
        assert tuple(len(splits[s]) for s in ("train", "valid", "test")) == counts, source
        assert len({key for s in splits.values() for key in s}) == sum(counts), source
    omniglot = MD_CLASS_SPLITS["omniglot"]
    assert len({key.split("/")[0] for key in omniglot["test"]}) == 20  # Lake's evaluation alphabets
    assert {key.split("/")[0] for key in omniglot["valid"]} == {
        "Blackfoot_(Canadian_Aboriginal_Syllabics)",
        "Ojibwe_(Canadian_Aboriginal_Syllabics)",
        "Inuktitut_(Canadian_Aboriginal_Syllabics)",
        "Tagalog",
        "Alphabet_of_the_Magi",
    }
    assert "n03126707" in MD_CLASS_SPLITS["ilsvrc_2012"]["test"]  # crane (the machine) is a device
    assert "n02084071" not in MD_CLASS_SPLITS["ilsvrc_2012"]["valid"]  # 'dog' is an inner node, not a class


FINGERPRINTS = {  # recorded on the trees of `make_md_tree(source, root, per_class=2)` (Omniglot: 1 per class)
    "ilsvrc_2012": "275b2789e0197766",
    "omniglot": "2f1d9abfe3357e44",
    "aircraft": "bd9e674fe9f47dd5",
    "cu_birds": "86055e125e8abb70",
    "dtd": "ddb094d17c831434",
    "quickdraw": "c328a0b51cc8692f",
    "fungi": "e5fb516da0a5d393",
    "vgg_flower": "30e61844d5312b5c",
    "traffic_sign": "f74733bb80076e96",
    "mscoco": "e369ed944c6e0cfd",
}
PUBLISHED_TEST_GRAPH = Path(__file__).parent / "fixtures" / "md_ilsvrc_test_graph.json"
"""The is-a edges of the TEST subgraph of Meta-Dataset's `ilsvrc_2012_dataset_spec.json` (180 nodes, 130 leaves)."""


@pytest.mark.parametrize("source", MD_SOURCES)
def test_each_source_reads_its_published_test_classes(source: str, tmp_path: Path) -> None:
    root = make_md_tree(source, tmp_path / source, per_class=1 if source == "omniglot" else 2)
    index = load_index(f"md-{source}", root)
    test = MD_CLASS_SPLITS[source]["test"]
    assert index.name == f"md-{source}"
    assert index.class_keys == tuple(sorted(test))
    assert index.counts() == [1 if source == "omniglot" else 2] * len(test)
    assert index.splits == () and index.skipped == ()
    assert index.open(len(index.items) - 1).mode == "RGB"
    assert index.fingerprint() == FINGERPRINTS[source]  # it enters every run id: it must never move silently
    benchmark = DATASETS[f"md-{source}"]
    assert md_benchmarks()[f"md-{source}"] is benchmark
    assert (benchmark.protocol, benchmark.suite, benchmark.episodes_for(1), benchmark.episodes_for(5)) == (
        "meta-dataset",
        "meta-dataset",
        600,
        600,
    )
    assert READERS[benchmark.reader].layout


def test_class_names_and_keys_follow_meta_dataset(tmp_path: Path) -> None:
    names = {}
    for source in ("cu_birds", "fungi", "vgg_flower", "traffic_sign", "omniglot"):
        keys = MD_CLASS_SPLITS[source]["test"][:2]
        index = READ_CLASSES[source](make_md_tree(source, tmp_path / source, keys), keys)
        names[source] = dict(zip(index.class_keys, index.class_names, strict=True))
    assert all(key[4] == "." and name == key[5:] for key, name in names["fungi"].items())  # "%04d.<name>"
    assert all(key[3] == "." and name == key[4:] for key, name in names["vgg_flower"].items())
    assert all(key[2] == "." and name == key[3:] for key, name in names["traffic_sign"].items())
    assert all("_" not in name and name in key.replace("_", " ") for key, name in names["cu_birds"].items())
    assert sorted(names["omniglot"].values()) == ["Angelic character 1", "Angelic character 2"]


def test_a_split_other_than_test_is_read_on_request(tmp_path: Path) -> None:
    dtd = MD_CLASS_SPLITS["dtd"]
    root = make_md_tree("dtd", tmp_path / "dtd", [*dtd["train"], *dtd["valid"], *dtd["test"]], per_class=2)
    for split in ("train", "valid", "test"):
        index = read_md_split("md-dtd", root, split)
        assert index.class_keys == tuple(sorted(dtd[split])) and index.splits == ()
    assert read_md_split("dtd", root).fingerprint() == load_index("md-dtd", root).fingerprint()
    with pytest.raises(DatasetError, match="md-traffic_sign: Meta-Dataset gives it no train classes; it has test"):
        read_md_split("traffic_sign", root, "train")
    with pytest.raises(DatasetError, match="unknown class split 'val'"):
        read_md_split("dtd", root, "val")


def test_a_coco_box_is_scaled_about_its_centre_and_clipped_at_the_image_edge(tmp_path: Path) -> None:
    # (x, y, w, h) = (12, 1, 4, 3) scaled 1.2x: x 11.6, w 4.8 -> columns round(11.1)=11 .. round(15.9)+1=17;
    # y 0.7, h 3.6 -> rows round(0.2)=0 .. round(3.8)+1=5. The image is 16 wide: the crop stops at column 16.
    assert scaled_box([12, 1, 4, 3]) == (11, 0, 17, 5)
    assert clip_box((11, 0, 17, 5), (16, 12)) == (11, 0, 16, 5)
    # (3, 3, 10, 10): x 2, w 12 -> round(1.5)=2 and round(13.5)+1=15: Python's half-to-even, as the conversion's
    assert scaled_box([3, 3, 10, 10]) == (2, 2, 15, 15)
    keys = MD_CLASS_SPLITS["mscoco"]["test"][:12]
    root = make_md_tree("mscoco", tmp_path / "coco", keys)
    index = READ_CLASSES["mscoco"](root, keys)
    by_key = {key: index.open(i) for i, key in enumerate(index.items)}
    assert by_key["train2017/000000000001.jpg#1011"].size == (5, 5)  # the 12th box, at the right edge: clipped
    assert by_key["train2017/000000000001.jpg#1000"].size == (6, 5)  # (1, 1, 4, 3) -> (0, 0, 6, 5)
    assert len(index.items) == 12 and len({index.item_digest(i) for i in range(12)}) == 12  # one file, 12 crops


def test_an_aircraft_crop_is_its_box_and_never_reaches_the_banner(tmp_path: Path) -> None:
    keys = MD_CLASS_SPLITS["aircraft"]["test"][:2]
    height = AIRCRAFT_SIZE[1]
    root = tmp_path / "aircraft"
    make_aircraft(root, keys, 1, boxes={"1000000": (2, 1, 30, height), "1000100": (0, 0, 10, 5)})
    index = READ_CLASSES["aircraft"](root, keys)
    tall, small = index.open(0), index.open(1)
    assert tall.size == (28, height - 20 - 1)  # cut at the banner's top edge (the bottom 20 rows)
    assert small.size == (10, 5)
    bottom = np.asarray(tall)[-1].astype(int)
    assert (bottom < 200).any(axis=1).all()  # the colour of the plane, not the white banner
    before = index.fingerprint()
    (root / "data" / "images_box.txt").write_text("1000000 2 1 30 9\n1000100 0 0 10 5\n")
    moved = READ_CLASSES["aircraft"](root, keys)
    assert moved.fingerprint() != before and moved.item_digest(1) == index.item_digest(1)
    assert pickle.loads(pickle.dumps(moved)).open(0).size == (28, 8)


def test_quickdraw_rows_become_28x28_images_read_lazily(tmp_path: Path) -> None:
    keys = MD_CLASS_SPLITS["quickdraw"]["test"][:2]
    root = tmp_path / "quickdraw"
    root.mkdir()
    make_quickdraw(root, keys, 3)
    index = READ_CLASSES["quickdraw"](root, keys)
    index.fingerprint()  # as a run does when it starts
    assert index.items[:3] == tuple(f"{sorted(keys)[0]}.npy#{row:06d}" for row in range(3))
    image = pickle.loads(pickle.dumps(index)).open(4)  # class 1, row 1
    pixels = np.asarray(image)
    assert image.size == (28, 28) and image.mode == "RGB"
    assert pixels[0, 0].tolist() == [255, 255, 255] and (pixels.reshape(-1, 3)[1:] == 10 * 1 + 1).all()
    np.save(root / f"{sorted(keys)[1]}.npy", np.zeros((3, 784), dtype=np.uint8))
    with pytest.raises(DatasetError, match="changed since the run started"):
        index.open(4)
    assert index.open(0).size == (28, 28)  # the other class's file is unchanged


def test_omniglot_gives_its_alphabets(tmp_path: Path) -> None:
    keys = ["Angelic/character01", "Angelic/character02", "Tagalog/character01", "Korean/character03"]
    index = READ_CLASSES["omniglot"](make_md_tree("omniglot", tmp_path / "omniglot", keys, per_class=2), keys)
    structure = md_structure("md-omniglot", index, None)
    assert isinstance(structure, Alphabets)
    assert structure.labels_of == {"Angelic": (0, 1), "Korean": (2,), "Tagalog": (3,)}
    assert structure.names == ("Angelic", "Korean", "Tagalog") and structure.alphabet_of(2) == "Korean"
    assert index.items[0].startswith("images_evaluation/Angelic/")  # a test alphabet
    assert index.items[-1].startswith("images_background/Tagalog/")  # a validation alphabet
    assert md_structure("md-dtd", index, None) is None


def test_ilsvrc_hierarchy_is_the_collapsed_wordnet_graph_of_its_classes(tmp_path: Path) -> None:
    # entity -> device -> {tool, box}; tool -> {l1, l2, l3}; box -> case (one child: collapsed) -> {l4, l5};
    # device -> l6; entity -> other -> l7 (l7 is not a class: 'other' is dropped)
    links = [
        ("n00001740", "n03183080"), ("n03183080", "n04451818"), ("n03183080", "n02883344"),
        ("n04451818", "n00000001"), ("n04451818", "n00000002"), ("n04451818", "n00000003"),
        ("n02883344", "n02974003"), ("n02974003", "n00000004"), ("n02974003", "n00000005"),
        ("n03183080", "n00000006"), ("n00001740", "n09999999"), ("n09999999", "n00000007"),
        ("n02883344", "n00000008"),
    ]  # fmt: skip
    classes = ["n00000001", "n00000002", "n00000003", "n00000004", "n00000005", "n00000006"]
    root = tmp_path / "ilsvrc"
    make_ilsvrc(root, classes, 1, is_a=links)
    index = READ_CLASSES["ilsvrc_2012"](root, classes)
    hierarchy = md_structure("ilsvrc_2012", index, root)
    assert isinstance(hierarchy, ClassHierarchy)
    assert hierarchy.root == "n03183080"  # entity kept one child ('other' has no class): collapsed
    assert "n00001740" not in hierarchy.children
    assert hierarchy.children["n03183080"] == ("n00000006", "n02974003", "n04451818")  # box collapsed into case
    assert "n02883344" not in hierarchy.children and "n09999999" not in hierarchy.children
    assert hierarchy.leaves_under("n04451818") == (0, 1, 2)
    assert hierarchy.leaves_under("n02974003") == (3, 4)
    assert hierarchy.leaves_under("n03183080") == (0, 1, 2, 3, 4, 5)
    assert hierarchy.leaves_under("n00000006") == (5,)
    assert hierarchy.span_nodes(low=3, high=5) == ("n04451818",)
    assert hierarchy.words["n04451818"] == "thing n04451818, other words"


def test_ilsvrc_test_classes_hang_from_the_device_root_and_skip_duplicates(tmp_path: Path) -> None:
    test = MD_CLASS_SPLITS["ilsvrc_2012"]["test"]
    root = make_md_tree("ilsvrc_2012", tmp_path / "ilsvrc", per_class=1)
    index = load_index("md-ilsvrc_2012", root)
    hierarchy = md_structure("md-ilsvrc_2012", index, root)
    assert isinstance(hierarchy, ClassHierarchy)
    assert hierarchy.root == "n03183080" and hierarchy.leaves_under("n03183080") == tuple(range(len(test)))
    assert index.class_names[0] == "thing " + index.class_keys[0]  # the first of the words
    wnids = ["n01443537", "n01440764"]  # train classes: one holds a file Meta-Dataset lists as a duplicate
    split_root = tmp_path / "train_layout"
    make_ilsvrc(split_root / "train", wnids, 1)
    shutil.move(split_root / "train" / "wordnet.is_a.txt", split_root / "wordnet.is_a.txt")
    shutil.move(split_root / "train" / "words.txt", split_root / "words.txt")
    shutil.copy(split_root / "train/n01443537/n01443537_0.JPEG", split_root / "train/n01443537/n01443537_1194.JPEG")
    both = READ_CLASSES["ilsvrc_2012"](split_root, wnids)
    assert both.items == ("train/n01440764/n01440764_0.JPEG", "train/n01443537/n01443537_0.JPEG")


def test_ilsvrc_test_hierarchy_is_the_published_test_subgraph(tmp_path: Path) -> None:
    published = json.loads(PUBLISHED_TEST_GRAPH.read_text())
    edges = [tuple(edge) for edge in published["is_a"]]
    # WordNet above 'device', and a second parent of crane (n03126707) outside it: both are left out
    above = [("n00001740", "n00021939"), ("n00021939", "n03183080"), ("n00001740", "n09999999")]
    root = tmp_path / "ilsvrc"
    make_ilsvrc(root, MD_CLASS_SPLITS["ilsvrc_2012"]["test"], 1, is_a=[*above, ("n09999999", "n03126707"), *edges])
    index = load_index("md-ilsvrc_2012", root)
    hierarchy = md_structure("md-ilsvrc_2012", index, root)
    assert isinstance(hierarchy, ClassHierarchy) and hierarchy.root == "n03183080"
    children: dict[str, set[str]] = {}
    for parent, child in edges:
        children.setdefault(parent, set()).add(child)
        children.setdefault(child, set())
    assert {node: set(kids) for node, kids in hierarchy.children.items()} == children
    assert len(hierarchy.span_nodes()) == 15  # the published graph's nodes spanning 5..392 leaves
    assert {index.class_keys[label] for label in hierarchy.leaves_under("n03183080")} == set(index.class_keys)


MISSING = {  # source -> (path removed from a two-class tree, what the message names)
    "ilsvrc_2012": ("words.txt", "words.txt"),
    "omniglot": ("images_evaluation", "images_evaluation/"),
    "aircraft": ("data/images_box.txt", "data/images_box.txt"),
    "cu_birds": ("classes.txt", "classes.txt"),
    "dtd": ("images", "images/"),
    "quickdraw": ("{0}.npy", "missing from"),
    "fungi": ("val.json", "val.json"),
    "vgg_flower": ("imagelabels.mat", "imagelabels.mat"),
    "traffic_sign": ("Final_Training", "Final_Training/Images/"),
    "mscoco": ("annotations", "annotations/instances_train2017.json"),
}


@pytest.mark.parametrize("source", MD_SOURCES)
def test_a_missing_file_is_named_in_one_line(source: str, tmp_path: Path) -> None:
    keys = sorted(MD_CLASS_SPLITS[source]["test"])[:2]
    root = make_md_tree(source, tmp_path / source, keys)
    removed, named = MISSING[source]
    path = root / removed.format(keys[0])
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(DatasetError) as caught:
        READ_CLASSES[source](root, keys)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"md-{source}: ") and named in message


def test_a_class_of_the_split_missing_on_disk_is_named(tmp_path: Path) -> None:
    keys = sorted(MD_CLASS_SPLITS["cu_birds"]["test"])
    root = make_md_tree("cu_birds", tmp_path / "cub", keys)
    shutil.rmtree(root / "images" / keys[3])
    with pytest.raises(DatasetError, match=rf"1 of the split's 30 classes are missing from .*images: {keys[3]}$"):
        load_index("md-cu_birds", root)


def test_a_coco_tree_without_room_for_a_box_skips_that_annotation(tmp_path: Path) -> None:
    keys = MD_CLASS_SPLITS["mscoco"]["test"][:2]
    root = tmp_path / "coco"
    make_mscoco(root, keys, 1)
    document = (root / "annotations/instances_train2017.json").read_text()
    (root / "annotations/instances_train2017.json").write_text(document.replace("[2, 1, 4, 3]", "[40, 1, 4, 3]"))
    with pytest.warns(UserWarning, match="skipped 1 item"), pytest.raises(DatasetError, match="no image found for"):
        READ_CLASSES["mscoco"](root, keys)


@pytest.fixture
def placeholder_protocol() -> Iterator[None]:
    """`meta-dataset` as the fixed-way sampler, for this test only (the real sampler registers that name)."""
    saved = dict(PROTOCOLS)
    if META_DATASET not in PROTOCOLS:
        register_protocol(dataclasses.replace(PROTOCOLS["fixed-way"], name=META_DATASET))
    yield
    PROTOCOLS.clear()
    PROTOCOLS.update(saved)


@pytest.mark.slow  # a CLI run on the tiny model: seconds alone, far more on a shared machine
def test_a_run_on_cropped_items_trains_stores_and_resumes(tmp_path: Path, placeholder_protocol: None) -> None:
    from typer.testing import CliRunner

    from cdfsl.cli import app  # torch: only this test needs it

    root = make_md_tree("aircraft", tmp_path / "aircraft", per_class=3)
    out, db = tmp_path / "out.json", tmp_path / "runs.sqlite"
    args = [
        "run", "--dataset", "md-aircraft", "--data-root", str(root), "--method", "lora", "--backbone", "tiny",
        "--pretrained", "none", "--device", "cpu", "--episodes", "2", "--iterations", "2", "--ways", "5",
        "--shots", "1", "--queries", "2", "--json", str(out), "--db", str(db),
    ]  # fmt: skip
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    summary = json.loads(out.read_text())
    assert (summary["dataset"], summary["episodes"]) == ("md-aircraft", 2)
    assert "2 trained, 0 from" in first.stdout
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "0 trained, 2 from" in again.stdout
