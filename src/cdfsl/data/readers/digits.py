"""`digits`: scikit-learn's 8x8 handwritten digits, embedded; no data root is read."""

from __future__ import annotations

import numpy as np

from cdfsl.data.decode import DigitsLoader
from cdfsl.data.index import ImageIndex
from cdfsl.data.readers.registry import Reader, register_reader

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def read_digits() -> ImageIndex:
    """scikit-learn's handwritten digits: 1797 8x8 images, grey 0..16 scaled to uint8 and shown as RGB."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(np.asarray(digits.images, dtype=np.float64) * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    keys = [f"digits/{i:05d}" for i in range(len(pixels))]
    pairs = sorted(zip((int(t) for t in digits.target), keys, strict=True))
    return ImageIndex(
        name="digits",
        class_keys=tuple(str(d) for d in range(10)),
        class_names=DIGIT_NAMES,
        items=tuple(key for _, key in pairs),
        labels=tuple(label for label, _ in pairs),
        loader=DigitsLoader(pixels),
        root=None,
    )


register_reader(Reader("digits", read_digits, needs_root=False, layout="scikit-learn's digits, embedded"))
