"""ImageCache: square bilinear resize without crop (torchvision's `Resize([s, s])`), memory reuse, and the disk cache
shared across instances, keyed by item content and the preprocessing tag."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdfsl.data.images import PREPROCESSING, ImageCache, cache_folder, resize_square
from cdfsl.data.index import ImageIndex, decoded_content


class CountingLoader:
    """Opens in-memory PIL images by key and counts calls per key.

    Like the digits loader, it supplies the content digests of its images itself (`item_contents`), so hashing the
    index is not counted as opening images.
    """

    def __init__(self, images: dict[str, Image.Image]) -> None:
        self.images = images
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, key: str) -> Image.Image:
        with self._lock:
            self.calls.append(key)
        return self.images[key].copy()

    def item_contents(self, keys: list[str]) -> list:
        return [decoded_content(self.images[key]) for key in keys]


def wide_image() -> Image.Image:
    """40x20 (2:1): green in the leftmost 4 columns, red elsewhere, a blue bottom row."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :, 0] = 200
    pixels[:, :4] = (0, 200, 0)
    pixels[-2:, 4:] = (0, 0, 200)
    return Image.fromarray(pixels)


def make_index(name: str = "toy") -> tuple[ImageIndex, CountingLoader]:
    rng = np.random.default_rng(0)
    images = {
        "a/wide.png": wide_image(),
        "a/noise.png": Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)),
        "b/grey.png": Image.fromarray(rng.integers(0, 256, (10, 25), dtype=np.uint8), mode="L"),
        "b/tall.png": Image.fromarray(rng.integers(0, 256, (50, 10, 3), dtype=np.uint8)),
    }
    loader = CountingLoader(images)
    index = ImageIndex(
        name=name,
        class_keys=("a", "b"),
        class_names=("a", "b"),
        items=tuple(images),
        labels=(0, 0, 1, 1),
        loader=loader,
    )
    return index, loader


def test_resize_square_is_bilinear_without_crop() -> None:
    image = wide_image()
    array = resize_square(image, 16)
    assert array.shape == (16, 16, 3) and array.dtype == np.uint8
    expected = np.asarray(image.resize((16, 16), Image.Resampling.BILINEAR))
    assert np.array_equal(array, expected)
    # No crop: the 4 green columns of 40 survive as the leftmost ~1.6 of 16, the blue bottom rows stay at the bottom.
    assert array[8, 0, 1] > 150 and array[8, 0, 0] < 60
    assert array[8, 8, 0] > 150 and array[8, 8, 1] < 60
    assert array[-1, 8, 2] > 100
    # Not the nearest or bicubic resize.
    for other in (Image.Resampling.NEAREST, Image.Resampling.BICUBIC):
        assert not np.array_equal(array, np.asarray(image.resize((16, 16), other)))


@pytest.mark.parametrize(("shape", "size"), [((37, 53), 224), ((300, 411), 64), ((90, 90), 31), ((20, 300), 40)])
def test_resize_square_equals_torchvision_resize(shape: tuple[int, int], size: int) -> None:
    """Pixel for pixel what the released loaders' `transforms.Resize([s, s])` gives, upscaling and downscaling."""
    from torchvision import transforms

    rng = np.random.default_rng(sum(shape) + size)
    image = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    expected = np.asarray(transforms.Resize([size, size])(image))
    array = resize_square(image, size)
    assert array.shape == expected.shape == (size, size, 3)
    assert np.array_equal(array, expected)
    # Downscaling antialiases: the filter spans the whole scale factor, so noise averages out (to ~0.12-0.23 of its
    # spread here), where a plain 2x2 bilinear interpolation would keep about 0.66 of it.
    if shape[0] > size and shape[1] > size:
        assert array.astype(float).std() < 0.4 * np.asarray(image).astype(float).std()


def test_get_shapes_dtype_and_order() -> None:
    index, _ = make_index()
    cache = ImageCache(index, 16, workers=1)
    batch = cache.get([0, 2, 1, 0])
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.uint8
    assert torch.equal(batch[0], batch[3])
    for row, position in enumerate([0, 2, 1]):
        expected = resize_square(index.open(position), 16)
        assert np.array_equal(batch[row].permute(1, 2, 0).numpy(), expected)
    # The grey image becomes RGB with three equal channels.
    assert torch.equal(batch[1][0], batch[1][1]) and torch.equal(batch[1][1], batch[1][2])


@pytest.mark.parametrize("workers", [1, 4])
def test_repeated_get_uses_memory(workers: int) -> None:
    index, loader = make_index()
    cache = ImageCache(index, 16, workers=workers)
    first = cache.get([0, 1, 1, 3])
    assert sorted(loader.calls) == sorted(["a/wide.png", "a/noise.png", "b/tall.png"])
    assert len(cache) == 3
    second = cache.get([3, 1, 0])
    assert len(loader.calls) == 3
    assert torch.equal(second, first[[3, 1, 0]])
    cache.get([2, 0])
    assert len(loader.calls) == 4 and loader.calls[-1] == "b/grey.png"


