"""Learning on the embedded tiny CLIP and digits: a broken training loop, loss or method fails here.

Uses the shipped checkpoint (`--backbone tiny`), six fixed 5-shot episodes, and 60 iterations at digits' default
learning rate (1e-3) so it runs in about a minute on 2 CPU cores. The per-episode results are also pinned (fp32 CPU
path), so speed work that changes any prediction is caught.
"""

from __future__ import annotations

import pytest

from cdfsl.config import RunConfig
from cdfsl.engine.runner import Runner, RunResult

EPISODES = 6
ITERATIONS = 60
MARGIN = 3.0  # measured: lora +5.1 points over zero-shot on these episodes


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
        config.train.iterations = ITERATIONS
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
    "zeroshot": [84.0, 65.33, 46.67, 81.33, 78.67, 62.67],
    "lora": [86.67, 73.33, 62.67, 81.33, 82.67, 62.67],
    "tir": [85.33, 72.0, 62.67, 81.33, 84.0, 62.67],
}
