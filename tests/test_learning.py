"""Learning on the embedded tiny CLIP and digits: a broken training loop, loss or method fails here.

Uses the shipped checkpoint (`--backbone tiny`) and six fixed 5-shot episodes, each method on its default recipe with
fewer iterations so the module runs in about a minute on 2 CPU cores: `lora` (vtt-release) 120 of its 250 iterations,
`tir` (tir-release) 24 of its 100 full-support steps. The per-episode results are also pinned (fp32 CPU path), so
speed work that changes any prediction is caught.
"""

from __future__ import annotations

import pytest

from cdfsl.config import RunConfig
from cdfsl.engine.runner import Runner, RunResult

EPISODES = 6
ITERATIONS = {"zeroshot": None, "lora": 120, "tir": 24}
MARGIN = 3.0  # measured: lora +6.0 and tir +12.9 points over zero-shot (69.78) on these episodes


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunResult]:
    db = tmp_path_factory.mktemp("learning") / "results.sqlite"
    runner = Runner()
    out = {}
    for method in ("zeroshot", "lora", "tir"):
        config = RunConfig(
            dataset="digits", method=method, backbone="tiny", shots=5, episodes=EPISODES, episode_batch=EPISODES,
            device="cpu", db=str(db),
        )  # fmt: skip
        config.train.iterations = ITERATIONS[method]
        out[method] = runner.run(config)
    return out


def test_shipped_checkpoint_is_present() -> None:
    from cdfsl.backbone.tiny import CHECKPOINT_PATH

    assert CHECKPOINT_PATH.is_file()
    assert CHECKPOINT_PATH.stat().st_size <= 16 * 2**20


def test_zero_shot_is_above_chance(results: dict[str, RunResult]) -> None:
    assert results["zeroshot"].mean_acc > 30.0  # chance is 20%


@pytest.mark.parametrize("method", ["lora", "tir"])
def test_fine_tuning_beats_zero_shot(results: dict[str, RunResult], method: str) -> None:
    assert results[method].mean_acc >= results["zeroshot"].mean_acc + MARGIN


def test_pinned_per_episode_accuracies(results: dict[str, RunResult]) -> None:
    """The fp32 CPU path's predictions, measured once; any change to them needs a reason in its commit."""
    measured = {method: [round(a, 2) for _, a in result.per_episode] for method, result in results.items()}
    assert measured == PINNED


PINNED: dict[str, list[float]] = {
    "zeroshot": [82.67, 65.33, 48.0, 77.33, 81.33, 64.0],
    "lora": [81.33, 76.0, 66.67, 78.67, 85.33, 66.67],
    "tir": [88.0, 82.67, 70.67, 86.67, 89.33, 78.67],
}
