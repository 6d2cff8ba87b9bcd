"""`cdfsl run --tensorboard DIR`: each stored batch of episodes also written as TensorBoard event files.

Layout under DIR, per run (its run name, else its id):
- `<run>/`: `accuracy` of each episode at step = the episode index, and `running_mean` (the mean of the episodes
  this process has written so far);
- `<run>/episode_NNNN/`: that episode's training curves (`loss_ce`, and with the plug-ins `sink_share`, `loss_vtt`,
  `dgso_cos`) at their training steps, so TensorBoard overlays the episodes on one chart per quantity.

TensorBoard's own writer (`torch.utils.tensorboard`) needs the `tensorboard` package, an optional extra
(`pip install 'cdfsl[tensorboard]'`); `require_tensorboard` says so before a run starts. Only episodes this process
trains are written; episodes served from the store or trained by another process are not.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cdfsl.engine.store import EpisodeResult
from cdfsl.errors import ConfigError


def require_tensorboard() -> None:
    """Raise `ConfigError` with the install line when the `tensorboard` package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--tensorboard needs the tensorboard package: pip install 'cdfsl[tensorboard]' (or pip install tensorboard)"
        ) from None


class TensorBoardSink:
    """Writes finished episodes of runs under `folder` (created when missing; its parent must exist)."""

    def __init__(self, folder: Path) -> None:
        require_tensorboard()
        self.folder = Path(folder)
        self._sums: dict[str, tuple[float, int]] = {}

    def __call__(self, run_label: str, results: list[EpisodeResult]) -> None:
        """Write `results` of the run labelled `run_label` (episodes in any order)."""
        from torch.utils.tensorboard import SummaryWriter

        root = self.folder / run_label
        total, count = self._sums.get(run_label, (0.0, 0))
        with SummaryWriter(log_dir=str(root)) as writer:
            for result in sorted(results, key=lambda r: r.episode):
                total, count = total + result.accuracy, count + 1
                writer.add_scalar("accuracy", 100 * result.accuracy, result.episode)
                writer.add_scalar("running_mean", 100 * total / count, result.episode)
        self._sums[run_label] = (total, count)
        for result in results:
            if result.curves:
                self._write_curves(root / f"episode_{result.episode:04d}", result.curves)

    @staticmethod
    def _write_curves(folder: Path, curves: dict[str, list[Any]]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(folder)) as writer:
            for name, values in curves.items():
                if name == "step":
                    continue
                for step, value in zip(curves["step"], values, strict=True):
                    if value is not None and math.isfinite(value):
                        writer.add_scalar(name, value, step)
