"""Memory of one episode at Meta-Dataset's largest shape (50 classes, 500 supports, 10 queries a class) on the CPU.
A script, not a test.

    python benchmarks/md_memory.py [--methods lora,vtt] [--backbone ViT-B-16] [--iterations 1] [--predict]

Each method runs in a fresh subprocess (so its peak RSS is its own): ViT-B/16 with random weights (`pretrained none`;
memory does not depend on the weights' values), the method's default recipe, one synthetic episode of the protocol's
largest shape (`EpisodeLimits().largest`, random images as `--episode-batch auto`'s trials use), `--iterations`
training steps. Reported per method:

- `inputs`: the episode's image tensors (support views and queries, float32), what a batch holds per episode;
- `saved`: the bytes autograd saved for backward during the fit (`torch.autograd.graph.saved_tensors_hooks`, each
  storage once, the backbone's own weights left out): the activation memory a training step needs per episode;
- `peak_rss`: the process's peak resident memory over loading, the fit (and with `--predict` the prediction of the
  500 queries), the weights included.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="lora,vtt")
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--predict", action="store_true", help="also predict the 500 queries (slow on a CPU)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a method measured in this process (the subprocess)
    return parser.parse_args()


def measure(method_name: str, backbone: str, iterations: int, predict: bool) -> dict[str, object]:
    """One method's numbers (module docstring), in this process."""
    import torch

    from cdfsl.config import RunConfig
    from cdfsl.data.md_sampler import EpisodeLimits
    from cdfsl.engine.autobatch import synthetic_batch
    from cdfsl.engine.context import build_context
    from cdfsl.methods import build_method

    config = RunConfig(dataset="digits", method=method_name, backbone=backbone, pretrained="none", device="cpu")
    config.protocol = "meta-dataset"
    config.train.iterations = iterations
    context = build_context(config, load_data=False)
    shape = EpisodeLimits().largest
    batch = synthetic_batch(context.config, 1, context.backbone.image_size, torch.device("cpu"), shape)
    method = build_method(context.config, context.backbone, context.autocast_dtype)
    weights = {p.untyped_storage().data_ptr() for p in context.backbone.model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    started = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        method.fit(batch)
    fit_seconds = time.perf_counter() - started
    if predict:
        method.predict(batch)
    inputs = batch.support.numel() * batch.support.element_size() + batch.query.numel() * batch.query.element_size()
    return {
        "method": method_name,
        "recipe": context.config.recipe,
        "shape": {"ways": shape.ways, "supports": shape.supports, "queries": shape.queries},
        "support_views": int(batch.support.shape[1]),
        "batch_size": context.config.train.batch_size,
        "iterations": iterations,
        "inputs_mib": round(inputs / MIB, 1),
        "saved_mib": round(sum(saved.values()) / MIB, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "fit_seconds": round(fit_seconds, 1),
        "predicted": predict,
    }


def main() -> None:
    args = parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.backbone, args.iterations, args.predict)))
        return
    print(f"# {platform.processor() or platform.machine()}, {platform.python_version()}, backbone {args.backbone}")
    for method in args.methods.split(","):
        command = [sys.executable, __file__, "--one", method, "--backbone", args.backbone]
        command += ["--iterations", str(args.iterations)] + (["--predict"] if args.predict else [])
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{method}: failed\n{done.stderr}", file=sys.stderr)
            continue
        print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
