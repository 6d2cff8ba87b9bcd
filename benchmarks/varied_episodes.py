"""Episodes of different shapes: grouped by shape (what the engine does) against one batch padded to the largest shape
(an upper bound of the compute a padded design would spend). A script, not a test.

    python benchmarks/varied_episodes.py [--method lora] [--iterations 10] [--ways 3,5,7] [--episodes 8] [--repeats 3]

The tiny model on the CPU (random weights), `--episodes` episodes whose ways cycle through `--ways`, each `--shots`
shots and `--queries` queries per class, random images of the right shapes. Grouped: one fit + prediction per shape,
with E = the episodes of that shape. Padded: one fit + prediction of all episodes at once, every one at the largest
shape. Timed fits are interleaved (grouped, padded, grouped, ...) after one untimed warm-up of each; medians reported.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections import Counter

import torch

from cdfsl.backbone.factory import load_backbone
from cdfsl.config import RunConfig
from cdfsl.data.protocols import EpisodeShape
from cdfsl.engine.autobatch import synthetic_batch
from cdfsl.methods import build_method


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="lora")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--ways", default="3,5,7")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def fit_seconds(config: RunConfig, backbone: object, shape: EpisodeShape, episodes: int) -> float:
    """Seconds for one fit + prediction of `episodes` synthetic episodes of `shape`."""
    batch = synthetic_batch(config, episodes, backbone.image_size, torch.device("cpu"), shape)  # type: ignore[attr-defined]
    method = build_method(config, backbone, None)  # type: ignore[arg-type]
    start = time.perf_counter()
    method.fit(batch)
    method.predict(batch)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    ways = [int(w) for w in args.ways.split(",")]
    config = RunConfig(dataset="digits", method=args.method, backbone="tiny", pretrained="none", device="cpu")
    config.shots, config.queries = args.shots, args.queries
    config.train.iterations = args.iterations
    config = config.resolved()
    backbone = load_backbone("tiny", "none", torch.device("cpu"))
    counts = Counter(ways[i % len(ways)] for i in range(args.episodes))
    shapes = {k: EpisodeShape(k, k * args.shots, k * args.queries) for k in counts}
    largest = shapes[max(counts)]

    def grouped() -> float:
        return sum(fit_seconds(config, backbone, shapes[k], n) for k, n in counts.items())

    def padded() -> float:
        return fit_seconds(config, backbone, largest, args.episodes)

    grouped(), padded()  # warm-up
    times: dict[str, list[float]] = {"grouped": [], "padded": []}
    for _ in range(args.repeats):
        times["grouped"].append(grouped())
        times["padded"].append(padded())
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"{args.method}, {args.iterations} iterations, {args.episodes} episodes of {dict(sorted(counts.items()))} "
        f"(ways: episodes), {args.shots}-shot, {args.queries} queries, recipe {config.recipe}"
    )
    print("| design | median s | runs (s) |")
    print("|---|---:|---|")
    for name, values in times.items():
        print(f"| {name} | {median[name]:.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    print(f"padded / grouped = {median['padded'] / median['grouped']:.2f}")


if __name__ == "__main__":
    main()
