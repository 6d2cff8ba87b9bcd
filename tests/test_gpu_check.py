"""`make gpu-check` (benchmarks/gpu_check.py): its steps at tiny size on the CPU, so the script never rots, and the
device tests it runs on a lent GPU (marked `gpu`, skipped without CUDA)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from episode_batching import COSINE_TOLERANCE

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import gpu_check  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_host_syncs_are_counted_on_the_cpu() -> None:
    values = torch.arange(4.0)
    with gpu_check.count_host_syncs(torch.device("cpu")) as syncs:
        values.sum().item()
        float(values[0])
        values.tolist()
        values.cpu()
        values * 2  # stays on the device: not counted
    assert syncs() == 4


def test_one_method_benchmarked_at_tiny_size() -> None:
    records = gpu_check.bench_method("lora", "cpu", (1,), iterations=1)
    (record,) = records
    assert record["method"] == "lora" and record["episode_batch"] == 1
    assert record["s_per_iteration"] > 0 and record["images_per_s"] > 0
    assert 0 < record["flop_utilisation"] < 2
    assert record["host_syncs_per_step"] >= 0 and record["peak_mem_mb"] is None


def test_equalities_on_the_cpu() -> None:
    """On the CPU: E at once equals each alone within the batching tolerance; the same fit twice is equal, with or
    without the deterministic switch."""
    result = gpu_check.equality("cpu", iterations=1)
    assert result["at_once_vs_alone_max_diff_cosine"] < COSINE_TOLERANCE
    assert result["same_predictions"]
    assert result["run_to_run"]["default"]["equal"] and result["run_to_run"]["deterministic"]["equal"]


def test_the_table_shows_every_case_and_failure() -> None:
    case = {"method": "lora", "episode_batch": 4, "s_per_iteration": 0.01, "s_per_episode": 0.5,
            "episodes_per_hour": 7200.0, "images_per_s": 1000.0, "peak_mem_mb": 2048.0, "flop_utilisation": 0.42,
            "host_syncs_per_step": 0.0}  # fmt: skip
    result = {
        "date": "2026-12-04T03:00:00+00:00", "seconds": 300.0,
        "environment": {"device": "cuda", "device_model": "NVIDIA H200", "torch": "2.11.0"},
        "tests": {"summary": "3 passed", "exit_code": 0},
        "end_to_end": {"exit_code": 0, "episode_batch": 16, "mean_acc": 23.5, "seconds": 61.0},
        "benchmark": [case, {"method": "vtt", "episode_batch": 16, "error": "out of memory: CUDA"}],
        "equality": {"method": "lora", "at_once_vs_alone_max_diff_cosine": 1e-3, "same_predictions": True,
                     "run_to_run": {"default": {"max_diff_cosine": 1e-4, "equal": False},
                                    "deterministic": {"max_diff_cosine": 0.0, "equal": True}}},
    }  # fmt: skip
    text = gpu_check.table(result)
    assert "| lora | 4 | 0.0100 | 0.50 | 7200 | 1000 | 2048 | 42.0% | 0.0 |" in text
    assert "| vtt | 16 | out of memory: CUDA |" in text
    assert "E = 16, 23.50%" in text and "with --deterministic 0.00e+00 (equal: True)" in text


@pytest.mark.slow
def test_the_whole_check_at_tiny_size_on_the_cpu(tmp_path: Path) -> None:
    """What `make gpu-check DEVICE=cpu` runs (about a minute)."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["tests"]["passed"], result["tests"]
    assert result["end_to_end"]["exit_code"] == 0 and result["end_to_end"]["episode_batch"] >= 1
    cases = [(r["method"], r["episode_batch"]) for r in result["benchmark"] if "error" not in r]
    assert cases == [(m, e) for m in gpu_check.METHODS for e in (1, 2)]
    assert "| tir+vtt | 2 |" in (tmp_path / "table.md").read_text()


# ------------------------------------------------------------------------------------------------ on a GPU only
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
def test_on_cuda_at_once_is_each_alone_to_bf16_tolerance_and_deterministic_repeats() -> None:
    """bf16 autocast rounds to 2^-8 relative: E at once and each alone agree to far less than a training step moves
    the cosines; with --deterministic the same fit twice is equal bit for bit."""
    result = gpu_check.equality("cuda", iterations=2, backbone="tiny")
    assert result["at_once_vs_alone_max_diff_cosine"] < 2e-2, result
    assert result["run_to_run"]["deterministic"]["equal"], result


@pytest.mark.gpu
@cuda
def test_on_cuda_a_training_step_has_no_host_sync() -> None:
    (record,) = gpu_check.bench_method("lora", "cuda", (2,), iterations=3)
    assert "error" not in record and record["peak_mem_mb"] > 0
    assert record["host_syncs_per_step"] < 1, record  # the first step's setup may sync once
