"""Decode once, resize once: a cache of images at the model's input size as uint8 tensors.

Resizing follows the released loaders whose numbers we reproduce (the VtT and TIR releases, see `docs/protocol.md`):
torchvision's `Resize([s, s])` on a PIL image, which is Pillow's bilinear `resize((s, s))` (antialiased when
downscaling: the filter support widens with the scale factor); square model input, aspect ratio not kept, no crop.
Dataset-specific steps before it live in the readers' loaders (ChestX: a 256x256 pre-resize, see
`cdfsl.data.readers.open_chestx`). Decoding a large PNG (ChestX) for every episode is the slow part of a run, so each
decoded, resized image is kept in memory and, with a cache folder, on disk as a `.npy` file under
`<cache_dir>/<dataset>/<fingerprint>-<size>-<PREPROCESSING>/`, named by a hash of the item key; a later run or
process reuses it. `PREPROCESSING` names the decode-and-resize rule, so a cache written under an older rule is never
read back.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cdfsl.data.index import ImageIndex
from cdfsl.errors import DatasetError

PREPROCESSING = "bilinear-aa.chestx256"
"""Tag of the decode-and-resize rule, part of the disk cache's folder name. Change it whenever what an image
becomes changes (the resize filter here, or a reader's loader such as the ChestX pre-resize), so that older caches
are never reused. History: untagged = bicubic resize, no ChestX pre-resize; `bilinear-aa.chestx256` = Pillow
bilinear (antialiased) resize as torchvision's `Resize([s, s])`, ChestX first resized to 256x256 by its loader."""


def resize_square(image: Image.Image, size: int) -> np.ndarray:
    """PIL image → RGB `[size, size, 3]` uint8, aspect ratio not kept (no crop).

    Exactly torchvision's `Resize([size, size])` on a PIL image: Pillow's bilinear `resize`, which antialiases
    when downscaling.
    """
    return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def cache_folder_name(index: ImageIndex, size: int) -> str:
    """Disk cache folder of `index` at `size`: `<fingerprint>-<size>-<PREPROCESSING>`."""
    return f"{index.fingerprint()}-{size}-{PREPROCESSING}"


class ImageCache:
    """Resized uint8 images of one index at one size.

    Args:
        index: the dataset.
        size: square side in pixels.
        cache_dir: optional folder for a disk cache shared across runs; files go under
            `<cache_dir>/<dataset>/<fingerprint>-<size>-<PREPROCESSING>/`.
        workers: decoding threads (PIL releases the GIL while decoding).
    """

    def __init__(self, index: ImageIndex, size: int, cache_dir: str | Path | None = None, workers: int = 4) -> None:
        self.index = index
        self.size = size
        self.workers = workers
        self._memory: dict[int, np.ndarray] = {}
        self._disk = Path(cache_dir) / index.name / cache_folder_name(index, size) if cache_dir else None
        if self._disk is not None:
            self._disk.mkdir(parents=True, exist_ok=True)

    def _disk_path(self, position: int) -> Path | None:
        if self._disk is None:
            return None
        digest = hashlib.sha1(self.index.items[position].encode()).hexdigest()
        return self._disk / f"{digest}.npy"

    def _decode(self, position: int) -> np.ndarray:
        path = self._disk_path(position)
        if path is not None and path.is_file():
            return np.load(path)
        key = self.index.items[position]
        try:
            array = resize_square(self.index.open(position), self.size)
        except (OSError, ValueError) as error:
            # Readers check every header; a file corrupt past its header is only found here. Dropping it now
            # would change the episode, so stop with its name instead.
            raise DatasetError(f"cannot decode {key}: {error}; remove or replace the file and re-run") from None
        if path is not None:
            temporary = path.with_suffix(".tmp.npy")
            np.save(temporary, array)
            temporary.replace(path)
        return array

    def get(self, positions: list[int]) -> Tensor:
        """Images at item `positions` → uint8 `[N, 3, size, size]`."""
        missing = sorted({p for p in positions if p not in self._memory})
        if missing:
            if len(missing) > 1 and self.workers > 1:
                with ThreadPoolExecutor(self.workers) as pool:
                    arrays = list(pool.map(self._decode, missing))
            else:
                arrays = [self._decode(p) for p in missing]
            self._memory.update(zip(missing, arrays, strict=True))
        stacked = np.stack([self._memory[p] for p in positions])
        return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self._memory)
