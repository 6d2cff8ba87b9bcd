"""One check for a lent GPU: device tests, an end-to-end run, the benchmark, equalities and host syncs. A script.

    python benchmarks/gpu_check.py [--device cuda|cpu] [--out gpu-check]      (what `make gpu-check` runs)

Steps, each recorded in `<out>/out.json` and summed up in `<out>/table.md` (Markdown, ready for
`benchmarks/RESULTS.md`):

1. `tests`: the device tests (`pytest -m gpu`: skipped without CUDA) in a process of their own.
2. `end_to_end`: `cdfsl run --method tir+vtt --episode-batch auto` on digits (ViT-B/16 with random weights on CUDA,
   the tiny model on the CPU), in a process of its own: the episode batch `auto` chose, seconds, accuracy.
3. `benchmark`: per method (`lora`, `tir`, `vtt`, `tir+vtt`), on CUDA in a process of its own (so one method's
   memory never counts in another's peak), E = 1/4/16 on CUDA (1/2 on the CPU) of synthetic 5-way 5-shot episodes
   (CPU: 1-shot, 3 queries a class) in the method's default recipe: seconds per iteration, episodes per hour, images
   per second, peak memory, the utilisation of the counted FLOPs (`analysis.cost.flop_counter` on one step and one
   prediction, against a large matrix product timed in the same process: the device's practical peak) and host
   syncs per training step. A case that runs out of memory is recorded as such and the larger E are skipped.
4. `equality`: E episodes fitted at once against each alone (largest difference of the logits in cosine units), and
   the same fit run twice, without and with `--deterministic` (largest difference, and whether they are equal).

On the CPU every step runs on one thread (`OMP_NUM_THREADS=1` in its processes): the tiny model's ops are too small
to gain from threads, which on a busy machine slow them many times over.

Host syncs are counted while the timed fit runs: on CUDA, the warnings of `torch.cuda.set_sync_debug_mode("warn")`
(every copy to the host, `.item()`, a synchronizing `nonzero`, …); on the CPU, where nothing synchronizes, the calls
that would (`.item()`, `.tolist()`, `.cpu()`, `float()`/`int()`/`bool()` of a tensor, copies to the host, …), counted
by the test suite's counter (`cdfsl.methods.host_syncs.HostSyncCounter`). Both are divided by the training steps.
The CPU count is an upper bound: it also counts calls on tensors that stay on the host in a GPU run too (a view's
parameters drawn on the CPU), which never synchronize.

`--device cpu` runs all of it at tiny sizes (the tiny model, 1-shot, E = 1/2, 2 iterations) in about a minute; on
one GPU the whole check takes about 5 minutes (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from episodes import matmul_peak, sync  # benchmarks/episodes.py (this script's folder is on sys.path)

METHODS = ("lora", "tir", "vtt", "tir+vtt")
ROOT = Path(__file__).resolve().parents[1]
DEVICE_TESTS = ("tests/test_gpu_check.py", "tests/test_pipeline.py")  # the files with tests marked gpu


def sizes(device: str) -> dict[str, Any]:
    """What each step runs on `device`: the full check on CUDA, tiny sizes on the CPU."""
    if device == "cuda":
        return {
            "backbone": "ViT-B-16",
            "shots": 5,
            "queries": 15,
            "batches": (1, 4, 16),
            "iterations": 30,
            "e2e_episodes": 8,
            "e2e_iterations": 20,
        }
    return {
        "backbone": "tiny",
        "shots": 1,
        "queries": 3,
        "batches": (1, 2),
        "iterations": 2,
        "e2e_episodes": 2,
        "e2e_iterations": 2,
    }


# ------------------------------------------------------------------------------------------------ host syncs
@contextmanager
def count_host_syncs(device: torch.device) -> Iterator[Callable[[], int]]:
    """Count host synchronizations inside the block; yields a function that returns the count so far."""
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield lambda: sum("synchroniz" in str(w.message) for w in caught)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return
    from cdfsl.methods.host_syncs import HostSyncCounter

    with HostSyncCounter(device) as counter:
        yield lambda: counter.total


# ------------------------------------------------------------------------------------------------ benchmark
def method_config(method: str, backbone: str, iterations: int, device: str) -> Any:
    from cdfsl.config import RunConfig

    size = sizes(torch.device(device).type)
    config = RunConfig(
        dataset="digits",
        method=method,
        backbone=backbone,
        pretrained="none",
        shots=size["shots"],
        queries=size["queries"],
        device=device,
    )
    config = config.resolved()
    config.train.iterations = iterations
    return config


def bench_method(method: str, device_name: str, batches: tuple[int, ...], iterations: int) -> list[dict[str, Any]]:
    """The benchmark cases of one method, E ascending (see the module docstring); stops at the first E that runs
    out of memory."""
    from cdfsl.analysis.cost import flop_counter
    from cdfsl.backbone.factory import load_backbone
    from cdfsl.engine.autobatch import synthetic_batch
    from cdfsl.engine.context import resolve_precision
    from cdfsl.methods import build_method

    device = torch.device(device_name)
    backbone_name = sizes(device.type)["backbone"]
    torch.manual_seed(0)
    backbone = load_backbone(backbone_name, "none", device)
    _, dtype = resolve_precision("auto", device)
    peak = matmul_peak(device, dtype or torch.float32)
    config = method_config(method, backbone_name, iterations, device_name)
    one_step = method_config(method, backbone_name, 1, device_name)
    batch = synthetic_batch(one_step, 1, backbone.image_size, device)
    with flop_counter() as counter:
        build_method(one_step, backbone, dtype).fit(batch)
        build_method(one_step, backbone, dtype).predict(batch)
    step_flops = counter.get_total_flops()  # one step, counted with the prediction of a model that never trained
    views = config.ways * config.shots * len(config.augment.views)
    per_step = views if config.train.batch_size == "all" else min(int(config.train.batch_size), views)
    records: list[dict[str, Any]] = []
    for episodes in batches:
        record: dict[str, Any] = {"method": method, "episode_batch": episodes}
        try:
            batch = synthetic_batch(config, episodes, backbone.image_size, device)
            build_method(method_config(method, backbone_name, 2, device_name), backbone, dtype).fit(batch)  # warm-up
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            model = build_method(config, backbone, dtype)
            sync(device)
            with count_host_syncs(device) as syncs:
                start = time.perf_counter()
                model.fit(batch)
                sync(device)
                fit_seconds = time.perf_counter() - start
                fit_syncs = syncs()
            model.predict(batch)
            sync(device)
            seconds = time.perf_counter() - start
        except torch.OutOfMemoryError as error:
            record["error"] = f"out of memory: {str(error).splitlines()[0]}"
            records.append(record)
            torch.cuda.empty_cache()
            break
        per_episode = seconds / episodes
        flops = step_flops * iterations * episodes  # steps scale with E; the prediction's share is small
        record.update(
            s_per_iteration=fit_seconds / iterations,
            s_per_episode=per_episode,
            episodes_per_hour=3600.0 / per_episode,
            images_per_s=per_step * iterations * episodes / fit_seconds,
            peak_mem_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            flop_utilisation=flops / seconds / peak,
            host_syncs_per_step=fit_syncs / iterations,
            peak_tflops=peak / 1e12,
        )
        records.append(record)
        print(json.dumps(record), flush=True)
    return records


# ------------------------------------------------------------------------------------------------ equality
def equality(
    device_name: str, method: str = "lora", iterations: int = 3, backbone: str | None = None
) -> dict[str, Any]:
    """E = 2 at once against each alone, and the same fit twice without and with the deterministic switch
    (`backbone`: the step's default for the device when None)."""
    from cdfsl.backbone.factory import load_backbone
    from cdfsl.engine.autobatch import synthetic_batch
    from cdfsl.engine.context import resolve_precision
    from cdfsl.engine.reproducibility import deterministic_mode
    from cdfsl.methods import build_method

    device = torch.device(device_name)
    backbone_name = backbone or sizes(device.type)["backbone"]
    torch.manual_seed(0)
    model_backbone = load_backbone(backbone_name, "none", device)
    _, dtype = resolve_precision("auto", device)
    config = method_config(method, backbone_name, iterations, device_name)
    batch = synthetic_batch(config, 2, model_backbone.image_size, device)  # episodes 0 and 1, each its own images

    scales: list[float] = []

    def logits(of: Any, deterministic: bool = False) -> torch.Tensor:
        with deterministic_mode(deterministic):
            model = build_method(config, model_backbone, dtype)
            model.fit(of)
            if not scales:  # the logit of a unit vector against itself: one cosine in logit units
                unit = torch.nn.functional.normalize(torch.ones(1, 1, model_backbone.embed_dim, device=device), dim=-1)
                scales.append(float(model.logits(unit, unit)[0, 0, 0]))
            return model.predict(of).float()

    together = logits(batch)  # [E, Q, K]
    alone = torch.cat([logits(_slice(batch, e)) for e in range(2)])
    scale = scales[0]
    runs = {}
    for deterministic in (False, True):
        first, second = logits(batch, deterministic), logits(batch, deterministic)
        runs["deterministic" if deterministic else "default"] = {
            "max_diff_cosine": float((first - second).abs().max()) / scale,
            "equal": bool(torch.equal(first, second)),
        }
    return {
        "method": method,
        "iterations": iterations,
        "at_once_vs_alone_max_diff_cosine": float((together - alone).abs().max()) / scale,
        "same_predictions": bool(torch.equal(together.argmax(-1), alone.argmax(-1))),
        "run_to_run": runs,
    }


def _slice(batch: Any, e: int) -> Any:
    import dataclasses

    return dataclasses.replace(
        batch,
        episodes=batch.episodes[e : e + 1],
        class_names=batch.class_names[e : e + 1],
        support=batch.support[e : e + 1],
        support_labels=batch.support_labels[e : e + 1],
        query=batch.query[e : e + 1],
        query_labels=batch.query_labels[e : e + 1],
    )


# ------------------------------------------------------------------------------------------------ steps
def child(args: list[str], timeout: float) -> tuple[int, str, float]:
    """Run `python args` from the repository root with this process's environment (and its thread count);
    (exit code, output, seconds)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        code, output = 124, f"timed out after {timeout:.0f} s: {error.stdout or ''}"
    return code, output, time.perf_counter() - start


def run_tests(device: str) -> dict[str, Any]:
    # Not -q: the project's addopts has it already, and -qq would drop the summary line read below.
    code, output, seconds = child(["-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", *DEVICE_TESTS], timeout=240)
    words = ("passed", "skipped", "failed", "error", "deselected", "no tests")
    summaries = [line.strip("= ") for line in output.splitlines() if any(word in line for word in words)]
    summary = summaries[-1] if summaries else output.strip()[-200:]
    return {"exit_code": code, "passed": code in (0, 5), "summary": summary, "seconds": round(seconds, 1)}


def end_to_end(device: str, out: Path) -> dict[str, Any]:
    size = sizes(device)
    summary = out / "e2e.json"
    for stale in (summary, out / "e2e.sqlite"):
        stale.unlink(missing_ok=True)
    args = ["-m", "cdfsl", "run", "--dataset", "digits", "--method", "tir+vtt", "--backbone", size["backbone"],
            "--pretrained", "none", "--shots", str(size["shots"]), "--episodes", str(size["e2e_episodes"]),
            "--iterations", str(size["e2e_iterations"]), "--episode-batch", "auto", "--device", device,
            "--db", str(out / "e2e.sqlite"), "--json", str(summary)]  # fmt: skip
    code, output, seconds = child(args, timeout=300)
    result: dict[str, Any] = {"exit_code": code, "seconds": round(seconds, 1)}
    if code == 0 and summary.is_file():
        data = json.loads(summary.read_text())
        result.update(episode_batch=data["config"]["episode_batch"], mean_acc=data["mean_acc"], run_id=data["run_id"])
    else:
        result["output"] = output[-2000:]
    return result


def benchmark(device: str) -> list[dict[str, Any]]:
    """Every method's cases, each method in a process of its own on CUDA (its own peak memory); on the CPU, where
    no peak is measured, in this process (no torch import and model load per method)."""
    size = sizes(device)
    records: list[dict[str, Any]] = []
    for method in METHODS:
        if device == "cpu":
            start = time.perf_counter()
            cases = bench_method(method, device, size["batches"], size["iterations"])
            records.extend(cases)
            print(f"benchmark {method}: {len(cases)} cases in {time.perf_counter() - start:.0f} s", flush=True)
            continue
        args = [str(Path(__file__).resolve()), "--device", device, "--bench", method]
        code, output, seconds = child(args, timeout=240)
        lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        if code != 0 and not lines:
            lines = [{"method": method, "episode_batch": size["batches"][0], "error": output.strip()[-500:]}]
        records.extend(lines)
        print(f"benchmark {method}: {len(lines)} cases in {seconds:.0f} s", flush=True)
    return records


def table(result: dict[str, Any]) -> str:
    """The Markdown summary of a check."""
    env = result["environment"]
    tests, e2e = result["tests"], result["end_to_end"]
    lines = [
        f"gpu-check on {env['device_model']} ({env['device']}), torch {env['torch']}, {result['date']}, "
        f"{result['seconds']:.0f} s",
        "",
        f"- device tests: {tests['summary'] or tests['exit_code']}",
        "- end-to-end `tir+vtt --episode-batch auto`: "
        + (
            f"E = {e2e['episode_batch']}, {e2e['mean_acc']:.2f}%, {e2e['seconds']:.0f} s"
            if "episode_batch" in e2e
            else f"failed ({e2e['exit_code']})"
        ),
        "",
        "| method | E | s/iteration | s/episode | episodes/hour | images/s | peak MB | FLOP util. | syncs/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["benchmark"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['episode_batch']} | {r['error'][:60]} | | | | | | |")
            continue
        peak = "–" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(
            f"| {r['method']} | {r['episode_batch']} | {r['s_per_iteration']:.4f} | {r['s_per_episode']:.2f} | "
            f"{r['episodes_per_hour']:.0f} | {r['images_per_s']:.0f} | {peak} | {100 * r['flop_utilisation']:.1f}% | "
            f"{r['host_syncs_per_step']:.1f} |"
        )
    eq = result["equality"]
    if "error" not in eq:
        runs = eq["run_to_run"]
        lines += [
            "",
            f"- {eq['method']}, E = 2 at once vs each alone: largest difference "
            f"{eq['at_once_vs_alone_max_diff_cosine']:.2e} (cosine units), same predictions: {eq['same_predictions']}",
            f"- the same fit twice: {runs['default']['max_diff_cosine']:.2e} (equal: {runs['default']['equal']}); "
            f"with --deterministic {runs['deterministic']['max_diff_cosine']:.2e} "
            f"(equal: {runs['deterministic']['equal']})",
        ]
    else:
        lines += ["", f"- equality: {eq['error']}"]
    return "\n".join(lines) + "\n"


def environment(device: str) -> dict[str, Any]:
    from cdfsl.engine.reproducibility import device_model

    return {"device": device, "device_model": device_model(torch.device(device)), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-check", help="folder for out.json and table.md")
    parser.add_argument("--bench", choices=METHODS, help=argparse.SUPPRESS)  # one method's cases, in this process
    parser.add_argument("--skip", default="", help="steps to leave out, comma-separated: tests,e2e,bench,equality")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)  # the tiny model's ops gain nothing from threads, which on a busy CPU slow them
    if args.bench:
        size = sizes(args.device)
        bench_method(args.bench, args.device, size["batches"], size["iterations"])
        return
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    result: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds")}
    result["environment"] = environment(args.device)
    print(f"gpu-check on {result['environment']['device_model']}", flush=True)
    result["tests"] = {"summary": "skipped", "exit_code": None} if "tests" in skip else run_tests(args.device)
    print(f"device tests: {result['tests']['summary']}", flush=True)
    result["end_to_end"] = {"exit_code": None} if "e2e" in skip else end_to_end(args.device, args.out)
    print(f"end to end: {result['end_to_end']}", flush=True)
    result["benchmark"] = [] if "bench" in skip else benchmark(args.device)
    try:
        result["equality"] = {"error": "skipped"} if "equality" in skip else equality(args.device)
    except Exception as error:  # reported in the table; the other steps' results still count
        result["equality"] = {"error": f"{type(error).__name__}: {error}"}
    result["seconds"] = time.perf_counter() - started
    (args.out / "out.json").write_text(json.dumps(result, indent=2))
    markdown = table(result)
    (args.out / "table.md").write_text(markdown)
    print(markdown, flush=True)


if __name__ == "__main__":
    main()
