"""Count the calls that make the host wait for the device (host synchronisations), on any device.

A GPU step is fast only when Python queues the next kernels while the device still runs the previous ones; every
read of a device value on the host (`.item()`, `float(t)`, `if t.any():`, `.tolist()`, `.cpu()`, a copy into host
memory) waits until everything queued before it has finished. `HostSyncCounter` is a `TorchFunctionMode` that counts
those calls by name while it is active, so a test on the CPU can assert that a training step makes none:

    with HostSyncCounter() as syncs:
        ...
    assert syncs.total == 0, syncs.counts

What it counts (the calls that synchronise on CUDA):

- reads of values: `.item()`, `.tolist()`, `.numpy()`, `float()`, `int()`, `bool()`, `operator.index()` and
  f-string formatting of a tensor (`__float__`, `__int__`, `__bool__`, `__index__`, `__format__`), `np.asarray`
  (`__array__`);
- copies to the host: `.cpu()`, `.to("cpu")` (or to a CPU tensor's device), `dst.copy_(src)` into a CPU tensor;
- results whose size depends on values: `nonzero`, `masked_select`, indexing with a boolean mask.

On the CPU every tensor is a host tensor, so the counter counts the CALLS (that is what would sync on CUDA), whatever
the tensor's device, except those that never sync anywhere: a copy with `non_blocking=True` (into pinned host memory
it returns at once; the reader waits on an event, see `host_read`) and whatever runs inside `Optimizer.step`
(PyTorch's optimizers keep their step counters in host memory and read them there on every device). On a CUDA device
pass `device="cuda"`: then only calls on non-CPU tensors count (exact, not a CPU stand-in).
`torch.cuda.set_sync_debug_mode("warn")` is the CUDA-only cross-check of the same property.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

READS = frozenset(
    {"item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__", "__format__", "__array__", "cpu"}
)
"""Tensor methods that bring a value (or the whole tensor) to the host whenever they are called."""

DATA_DEPENDENT = frozenset({"nonzero", "masked_select", "argwhere"})
"""Operations whose output size depends on the values (the host must read a count)."""

_paused = 0  # > 0 while `host_read` or an optimizer step runs


@contextmanager
def host_read() -> Iterator[None]:
    """Do not count what runs inside: a read of host memory that an earlier non-blocking copy filled and an event
    already guarded. Use it only there; anything else read inside would go uncounted."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1


class HostSyncCounter(TorchFunctionMode):
    """Counts host-synchronising tensor calls while active (module docstring).

    Args:
        device: the device the counted code would run on; "cpu" (the default) counts every call, a CUDA device only
            the calls on tensors that are not in host memory.

    Attributes:
        counts: calls by name (`"item"`, `"__bool__"`, `"to(cpu)"`, `"copy_(to cpu)"`, `"nonzero"`, ...).
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.on_host_only = torch.device(device).type == "cpu"
        self.counts: Counter[str] = Counter()
        self._handles: list[RemovableHandle] = []
        self._paused_before = 0

    @property
    def total(self) -> int:
        """All counted calls."""
        return sum(self.counts.values())

    def reset(self) -> None:
        self.counts.clear()

    def __enter__(self) -> HostSyncCounter:
        self._paused_before = _paused
        self._handles = [
            register_optimizer_step_pre_hook(_pause_hook(+1)),
            register_optimizer_step_post_hook(_pause_hook(-1)),
        ]
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        global _paused
        super().__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        _paused = self._paused_before  # an optimizer step that raised never ran its post-hook

    def _on_device(self, tensor: object) -> bool:
        """Whether `tensor` counts as device memory (every tensor when counting on the CPU)."""
        return isinstance(tensor, torch.Tensor) and (self.on_host_only or tensor.device.type != "cpu")

    def _syncing(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The name to count `name(*args, **kwargs)` under, or None when it does not synchronise."""
        if not args:
            return None
        source = args[0]
        if name in READS:
            return name if self._on_device(source) else None
        if name in DATA_DEPENDENT:
            return name if self._on_device(source) else None
        if name == "to":
            device, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            to_host = device is not None and torch.device(device).type == "cpu"
            return "to(cpu)" if to_host and not non_blocking and self._on_device(source) else None
        if name == "copy_":
            target, origin = args[0], args[1] if len(args) > 1 else kwargs.get("src")
            non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
            into_host = isinstance(target, torch.Tensor) and target.device.type == "cpu"
            return "copy_(to cpu)" if into_host and not non_blocking and self._on_device(origin) else None
        if name == "__getitem__" and len(args) > 1:
            index = args[1]
            indices = index if isinstance(index, tuple) else (index,)
            masked = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
            return "__getitem__(mask)" if masked and self._on_device(source) else None
        return None

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if not _paused:
            name = self._syncing(getattr(func, "__name__", ""), args, kwargs)
            if name is not None:
                self.counts[name] += 1
        return func(*args, **kwargs)


def _pause_hook(change: int) -> Callable[..., None]:
    def hook(*_: object) -> None:
        global _paused
        _paused += change

    return hook


__all__ = ["DATA_DEPENDENT", "READS", "HostSyncCounter", "host_read"]
