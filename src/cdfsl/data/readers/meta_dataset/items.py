"""Items that are a part of a file: a crop of an image (MSCOCO's annotations, FGVC-Aircraft's boxes) or one row of an
array (QuickDraw's `.npy` bitmaps).

Such an index keeps `root` set (it is file-backed) and its loader is a `PartLoader`, which gives `ImageIndex` two
hooks instead of the plain "one key, one file" rule:

- `part_contents(keys)`: the content of each item is the file's (size, sha256) combined with the part's description
  (`detail(key)`: the crop box as read from the annotations, the row number), so a changed box, a changed row or a
  changed file each give another item digest, and so another fingerprint and another image-cache entry. Each file
  is hashed once, however many items it holds (`cdfsl.data.fingerprint.file_contents`, cached across runs).
- `open_part(key, expected)`: the item decoded, refused (`DatasetError`) when its content is no longer the one the
  run was fingerprinted with. A crop reads the file's bytes once, checks them and decodes those same bytes; an array
  row checks the file by its cached digest (size, times and inode unchanged) and reads the one row through a memory
  map, so a 100 MB `.npy` is never read whole for one 28×28 image.

Called with a key alone (`loader(key)`, as `file_checks.deep_check` does) the item is decoded from the file as it is
now. Loaders are frozen dataclasses of plain data, so an index pickles into data-loader workers.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cdfsl.data.decode import IMAGE_FORMATS, to_8bit, upright
from cdfsl.data.fingerprint import Content, file_contents, open_regular
from cdfsl.errors import DatasetError

PART_SEPARATOR = "#"
"""Between an item key's file and its part: `train2017/000000000009.jpg#1038967`, `cat.npy#000123`."""

Box = tuple[int, int, int, int]
"""A crop box (left, top, right, bottom) in pixels, right and bottom exclusive (PIL's `crop`)."""


def part_key(file: str, part: str | int, width: int = 0) -> str:
    """The key of part `part` of `file` (`file#part`); an integer part is zero-padded to `width` digits."""
    text = f"{part:0{width}d}" if isinstance(part, int) else part
    return f"{file}{PART_SEPARATOR}{text}"


def file_of(key: str) -> str:
    """The file (relative to the data root) an item key names: the key up to its last `#`, or the whole key."""
    return key.rsplit(PART_SEPARATOR, 1)[0] if PART_SEPARATOR in key else key


def combined(content: Content, detail: str) -> Content:
    """The content of a part: the file's size, and sha256 of the file's digest and the part's description."""
    return Content(content.size, hashlib.sha256(f"{content.digest}\0{detail}".encode()).hexdigest())


@dataclass(frozen=True)
class PartLoader:
    """Opens items that are parts of files under `root` (see the module docstring); subclasses say which part."""

    root: Path

    reads_bytes = True
    """Whether `open_part` reads the whole file (and checks its bytes) or checks it by its cached digest."""

    def detail(self, key: str) -> str:
        """What, besides the file's bytes, makes the item what it is (the box, the row)."""
        raise NotImplementedError

    def decode(self, key: str, data: bytes | None) -> Image.Image:
        """The item as RGB, from the file's `data` when given, else from the file."""
        raise NotImplementedError

    def __call__(self, key: str, data: bytes | None = None) -> Image.Image:
        return self.decode(key, data)

    def part_contents(self, keys: Sequence[str]) -> list[Content]:
        """The content of each item (see the module docstring), each file hashed once.

        Raises:
            OSError: a file cannot be read.
        """
        files = sorted({file_of(key) for key in keys})
        by_file = dict(zip(files, file_contents([self.root / f for f in files]), strict=True))
        return [combined(by_file[file_of(key)], self.detail(key)) for key in keys]

    def open_part(self, key: str, expected: Content) -> Image.Image:
        """Item `key` decoded, from content whose digest is `expected` (see the module docstring).

        Raises:
            DatasetError: the file changed (or went away) since the index was fingerprinted.
            One of `cdfsl.data.decode.DECODE_ERRORS`: the content does not decode.
        """
        path = self.root / file_of(key)
        try:
            if self.reads_bytes:
                with open_regular(path) as handle:
                    data: bytes | None = handle.read()
                assert data is not None
                found = Content(len(data), hashlib.sha256(data).hexdigest())
            else:
                data, found = None, file_contents([path])[0]
        except OSError as error:
            raise DatasetError(
                f"{path} cannot be read any more ({getattr(error, 'strerror', None) or error}) though it was there "
                "when the run started; restore it, or re-run to index the data afresh"
            ) from None
        if combined(found, self.detail(key)) != expected:
            raise DatasetError(
                f"{path} changed since the run started (its bytes no longer match the digest taken then); "
                "nothing was stored for it: re-run to use the new file"
            )
        return self.decode(key, data)


@dataclass(frozen=True)
class CropLoader(PartLoader):
    """Items that are boxes of image files: `boxes[key]` is the crop of the file `file_of(key)`.

    `banner`: rows at the bottom of every image that no crop may include (FGVC-Aircraft's 20-pixel copyright
    banner); a box reaching into them is cut at the banner's top edge. Boxes are clipped to the image.
    """

    boxes: Mapping[str, Box] = field(default_factory=dict)
    banner: int = 0

    def detail(self, key: str) -> str:
        return "box " + " ".join(str(v) for v in self.boxes[key]) + (f" banner {self.banner}" if self.banner else "")

    def decode(self, key: str, data: bytes | None) -> Image.Image:
        path = self.root / file_of(key)
        source = io.BytesIO(data) if data is not None else open_regular(path)
        with source as handle, Image.open(handle, formats=IMAGE_FORMATS) as image:
            image.load()
            rgb = to_8bit(upright(image, path), path).convert("RGB")
        return rgb.crop(clip_box(self.boxes[key], rgb.size, self.banner))


def clip_box(box: Box, size: tuple[int, int], banner: int = 0) -> Box:
    """`box` clipped to an image of `size` (width, height) whose bottom `banner` rows are left out.

    Raises:
        DatasetError: nothing of the box is left (it lies outside the image or inside the banner).
    """
    width, height = size
    left, top, right, bottom = box
    clipped = (max(left, 0), max(top, 0), min(right, width), min(bottom, height - banner))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise DatasetError(f"crop box {box} lies outside the {width}x{height} image (bottom {banner} rows left out)")
    return clipped


@dataclass(frozen=True)
class NpyRowLoader(PartLoader):
    """Items that are rows of `.npy` arrays of N×(side·side) uint8 bitmaps (QuickDraw): `file.npy#row` is row `row`
    reshaped to side×side, as an RGB image. Boolean arrays are scaled to 0/255 (as Meta-Dataset's conversion does)."""

    reads_bytes = False

    def detail(self, key: str) -> str:
        return f"row {int(key.rsplit(PART_SEPARATOR, 1)[1])}"

    def decode(self, key: str, data: bytes | None) -> Image.Image:
        row = int(key.rsplit(PART_SEPARATOR, 1)[1])
        array = np.load(self.root / file_of(key), mmap_mode="r", allow_pickle=False)
        return bitmap_image(np.asarray(array[row]))


def bitmap_image(row: np.ndarray) -> Image.Image:
    """A flat square bitmap (side·side values) as an RGB image of side×side pixels."""
    side = round(len(row) ** 0.5)
    if side * side != len(row):
        raise DatasetError(f"a bitmap row of {len(row)} values is not a square image")
    pixels = row.astype(np.uint8) * 255 if row.dtype == bool else row.astype(np.uint8)
    return Image.fromarray(pixels.reshape(side, side)).convert("RGB")
