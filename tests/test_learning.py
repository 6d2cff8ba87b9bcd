"""Learning on the embedded tiny CLIP and digits: a broken training loop, loss or method fails here.

Uses the shipped checkpoint (`--backbone tiny`) and six fixed 5-shot episodes, each method on its default recipe with
fewer iterations: `lora` (vtt-release) 120 of its 250 iterations, `tir` (tir-release) 24 of its 100 full-support steps.
The per-episode results are also pinned (fp32 CPU path), so speed work that changes any prediction is caught. `make
test` runs zero-shot and a smaller `tir` check (the budget below); `make test-slow` runs the full-size checks of both
trained methods and the pinned accuracies.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cdfsl.config import RunConfig
from cdfsl.engine.runner import Runner, RunResult

EPISODES = 6
ITERATIONS = {"zeroshot": None, "lora": 120, "tir": 24}
SMALL_EPISODES, SMALL_TIR_ITERATIONS = 3, 12
# Budget: this module's share of `make test` stays near a minute on 2 busy cores. Measured with --durations at a load
# of 4-5 (Dec 3): the full-size `tir` check (6 episodes x 24 steps) took 291 s and zero-shot 7 s, so the fast suite
# keeps the same claim at a quarter of the size (the first 3 episodes x 12 steps: 32 s, the module 48 s; +8.0 points
# over zero-shot's 65.33 on them); the full-size `tir` and `lora` checks and the pinned accuracies of all three are
# `slow` (make test-slow).
MARGIN = 3.0  # measured: lora +6.0 and tir +12.9 points over zero-shot (69.78) at full size; small tir +8.0


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], RunResult]:
    """Each method's run, made the first time a test asks for it (so a test pays only for the methods it reads)."""
    db = tmp_path_factory.mktemp("learning") / "results.sqlite"
    runner = Runner()
    done: dict[str, RunResult] = {}

    def result(method: str, small: bool = False) -> RunResult:
        key = f"{method}-small" if small else method
        if key not in done:
            episodes = SMALL_EPISODES if small else EPISODES
            config = RunConfig(
                dataset="digits", method=method, backbone="tiny", shots=5, episodes=episodes, episode_batch=episodes,
                device="cpu", db=str(db),
            )  # fmt: skip
            config.train.iterations = SMALL_TIR_ITERATIONS if small and method == "tir" else ITERATIONS[method]
            done[key] = runner.run(config)
        return done[key]

    return result


def test_shipped_checkpoint_is_present() -> None:
    from cdfsl.backbone.tiny import CHECKPOINT_PATH

    assert CHECKPOINT_PATH.is_file()
    assert CHECKPOINT_PATH.stat().st_size <= 16 * 2**20


def test_zero_shot_is_above_chance(results: Callable[..., RunResult]) -> None:
    assert results("zeroshot", small=True).mean_acc > 30.0  # chance is 20%


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "tir"])
def test_fine_tuning_beats_zero_shot(results: Callable[..., RunResult], method: str) -> None:
    assert results(method).mean_acc >= results("zeroshot").mean_acc + MARGIN


def test_tir_beats_zero_shot_at_a_smaller_size(results: Callable[..., RunResult]) -> None:
    """The fast suite's learning check: `tir` on the first 3 episodes with 12 steps beats zero-shot on the same 3."""
    assert results("tir", small=True).mean_acc >= results("zeroshot", small=True).mean_acc + MARGIN


@pytest.mark.slow
def test_pinned_per_episode_accuracies(results: Callable[[str], RunResult]) -> None:
    """The fp32 CPU path's predictions, measured once; any change to them needs a reason in its commit."""
    measured = {method: [round(a, 2) for _, a in results(method).per_episode] for method in PINNED}
    assert measured == PINNED


PINNED: dict[str, list[float]] = {
    "zeroshot": [82.67, 65.33, 48.0, 77.33, 81.33, 64.0],
    "lora": [81.33, 76.0, 66.67, 78.67, 85.33, 66.67],
    "tir": [88.0, 82.67, 70.67, 86.67, 89.33, 78.67],
}
