"""What TIR's Sum score and VtT's absorption cost when an episode has hundreds of classes (the all-way protocol of the
CLIP few-shot suite: ImageNet's 1,000). A script, not a test.

    python benchmarks/many_classes.py [--classes 5,100,1000] [--backbone tiny] [--skip-pieces | --skip-steps]

Two parts, each case in its own process (so the peak resident memory is that case's):

1. The pieces, at ViT-B/16's sizes (M = 196 patch tokens, joint width C = 512), without a model: TIR's weights at one
   insertion point (`TokenRecalibration.weights`: the tokens projected and normalized, the class × token cosine
   similarities, `token_weights`' top-k votes and the rule) for a training batch of 32 images and for a prediction
   batch of 256, and what VtT adds per step that depends on the classes (gathering each sample's class texts from the
   per-layer class features `[K, L, C]`, L = 12). The absorption itself (the fused token through the text tower, one
   prompt per sample) does not depend on K.
2. Whole training steps of `lora`, `lora+tir`, `lora+vtt` and `lora+tir+vtt` under recipe clip-lora-release (LoRA on
   both towers: every step encodes the K class prompts with gradients, as the CLIP-LoRA release does) on
   `--backbone` with random weights (default the embedded tiny model, on the CPU), one support image per class,
   batches of 32: seconds per step (median of the timed steps after one warm-up fit) and the peak resident memory.

Times are wall-clock on the machine it runs on; the memory is the process's peak RSS (`ru_maxrss`), model included.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import resource
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

PATCHES, JOINT, WIDTH, LAYERS = 196, 512, 768, 12  # ViT-B/16 at 224 pixels: tokens, joint width, token width, blocks
METHODS = ("lora", "lora+tir", "lora+vtt", "lora+tir+vtt")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", default="5,100,1000", help="class counts K, comma-separated")
    parser.add_argument("--backbone", default="tiny", help="the model of part 2 (random weights)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per case in part 2")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per piece in part 1")
    parser.add_argument("--skip-steps", action="store_true", help="part 1 only")
    parser.add_argument("--skip-pieces", action="store_true", help="part 2 only")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    return parser.parse_args()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _median_seconds(work: Any, repeats: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tir_piece(classes: int, images: int, repeats: int) -> dict[str, Any]:
    """TIR's weights at one insertion point for `images` images and `classes` class texts (ViT-B/16 sizes)."""
    from cdfsl.methods.tir.recalibration import token_weights

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn((1, images, PATCHES, WIDTH), generator=generator)
    projection = torch.randn((WIDTH, JOINT), generator=generator) / math.sqrt(WIDTH)
    text = F.normalize(torch.randn((1, classes, JOINT), generator=generator), dim=-1)

    def weights() -> torch.Tensor:
        with torch.no_grad():
            projected = F.normalize(F.layer_norm(tokens, (WIDTH,)) @ projection, dim=-1)  # [1, B, M, C]
            similarity = torch.einsum("ebmc,ekc->ebkm", projected, text)  # [1, B, K, M]
            return token_weights(similarity, 0.3)

    seconds = _median_seconds(weights, repeats)
    k = math.floor(0.3 * PATCHES)
    # What exists at once that grows with K: the similarities (fp32) and the top-k values (fp32) and indices (int64)
    # that `class_votes` counts from (before it counted them from a [K, M] int64 mark tensor too: + 8 bytes per pair).
    bytes_k = images * classes * (PATCHES * 4 + k * (4 + 8))
    return {
        "piece": "tir_weights", "classes": classes, "images": images, "seconds": seconds,
        "similarity_gflop": 2 * images * PATCHES * classes * JOINT / 1e9,
        "k_dependent_mb": bytes_k / 2**20, "peak_rss_mb": _peak_mb(),
    }  # fmt: skip


