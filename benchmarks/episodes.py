"""Episode throughput per method and episode batch. A script, not a test.

    python benchmarks/episodes.py [--device cpu|cuda] [--json PATH] [--batches 1,4] [--iterations N]

Each case is printed as it finishes. A case that runs out of device memory is printed as such and left out (the
other cases go on). Without `--batches`: 1,4 on the CPU; on CUDA the E of 1, 4, 16, 32, 64 whose estimated peak
(the heaviest method's per-episode memory, measured by a two-iteration fit at E = 1, times E) fits the free memory.

CPU mode: the tiny model (random weights; speed does not depend on their values), 5-way 5-shot, a reduced number of
iterations so the whole run takes a few minutes. `--backbone NAME` takes any supported model (`cdfsl backbones`), e.g.
the small member of each family (`small-clip`, `small-pe-core`, `small-siglip2`) or `PE-Core-B-16` on a GPU. GPU
mode: ViT-B/16 with random weights, 5-way 5-shot, 250 iterations, bf16 autocast. Images are random tensors of the
right shapes, so the data pipeline is not measured here (see `benchmarks/data_pipeline.py`).

Every method runs the `--recipe` loop (default `vtt-release`, the baseline's: the ratios then measure what each plug-in
adds to the same loop; `--recipe default` gives each method its own default recipe).

For each (method, E): one untimed warm-up fit, then `--repeats` timed fits + predictions of E episodes,
interleaved round-robin over the cases; the median is reported. Reported:
seconds per iteration and per episode, episodes per hour, training images per second, peak memory, and the achieved
fraction of the device's dense matmul throughput, with FLOPs counted by `torch.utils.flop_counter` on one training
step and one prediction, and the peak measured by a large matmul on the same device in the same run. Ratios
(`tir/lora`, `vtt/lora` at the largest E; E-batched vs E = 1 for lora) come from this one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from cdfsl.backbone.factory import load_backbone
from cdfsl.config import RunConfig
from cdfsl.engine.autobatch import synthetic_batch
from cdfsl.engine.context import resolve_precision
from cdfsl.methods import build_method

METHODS = ("lora", "tir", "vtt", "tir+vtt")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batches", help="episode batches E, comma-separated (default: cpu 1,4; cuda what fits)")
    parser.add_argument("--iterations", type=int, help="training iterations per episode (default: cpu 20, cuda 250)")
    parser.add_argument("--repeats", type=int, default=1, help="timed repetitions per (method, E)")
    parser.add_argument("--backbone", help="default: tiny on cpu, ViT-B-16 on cuda")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--recipe", default="vtt-release", help="every method's recipe, or 'default' (each its own)")
    return parser.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Achieved dense matmul FLOP/s on a large square product (the device's practical peak): the best of 5 rounds.

    On CPU the product is 2048²: at 1024² the measured rate was ~35% below the large-product rate, which made
    utilisations above 100% possible.
    """
    size = 4096 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    repeats = 20 if device.type == "cuda" else 2
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / best


def episode_flops(config: RunConfig, method_name: str, backbone: Any, dtype: torch.dtype | None) -> float:
    """FLOPs of one episode: `iterations` training steps plus one prediction (counted on one step, E = 1)."""
    trial = _config(config, method_name, iterations=1)
    method = build_method(trial, backbone, dtype)
    batch = synthetic_batch(trial, 1, backbone.image_size, backbone.device)
    with FlopCounterMode(display=False) as step_counter:
        method.fit(batch)
    with FlopCounterMode(display=False) as predict_counter:
        method.predict(batch)
    return step_counter.get_total_flops() * config.train.iterations + predict_counter.get_total_flops()


def _config(base: RunConfig, method: str, iterations: int | None = None) -> RunConfig:
    """`base` for `method` (resolved under `base.recipe`, or the method's default recipe when it is None)."""
    config = copy.deepcopy(base)
    config.method = method
    if iterations is not None:
        config.train.iterations = iterations
    return config.resolved()


def measure_once(config: RunConfig, method_name: str, episodes: int, backbone: Any, dtype: Any) -> float:
    """Seconds for one fit + predict of `episodes` episodes at once."""
    device = backbone.device
    batch = synthetic_batch(config, episodes, backbone.image_size, device)
    method = build_method(_config(config, method_name), backbone, dtype)
    sync(device)
    start = time.perf_counter()
    method.fit(batch)
    method.predict(batch)
    sync(device)
    return time.perf_counter() - start


def warm_up(config: RunConfig, method_name: str, episodes: int, backbone: Any, dtype: Any) -> None:
    batch = synthetic_batch(config, episodes, backbone.image_size, backbone.device)
    build_method(_config(config, method_name, iterations=2), backbone, dtype).fit(batch)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB; process-wide peak RSS


CUDA_BATCHES = (1, 4, 16, 32, 64)


def default_batches(config: RunConfig, methods: list[str], backbone: Any, dtype: Any) -> list[int]:
    """The E of `CUDA_BATCHES` whose estimated peak fits the device's free memory (1,4 on the CPU): per method, a
    two-iteration fit at E = 1 gives its memory above the loaded backbone; the largest of these times E, with a
    fifth more for the allocator's fragmentation, must fit in what is free with the cache emptied."""
    device = backbone.device
    if device.type != "cuda":
        return [1, 4]
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    per_episode = 0
    for method in methods:
        torch.cuda.reset_peak_memory_stats(device)
        try:
            warm_up(config, method, 1, backbone, dtype)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return [1]
        per_episode = max(per_episode, torch.cuda.max_memory_allocated(device) - base)
        torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    fitting = [e for e in CUDA_BATCHES if e * per_episode * 1.2 <= free]
    return fitting or [1]


