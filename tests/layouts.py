"""Tiny generated datasets in the real on-disk layouts of protocol.md, for tests (not a test module).

Every `make_*` writes under `root` and returns the data root to pass to `load_index`. Images are 12x12 with
a class-dependent colour plus per-image noise from a numpy generator seeded by (dataset, class, image), so a
file's content never depends on the order files are written in (`reverse_order=True` writes them reversed).
Defaults give 20 images per class: enough for 5-way episodes with up to 5 shots + 15 queries.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 12
PER_CLASS = 20

EUROSAT_FOLDERS = (
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
)
PLANTVILLAGE_FOLDERS = (
    "Apple___Apple_scab",
    "Apple___healthy",
    "Corn_(maize)___Cercospora_leaf_spot Gray_leaf_spot",
    "Pepper,_bell___Bacterial_spot",
    "Tomato___Tomato_Yellow_Leaf_Curl_Virus",
    "Tomato___healthy",
)
ISIC_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
CHESTX_CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax")
CHESTX_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
# Rows of the ChestX CSV that the reader must drop (their images exist on disk).
CHESTX_DROPPED_LABELS = (
    "No Finding",
    "Pneumonia",
    "Effusion|Mass",
    "Atelectasis|Cardiomegaly|Nodule",
    "Hernia",
)

_Job = tuple[Path, int, int, str]  # (path, class index, image index, format)


def image_array(dataset: str, label: int, number: int, grey: bool = False) -> np.ndarray:
    """Pixels of one generated image: class colour plus seeded noise (uint8, HxWx3 or HxW if grey)."""
    rng = np.random.default_rng([zlib.crc32(dataset.encode()), label, number])
    colour = np.array([(label * 67) % 256, (label * 131 + 40) % 256, (label * 29 + 90) % 256], dtype=np.int16)
    noise = rng.integers(-30, 31, size=(SIZE, SIZE, 3), dtype=np.int16)
    pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
    return pixels.mean(axis=2).astype(np.uint8) if grey else pixels


def make_eurosat(
    root: str | Path, per_class: int = PER_CLASS, nested: bool = False, reverse_order: bool = False
) -> Path:
    """EuroSAT RGB: `<Class>/<Class>_<n>.jpg` directly under `root`, or under `root/2750/` if `nested`."""
    root = Path(root)
    base = root / "2750" if nested else root
    jobs = [
        (base / folder / f"{folder}_{n + 1}.jpg", label, n, "JPEG")
        for label, folder in enumerate(EUROSAT_FOLDERS)
        for n in range(per_class)
    ]
    _write_all("eurosat", jobs, reverse_order)
    return root


def make_cropdiseases(
    root: str | Path,
    classes: Sequence[str] = PLANTVILLAGE_FOLDERS,
    per_class: int = PER_CLASS,
    nested: bool = False,
    reverse_order: bool = False,
) -> Path:
    """PlantVillage: `<class>/<hex>___RS_L <n>.JPG` directly under `root`, or under `root/dataset/train/`."""
    root = Path(root)
    base = root / "dataset" / "train" if nested else root
    jobs = [
        (base / folder / f"{zlib.crc32(f'{folder}{n}'.encode()):08x}___RS_L {n}.JPG", label, n, "JPEG")
        for label, folder in enumerate(classes)
        for n in range(per_class)
    ]
    _write_all("cropdiseases", jobs, reverse_order)
    return root


def make_isic2018(
    root: str | Path, per_class: int = PER_CLASS, extra_rows: Iterable[str] = (), reverse_order: bool = False
) -> Path:
    """ISIC 2018 task 3: input JPEGs plus the one-hot ground-truth CSV.

    `extra_rows` are raw CSV lines appended to the CSV (no images are written for them).
    """
    root = Path(root)
    input_dir = root / "ISIC2018_Task3_Training_Input"
    names = [f"ISIC_{24306 + label * per_class + n:07d}" for label in range(7) for n in range(per_class)]
    jobs = [
        (input_dir / f"{names[label * per_class + n]}.jpg", label, n, "JPEG")
        for label in range(7)
        for n in range(per_class)
    ]
    _write_all("isic2018", jobs, reverse_order)
    lines = ["image," + ",".join(ISIC_COLUMNS)]
    for position, name in enumerate(names):
        label = position // per_class
        lines.append(name + "," + ",".join("1.0" if c == label else "0.0" for c in range(7)))
    lines.extend(extra_rows)
    csv_path = root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path.write_text("\n".join(lines) + "\n")
    return root


def make_chestx(
    root: str | Path,
    per_class: int = PER_CLASS,
    spread: bool = False,
    extra_rows: Iterable[str] = (),
    reverse_order: bool = False,
) -> Path:
    """NIH ChestX-ray14: `Data_Entry_2017.csv` plus grey PNGs in `images/` (or `images_001..012/images/`).

    Besides `per_class` single-label rows per class, the CSV holds rows labelled as in
    `CHESTX_DROPPED_LABELS` (with their images on disk) that the reader must drop. `extra_rows` are
    (image name, labels) pairs appended to the CSV without writing images.
    """
    root = Path(root)
    rows = [(label, n, CHESTX_CLASSES[label]) for label in range(7) for n in range(per_class)]
    rows += [(7 + k, 0, labels) for k, labels in enumerate(CHESTX_DROPPED_LABELS)]
    jobs: list[_Job] = []
    lines = [CHESTX_HEADER]
    for position, (label, n, labels) in enumerate(rows):
        name = f"{position + 1:08d}_000.png"
        folder = root / f"images_{position % 12 + 1:03d}" / "images" if spread else root / "images"
        jobs.append((folder / name, label, n, "PNG"))
        lines.append(_chestx_line(name, labels, position))
    lines += [_chestx_line(name, labels, 0) for name, labels in extra_rows]
    _write_all("chestx", jobs, reverse_order, grey=True)
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    return root


def make_imagefolder(
    root: str | Path,
    classes: Sequence[str] = ("cat", "dog", "bird", "fish", "frog"),
    per_class: int = PER_CLASS,
    classnames: dict[str, str] | None = None,
    reverse_order: bool = False,
) -> Path:
    """Generic tree: `<class>/img_<n>.png` (RGB), plus `classnames.json` if `classnames` is given."""
    root = Path(root)
    jobs = [
        (root / folder / f"img_{n:03d}.png", label, n, "PNG")
        for label, folder in enumerate(classes)
        for n in range(per_class)
    ]
    _write_all("imagefolder", jobs, reverse_order)
    if classnames is not None:
        (root / "classnames.json").write_text(json.dumps(classnames))
    return root


def _chestx_line(name: str, labels: str, position: int) -> str:
    return f"{name},{labels},0,{position + 1},58,M,PA,2682,2749,0.143,0.143,"


def _write_all(dataset: str, jobs: list[_Job], reverse_order: bool, grey: bool = False) -> None:
    for path, label, number, fmt in reversed(jobs) if reverse_order else jobs:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_array(dataset, label, number, grey)).save(path, format=fmt)


# damaged files -----------------------------------------------------------------------------------


def noise_image(path: Path, side: int = 64, seed: int = 0, fmt: str | None = None) -> Path:
    """A noisy RGB image (compresses badly, so its pixel data spans most of the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def cut_in_half(path: Path) -> None:
    """Keep the first half of the file: header intact, the rest (and the end marker) gone."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_middle(path: Path) -> None:
    """Zero 400 bytes in the middle of the file; its header and its last bytes stay intact."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle - 200 : middle + 200] = bytes(400)
    path.write_bytes(bytes(data))


def png_with_broken_chunk(path: Path, side: int = 64, seed: int = 0) -> Path:
    """A noisy PNG whose pixel data is split in two IDAT chunks, the second with an invalid chunk type.

    Header and IEND are intact; Pillow opens it but raises `SyntaxError` ("broken PNG file"), not `OSError`, when
    decoding it.
    """
    noise_image(path, side, seed, "PNG")
    data = path.read_bytes()
    start = data.find(b"IDAT") - 4
    length = struct.unpack(">I", data[start : start + 4])[0]
    payload = data[start + 8 : start + 8 + length]
    half = len(payload) // 2

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    broken = chunk(b"IDAT", payload[:half]) + chunk(b"\x00\x01\x02\x03", payload[half:])
    path.write_bytes(data[:start] + broken + data[start + 12 + length :])
    return path
