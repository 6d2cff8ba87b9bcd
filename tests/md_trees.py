"""Tiny generated trees in the download layouts of Meta-Dataset's ten sources, for tests (not a test module).

`make_md_tree(source, root, classes)` writes the source's layout under `root` holding `classes` (default: the
source's published test classes) with `per_class` images each and returns the data root. Images are 8×8 (Aircraft
and MSCOCO images are larger, to have room for boxes) in a colour set by (class, image), written in sorted order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cdfsl.data.meta_dataset import MD_CLASS_SPLITS

SIDE = 8
AIRCRAFT_SIZE = (40, 30)  # width, height: the bottom 20 rows are the banner
COCO_SIZE = (16, 12)
COCO_IMAGE = "000000000001.jpg"


def colour(label: int, number: int) -> tuple[int, int, int]:
    return ((37 * label + 11) % 256, (53 * number + 101) % 256, (17 * label + 29 * number) % 256)


def write_image(path: Path, label: int, number: int, size: tuple[int, int] = (SIDE, SIDE), fmt: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour(label, number)).save(path, format=fmt or None)
    return path


def make_md_tree(source: str, root: Path, classes: Sequence[str] | None = None, per_class: int = 1) -> Path:
    """The layout of `source` under `root` with `classes` (default: its published test classes)."""
    keys = list(classes if classes is not None else MD_CLASS_SPLITS[source]["test"])
    root.mkdir(parents=True, exist_ok=True)
    MAKERS[source](root, keys, per_class)
    return root


def make_ilsvrc(root: Path, keys: Sequence[str], per_class: int, is_a: Sequence[tuple[str, str]] | None = None) -> None:
    """Wnid folders plus WordNet files; default hierarchy: entity -> device (the test root) -> every class."""
    for label, wnid in enumerate(keys):
        for n in range(per_class):
            write_image(root / wnid / f"{wnid}_{n}.JPEG", label, n, fmt="JPEG")
    links = is_a if is_a is not None else [("n00001740", "n03183080"), *(("n03183080", wnid) for wnid in keys)]
    (root / "wordnet.is_a.txt").write_text("".join(f"{p} {c}\n" for p, c in links))
    nodes = sorted({n for link in links for n in link} | set(keys))
    (root / "words.txt").write_text("".join(f"{n}\tthing {n}, other words\n" for n in nodes))


def make_omniglot(root: Path, keys: Sequence[str], per_class: int) -> None:
    test_alphabets = {key.split("/")[0] for key in MD_CLASS_SPLITS["omniglot"]["test"]}
    for label, key in enumerate(keys):
        alphabet = key.split("/")[0]
        folder = "images_evaluation" if alphabet in test_alphabets else "images_background"
        for n in range(per_class):
            write_image(root / folder / key / f"{label:04d}_{n:02d}.png", label, n)
    for folder in ("images_background", "images_evaluation"):
        (root / folder).mkdir(exist_ok=True)


def make_aircraft(root: Path, keys: Sequence[str], per_class: int, boxes: dict[str, tuple] | None = None) -> None:
    """Images 40×30 whose bottom 20 rows are a white banner; default box (2, 1, 30, 8) per image."""
    data = root / "data"
    lines, variants = [], []
    for label, key in enumerate(keys):
        for n in range(per_class):
            name = f"{1000000 + 100 * label + n}"
            image = Image.new("RGB", AIRCRAFT_SIZE, colour(label, n))
            image.paste((255, 255, 255), (0, AIRCRAFT_SIZE[1] - 20, AIRCRAFT_SIZE[0], AIRCRAFT_SIZE[1]))
            (data / "images").mkdir(parents=True, exist_ok=True)
            image.save(data / "images" / f"{name}.jpg", quality=95)
            box = (boxes or {}).get(name, (2, 1, 30, 8))
            lines.append(f"{name} {' '.join(str(v) for v in box)}\n")
            variants.append(f"{name} {key}\n")
    (data / "images_box.txt").write_text("".join(lines))
    half = len(variants) // 2
    (data / "images_variant_trainval.txt").write_text("".join(variants[:half]))
    (data / "images_variant_test.txt").write_text("".join(variants[half:]))


def make_cub(root: Path, keys: Sequence[str], per_class: int) -> None:
    for label, key in enumerate(keys):
        for n in range(per_class):
            write_image(root / "images" / key / f"{key.split('.')[-1]}_{n:04d}.jpg", label, n, fmt="JPEG")
    (root / "classes.txt").write_text("".join(f"{i + 1} {key}\n" for i, key in enumerate(keys)))


def make_dtd(root: Path, keys: Sequence[str], per_class: int) -> None:
    for label, key in enumerate(keys):
        for n in range(per_class):
            write_image(root / "images" / key / f"{key}_{n:04d}.jpg", label, n, fmt="JPEG")
        (root / "images" / key / ".directory").write_text("[Dolphin]\n")  # the stray file DTD ships
        (root / "images" / key / "notes.txt").write_text("not an image\n")


def make_quickdraw(root: Path, keys: Sequence[str], per_class: int) -> None:
    """One `<class>.npy` of `per_class` rows; row r of class c is all `(10 * c + r) % 256` but pixel 0, which is 255."""
    for label, key in enumerate(keys):
        rows = np.full((per_class, 784), 0, dtype=np.uint8)
        for r in range(per_class):
            rows[r, :] = (10 * label + r) % 256
            rows[r, 0] = 255
        np.save(root / f"{key}.npy", rows)


def make_fungi(root: Path, keys: Sequence[str], per_class: int) -> None:
    categories = [{"id": int(key[:4]), "name": key[5:]} for key in keys]
    parts: dict[str, dict[str, list]] = {p: {"images": [], "annotations": []} for p in ("train", "val")}
    image_id = 0
    for label, key in enumerate(keys):
        for n in range(per_class):
            file_name = f"images/{key[5:].replace(' ', '_')}/{label:04d}_{n}.JPG"
            write_image(root / file_name, label, n, fmt="JPEG")
            part = parts["train" if n % 2 == 0 else "val"]
            part["images"].append({"id": image_id, "file_name": file_name})
            part["annotations"].append({"id": image_id, "image_id": image_id, "category_id": int(key[:4])})
            image_id += 1
    (root / "images").mkdir(exist_ok=True)
    for name, part in parts.items():
        (root / f"{name}.json").write_text(json.dumps({**part, "categories": categories}))


def make_vgg_flower(root: Path, keys: Sequence[str], per_class: int) -> None:
    from scipy.io import savemat

    labels = []
    for label, key in enumerate(keys):
        for n in range(per_class):
            labels.append(int(key[:3]))
            write_image(root / "jpg" / f"image_{len(labels):05d}.jpg", label, n, fmt="JPEG")
    labels.append(999)  # an image of a class no split names
    write_image(root / "jpg" / f"image_{len(labels):05d}.jpg", 0, 0, fmt="JPEG")
    savemat(root / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8 if max(labels) < 256 else float)})


def make_traffic_sign(root: Path, keys: Sequence[str], per_class: int) -> None:
    for label, key in enumerate(keys):
        folder = root / "Final_Training" / "Images" / f"{int(key[:2]):05d}"
        for n in range(per_class):
            write_image(folder / f"00000_{n:05d}.ppm", label, n, fmt="PPM")
        (folder / f"GT-{int(key[:2]):05d}.csv").write_text("Filename;Width;Height\n")


def make_mscoco(root: Path, keys: Sequence[str], per_class: int) -> None:
    """One 16×12 image per `per_class`; each holds one annotation of every class, the first at (1, 1, 4, 3), the
    others with boxes marching right so that the last ones reach the image's right edge."""
    categories = [{"id": 100 + i, "name": key} for i, key in enumerate(keys)]
    images, annotations = [], []
    for n in range(per_class):
        file_name = f"{n + 1:012d}.jpg"
        write_image(root / "train2017" / file_name, 0, n, size=COCO_SIZE, fmt="JPEG")
        images.append({"id": n + 1, "file_name": file_name, "width": COCO_SIZE[0], "height": COCO_SIZE[1]})
        for i in range(len(keys)):
            box = [1 + (i % 12), 1, 4, 3]
            annotations.append({"id": 1000 * (n + 1) + i, "image_id": n + 1, "category_id": 100 + i, "bbox": box})
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    document = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(document))


MAKERS = {
    "ilsvrc_2012": make_ilsvrc,
    "omniglot": make_omniglot,
    "aircraft": make_aircraft,
    "cu_birds": make_cub,
    "dtd": make_dtd,
    "quickdraw": make_quickdraw,
    "fungi": make_fungi,
    "vgg_flower": make_vgg_flower,
    "traffic_sign": make_traffic_sign,
    "mscoco": make_mscoco,
}
