"""Support views: the released loaders' augmentation scheme, vectorized on the compute device.

Each support image gives one view per entry of `views`; an entry is `plain` or a `+`-joined list of `crop`,
`rotate`, `jitter` and `flip`, applied in that order. The benchmark's `plain, rotate+jitter+flip, rotate, jitter,
flip` is the five transform lists of the VtT and TIR releases' loaders (see `docs/protocol.md`), which run torchvision's
`RandomRotation(45)`, an `ImageEnhance`-based `ImageJitter` and `RandomHorizontalFlip` on uint8 PIL images after the
resize. Here the same operations run on float tensors in [0, 1] holding uint8 levels `k / 255` (the resized images
divided by 255), and reproduce the PIL results:

- `rotate`: angle uniform in ±rotation degrees (positive = clockwise here; PIL's `rotate` turns positive angles
  counter-clockwise, which for a symmetric draw is the same distribution), about the image centre, no expand, zero
  fill, nearest-neighbour sampling. Source pixels are picked with Pillow's own 16.16 fixed-point affine arithmetic
  (the matrix computed as `Image.rotate` does, in double precision on the CPU), so the output is pixel for pixel
  `Image.rotate(-angle, NEAREST, fillcolor=0)`, borders included, at any angle and for any image up to 16k pixels a
  side (beyond that Pillow itself leaves the fixed-point path).
- `jitter`: brightness, contrast, saturation factors each uniform in [1 - j, 1 + j], applied in that order as PIL's
  `ImageEnhance.Brightness`, `Contrast` and `Color`: each step blends the image with a degenerate image (black; a
  flat grey at the mean of the image's 'L' conversion rounded half up to an integer level; each pixel's own 'L'
  value) in float32 arithmetic as Pillow's `blend` does, and truncates to a uint8 level; 'L' is Pillow's integer
  luma `(19595 R + 38470 G + 7471 B + 32768) >> 16`. Float32 inputs are first rounded to the nearest level `k / 255`;
  on inputs on that grid the result equals the PIL chain run with the same (float32) factors exactly. A view whose
  three factors are all 1 is returned untouched.
- `flip`: horizontal, with probability flip_p.
- `crop`: torchvision's `RandomResizedCrop` with the image's own size as output (the CLIP-LoRA release's
  augmentation, recipe `clip-lora-release`): up to 10 tries of an area share uniform in `crop_scale` and a log-uniform
  aspect ratio in (3/4, 4/3), the first box that fits taken at a uniform position, else the central crop of the whole
  image clamped to that ratio range; the box is resized back bicubically (`F.interpolate`, no antialias: the box is
  never larger than the image) and the result clamped to [0, 1] and rounded to uint8 levels `k / 255`, as a PIL
  image would be.

What is not reproduced: the releases draw their parameters from torch's global generator in a different order, so
the same seed gives other angles and factors; here all parameters are drawn once per episode from the episode's own
`views` stream on the CPU, so the views do not depend on the device, the method or the episode batch. The exact
match of `jitter` holds for inputs on the uint8 grid, which is what the image cache provides and what `rotate`
(nearest sampling) and `flip` keep; it relies on IEEE float32 elementwise arithmetic without fused multiply-add, which
eager PyTorch gives on the CPU and on CUDA (the tests check it against Pillow on the CPU).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from cdfsl.errors import ConfigError

TRANSFORMS = ("crop", "rotate", "jitter", "flip")
DEFAULT_VIEWS = ("plain", "rotate+jitter+flip", "rotate", "jitter", "flip")
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default aspect-ratio range
CROP_ATTEMPTS = 10  # torchvision's tries before the central fallback


class ViewSettings(Protocol):
    """What the support views read (the config's `augment` section satisfies it; data/ never imports the config)."""

    @property
    def views(self) -> tuple[str, ...]: ...

    @property
    def rotation(self) -> float: ...

    @property
    def jitter(self) -> float: ...

    @property
    def flip_p(self) -> float: ...

    @property
    def crop_scale(self) -> tuple[float, float]: ...


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
    crop_scale: tuple[float, float] = (0.08, 1.0),
) -> Tensor:
    """Float images in [0, 1] `[N, 3, H, W]` → views `[N, V, 3, H, W]` in [0, 1], V = len(views)."""
    n, v = images.shape[0], len(views)
    kinds = [parse_view(view) for view in views]
    # Draw every parameter for every (image, view), used or not, so streams never depend on the view list.
    angles = (torch.rand((n, v), generator=generator) * 2 - 1) * rotation
    factors = 1 + (torch.rand((n, v, 3), generator=generator) * 2 - 1) * jitter
    flips = torch.rand((n, v), generator=generator) < flip_p
    # Drawn after the others, so adding `crop` left the rotate/jitter/flip draws of every earlier run unchanged.
    boxes = crop_boxes(n * v, images.shape[-2], images.shape[-1], crop_scale, generator).view(n, v, 4)
    use = {t: torch.tensor([t in kind for kind in kinds], dtype=torch.bool) for t in TRANSFORMS}  # each [V]
    angles = torch.where(use["rotate"], angles, 0.0)
    factors = torch.where(use["jitter"][:, None], factors, 1.0)
    flips = flips & use["flip"]
    cropped = use["crop"].expand(n, v)

    device = images.device
    x = images[:, None].expand(n, v, *images.shape[1:]).reshape(n * v, *images.shape[1:])
    x = _crop(x, boxes.reshape(-1, 4), cropped.reshape(-1))
    x = _rotate(x, angles.reshape(-1))  # angles stay on the host, where the rotation matrices are computed
    x = _jitter(x, factors.reshape(-1, 3).to(device))
    x = torch.where(flips.reshape(-1, 1, 1, 1).to(device), x.flip(-1), x)
    return x.reshape(n, v, *images.shape[1:])


