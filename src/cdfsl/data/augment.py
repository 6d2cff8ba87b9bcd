"""Support views: the benchmark code's augmentation scheme, vectorized on the compute device.

Each support image gives one view per entry of `views`; an entry is `plain` or a `+`-joined list of `rotate`
(uniform angle in ±rotation degrees, bilinear, black fill), `jitter` (brightness, contrast, saturation factors each
uniform in [1 − j, 1 + j], applied in that order) and `flip` (horizontal, with probability flip_p). The default
`plain, rotate+jitter+flip, rotate, jitter, flip` is protocol.md's. All parameters are drawn once per episode from the
episode's own `views` stream on the CPU, so the views do not depend on the device, the method or the episode batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cdfsl.errors import ConfigError

TRANSFORMS = ("rotate", "jitter", "flip")
DEFAULT_VIEWS = ("plain", "rotate+jitter+flip", "rotate", "jitter", "flip")


def parse_view(view: str) -> frozenset[str]:
    """`rotate+jitter` → {"rotate", "jitter"}; `plain` → {}."""
    if view == "plain":
        return frozenset()
    parts = frozenset(p.strip() for p in view.split("+"))
    unknown = parts - set(TRANSFORMS)
    if unknown or not parts:
        raise ConfigError(f"unknown augmentation {view!r}: use 'plain' or '+'-joined {', '.join(TRANSFORMS)}")
    return parts


def support_views(
    images: Tensor,
    views: tuple[str, ...],
    generator: torch.Generator,
    rotation: float = 45.0,
    jitter: float = 0.4,
    flip_p: float = 0.5,
) -> Tensor:
    """Float images in [0, 1] `[N, 3, H, W]` → views `[N, V, 3, H, W]` in [0, 1], V = len(views)."""
    n, v = images.shape[0], len(views)
    kinds = [parse_view(view) for view in views]
    # Draw every parameter for every (image, view), used or not, so streams never depend on the view list.
    angles = (torch.rand((n, v), generator=generator) * 2 - 1) * rotation
    factors = 1 + (torch.rand((n, v, 3), generator=generator) * 2 - 1) * jitter
    flips = torch.rand((n, v), generator=generator) < flip_p
    use = torch.tensor([[t in kind for t in TRANSFORMS] for kind in kinds], dtype=torch.bool)  # [V, 3]
    angles = torch.where(use[:, 0], angles, 0.0)
    factors = torch.where(use[:, 1, None], factors, 1.0)
    flips = flips & use[:, 2]

    device = images.device
    x = images[:, None].expand(n, v, *images.shape[1:]).reshape(n * v, *images.shape[1:])
    x = _rotate(x, angles.reshape(-1).to(device))
    x = _jitter(x, factors.reshape(-1, 3).to(device))
    x = torch.where(flips.reshape(-1, 1, 1, 1).to(device), x.flip(-1), x)
    return x.reshape(n, v, *images.shape[1:])


def _rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image `[N, 3, H, W]` about its centre by `degrees[N]` (clockwise), zeros outside."""
    if bool((degrees == 0).all()):
        return x
    theta = degrees * (math.pi / 180.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    matrix = torch.stack([torch.stack([cos, sin, zero], -1), torch.stack([-sin, cos, zero], -1)], 1)
    grid = F.affine_grid(matrix.to(x.dtype), list(x.shape), align_corners=False)
    rotated = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return torch.where((degrees == 0).view(-1, 1, 1, 1), x, rotated)


def _grey(x: Tensor) -> Tensor:
    """ITU-R 601 luma `[N, 1, H, W]` of RGB images `[N, 3, H, W]`."""
    r, g, b = x.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _jitter(x: Tensor, factors: Tensor) -> Tensor:
    """Brightness, contrast, saturation by `factors[N, 3]`, clamped to [0, 1]; images with all factors 1 untouched."""
    brightness, contrast, saturation = (factors[:, i].view(-1, 1, 1, 1).to(x.dtype) for i in range(3))
    original = x
    x = (x * brightness).clamp(0, 1)
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    grey = _grey(x)
    jittered = ((x - grey) * saturation + grey).clamp(0, 1)
    untouched = (factors == 1).all(dim=1).view(-1, 1, 1, 1)
    return torch.where(untouched, original, jittered)
