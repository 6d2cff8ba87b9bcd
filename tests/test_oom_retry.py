"""A batch of episodes that runs out of device memory is split in halves and retried, down to one episode, with one
warning per split, and gives the results of the unsplit batch (simulated on the CPU with `torch.OutOfMemoryError`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from cdfsl.data.episodes import EpisodeBatch
from cdfsl.engine.runner import Runner
from cdfsl.engine.store import ResultStore
from cdfsl.errors import OutOfMemoryWarning
from cdfsl.methods.lora.method import LoraMethod
from digits_world import stored_run_config

pytestmark = pytest.mark.usefixtures("one_thread")


def stored(db: Path) -> tuple[dict[int, object], dict[int, dict[str, object]]]:
    with ResultStore(db, read_only=True) as store:
        (run,) = store.runs()
        return store.episode_queries(run.run_id), store.episode_records(run.run_id)


@dataclass
class Fits:
    """Every fit's episode count; a fit of more than `limit` episodes runs out of memory."""

    sizes: list[int] = field(default_factory=list)
    limit: int = 99


@pytest.fixture
def fits(monkeypatch: pytest.MonkeyPatch) -> Fits:
    log = Fits()
    original = LoraMethod.fit

    def fit(self: LoraMethod, batch: EpisodeBatch) -> None:
        log.sizes.append(len(batch.episodes))
        if len(batch.episodes) > log.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        original(self, batch)

    monkeypatch.setattr(LoraMethod, "fit", fit)
    return log


def test_a_batch_out_of_memory_is_split_and_gives_the_same_results(tmp_path: Path, fits: Fits) -> None:
    runner = Runner()
    whole = runner.run(stored_run_config(tmp_path / "whole.sqlite", 1, episodes=4, episode_batch=4, queries=2))
    assert fits.sizes == [4]
    fits.sizes.clear()
    fits.limit = 1
    with pytest.warns(OutOfMemoryWarning) as caught:
        split = runner.run(stored_run_config(tmp_path / "split.sqlite", 1, episodes=4, episode_batch=4, queries=2))
    assert fits.sizes == [4, 2, 1, 1, 2, 1, 1]  # halves, then quarters: each retried down to one episode
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3
    assert messages[0].startswith("a batch of 4 episodes (from episode 0) ran out of memory on cpu (CUDA out of memory")
    assert "retrying it as 2 + 2 episodes" in messages[0] and "more detail" not in messages[0]
    assert "a batch of 2 episodes (from episode 2)" in messages[2]
    assert split.run_id == whole.run_id and split.per_episode == whole.per_episode
    assert stored(tmp_path / "split.sqlite") == stored(tmp_path / "whole.sqlite")  # query by query, records too


def test_one_episode_out_of_memory_is_raised(tmp_path: Path, fits: Fits) -> None:
    fits.limit = 0
    with pytest.warns(OutOfMemoryWarning), pytest.raises(torch.OutOfMemoryError):
        Runner().run(stored_run_config(tmp_path / "r.sqlite", 1, episodes=2, episode_batch=2, queries=2))
    assert fits.sizes == [2, 1]
    with ResultStore(tmp_path / "r.sqlite", read_only=True) as store:
        assert store.runs() == []  # nothing stored of the batch in flight