def crop_boxes(count: int, height: int, width: int, scale: tuple[float, float], generator: torch.Generator) -> Tensor:
    """`count` random resized crop boxes of an `height × width` image → int64 `[count, 4]` (top, left, h, w).

    torchvision's `RandomResizedCrop.get_params`, vectorized: `CROP_ATTEMPTS` tries, each an area `scale`-share
    uniform in `[low, high]` of the image and an aspect ratio log-uniform in `CROP_RATIO`, rounded to whole pixels;
    the first that fits is placed uniformly; when none fits, the largest central box whose ratio lies in the range.
    Every try's four numbers are drawn whether used or not (`[count, CROP_ATTEMPTS, 4]` from `generator`).
    """
    low, high = scale
    draws = torch.rand((count, CROP_ATTEMPTS, 4), generator=generator, dtype=torch.float64)
    area = height * width
    target = area * (low + (high - low) * draws[..., 0])
    log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = torch.exp(log_low + (log_high - log_low) * draws[..., 1])
    w = torch.round(torch.sqrt(target * ratio)).long()
    h = torch.round(torch.sqrt(target / ratio)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top = torch.floor(draws[..., 2] * (height - h + 1).clamp(min=1)).long()
    left = torch.floor(draws[..., 3] * (width - w + 1).clamp(min=1)).long()
    first = fits.long().argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    chosen = [part.gather(1, first).squeeze(1) for part in (top, left, h, w)]
    boxes = torch.stack(chosen, dim=1)
    fallback = torch.tensor(_central_box(height, width), dtype=torch.long)
    return torch.where(fits.any(dim=1, keepdim=True), boxes, fallback)


def _central_box(height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision's fallback box: the whole image, narrowed to the nearest ratio in `CROP_RATIO`, centred."""
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, round(height * CROP_RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _crop(x: Tensor, boxes: Tensor, used: Tensor) -> Tensor:
    """Each image of `x` `[N, C, H, W]` whose `used[N]` is set: its box `boxes[N] = (top, left, h, w)` resized back to
    `H × W` (bicubic, clamped to [0, 1], rounded to levels `k / 255`); the others untouched."""
    if not bool(used.any()):
        return x
    height, width = x.shape[-2:]
    out = x.clone()
    for i in used.nonzero().flatten().tolist():
        top, left, h, w = boxes[i].tolist()
        box = x[i : i + 1, :, top : top + h, left : left + w]
        resized = F.interpolate(box.float(), size=(height, width), mode="bicubic", align_corners=False)
        out[i] = (torch.round(resized.clamp(0.0, 1.0) * 255.0) / 255.0).to(x.dtype)[0]
    return out


def _rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image `[N, C, H, W]` about its centre by `degrees[N]` (clockwise), nearest, zeros outside.

    `degrees` are read on the host (Pillow's matrices are computed there): pass them on the CPU, so nothing is read
    back from the device.

    Bit-for-bit PIL's `Image.rotate(-degrees, Image.Resampling.NEAREST, fillcolor=0)`: output pixel `(x, y)` takes
    input pixel `(floor(X), floor(Y))`, `(X, Y)` the output pixel's centre mapped by the inverse rotation in Pillow's
    16.16 fixed point, or 0 where that falls outside the image.
    """
    if bool((degrees == 0).all()):
        return x
    n, c, h, w = x.shape
    coefficients = torch.tensor(
        [_pil_rotation_fixed_point(-angle, w, h) for angle in degrees.tolist()], dtype=torch.int32, device=x.device
    )  # int32, as Pillow's C ints: no overflow for images up to 16k pixels a side
    a0, a1, a2, a3, a4, a5 = (coefficients[:, i].view(n, 1, 1) for i in range(6))
    rows = torch.arange(h, dtype=torch.int32, device=x.device).view(1, h, 1)
    cols = torch.arange(w, dtype=torch.int32, device=x.device).view(1, 1, w)
    source_x = torch.div(a2 + cols * a0 + rows * a1, 65536, rounding_mode="floor")  # [N, H, W]
    source_y = torch.div(a5 + cols * a3 + rows * a4, 65536, rounding_mode="floor")
    inside = (source_x >= 0) & (source_x < w) & (source_y >= 0) & (source_y < h)
    flat = (source_y.clamp(0, h - 1) * w + source_x.clamp(0, w - 1)).long().view(n, 1, h * w).expand(n, c, h * w)
    rotated = x.reshape(n, c, h * w).gather(2, flat).view(n, c, h, w)
    rotated = torch.where(inside.view(n, 1, h, w), rotated, torch.zeros((), dtype=x.dtype, device=x.device))
    return torch.where((degrees == 0).view(-1, 1, 1, 1).to(x.device), x, rotated)


def _pil_rotation_fixed_point(angle: float, width: int, height: int) -> tuple[int, int, int, int, int, int]:
    """Pillow's 16.16 fixed-point inverse affine map of `Image.rotate(angle)` (counter-clockwise, about the centre).

    The double-precision matrix is computed as in `Image.rotate` (cos/sin rounded to 15 decimals, centre `(w/2, h/2)`),
    then converted as Pillow's nearest-neighbour affine transform does, with the half-pixel offset of output pixel
    centres folded into the constant terms. Input pixel of output `(x, y)`: `((a2 + a0 x + a1 y) >> 16,
    (a5 + a3 x + a4 y) >> 16)`.
    """
    radians = -math.radians(angle % 360.0)
    cos, sin = round(math.cos(radians), 15), round(math.sin(radians), 15)
    m0, m1, m3, m4 = cos, sin, -sin, cos
    centre_x, centre_y = width / 2, height / 2
    m2 = m0 * -centre_x + m1 * -centre_y + 0.0 + centre_x
    m5 = m3 * -centre_x + m4 * -centre_y + 0.0 + centre_y

    def fix(value: float) -> int:
        return math.floor(value * 65536.0 + 0.5)

    return fix(m0), fix(m1), fix(m2 + m0 * 0.5 + m1 * 0.5), fix(m3), fix(m4), fix(m5 + m3 * 0.5 + m4 * 0.5)


def _blend(degenerate: Tensor, image: Tensor, factor: Tensor) -> Tensor:
    """Pillow's `Image.blend(degenerate, image, factor)` on uint8 levels in float32: truncated, clipped to 0..255."""
    return torch.floor(degenerate + factor * (image - degenerate)).clamp(0, 255)


def _luma_levels(levels: Tensor) -> Tensor:
    """Pillow's RGB → 'L' conversion of uint8 levels `[N, 3, H, W]` → int32 `[N, 1, H, W]`."""
    r, g, b = levels.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).unsqueeze(1)


def _jitter(x: Tensor, factors: Tensor) -> Tensor:
    """Brightness, contrast, saturation by `factors[N, 3]`, as PIL's `ImageEnhance` chain on uint8 images.

    `x` in [0, 1] is rounded to levels `k / 255` first; each step's result is a uint8 level again. Images with all
    factors 1 are returned untouched.
    """
    brightness, contrast, saturation = (factors[:, i].view(-1, 1, 1, 1).to(torch.float32) for i in range(3))
    levels = torch.round(x.to(torch.float32) * 255.0)
    levels = _blend(torch.zeros((), dtype=torch.float32, device=x.device), levels, brightness)
    # Contrast blends with a flat grey: the mean of the 'L' image, rounded half up to an integer level.
    luma = _luma_levels(levels)
    count = luma.shape[-2] * luma.shape[-1]
    total = luma.sum(dim=(1, 2, 3), keepdim=True, dtype=torch.int64)
    mean = torch.div(2 * total + count, 2 * count, rounding_mode="floor")
    levels = _blend(mean.to(torch.float32), levels, contrast)
    levels = _blend(_luma_levels(levels).to(torch.float32), levels, saturation)
    jittered = (levels / 255.0).to(x.dtype)
    untouched = (factors == 1).all(dim=1).view(-1, 1, 1, 1)
    return torch.where(untouched, x, jittered)
