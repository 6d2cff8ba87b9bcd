"""The fed pipeline on the CPU: with a slow loader a run takes about max(load, train) per batch, not their sum.

    python benchmarks/pipeline_overlap.py [--batches 6] [--iterations 10] [--load SECONDS] [--json PATH]

A real run (`cdfsl.Runner`: lora on digits, the tiny model with random weights, 5-way 1-shot, one episode per
batch) whose batch building (`build_batch`: decoding, views, copies) is slowed by a sleep of `--load` seconds per
batch, standing for a slow disk or a slow decoder (a sleep releases the GIL as Pillow's decoding does). Three runs,
each in a fresh store and with the backbone and images loaded beforehand:

- `train`: no sleep: the training time per batch, T;
- `sequential`: the sleep, with the feed's look-ahead turned off: each batch is built, then trained (≈ L + T each);
- `fed`: the sleep, the feed on: the next batch is built while this one trains (≈ max(L, T) each, plus one L).

`--load` defaults to the measured T, where the gain is largest (the sum is twice the max). The accuracies of the
three runs are equal (the same episodes and views); the script checks it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import cdfsl.engine.context as context_module
from cdfsl.config import RunConfig
from cdfsl.engine.prefetch import BatchFeed
from cdfsl.engine.runner import Runner


def config(db: Path, batches: int, iterations: int) -> RunConfig:
    run = RunConfig(
        dataset="digits", method="lora", backbone="tiny", pretrained="none", shots=1, episodes=batches, device="cpu",
        episode_batch=1, db=str(db),
    )  # fmt: skip
    run.train.iterations = iterations
    return run


def timed_run(runner: Runner, run: RunConfig, load: float, look_ahead: bool) -> tuple[float, list[Any]]:
    original = context_module.build_batch

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(load)
        return original(*args, **kwargs)

    prepare = BatchFeed.prepare if look_ahead else lambda *a, **k: None
    with mock.patch.object(context_module, "build_batch", slow), mock.patch.object(BatchFeed, "prepare", prepare):
        start = time.perf_counter()
        result = runner.run(run)
        return time.perf_counter() - start, result.per_episode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=10, help="training iterations per episode")
    parser.add_argument("--load", type=float, help="seconds of sleep per batch built (default: the training time)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runner = Runner()
    with tempfile.TemporaryDirectory() as folder:
        stores = iter(Path(folder, f"{n}.sqlite") for n in range(5))
        timed_run(runner, config(next(stores), 1, 1), 0.0, True)  # loads the backbone and the images
        train, reference = timed_run(runner, config(next(stores), args.batches, args.iterations), 0.0, True)
        per_batch = train / args.batches
        load = per_batch if args.load is None else args.load
        sequential, plain = timed_run(runner, config(next(stores), args.batches, args.iterations), load, False)
        fed, overlapped = timed_run(runner, config(next(stores), args.batches, args.iterations), load, True)
    if not reference == plain == overlapped:
        raise SystemExit("the three runs' accuracies differ: the pipeline changed a result")
    result = {
        "batches": args.batches,
        "iterations": args.iterations,
        "train_s_per_batch": per_batch,
        "load_s_per_batch": load,
        "sequential_s": sequential,
        "fed_s": fed,
        "sum_model_s": args.batches * (load + per_batch),
        "max_model_s": load + args.batches * max(load, per_batch),
    }
    print(
        f"{args.batches} batches, train {per_batch:.2f} s and load {load:.2f} s per batch\n"
        f"sequential {sequential:.2f} s (sum: {result['sum_model_s']:.2f} s)\n"
        f"fed        {fed:.2f} s (max: {result['max_model_s']:.2f} s)\n"
        f"speed-up   {sequential / fed:.2f}x"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
