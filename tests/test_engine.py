"""The episode runner on digits + the tiny model: statistics, resume, interruption, episode batching, failures."""

from __future__ import annotations

import copy
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import cdfsl.engine.context as context_module
from cdfsl.config import RunConfig
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.engine.context import chunks, resolve_device, resolve_precision
from cdfsl.engine.runner import Progress, Runner, RunResult
from cdfsl.errors import BackboneError, ConfigError, DatasetError, StoreError
from cdfsl.stats import mean_ci95
from digits_world import stored_run_config
from episode_batching import assert_same_as_alone, logit_scale_of

EPISODES = 4
QUERIES = 5 * 15


def make_config(db: Path, **changes: Any) -> RunConfig:
    """digits, lora, tiny with random weights, 5-way 1-shot, 4 episodes of 3 iterations."""
    return stored_run_config(db, 3, **changes)


def stored_rows(db: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(db) as connection:
        return list(connection.execute("SELECT run_id, episode FROM episodes ORDER BY run_id, episode"))


@pytest.fixture(scope="module")
def runner() -> Runner:
    """One runner for the module: it keeps the loaded backbone and image cache between runs."""
    return Runner()


@dataclass
class Base:
    db: Path
    config: RunConfig
    result: RunResult


@pytest.fixture(scope="module")
def base(runner: Runner, tmp_path_factory: pytest.TempPathFactory) -> Base:
    """The reference: an uninterrupted run, one episode at a time, default dropout 0.25."""
    db = tmp_path_factory.mktemp("base") / "results.sqlite"
    config = make_config(db)
    return Base(db, copy.deepcopy(config), runner.run(config))


def test_result_statistics(base: Base) -> None:
    result = base.result
    assert [i for i, _ in result.per_episode] == list(range(EPISODES))
    assert result.trained_episodes == EPISODES
    assert result.excluded_classes == ()
    for _, accuracy in result.per_episode:
        correct = accuracy / 100 * QUERIES
        assert correct == pytest.approx(round(correct), abs=1e-9)
        assert 0 <= accuracy <= 100
    values = [a / 100 for _, a in result.per_episode]
    assert (result.mean_acc, result.ci95) == mean_ci95(values)
    percent = np.array([a for _, a in result.per_episode])
    assert result.mean_acc == pytest.approx(percent.mean())
    assert result.ci95 == pytest.approx(1.96 * percent.std() / np.sqrt(EPISODES))
    assert len(result.run_id) == 16
    rows = stored_rows(base.db)
    assert rows == [(result.run_id, i) for i in range(EPISODES)]
    with sqlite3.connect(base.db) as connection:
        stored = dict(connection.execute("SELECT episode, accuracy FROM episodes"))
        totals = {row[0] for row in connection.execute("SELECT total FROM episodes")}
    assert totals == {QUERIES}
    assert [stored[i] * 100 for i in range(EPISODES)] == [a for _, a in result.per_episode]


def test_rerun_trains_nothing(runner: Runner, base: Base) -> None:
    again = runner.run(copy.deepcopy(base.config))
    assert again.trained_episodes == 0
    assert again.run_id == base.result.run_id
    assert again.per_episode == base.result.per_episode
    assert (again.mean_acc, again.ci95) == (base.result.mean_acc, base.result.ci95)
    # The episode batch is not part of the run: still nothing to train.
    rebatched = runner.run(make_config(base.db, episode_batch=3))
    assert rebatched.trained_episodes == 0 and rebatched.per_episode == base.result.per_episode
    # Fewer episodes: the first ones, from the store.
    fewer = runner.run(make_config(base.db, episodes=2))
    assert fewer.trained_episodes == 0 and fewer.per_episode == base.result.per_episode[:2]
    assert len(stored_rows(base.db)) == EPISODES


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_results(base: Base, tmp_path: Path) -> None:
    """Interrupted after its first batch, then resumed by another runner (as a new process would)."""
    db = tmp_path / "interrupted.sqlite"
    reports: list[Progress] = []

    def interrupt(progress: Progress) -> None:
        reports.append(progress)
        raise Interrupt

    with pytest.raises(Interrupt):
        Runner(progress=interrupt).run(make_config(db, episode_batch=2))
    run_id = base.result.run_id
    assert stored_rows(db) == [(run_id, 0), (run_id, 1)]
    first_two = [a / 100 for _, a in base.result.per_episode[:2]]
    assert len(reports) == 1
    assert (reports[0].done, reports[0].total, reports[0].resumed) == (2, EPISODES, 0)
    assert (reports[0].mean, reports[0].ci95) == pytest.approx(mean_ci95(first_two))

    resumed = Runner(progress=reports.append).run(make_config(db, episode_batch=2))
    assert resumed.trained_episodes == 2
    assert (reports[1].done, reports[1].total, reports[1].resumed) == (EPISODES, EPISODES, 2)
    assert reports[1].mean == pytest.approx(resumed.mean_acc)
    with sqlite3.connect(db) as connection:
        counts = list(connection.execute("SELECT episode, COUNT(*) FROM episodes GROUP BY run_id, episode"))
    assert counts == [(i, 1) for i in range(EPISODES)]
    assert resumed.per_episode == base.result.per_episode
    assert (resumed.mean_acc, resumed.ci95) == (base.result.mean_acc, base.result.ci95)


@pytest.mark.batching
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_episode_batch_does_not_change_results(runner: Runner, base: Base, tmp_path: Path, dropout: float) -> None:
    results = {}
    for episode_batch in (1, 4):
        if dropout == 0.25 and episode_batch == 1:
            results[1] = base.result  # the base run is exactly this config
            continue
        config = make_config(tmp_path / f"e{episode_batch}.sqlite", episode_batch=episode_batch, lora__dropout=dropout)
        results[episode_batch] = runner.run(config)
        assert results[episode_batch].trained_episodes == EPISODES
    assert results[4].run_id == results[1].run_id
    assert results[4].per_episode == results[1].per_episode


@pytest.mark.batching
def test_batched_logits_match_single_episode_logits(runner: Runner) -> None:
    """Below the accuracies: E = 2 query logits equal each episode's own E = 1 logits (dropout 0.25, 2 iterations)."""
    from cdfsl.data.episodes import build_batch
    from cdfsl.data.readers import load_index
    from cdfsl.data.sampler import EpisodeSampler
    from cdfsl.methods import build_method

    config = make_config(Path("unused.sqlite"), train__iterations=2)
    device = torch.device("cpu")
    backbone = runner.backbone(config, device)
    index = load_index("digits", None)
    sampler = EpisodeSampler(index, 5, 1, 15, 0)
    cache = runner.image_cache(index, backbone.image_size, None)

    scales: list[float] = []

    def logits(indices: list[int]) -> torch.Tensor:
        batch = build_batch(
            sampler.episodes(indices), index, cache, config.resolved().augment, backbone.normalize, 0, device
        )
        method = build_method(config, backbone)
        method.fit(batch)
        scales.append(logit_scale_of(method))
        return method.predict(batch)

    together = logits([5, 6])
    assert together.shape == (2, QUERIES, 5)
    for e, i in enumerate([5, 6]):
        assert_same_as_alone(logits([i])[0], together[e], scales[0])


def test_merged_and_unmerged_predictions_agree(runner: Runner) -> None:
    """protocol.md: after training, merging LoRA into the weights gives the same predictions."""
    from cdfsl.data.episodes import build_batch
    from cdfsl.data.readers import load_index
    from cdfsl.data.sampler import EpisodeSampler
    from cdfsl.methods import build_method

    config = make_config(Path("unused.sqlite"), train__iterations=2)
    device = torch.device("cpu")
    backbone = runner.backbone(config, device)
    index = load_index("digits", None)
    episodes = EpisodeSampler(index, 5, 1, 15, 0).episodes([1, 2])
    cache = runner.image_cache(index, backbone.image_size, None)
    batch = build_batch(episodes, index, cache, config.resolved().augment, backbone.normalize, 0, device)
    method = build_method(config, backbone)
    method.fit(batch)
    merged = method.predict(batch)
    config.lora.merge_for_prediction = False
    unmerged = method.predict(batch)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-5)
    assert torch.equal(merged.argmax(-1), unmerged.argmax(-1))
    # Training moved the model: the trained predictions are not the zero-shot ones.
    zeroshot = build_method(make_config(Path("unused.sqlite"), method="zeroshot"), backbone).predict(batch)
    assert not torch.allclose(merged, zeroshot, atol=1e-3)