def test_disk_cache_is_written_and_reused(tmp_path: Path) -> None:
    index, loader = make_index()
    cache = ImageCache(index, 16, cache_dir=tmp_path, workers=2)
    first = cache.get([0, 1, 2, 3])
    assert len(loader.calls) == 4
    files = sorted(tmp_path.rglob("*.npy"))
    assert len(files) == 4
    assert not list(tmp_path.rglob("*.tmp*"))
    folder = tmp_path / "toy" / f"16-{PREPROCESSING}"
    assert folder == cache_folder(tmp_path, index, 16)
    assert all(f.parent == folder for f in files)
    assert sorted(f.name for f in files) == sorted(f"{index.item_digest(p)}.npy" for p in range(4))
    stored = sorted((np.load(f) for f in files), key=lambda a: a.tobytes())
    assert all(a.shape == (16, 16, 3) and a.dtype == np.uint8 for a in stored)

    other_index, other_loader = make_index()
    again = ImageCache(other_index, 16, cache_dir=tmp_path, workers=1).get([3, 2, 1, 0])
    assert other_loader.calls == []
    assert torch.equal(again, first[[3, 2, 1, 0]])

    # Another size is another cache: it decodes again and writes its own files.
    ImageCache(other_index, 8, cache_dir=tmp_path, workers=1).get([0])
    assert other_loader.calls == ["a/wide.png"]
    assert len(list(cache_folder(tmp_path, index, 8).glob("*.npy"))) == 1


def test_disk_cache_folder_names_the_preprocessing(tmp_path: Path) -> None:
    """The cache folder carries the preprocessing tag, so a cache written under an older rule is not read."""
    index, loader = make_index()
    assert PREPROCESSING and cache_folder(tmp_path, index, 16).name == f"16-{PREPROCESSING}"
    assert "bilinear" in PREPROCESSING and "chestx256" in PREPROCESSING
    # Plant stale entries under the item's file name where an untagged and the previous rule would keep them.
    stale_folders = [tmp_path / "toy" / "16", tmp_path / "toy" / "16-bilinear-aa.chestx256"]
    for stale in stale_folders:
        stale.mkdir(parents=True)
        np.save(stale / f"{index.item_digest(0)}.npy", np.zeros((16, 16, 3), dtype=np.uint8))
    batch = ImageCache(index, 16, cache_dir=tmp_path, workers=1).get([0])
    assert loader.calls == ["a/wide.png"]  # decoded again, not read from a stale folder
    assert np.array_equal(batch[0].permute(1, 2, 0).numpy(), resize_square(index.open(0), 16))
    written = [f.parent.name for f in tmp_path.rglob("*.npy") if f.parent not in stale_folders]
    assert written == [f"16-{PREPROCESSING}"]


def test_disk_cache_keyed_by_item_content(tmp_path: Path) -> None:
    """Entries are named by content: identical images share them across indexes, other pixels under the same key
    never read them."""
    index, _ = make_index()
    ImageCache(index, 16, cache_dir=tmp_path).get([0])
    renamed, loader = make_index()
    renamed = ImageIndex(
        name=renamed.name,
        class_keys=renamed.class_keys,
        class_names=("cat", "dog"),
        items=renamed.items,
        labels=renamed.labels,
        loader=loader,
    )
    assert renamed.fingerprint() != index.fingerprint()
    ImageCache(renamed, 16, cache_dir=tmp_path).get([0])
    assert loader.calls == []  # same pixels: served from the shared entry
    changed, changed_loader = make_index()
    changed_loader.images["a/wide.png"] = wide_image().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert changed.item_digest(0) != index.item_digest(0)
    batch = ImageCache(changed, 16, cache_dir=tmp_path).get([0])
    assert changed_loader.calls == ["a/wide.png"]
    assert np.array_equal(batch[0].permute(1, 2, 0).numpy(), resize_square(changed_loader.images["a/wide.png"], 16))


def test_file_damaged_in_the_middle_names_the_file(tmp_path: Path) -> None:
    """Header and end intact, so indexing keeps the file; decoding it stops with its name."""
    from cdfsl.data.readers import load_index
    from cdfsl.errors import DatasetError
    from layouts import corrupt_middle, noise_image

    root = tmp_path / "data"
    for name in ("a", "b"):
        for i in range(2):
            noise_image(root / name / f"{i}.png", seed=i + 2 * (name == "b"))
    corrupt_middle(root / "b" / "1.png")
    index = load_index("imagefolder", root)
    assert "b/1.png" in index.items
    cache = ImageCache(index, 16)
    with pytest.raises(DatasetError, match=r"b/1\.png"):
        cache.get(list(range(len(index.items))))
