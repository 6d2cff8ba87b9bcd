"""Decode once, resize once: a cache of images at the model's input size as uint8 tensors.

Resizing follows the released loaders whose numbers we reproduce (the VtT and TIR releases, see `docs/protocol.md`):
torchvision's `Resize([s, s])` on a PIL image, which is Pillow's bilinear `resize((s, s))` (antialiased when
downscaling: the filter support widens with the scale factor); square model input, aspect ratio not kept, no crop.
Before it, a run may resize every image as opened to a square of `pre_resize` pixels with Pillow's default filter
(bicubic), as the VtT release's ChestX loader does at 256 (a recipe value, docs/recipes.md); 16-bit and float images
are brought to 8 bits by the loaders (`cdfsl.data.decode.to_8bit`).

Decoding a large PNG (ChestX) for every episode is the slow part of a run, so each decoded, resized image is kept in
memory and, with a cache folder, on disk as a `.npy` file `<cache_dir>/<dataset>/<size>-<rule>/<digest>.npy`,
named by the item's content digest (`ImageIndex.item_digest`: sha256 of the file's bytes). `ImageIndex.open` reads a
file's bytes once, checks their digest against that one and decodes those same bytes, so an entry always holds the
pixels of the bytes it is named by: a file changed since the run started is refused (`DatasetError`), never stored
under its old digest. Different pixels at the same path therefore never meet a stale entry, and identical files share
one. The dataset name stays in the path because the dataset decides the loader, and the rule (`image_rule`:
`PREPROCESSING` and the pre-resize) names the decode-and-resize rule, so a cache written under another rule is never
read back.

Entries are written to a name private to the process and thread, then renamed into place (`os.replace`), so runs
sharing a cache folder never see a half-written entry. An entry that cannot be read back, or holds anything but a
uint8 `[size, size, 3]` array, is reported with a `DatasetWarning` naming it, decoded again and overwritten; a failed
write (full disk) is reported once and the run goes on with the memory cache. A file that fails to decode stops the
run with a `DatasetError` naming it (the readers' indexing check leaves out files cut short; files damaged in the
middle are found here, or beforehand with `cdfsl.data.file_checks.deep_check`).
"""

from __future__ import annotations

import os
import threading
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cdfsl.data.decode import DECODE_ERRORS
from cdfsl.data.index import ImageIndex
from cdfsl.errors import DatasetError, DatasetWarning

PREPROCESSING = "bilinear-aa.chestx256.wide8.exif"
"""Tag of the decode-and-resize rule, part of the disk cache's folder name and of the run identity. Change it whenever
what an image becomes changes (the resize filter here, or a reader's loader such as the ChestX pre-resize), so that
older caches are never reused. History: untagged = bicubic resize, no ChestX pre-resize; `bilinear-aa.chestx256` =
Pillow bilinear (antialiased) resize as torchvision's `Resize([s, s])`, ChestX first resized to 256x256 by its loader;
`bilinear-aa.chestx256.wide8` = the same, with 16-bit and float images scaled to 8 bits by the loaders instead of
Pillow's `convert("RGB")` (which made them all white or all black); `bilinear-aa.chestx256.wide8.exif` = the same,
with each image first turned upright as its EXIF orientation tag says (`cdfsl.data.decode.upright`). The ChestX
pre-resize is now the run's `pre_resize` (`image_rule`); this tag stands for the pre-resize it used to fix,
`TAGGED_PRE_RESIZE`."""

TAGGED_PRE_RESIZE = {"chestx": 256}
"""The pre-resize `PREPROCESSING` stands for, by dataset (0 for the others): a fixed step of the ChestX loader before
it became the `pre_resize` config value. Runs and caches with that pre-resize keep the tag (and so their run ids and
cache folders); any other pre-resize is appended to it (`image_rule`)."""


def image_rule(dataset: str, pre_resize: int) -> str:
    """Tag of the decode-and-resize rule of `dataset`'s images with `pre_resize` (0: none): part of the run identity
    and of the disk cache's folder name. `PREPROCESSING` where the pre-resize is the one it stands for
    (`TAGGED_PRE_RESIZE`), else `PREPROCESSING` + `.pre<N>` (`.pre0`: none, e.g. ChestX under `tir-release`)."""
    if pre_resize == TAGGED_PRE_RESIZE.get(dataset, 0):
        return PREPROCESSING
    return f"{PREPROCESSING}.pre{pre_resize}"


