"""Decoding: one item of an index opened as an upright, 8-bit RGB `PIL.Image`.

Loaders open an item as RGB at its stored size, turned upright as its EXIF orientation tag says (`upright`).
16-bit and 32-bit integer grey images (modes `I;16*`, `I`) are scaled from 0..65535 to 0..255 (rounded, higher
values clipped), and float images (mode `F`) are scaled by 255 when all values lie in [0, 1], else clipped to
[0, 255] with one warning per file; Pillow's own `convert("RGB")` would make them all white or all black. Other
modes convert as Pillow does. A file that fails to decode raises one of `DECODE_ERRORS` (the image cache turns it into
a `DatasetError` naming it).

Only Pillow's parsers for `IMAGE_FORMATS` ever run, whatever a file's extension says. Loaders are module-level
functions and classes, so an index (whose loader is a `functools.partial` of `open_rgb`, or a `DigitsLoader`) pickles
into data-loader workers. This module needs no torch: indexing and decoding stay light; resizing and caching as tensors
is `cdfsl.data.images`'s job.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cdfsl.data.fingerprint import Content, open_regular
from cdfsl.errors import DatasetWarning

IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")
"""The Pillow formats images are opened with (`Image.open(..., formats=IMAGE_FORMATS)`); no other parser runs."""
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes PIL.UnidentifiedImageError and "image file is truncated"
    SyntaxError,  # Pillow's "broken PNG file" and other parser errors
    ValueError,
    EOFError,
    IndexError,
    struct.error,
    Image.DecompressionBombError,
)
"""What opening or decoding a bad image file raises: such a file is unreadable, never a crash."""


def open_rgb(root: Path, key: str, data: bytes | None = None) -> Image.Image:
    """Open `root/key` (one of `IMAGE_FORMATS`) and return it decoded as RGB (wide modes scaled, see `to_8bit`).

    `data`: the file's bytes, already read (and checked) by the caller (`ImageIndex.open`); they are decoded
    instead of reading the file. An EXIF orientation is applied (`upright`), so the image is the way viewers show it.

    Raises:
        One of `DECODE_ERRORS`: the file cannot be opened or decoded.
    """
    path = root / key
    source = io.BytesIO(data) if data is not None else open_regular(path)
    with source as handle, Image.open(handle, formats=IMAGE_FORMATS) as image:
        image.load()  # a damaged file fails here, as a decode error, before its EXIF block is looked for
        return to_8bit(upright(image, path), path).convert("RGB")


def upright(image: Image.Image, path: str | Path) -> Image.Image:
    """`image` turned as its EXIF orientation tag says (Pillow's `ImageOps.exif_transpose`; the tag is dropped from
    the result), so a phone photo stored sideways is seen upright. An EXIF block Pillow cannot parse is named in one
    `DatasetWarning` per file and the image is used as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except DECODE_ERRORS as error:
        _warn_once_per_file(
            path, f"cannot read the EXIF orientation of {os.fsdecode(path)!r} ({error}); used the image as stored"
        )
        return image


def to_8bit(image: Image.Image, path: str | Path) -> Image.Image:
    """Wide grey modes as 8-bit grey (`L`); any other image unchanged.

    `I;16*` and `I`: values 0..65535 map linearly to 0..255 (rounded half up; negative values become 0, values
    above 65535 become 255). `F`: values are multiplied by 255 when all lie in [0, 1]; otherwise they are clipped
    to [0, 255] (NaN becomes 0) with one `DatasetWarning` per file naming `path`.
    """
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    if image.mode == "F":
        values = np.asarray(image).astype(np.float64)
        finite = np.isfinite(values)
        if finite.all() and values.size and values.min() >= 0.0 and values.max() <= 1.0:
            scaled = values * 255.0
        else:
            scaled = np.clip(np.where(finite, values, 0.0), 0.0, 255.0)
            scaled[np.isposinf(values)] = 255.0
            _warn_once_per_file(
                path,
                f"float image {os.fsdecode(path)!r} has values outside [0, 1]; used them as 0..255 levels, clipped; "
                "convert it to 8-bit to control how it looks",
            )
        return Image.fromarray(np.floor(scaled + 0.5).astype(np.uint8))
    return image


_warned_files: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once_per_file(path: str | Path, message: str) -> None:
    key = os.fsdecode(path)
    with _warned_lock:
        if key in _warned_files:
            return
        _warned_files.add(key)
    warnings.warn(message, DatasetWarning, stacklevel=3)


@dataclass(frozen=True, eq=False)
class DigitsLoader:
    """Loads `digits/NNNNN` from the uint8 pixel array `[N, 8, 8]` as an 8x8 RGB image."""

    pixels: np.ndarray = field(repr=False)

    def __call__(self, key: str) -> Image.Image:
        return Image.fromarray(self.pixels[self._number(key)]).convert("RGB")

    def item_contents(self, keys: Sequence[str]) -> list[Content]:
        """(byte count, sha256) of each key's uint8 pixels: the content `ImageIndex.fingerprint` hashes."""
        contents = []
        for key in keys:
            pixels = np.ascontiguousarray(self.pixels[self._number(key)], dtype=np.uint8)
            contents.append(Content(pixels.nbytes, hashlib.sha256(pixels.tobytes()).hexdigest()))
        return contents

    def _number(self, key: str) -> int:
        prefix, _, number = key.partition("/")
        if prefix != "digits" or not number.isdigit() or int(number) >= len(self.pixels):
            raise KeyError(f"not a digits key: {key!r}")
        return int(number)
