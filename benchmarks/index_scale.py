"""Indexing and content fingerprint on a large folder tree (ImageNet's layout). Not a test.

    python benchmarks/index_scale.py [--files 100000] [--classes 1000] [--json PATH]

Writes an ImageNet-like tree of tiny PNGs (8x8, distinct pixels) to a temporary directory: `images/train/<wnid>/` and
`images/val/<wnid>/` (one file in five is a val image) and `classnames.txt`. Then times, with the digest cache in the
temporary directory:

- indexing: the `imagenet` reader (`Benchmark.read_splits`: listing with `os.scandir` and the builder's readability
  check, which opens every file for its header and end marker);
- the cold fingerprint: every file hashed, digests written to the cache;
- the warm fingerprint: a new index (read again, as a later run does), its digests from the cache;
- the test split of the episodic path (`Benchmark.read`, indexing + `split("test")`) and its warm fingerprint.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cdfsl.data.benchmarks import DATASETS


def write_tree(root: Path, files: int, classes: int) -> Path:
    """`files` tiny PNGs in ImageNet's layout under `root`, spread evenly over `classes` wnid folders."""
    rng = np.random.default_rng(0)
    wnids = [f"n{index:08d}" for index in range(classes)]
    for wnid in wnids:
        (root / "images" / "train" / wnid).mkdir(parents=True)
        (root / "images" / "val" / wnid).mkdir(parents=True)
    (root / "classnames.txt").write_text("".join(f"{wnid} class {index}\n" for index, wnid in enumerate(wnids)))
    buffer = io.BytesIO()
    for number in range(files):
        wnid = wnids[number % classes]
        split = "val" if number % 5 == 4 else "train"
        buffer.seek(0)
        buffer.truncate()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
        (root / "images" / split / wnid / f"{wnid}_{number:07d}.JPEG").write_bytes(buffer.getvalue())
    return root


def timed(action):
    start = time.perf_counter()
    value = action()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    benchmark = DATASETS["imagenet"]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CDFSL_CACHE_DIR"] = str(Path(tmp) / "digests")
        root, written = timed(lambda: write_tree(Path(tmp) / "imagenet", args.files, args.classes))
        index, indexing = timed(lambda: benchmark.read_splits(root))
        _, cold = timed(index.fingerprint)
        again, reindexing = timed(lambda: benchmark.read_splits(root))
        _, warm = timed(again.fingerprint)
        episodic, episodic_indexing = timed(lambda: benchmark.read(root))
        _, episodic_warm = timed(episodic.fingerprint)
    results = {
        "files": len(index.items),
        "classes": index.num_classes,
        "test_files": len(episodic.items),
        "write_s": round(written, 2),
        "index_s": round(indexing, 2),
        "fingerprint_cold_s": round(cold, 2),
        "reindex_s": round(reindexing, 2),
        "fingerprint_warm_s": round(warm, 2),
        "episodic_index_s": round(episodic_indexing, 2),
        "episodic_fingerprint_warm_s": round(episodic_warm, 2),
        "files_per_s": {
            "index": round(len(index.items) / indexing),
            "fingerprint_cold": round(len(index.items) / cold),
            "fingerprint_warm": round(len(index.items) / warm),
        },
    }
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
