"""The test suite's own trust: batching-equality checks that hold on every CPU (one tolerance, derived in
`episode_batching`, and `make test` running them under several CPU kernel sets)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test_backbone_families
import test_methods_registry
from cdfsl.backbone.factory import load_backbone
from cdfsl.config import RunConfig
from cdfsl.methods import build_method
from digits_world import DigitsWorld, configured
from episode_batching import assert_same_as_alone, logit_scale_of

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")

# The learned prompt context on the PE-Core family: the computation most sensitive to kernel rounding (two SGD steps
# through the causal text tower), where an AVX-512 Xeon first showed batched and single runs apart.
SENSITIVE = {
    "dataset": "digits", "method": "coop", "backbone": "small-pe-core", "pretrained": "none", "queries": 2,
    "device": "cpu",
}  # fmt: skip
SIZES = {"train__iterations": 2, "augment__views": ("plain",)}

SINGLE_RUN = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from cdfsl.backbone.factory import load_backbone
from cdfsl.config import RunConfig
from cdfsl.methods import build_method
from digits_world import DigitsWorld, configured
config = configured(RunConfig(**{config!r}), **{sizes!r})
world = DigitsWorld.of(load_backbone(config.backbone, "none"))
method = build_method(config, world.backbone)
method.fit(world.batch(config, [1]))
torch.save((torch.backends.cpu.get_cpu_capability(), method.predict(world.batch(config, [1]))[0]), {out!r})
"""


def test_a_single_run_on_other_cpu_kernels_agrees_with_the_batch_within_the_tolerance(tmp_path: Path) -> None:
    """The episode run alone in a process on other kernels (`ATEN_CPU_CAPABILITY`) against the batched run here:
    what another CPU would compute. Here that moves logits by up to 3.7e-4 (the former fixed 2e-5 failed); the
    tolerance in cosine units holds."""
    here = torch.backends.cpu.get_cpu_capability()
    other = "avx2" if here == "DEFAULT" else "default"
    out = tmp_path / "alone.pt"
    script = SINGLE_RUN.format(tests=str(ROOT / "tests"), config=SENSITIVE, sizes=SIZES, out=str(out))
    environment = {**os.environ, "ATEN_CPU_CAPABILITY": other}
    subprocess.run([sys.executable, "-c", script], check=True, env=environment, timeout=300)
    capability, alone = torch.load(out)
    if capability == here:
        pytest.skip(f"this CPU offers no kernel set besides {here}")
    config = configured(RunConfig(**SENSITIVE), **SIZES)  # type: ignore[arg-type]
    world = DigitsWorld.of(load_backbone(config.backbone, "none"))
    together = build_method(config, world.backbone)
    together.fit(world.batch(config, [0, 1]))
    assert_same_as_alone(alone, together.predict(world.batch(config, [0, 1]))[1], logit_scale_of(together))


def test_make_test_runs_the_batching_tests_under_each_cpu_kernel_set() -> None:
    """`make test` reruns `-m batching` under ATEN_CPU_CAPABILITY default and avx2, and avx512 where the CPU has it."""
    commands = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    expected = ["default", "avx2"]
    if "avx512f" in Path("/proc/cpuinfo").read_text().split():
        expected.append("avx512")
    assert f"for capability in {' '.join(expected)} ;" in commands
    assert 'ATEN_CPU_CAPABILITY=$capability .venv/bin/python -m pytest -m "batching and not slow" tests/' in commands
    assert "tests/test_backbone_families.py" in commands  # every method on PE-Core's and SigLIP's towers
    assert '[ "$capability" = "$native" ] && continue' in commands  # the first pass ran under the CPU's own set


@pytest.mark.parametrize(
    "test",
    [
        test_backbone_families.test_every_method_runs_on_the_family,
        test_methods_registry.test_fits_predicts_and_episodes_at_once_equal_each_alone,
    ],
)
def test_the_batching_tests_carry_the_marker(test: object) -> None:
    assert "batching" in {mark.name for mark in getattr(test, "pytestmark", [])}


def test_make_test_keeps_the_bounded_learning_checks_only() -> None:
    """`make test` (-m "not slow") runs zero-shot and a smaller `tir` check (3 episodes x 12 steps, under the module's
    budget); the full-size lora and tir runs (tir: 291 s under load) and the pinned accuracies that need them are in
    `make test-slow`."""
    collected = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-o",
            "addopts=",
            "--collect-only",
            "-q",
            "-m",
            "not slow",
            "tests/test_learning.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    kept = sorted(line.partition("::")[2] for line in collected if line.startswith("tests/test_learning.py::"))
    assert kept == [
        "test_shipped_checkpoint_is_present",
        "test_tir_beats_zero_shot_at_a_smaller_size",
        "test_zero_shot_is_above_chance",
    ]