def vtt_piece(classes: int, images: int, repeats: int) -> dict[str, Any]:
    """What VtT adds per step that depends on K: each sample's per-layer class texts gathered from `[K, L, C]`."""
    generator = torch.Generator().manual_seed(0)
    class_layers = torch.randn((1, classes, LAYERS, JOINT), generator=generator)
    labels = torch.randint(0, classes, (1, images), generator=generator)
    rows = torch.arange(1)[:, None]

    def gather() -> torch.Tensor:
        return class_layers.detach().float()[rows, labels]  # [1, B, L, C], as `VttExtension.absorption_token`

    seconds = _median_seconds(gather, repeats)
    return {
        "piece": "vtt_class_texts", "classes": classes, "images": images, "seconds": seconds,
        "k_dependent_mb": class_layers.numel() * 4 / 2**20, "peak_rss_mb": _peak_mb(),
    }  # fmt: skip


def training_step(method_name: str, classes: int, backbone_name: str, steps: int) -> dict[str, Any]:
    """Seconds per training step of `method_name` under clip-lora-release with `classes` classes, one image each."""
    from cdfsl.backbone.factory import load_backbone
    from cdfsl.config import RunConfig
    from cdfsl.data.protocols import EpisodeShape
    from cdfsl.engine.autobatch import synthetic_batch
    from cdfsl.methods import build_method

    torch.manual_seed(0)
    device = torch.device("cpu")
    backbone = load_backbone(backbone_name, "none", device)
    config = RunConfig(
        dataset="digits", method=method_name, recipe="clip-lora-release", backbone=backbone_name,
        pretrained="none", ways=classes, shots=1, queries=1, device="cpu",
    )  # fmt: skip
    config.augment.views = ("plain",)
    config.train.iterations = 1
    config = config.resolved()
    shape = EpisodeShape(classes, classes, classes)
    batch = synthetic_batch(config, 1, backbone.image_size, device, shape)
    build_method(config, backbone).fit(batch)  # warm-up
    times = []
    for iterations in (1, 1 + steps):  # the difference is `steps` steps, without the per-fit setup
        config.train.iterations = iterations
        method = build_method(config, backbone)
        start = time.perf_counter()
        method.fit(batch)
        times.append(time.perf_counter() - start)
    return {
        "piece": "training_step", "method": method_name, "classes": classes, "backbone": backbone_name,
        "batch": config.train.batch_size, "seconds_per_step": (times[1] - times[0]) / steps,
        "peak_rss_mb": _peak_mb(),
    }  # fmt: skip


def _in_process(target: Any, *args: Any) -> dict[str, Any]:
    """`target(*args)` in a fresh process (its own peak memory); its result."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(target, args)


def main() -> None:
    args = parse_args()
    counts = [int(c) for c in args.classes.split(",")]
    results: list[dict[str, Any]] = []
    if not args.skip_pieces:
        print(f"pieces at ViT-B/16 sizes (M={PATCHES}, C={JOINT}, L={LAYERS}), CPU, {torch.get_num_threads()} threads")
        print("| piece | K | images | ms | K-dependent MB | peak RSS MB |")
        print("|---|---:|---:|---:|---:|---:|", flush=True)
        for classes in counts:
            cases = [(tir_piece, classes, 32), (tir_piece, classes, 256), (vtt_piece, classes, 32)]
            for piece, k, images in cases:
                r = _in_process(piece, k, images, args.repeats)
                results.append(r)
                print(
                    f"| {r['piece']} | {r['classes']} | {r['images']} | {r['seconds'] * 1e3:.2f} | "
                    f"{r['k_dependent_mb']:.1f} | {r['peak_rss_mb']:.0f} |",
                    flush=True,
                )
    if not args.skip_steps:
        print(f"\ntraining steps, {args.backbone} (random weights), clip-lora-release, batch 32, CPU")
        print("| method | K | s/step | peak RSS MB |")
        print("|---|---:|---:|---:|", flush=True)
        for classes in counts:
            for method in METHODS:
                r = _in_process(training_step, method, classes, args.backbone, args.steps)
                results.append(r)
                print(
                    f"| {r['method']} | {r['classes']} | {r['seconds_per_step']:.3f} | {r['peak_rss_mb']:.0f} |",
                    flush=True,
                )
    if args.json is not None:
        meta = {"date": datetime.now(UTC).isoformat(), "machine": platform.platform(), "torch": torch.__version__}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
