"""Decode once, resize once: a cache of images at the model's input size as uint8 tensors.

Resizing follows protocol.md: square model input, no crop, bicubic. Decoding a large PNG (ChestX) for every episode is
the slow part of a run, so each decoded, resized image is kept in memory and, with a cache folder, on disk as a `.npy`
file keyed by a hash of (dataset fingerprint, item key, size); a later run or process reuses it.
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


def resize_square(image: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image → `[size, size, 3]` uint8, bicubic, aspect ratio not kept (no crop)."""
    return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


class ImageCache:
    """Resized uint8 images of one index at one size.

    Args:
        index: the dataset.
        size: square side in pixels.
        cache_dir: optional folder for a disk cache shared across runs.
        workers: decoding threads (PIL releases the GIL while decoding).
    """

    def __init__(self, index: ImageIndex, size: int, cache_dir: str | Path | None = None, workers: int = 4) -> None:
        self.index = index
        self.size = size
        self.workers = workers
        self._memory: dict[int, np.ndarray] = {}
        self._disk = Path(cache_dir) / index.name / f"{index.fingerprint()}-{size}" if cache_dir else None
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