def resize_square(image: Image.Image, size: int, pre_resize: int = 0) -> np.ndarray:
    """PIL image → RGB `[size, size, 3]` uint8, aspect ratio not kept (no crop).

    Exactly torchvision's `Resize([size, size])` on a PIL image: Pillow's bilinear `resize`, which antialiases
    when downscaling. With `pre_resize` > 0 the RGB image is first resized to `pre_resize`² with Pillow's default
    filter (bicubic), as the VtT release's ChestX loader does; for grey or opaque images this gives the same pixels
    as that loader's resize before its RGB conversion.
    """
    image = image.convert("RGB")
    if pre_resize:
        image = image.resize((pre_resize, pre_resize))
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def cache_folder(cache_dir: str | Path, index: ImageIndex, size: int, pre_resize: int = 0) -> Path:
    """Disk cache folder of `index` at `size`: `<cache_dir>/<dataset>/<size>-<image_rule(dataset, pre_resize)>`."""
    return Path(cache_dir) / index.name / f"{size}-{image_rule(index.name, pre_resize)}"


class ImageCache:
    """Resized uint8 images of one index at one size.

    Args:
        index: the dataset.
        size: square side in pixels.
        cache_dir: optional folder for a disk cache shared across runs and processes; files go under
            `cache_folder(cache_dir, index, size, pre_resize)`, named by content digest (see the module docstring).
        workers: decoding threads (PIL releases the GIL while decoding).
        pre_resize: square side every image is first resized to (0: none; see `resize_square`).

    Raises:
        DatasetError: the disk cache folder cannot be created.
    """

    def __init__(
        self,
        index: ImageIndex,
        size: int,
        cache_dir: str | Path | None = None,
        workers: int = 4,
        pre_resize: int = 0,
    ) -> None:
        self.index = index
        self.size = size
        self.workers = workers
        self.pre_resize = pre_resize
        self._memory: dict[int, np.ndarray] = {}
        self._disk = cache_folder(cache_dir, index, size, pre_resize) if cache_dir else None
        self._write_failed = False
        self._lock = threading.Lock()
        if self._disk is not None:
            try:
                self._disk.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise DatasetError(
                    f"cannot create the image cache folder {self._disk}: {error.strerror or error}; "
                    "pass a writable --cache-dir or leave it out"
                ) from None

    def _disk_path(self, position: int) -> Path | None:
        if self._disk is None:
            return None
        return self._disk / f"{self.index.item_digest(position)}.npy"

    def _decode(self, position: int) -> np.ndarray:
        path = self._disk_path(position)
        if path is not None:
            cached = self._read(path)
            if cached is not None:
                return cached
        key = self.index.items[position]
        try:
            array = resize_square(self.index.open(position), self.size, self.pre_resize)
        except DECODE_ERRORS as error:
            # Readers check every file's header and end; a file damaged in the middle is only found here. Dropping
            # it now would change the episode, so stop with its name instead.
            raise DatasetError(f"cannot decode {key}: {error}; remove or replace the file and re-run") from None
        if path is not None:
            self._write(path, array)
        return array

    def _read(self, path: Path) -> np.ndarray | None:
        """The cached array at `path`, or None when there is none or it is unusable (then a warning names it)."""
        try:
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as error:
            problem = f"cannot be read ({error})"
        else:
            if isinstance(array, np.ndarray) and array.dtype == np.uint8 and array.shape == (self.size, self.size, 3):
                return array
            problem = f"holds {getattr(array, 'dtype', type(array).__name__)} {getattr(array, 'shape', '')}"
        warnings.warn(
            f"image cache entry {path} {problem}, not uint8 {(self.size, self.size, 3)}; decoding the image again "
            "and replacing it",
            DatasetWarning,
            stacklevel=2,
        )
        return None

    def _write(self, path: Path, array: np.ndarray) -> None:
        """Write `array` to `path` atomically: a private temporary name, then `os.replace`."""
        temporary = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex}.tmp.npy")
        try:
            with open(temporary, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
            os.replace(temporary, path)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            with self._lock:
                if self._write_failed:
                    return
                self._write_failed = True
            warnings.warn(
                f"cannot write the image cache entry {path} ({error.strerror or error}); "
                "going on without storing decoded images on disk",
                DatasetWarning,
                stacklevel=2,
            )

    def get(self, positions: list[int], pinned: bool = False) -> Tensor:
        """Images at item `positions` → uint8 `[N, 3, size, size]`; with `pinned`, in page-locked host memory, so a
        copy to a CUDA device can be asynchronous (`Tensor.to(device, non_blocking=True)`)."""
        missing = sorted({p for p in positions if p not in self._memory})
        if missing:
            if self._disk is not None:
                self.index.item_digest(missing[0])  # hash the index once, here, not racing in the decode threads
            if len(missing) > 1 and self.workers > 1:
                with ThreadPoolExecutor(self.workers) as pool:
                    arrays = list(pool.map(self._decode, missing))
            else:
                arrays = [self._decode(p) for p in missing]
            self._memory.update(zip(missing, arrays, strict=True))
        shape = (len(positions), 3, self.size, self.size)
        images = torch.empty(shape, dtype=torch.uint8, pin_memory=pinned)
        if positions:
            stacked = np.stack([self._memory[p] for p in positions])
            images.copy_(torch.from_numpy(stacked).permute(0, 3, 1, 2))
        return images

    def __len__(self) -> int:
        return len(self._memory)
