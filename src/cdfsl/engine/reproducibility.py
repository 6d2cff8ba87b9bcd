"""What makes a run's numbers repeat: the deterministic switch (`RunConfig.deterministic`) and the device model.

On the CPU every kernel PyTorch runs here is deterministic already: a run repeats bit for bit, and E episodes at once
give each episode the numbers it gets alone (the batching tests check it). On CUDA neither holds by default: cuDNN
and cuBLAS pick kernels by shape and timing, some kernels accumulate with atomics in any order, and the fused
attention kernels (flash, memory-efficient) are not deterministic in their backward. `deterministic_mode` turns on
everything PyTorch offers against that (docs/protocol.md, "Reproducibility", says which equalities then hold and
what it costs):

- `torch.use_deterministic_algorithms(True, warn_only=True)`: deterministic kernels wherever PyTorch has one; an op
  without one warns (`UserWarning` naming it) instead of stopping the run;
- cuDNN deterministic, its autotuner (`benchmark`) off;
- `CUBLAS_WORKSPACE_CONFIG=:4096:8` (cuBLAS's condition for deterministic matrix products; it must be set before the
  process's first cuBLAS call, which is why the CLI sets it when the option is read: `set_cublas_workspace`);
- attention on the math path (`torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`): no fused kernels.

It is not part of the run identity: on the CPU it changes nothing, and on CUDA the run without it is the same
experiment whose last digits vary from one execution to the next.

The device model (`device_model`: the GPU's name, or `cpu` and the processor's) is stored with every episode
(`ResultStore.episode_devices`), not in the identity: CUDA random streams (dropout masks) and kernels may differ
between GPU models, so two stores that disagree in the last digits can be told apart by it.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

CUBLAS_WORKSPACE = ":4096:8"
_DETERMINISTIC_WORKSPACES = (":4096:8", ":16:8")  # the two settings cuBLAS documents as deterministic


def set_cublas_workspace() -> None:
    """Set `CUBLAS_WORKSPACE_CONFIG` for deterministic cuBLAS unless it is set to a deterministic value already;
    effective for cuBLAS handles created after it (call it before the first CUDA matrix product)."""
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in _DETERMINISTIC_WORKSPACES:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE


@contextmanager
def deterministic_mode(enabled: bool = True) -> Iterator[None]:
    """Within the block, PyTorch's deterministic settings (module docstring); the earlier settings are restored on
    leaving it, except `CUBLAS_WORKSPACE_CONFIG`, which stays (cuBLAS reads it once per handle). `enabled=False`:
    nothing changes."""
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    set_cublas_workspace()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def device_model(device: torch.device) -> str:
    """What computes on `device`: the GPU's name on CUDA (`NVIDIA H100 80GB HBM3`), `mps`, or `cpu: ` and the
    processor's model name (from /proc/cpuinfo where there is one, else `platform.processor()` or the machine)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    return f"cpu: {_processor_name()}"


def _processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
