"""Image pipeline throughput: content fingerprint, decoding every time vs the memory and disk caches. Not a test.

    python benchmarks/data_pipeline.py [--images 200] [--side 1024] [--size 224] [--json PATH]

Writes a ChestX-like image folder (grey PNGs of `side`² pixels) to a temporary directory, then measures images per
second for: the index's content fingerprint (every file hashed, then again from the digest cache with a new index,
as a later run does), decode + resize every time (a fresh cache per pass), the in-memory cache (second pass), and the
disk cache (a new index and cache instance reading `.npy` files written by an earlier one, as a new process does),
plus the support-view augmentation on the CPU. The digest cache lives in the temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cdfsl.data.augment import support_views
from cdfsl.data.images import ImageCache
from cdfsl.data.readers import load_index


def write_folder(root: Path, images: int, side: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / f"class{i % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (side, side), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:05d}.png")
    return root


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--side", type=int, default=1024, help="side of the stored PNGs (ChestX: 1024)")
    parser.add_argument("--size", type=int, default=224, help="model input size")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CDFSL_CACHE_DIR"] = str(Path(tmp) / "digests")
        root = write_folder(Path(tmp) / "data", args.images, args.side)
        index = load_index("imagefolder", root)
        positions = list(range(len(index.items)))
        cache_dir = Path(tmp) / "cache"

        start = time.perf_counter()
        index.fingerprint()
        hashed = rate(len(positions), time.perf_counter() - start)
        start = time.perf_counter()
        load_index("imagefolder", root).fingerprint()
        remembered = rate(len(positions), time.perf_counter() - start)

        start = time.perf_counter()
        ImageCache(index, args.size).get(positions)
        decode = rate(len(positions), time.perf_counter() - start)

        memory_cache = ImageCache(index, args.size, cache_dir)
        memory_cache.get(positions)  # fills memory and disk
        start = time.perf_counter()
        images = memory_cache.get(positions)
        memory = rate(len(positions), time.perf_counter() - start)

        start = time.perf_counter()
        ImageCache(load_index("imagefolder", root), args.size, cache_dir).get(positions)
        disk = rate(len(positions), time.perf_counter() - start)

        views = ("plain", "rotate+jitter+flip", "rotate", "jitter", "flip")
        start = time.perf_counter()
        support_views(images.float() / 255.0, views, torch.Generator().manual_seed(0))
        augment = rate(len(positions) * len(views), time.perf_counter() - start)

    result = {
        "images": args.images,
        "stored_side": args.side,
        "model_size": args.size,
        "fingerprint_hashing_images_per_s": hashed,
        "fingerprint_cached_digests_images_per_s": remembered,
        "decode_every_time_images_per_s": decode,
        "memory_cache_images_per_s": memory,
        "disk_cache_images_per_s": disk,
        "augmented_views_per_s_cpu": augment,
    }
    print(f"{args.images} grey PNGs of {args.side}² px → {args.size}² px\n")
    print("| path | images/s |\n|---|---:|")
    print(f"| content fingerprint, hashing every file | {hashed:.0f} |")
    print(f"| content fingerprint, digests cached (new index) | {remembered:.0f} |")
    print(f"| decode + resize every time | {decode:.0f} |")
    print(f"| memory cache | {memory:.0f} |")
    print(f"| disk cache (new index, as a new process) | {disk:.0f} |")
    print(f"| support views, 5 per image (CPU) | {augment:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
