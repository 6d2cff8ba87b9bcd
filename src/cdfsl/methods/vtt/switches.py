"""DGSO's dynamic loss combination for E episodes at once, kept on the device (no host read inside a step).

`LossSwitch` (extension.py) states the rule for one episode on the host; `EpisodeSwitches` applies the same rule to
E episodes with tensors: the history starts at 1.0, each update appends the step's mean gradient agreement `[E]`
(float64, as the host rule's Python floats), and an episode switches `L_VtT` off for good once the sum of its last
`window` entries is ≤ 0 (the sign of the window mean). Only the order of that sum's additions may differ from the
host rule's left-to-right sum, which can matter only for a window mean within ~1e-16 of zero.

Whether any episode is still on decides whether a step runs VtT's path at all (skipping it when every episode is off
changes no result, docs/vtt.md). The host learns it without waiting: `AnyOn` copies the flag to host memory without
blocking after each update and reads it one step later, once the device has long finished that copy (on the CPU the
flag is host memory already and is read at once, so a CPU fit skips exactly as soon as every episode is off).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cdfsl.methods.host_syncs import host_read


class AnyOn:
    """A device flag `[]` (bool) that the host reads without waiting for the device.

    `publish(flag)` starts a non-blocking copy to host memory; `value()` returns the last published flag whose copy
    has been waited for: on the CPU the one just published; on an accelerator the one published one call before the
    latest (`lag` = 1), whose copy the device finished while it ran the step after it. Until then it returns `True`
    (the safe answer: a step that runs VtT's path for episodes that are all off computes what skipping it would).
    """

    def __init__(self, device: torch.device) -> None:
        self.lag = 0 if device.type == "cpu" else 1
        self._pending: list[tuple[Tensor, torch.Event | None]] = []
        self._known = True

    def publish(self, flag: Tensor) -> None:
        if self.lag == 0:
            with host_read():
                self._known = bool(flag)
            return
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.Event(device=flag.device)
        event.record()
        self._pending.append((host, event))
        while len(self._pending) > self.lag:
            host, event = self._pending.pop(0)
            assert event is not None
            event.synchronize()  # recorded a step ago: the device finished it while the host queued this step
            with host_read():
                self._known = bool(host)

    def value(self) -> bool:
        return self._known


class EpisodeSwitches:
    """DLC for E episodes on `device`: `on` `[E]` (bool), `off_at` `[E]` (the 1-based update that switched an episode
    off; 0: never), `history` (the appended agreements, one `[E]` float64 tensor per update).

    Args:
        episodes: E. window: λ. device: where the state lives.
    """

    def __init__(self, episodes: int, window: int, device: torch.device) -> None:
        self.window = window
        self.on = torch.ones(episodes, dtype=torch.bool, device=device)
        self.off_at = torch.zeros(episodes, dtype=torch.long, device=device)
        self.history: list[Tensor] = [torch.ones(episodes, dtype=torch.float64, device=device)]
        self.any_on = AnyOn(device)

    @property
    def updates(self) -> int:
        return len(self.history) - 1

    def update(self, agreement: Tensor) -> None:
        """Append the step's mean agreement `[E]` for the episodes still on; switch off where the window's sum ≤ 0."""
        was_on = self.on
        self.history.append(agreement.detach().double())
        recent = torch.stack(self.history[-self.window :]).sum(dim=0)  # [E]
        switched = was_on & (recent <= 0)
        self.off_at = torch.where(switched, self.updates, self.off_at)
        self.on = was_on & ~switched
        self.any_on.publish(self.on.any())

    def off_steps(self) -> list[int | None]:
        """Per episode, the update that switched it off (None: never); one host read, after a fit."""
        return [step or None for step in self.off_at.tolist()]

    def histories(self) -> list[list[float]]:
        """Per episode, the agreements its rule saw: 1.0, then one per update while it was on (one host read)."""
        table = torch.stack(self.history, dim=1).tolist()  # [E, 1 + updates]
        ends = [len(row) if off is None else off + 1 for row, off in zip(table, self.off_steps(), strict=True)]
        return [row[:end] for row, end in zip(table, ends, strict=True)]


__all__ = ["AnyOn", "EpisodeSwitches"]
