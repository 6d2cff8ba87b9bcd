"""`--episode-batch auto` on the CPU with a scripted device memory: one backbone for both trials, the cache emptied
before each measurement and before the free memory is read, the protocol's largest shape, the arithmetic, and a trial
out of memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import cdfsl.engine.context as context_module
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.engine.autobatch import CPU_EPISODE_BATCH, auto_episode_batch
from cdfsl.engine.context import LoadCache
from cdfsl.methods.lora.method import LoraMethod
from digits_world import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


class ScriptedMemory:
    """A device whose trials peak at `peaks` bytes above `allocated` (E = 1, then E = 2), with `free` bytes free;
    every call is logged."""

    def __init__(self, peaks: list[int], free: int, allocated: int = 1000) -> None:
        self.peaks, self.free_bytes, self.allocated_bytes = list(peaks), free, allocated
        self.calls: list[str] = []

    def clear(self) -> None:
        self.calls.append("clear")

    def allocated(self) -> int:
        self.calls.append("allocated")
        return self.allocated_bytes

    def peak(self) -> int:
        self.calls.append("peak")
        return self.allocated_bytes + self.peaks.pop(0)

    def free(self) -> int:
        self.calls.append("free")
        return self.free_bytes


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The backbones loaded (by name) while the test runs."""
    loaded: list[str] = []
    original = context_module.load_backbone

    def load(name: str, *args: Any, **kwargs: Any) -> Any:
        loaded.append(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(context_module, "load_backbone", load)
    return loaded


@dataclass
class Fits:
    """Each trial fit's (episodes, supports, queries); a fit of more than `limit` episodes runs out of memory."""

    shapes: list[tuple[int, int, int]] = field(default_factory=list)
    limit: int = 99


@pytest.fixture
def fitted(monkeypatch: pytest.MonkeyPatch) -> Fits:
    fits = Fits()
    original = LoraMethod.fit

    def fit(self: LoraMethod, batch: EpisodeBatch) -> None:
        fits.shapes.append((len(batch.episodes), batch.support.shape[1], batch.query.shape[1]))
        if len(batch.episodes) > fits.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        original(self, batch)

    monkeypatch.setattr(LoraMethod, "fit", fit)
    return fits


def config(**changes: object) -> Any:
    return tiny_config("lora", **{"device": "cpu", "episodes": 400, "augment__views": ["plain"], **changes})


def test_one_backbone_for_both_trials_measured_from_an_emptied_cache(loads: list[str], fitted: Fits) -> None:
    # E = 1 peaks 300 bytes above the backbone, E = 2 400: 100 per episode and 200 for the rest; 1000 bytes free:
    # (0.85 · 1000 − 200) // 100 = 6 episodes.
    memory = ScriptedMemory(peaks=[300, 400], free=1000)
    assert auto_episode_batch(config(), memory=memory) == 6
    assert loads == ["tiny"]  # one backbone, loaded once for both trials
    trial = ["clear", "allocated", "peak", "clear"]
    assert memory.calls == trial + trial + ["clear", "free"]
    assert [(e, s) for e, s, _ in fitted.shapes] == [(1, 5), (2, 5)]  # 5-way 1-shot, one view: the largest shape
    assert all(q == 5 * 3 for _, _, q in fitted.shapes)


def test_the_batch_is_capped_and_shared_loads_are_reused(loads: list[str], fitted: Fits) -> None:
    shared = LoadCache()
    assert auto_episode_batch(config(episodes=5), shared, ScriptedMemory([300, 400], free=10**9)) == 5
    assert auto_episode_batch(config(), shared, ScriptedMemory([300, 400], free=100)) == 1  # nothing fits: one
    assert loads == ["tiny"]  # the second call found the backbone in the shared cache


def test_a_trial_out_of_memory_gives_one_episode(loads: list[str], fitted: Fits) -> None:
    fitted.limit = 1
    memory = ScriptedMemory(peaks=[300], free=10**9)
    assert auto_episode_batch(config(), memory=memory) == 1
    assert [e for e, _, _ in fitted.shapes] == [1, 2]
    assert memory.calls[-1] == "clear"  # the failed trial's memory handed back


def test_on_the_cpu_auto_is_a_fixed_batch(loads: list[str]) -> None:
    assert auto_episode_batch(config()) == CPU_EPISODE_BATCH
    assert auto_episode_batch(config(episodes=2)) == 2
    assert loads == []  # nothing trained, nothing loaded