def record_batches(monkeypatch: pytest.MonkeyPatch) -> list[EpisodeBatch]:
    seen: list[EpisodeBatch] = []
    original = context_module.build_batch

    def recording(*args: Any, **kwargs: Any) -> EpisodeBatch:
        batch = original(*args, **kwargs)
        seen.append(batch)
        return batch

    monkeypatch.setattr(context_module, "build_batch", recording)
    return seen


def test_zeroshot_and_lora_see_the_same_episodes(
    runner: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = record_batches(monkeypatch)
    db = tmp_path / "both.sqlite"
    zeroshot = runner.run(make_config(db, method="zeroshot", episodes=3, episode_batch=3))
    zeroshot_batches = list(seen)
    seen.clear()
    lora = runner.run(make_config(db, episodes=3, episode_batch=1, train__iterations=1))
    assert zeroshot.run_id != lora.run_id
    assert len(zeroshot_batches) == 1 and len(seen) == 3

    z = zeroshot_batches[0]
    assert z.support.shape[1] == 5  # zeroshot builds the plain support image only
    for e, batch in enumerate(seen):
        assert batch.episodes == [z.episodes[e]]
        assert batch.episodes[0].index == e
        assert batch.class_names[0] == z.class_names[e]
        assert torch.equal(batch.query_labels[0], z.query_labels[e])
        assert torch.equal(batch.query[0], z.query[e])
        assert batch.support.shape[1] == 5 * 5  # 5 support images x 5 views, image-major
        torch.testing.assert_close(batch.support[0, ::5], z.support[e], atol=1e-5, rtol=0)
    with sqlite3.connect(db) as connection:
        per_run = dict(connection.execute("SELECT run_id, COUNT(*) FROM episodes GROUP BY run_id"))
    assert per_run == {zeroshot.run_id: 3, lora.run_id: 3}


def test_failed_runs_store_no_episodes(runner: Runner, tmp_path: Path) -> None:
    db = tmp_path / "failed.sqlite"
    with pytest.raises(BackboneError, match="not found"):
        runner.run(make_config(db, pretrained=str(tmp_path / "missing.pt")))
    with pytest.raises(DatasetError, match="needs 11 classes"):
        runner.run(make_config(db, ways=11))
    with pytest.raises(ConfigError, match="method"):
        runner.run(make_config(db, method="finetune"))
    with pytest.raises(StoreError, match="does not exist"):
        runner.run(make_config(tmp_path / "no" / "such" / "folder.sqlite"))
    if db.exists():
        assert stored_rows(db) == []


def test_failure_during_a_batch_stores_only_finished_batches(
    runner: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash inside the second batch keeps the first batch and nothing of the one in flight."""
    from cdfsl.methods.lora.method import LoraMethod

    calls = []
    original = LoraMethod.predict

    def crash_second(self: LoraMethod, batch: EpisodeBatch) -> torch.Tensor:
        calls.append(batch.indices)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return original(self, batch)

    monkeypatch.setattr(LoraMethod, "predict", crash_second)
    db = tmp_path / "crash.sqlite"
    with pytest.raises(RuntimeError, match="out of memory"):
        runner.run(make_config(db, episodes=3, episode_batch=1, train__iterations=1))
    assert [episode for _, episode in stored_rows(db)] == [0]


def test_to_json_has_the_cli_summary(base: Base) -> None:
    summary = base.result.to_json()
    assert set(summary) == {
        "protocol", "run_id", "dataset", "method", "recipe", "backbone", "ways", "shots", "queries", "episodes",
        "seed", "mean_acc", "ci95", "per_episode", "config",
    }  # fmt: skip
    assert summary["protocol"] == "episodic"
    assert summary["recipe"] == "vtt-release"
    assert summary["run_id"] == base.result.run_id
    assert (summary["dataset"], summary["method"], summary["backbone"]) == ("digits", "lora", "tiny")
    assert (summary["ways"], summary["shots"], summary["queries"], summary["seed"]) == (5, 1, 15, 0)
    assert summary["episodes"] == EPISODES
    assert summary["mean_acc"] == pytest.approx(base.result.mean_acc, abs=1e-4)
    assert summary["ci95"] == pytest.approx(base.result.ci95, abs=1e-4)
    assert [set(row) for row in summary["per_episode"]] == [
        {"episode", "acc", "ways", "shots", "queries", "classes"}
    ] * EPISODES
    assert all((row["ways"], row["shots"], row["queries"]) == (5, [1] * 5, [15] * 5) for row in summary["per_episode"])
    assert all(len(set(row["classes"])) == 5 for row in summary["per_episode"])
    assert [row["episode"] for row in summary["per_episode"]] == list(range(EPISODES))
    assert [row["acc"] for row in summary["per_episode"]] == pytest.approx(
        [a for _, a in base.result.per_episode], abs=1e-4
    )
    assert summary["config"] == base.config.resolved().to_dict()  # every recipe value filled in
    assert summary["config"]["train"]["iterations"] == 3
    loaded = json.loads(json.dumps(summary))
    assert loaded["per_episode"] == summary["per_episode"]
    assert loaded["config"]["lora"]["targets"] == ["q", "k", "v"]


def test_helpers() -> None:
    assert list(chunks([0, 1, 2, 3, 4], 2)) == [[0, 1], [2, 3], [4]]
    assert list(chunks([], 3)) == []
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_precision("auto", torch.device("cpu")) == ("fp32", None)
    assert resolve_precision("auto", torch.device("cuda")) == ("bf16", torch.bfloat16)
    assert resolve_precision("fp32", torch.device("cuda")) == ("fp32", None)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