def out_of_memory(case: tuple[str, int], error: BaseException, device: torch.device) -> str:
    """Report a case that ran out of memory (printed at once) and free what it held."""
    message = f"{case[0]} E={case[1]}: out of memory ({str(error).splitlines()[0]}); left out"
    print(message, flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return message


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    backbone_name = args.backbone or ("ViT-B-16" if cuda else "tiny")
    iterations = args.iterations or (250 if cuda else 20)
    methods = args.methods.split(",")
    recipe = None if args.recipe == "default" else args.recipe
    config = RunConfig(
        dataset="digits", method="lora", recipe=recipe, backbone=backbone_name, pretrained="none", shots=args.shots
    )
    config.train.iterations = iterations
    precision, dtype = resolve_precision("auto", device)
    torch.manual_seed(0)
    backbone = load_backbone(backbone_name, "none", device)
    peak = matmul_peak(device, torch.bfloat16 if cuda else torch.float32)
    views = config.ways * config.shots * len(config.resolved().augment.views)
    batches = (
        [int(b) for b in args.batches.split(",")] if args.batches else default_batches(config, methods, backbone, dtype)
    )
    print(f"{backbone_name} on {device}, E = {', '.join(map(str, batches))}", flush=True)

    def per_step_images(method: str) -> int:
        batch = _config(config, method).train.batch_size
        return views if batch == "all" else min(int(batch), views)

    # Repeats are interleaved round-robin over (method, E), so a burst of load elsewhere hits every case alike;
    # each case reports its median.
    cases = [(m, e) for m in methods for e in batches]
    flops = {m: episode_flops(config, m, backbone, dtype) for m in methods}
    times: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
    peaks: dict[tuple[str, int], float] = {}
    failed: dict[tuple[str, int], str] = {}
    for case in cases:
        try:
            warm_up(config, *case, backbone, dtype)
        except torch.OutOfMemoryError as error:
            failed[case] = out_of_memory(case, error, device)
    for repeat in range(args.repeats):
        for case in cases:
            if case in failed:
                continue
            method_name, episodes = case
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            try:
                seconds = measure_once(config, method_name, episodes, backbone, dtype)
            except torch.OutOfMemoryError as error:
                failed[case] = out_of_memory(case, error, device)
                continue
            times[case].append(seconds)
            peaks[case] = max(peaks.get(case, 0.0), peak_memory_mb(device))
            print(
                f"{method_name} E={episodes} repeat {repeat + 1}/{args.repeats}: {seconds / episodes:.2f} s/episode, "
                f"peak {peaks[case]:.0f} MB",
                flush=True,
            )
    records = []
    for method_name, episodes in (case for case in cases if case not in failed):
        runs = sorted(times[(method_name, episodes)])
        seconds = runs[len(runs) // 2]
        per_episode = seconds / episodes
        records.append(
            {
                "method": method_name,
                "episode_batch": episodes,
                "s_per_iteration": seconds / iterations,
                "s_per_episode": per_episode,
                "episodes_per_hour": 3600.0 / per_episode,
                "images_per_s": per_step_images(method_name) * iterations * episodes / seconds,
                "peak_mem_mb": peaks[(method_name, episodes)],
                "matmul_utilisation": flops[method_name] / per_episode / peak,
            }
        )

    def s_per_episode(method: str, episodes: int) -> float | None:
        match = [r["s_per_episode"] for r in records if r["method"] == method and r["episode_batch"] == episodes]
        return match[0] if match else None

    measured = [e for m, e in cases if (m, e) not in failed] or batches
    largest = max(measured)
    lora = s_per_episode("lora", largest)
    ratios = {
        "tir_over_lora": s_per_episode("tir", largest) / lora if lora and s_per_episode("tir", largest) else None,
        "vtt_over_lora": s_per_episode("vtt", largest) / lora if lora and s_per_episode("vtt", largest) else None,
        "batched_speedup": (s_per_episode("lora", 1) / lora) if lora and s_per_episode("lora", 1) else None,
    }
    result = {
        "device": torch.cuda.get_device_name(device)
        if cuda
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "backbone": backbone_name,
        "precision": precision,
        "shots": config.shots,
        "recipe": args.recipe,
        "iterations": iterations,
        "peak_matmul_tflops": peak / 1e12,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "records": records,
        "ratios": ratios,
        "out_of_memory": list(failed.values()),
    }
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['backbone']} on {result['device']}, {result['precision']}, 5-way {result['shots']}-shot, "
        f"{result['iterations']} iterations, recipe {result['recipe']}; measured matmul peak "
        f"{result['peak_matmul_tflops']:.3f} TFLOP/s",
        "",
        "| method | E | s/iteration | s/episode | episodes/hour | images/s | peak MB | matmul util. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["records"]:
        lines.append(
            f"| {r['method']} | {r['episode_batch']} | {r['s_per_iteration']:.4f} | {r['s_per_episode']:.2f} | "
            f"{r['episodes_per_hour']:.0f} | {r['images_per_s']:.0f} | {r['peak_mem_mb']:.0f} | "
            f"{100 * r['matmul_utilisation']:.1f}% |"
        )
    ratios = result["ratios"]
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in ratios.items() if value is not None]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
