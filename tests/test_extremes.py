"""Every numeric setting at extreme values, on the three loops (LoRA with both plug-ins, CoOp + LoRA, MaPLe with both
plug-ins): each is refused at validation, stops with a `TrainingError`, or trains to finite logits — never a raw
exception. Slow (about 30 s on 2 cores): `make test-slow`. It found `vtt.lr=1e300` and `prompt.weight_decay=1e300`
crashing the optimizers' float32 step."""

from __future__ import annotations

import pytest
import torch

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.config import NUMERIC_RULES, apply_override
from cdfsl.errors import CdfslError
from cdfsl.methods import build_method
from digits_world import DigitsWorld, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SHAPE_KEYS = {"ways", "shots", "queries", "episodes", "seed", "episode_batch"}  # covered by their own tests
EXTREMES = ("1e300", "1e6")


@pytest.fixture(scope="module")
def world(tiny: ClipAdapter) -> DigitsWorld:
    return DigitsWorld.of(tiny)


@pytest.mark.parametrize("method", ["lora+tir+vtt", "coop+lora", "maple+tir+vtt"])
def test_extreme_values_are_refused_stopped_or_finite(world: DigitsWorld, method: str) -> None:
    raw = []
    for key in sorted(set(NUMERIC_RULES) - SHAPE_KEYS):
        for value in EXTREMES:
            config = tiny_config(method, queries=2, shots=1, train__iterations=1, maple__epochs=1)
            try:
                apply_override(config, f"{key}={value}")
                resolved = config.validate().resolved()
                fitted = build_method(resolved, world.backbone)
                batch = world.batch(resolved, [0])
                fitted.fit(batch)
                assert torch.isfinite(fitted.predict(batch)).all()
            except CdfslError:
                continue
            except Exception as error:  # any other exception is the finding
                raw.append(f"{key}={value}: {type(error).__name__}: {error}")
    assert not raw, "\n".join(raw)
