"""The fed pipeline: batches built in a background thread while the one before trains, with unchanged results."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import cdfsl.engine.context as context_module
from cdfsl.data.episodes import to_device
from cdfsl.engine.prefetch import BatchFeed, fed
from cdfsl.engine.runner import Runner
from digits_world import stored_run_config

pytestmark = pytest.mark.usefixtures("one_thread")


def slow_build(seconds: float, log: list[tuple[list[int], str]]) -> Any:
    def build(episodes: list[int], with_views: bool) -> list[int]:
        time.sleep(seconds)
        log.append((episodes, threading.current_thread().name))
        return episodes

    return build


def test_loading_overlaps_training() -> None:
    """3 batches of 0.3 s loading and 0.3 s training: one after the other 1.8 s, fed 0.3 + 3 × 0.3 = 1.2 s."""
    log: list[tuple[list[int], str]] = []
    started = time.perf_counter()
    with BatchFeed(slow_build(0.3, log)) as feed:
        seen = []
        for batch in fed(feed, [[0], [1], [2]]):
            time.sleep(0.3)  # training; sleeping releases the GIL as decoding in Pillow or a CUDA step does
            seen.append(batch)
    wall = time.perf_counter() - started
    assert seen == [[0], [1], [2]]
    assert wall < 1.5, f"{wall:.2f} s: loading did not overlap training"
    assert [name.startswith("cdfsl-feed") for _, name in log] == [False, True, True]


def test_a_batch_never_announced_is_built_at_once_and_a_wrong_guess_is_dropped() -> None:
    log: list[tuple[list[int], str]] = []
    with BatchFeed(slow_build(0.0, log)) as feed:
        feed.prepare([5, 6])
        feed.prepare([5, 6])  # announced once
        assert feed.take([7]) == [7]  # not the guess: built here
        assert feed.take([5, 6]) == [5, 6]  # dropped by the take before: built again, here
    assert [name for episodes, name in log if episodes == [7]] == ["MainThread"]
    assert log[-1] == ([5, 6], "MainThread")
    assert len([episodes for episodes, _ in log if episodes == [5, 6]]) <= 2


def test_an_error_while_building_ahead_is_raised_when_that_batch_is_taken_only() -> None:
    def build(episodes: list[int], with_views: bool) -> list[int]:
        if episodes == [1]:
            raise KeyboardInterrupt  # as an interrupt or a file that fails to decode in the background
        return episodes

    with BatchFeed(build) as feed:
        feed.prepare([1])
        assert feed.take([2]) == [2]  # the failed guess is forgotten
        feed.prepare([1])
        with pytest.raises(KeyboardInterrupt):
            feed.take([1])


def test_the_runner_builds_the_next_batch_in_the_background(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of 3 batches builds the first where it runs and the next two while the one before trains; the run's
    results are those of the same run without the feed (the stored-reference test checks every method)."""
    threads: list[str] = []
    original = context_module.build_batch

    def recording(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    runner = Runner()  # one backbone and image cache for both runs
    config = stored_run_config(tmp_path / "fed.sqlite", 1, episodes=3, method="zeroshot")
    with monkeypatch.context() as patch:
        patch.setattr(context_module, "build_batch", recording)
        fed_result = runner.run(config)
    assert threads[0] == "MainThread" and all(name.startswith("cdfsl-feed") for name in threads[1:])
    assert len(threads) == 3

    with monkeypatch.context() as patch:
        patch.setattr(BatchFeed, "prepare", lambda *args, **kwargs: None)
        plain = runner.run(stored_run_config(tmp_path / "plain.sqlite", 1, episodes=3, method="zeroshot"))
    assert fed_result.run_id == plain.run_id and fed_result.per_episode == plain.per_episode


def test_to_device_on_the_cpu_is_the_tensor_itself() -> None:
    tensor = torch.arange(6)
    assert to_device(tensor, torch.device("cpu")) is tensor


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_device_copies_to_cuda_from_pinned_memory() -> None:
    tensor = torch.arange(6)
    moved = to_device(tensor, torch.device("cuda"))
    assert moved.device.type == "cuda" and torch.equal(moved.cpu(), tensor)
