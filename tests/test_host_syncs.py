"""No host synchronisation inside a training step: the counter (`cdfsl.methods.host_syncs`) on hand-made calls, and
every registered trained method's fit counted after its first step (registry-driven, tiny model, 3 steps)."""

from __future__ import annotations

import operator

import pytest
import torch

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.config import METHODS
from cdfsl.methods import build_method
from cdfsl.methods.host_syncs import HostSyncCounter, host_read
from cdfsl.methods.training import TrainedBase
from digits_world import DigitsWorld, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    "item": lambda t: t.sum().item(),
    "tolist": lambda t: t.tolist(),
    "numpy": lambda t: t.numpy(),
    "cpu": lambda t: t.cpu(),
    "__float__": lambda t: float(t[0]),
    "__int__": lambda t: int(t[0]),
    "__bool__": lambda t: bool(t[0] > 0),
    "__index__": lambda t: [0, 1, 2][operator.index(t[1].long())],
    "__format__": lambda t: f"{t[0]:.2f}",
    "to(cpu)": lambda t: t.to("cpu"),
    "copy_(to cpu)": lambda t: torch.empty(3).copy_(t),
    "nonzero": lambda t: t.nonzero(),
    "__getitem__(mask)": lambda t: t[t > 1],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_counter_counts_each_syncing_call_once(name: str) -> None:
    values = torch.tensor([1.0, 2.0, 3.0])
    with HostSyncCounter() as syncs:
        CASES[name](values)
    assert dict(syncs.counts) == {name: 1}


def test_the_counter_ignores_device_work_and_non_blocking_copies() -> None:
    values = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    with HostSyncCounter() as syncs:
        loss = (values * 2).softmax(0).sum()
        loss.backward()
        values.detach().to(torch.float64)  # a dtype change stays on the device
        torch.empty(3).copy_(values.detach(), non_blocking=True)
        with host_read():
            values.sum().item()
        torch.optim.SGD([values], lr=0.1).step()
    assert syncs.total == 0, syncs.counts


def test_on_a_cuda_device_host_tensors_do_not_count() -> None:
    with HostSyncCounter(device="cuda") as syncs:
        torch.tensor([1.0, 2.0]).sum().item()
        float(torch.tensor(3.0))
    assert syncs.total == 0


TRAINED = sorted(m for m in METHODS if m != "zeroshot")
SIZES = {"ways": 2, "shots": 2, "queries": 1, "augment__views": ("plain",), "vtt__state": 4, "train__batch_size": 2}
MAPLE = {"maple__epochs": 2, "maple__batch_size": 2, "maple__warmup_epochs": 1}  # 2 epochs of 2 steps


@pytest.fixture(scope="module")
def world(tiny: ClipAdapter) -> DigitsWorld:
    return DigitsWorld.of(tiny)


def test_every_trained_method_is_checked() -> None:
    assert "lora" in TRAINED and "maple+tir+vtt" in TRAINED and "coop+lora+tir+vtt" in TRAINED


@pytest.mark.parametrize("method", TRAINED)
def test_a_training_step_makes_no_host_sync(world: DigitsWorld, method: str) -> None:
    """Counted from the end of the first step (which builds per-fit state once) to the end of the last: 0 per step,
    with dropout on (LoRA's masks) and two episodes at once."""
    sizes = {**SIZES, **(MAPLE if method.startswith("maple") else {})}
    config = tiny_config(method, lora__dropout=0.25, **sizes).resolved()
    trained = build_method(config, world.backbone)
    assert isinstance(trained, TrainedBase)
    batch = world.batch(config, [0, 1])
    counter = HostSyncCounter()
    per_step: list[dict[str, int]] = []

    def on_step(step: int, steps: int) -> None:
        per_step.append(dict(counter.counts))
        counter.reset()

    trained.on_step = on_step
    with counter:
        trained.fit(batch)
    assert len(per_step) >= 3
    assert per_step[1:] == [{}] * (len(per_step) - 1), per_step
