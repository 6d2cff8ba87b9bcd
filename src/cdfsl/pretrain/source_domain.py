"""A deterministic, captioned SOURCE domain for pretraining the embedded tiny CLIP (docs/embedded.md).

`generate_batch(rng, n)` draws `n` RGB images of `IMAGE_SIZE` x `IMAGE_SIZE` pixels, one caption each and a concept
id each (the class the label-aware contrastive loss groups captions by; `CONCEPTS[id]` names it). Kinds:

- digits 0-9 (concepts 0-9, about half the images): rendered in matplotlib's bundled fonts (DejaVu, STIX, Computer
  Modern; never downloaded) with random size, stroke weight, rotation, stretch, position and colours. Captions
  include the evaluation prompt form "a photo of a seven." (the zero-shot prompt on the target domain) besides
  "a photo of the digit seven", "the number 7", "a red seven on a black background", ...
- letters a-z (either case, one concept per letter): "a photo of the letter k", "the capital letter k", ...
- geometric shapes on plain, gradient or textured backgrounds: "a red triangle on a striped background", ...
- colour patches: "a photo of the colour green.", ...
- textures (stripes, checks, dots, grid, noise): "a blue and white striped pattern", ...

The target domain is sklearn's 8x8 handwritten digits upsampled bicubic to 64 px, grey, light ink on a dark ground.
So a large share of the digits (and some other images) is rendered the same way: grey, frame-filling, thick strokes,
box-downsampled to 6-16 px and upsampled bicubic; others are Gaussian-blurred.

Every draw comes from the numpy `Generator` passed in: the same generator state gives the same arrays and captions.
Fonts are loaded once per process (a read-only memo, `_font`).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

IMAGE_SIZE = 64
_GLYPH_FONT_SIZE = 64  # glyphs are rendered at this size, cropped to their ink and rescaled
_GLYPH_CANVAS = 2 * _GLYPH_FONT_SIZE + 32
_SHAPE_SUPERSAMPLE = 4

# Text fonts of matplotlib's package data that have Latin letters and digits at their usual code points.
FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmti10.ttf",
)

DIGIT_NAMES: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
# Letters, less those that read as digits in many fonts ("o" as 0, "i" and "l" as 1).
LETTERS: str = "".join(c for c in string.ascii_lowercase if c not in "ilo")
SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "pentagon",
    "hexagon",
    "diamond",
    "star",
    "cross",
    "ring",
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 160, 50),
    "blue": (35, 70, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 20),
    "purple": (130, 40, 170),
    "pink": (245, 135, 190),
    "brown": (125, 80, 35),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
}
# texture name -> (noun phrase, adjective)
TEXTURES: dict[str, tuple[str, str]] = {
    "stripes": ("stripes", "striped"),
    "checks": ("a checkerboard", "checkered"),
    "dots": ("polka dots", "dotted"),
    "grid": ("a grid", "grid"),
    "noise": ("noise", "noisy"),
}

CONCEPTS: tuple[str, ...] = (
    DIGIT_NAMES
    + tuple(f"letter {c}" for c in LETTERS)
    + SHAPES
    + tuple(f"colour {c}" for c in COLOURS)
    + tuple(f"texture {t}" for t in TEXTURES)
)
NUM_CONCEPTS = len(CONCEPTS)
_LETTER_BASE = len(DIGIT_NAMES)
_SHAPE_BASE = _LETTER_BASE + len(LETTERS)
_COLOUR_BASE = _SHAPE_BASE + len(SHAPES)
_TEXTURE_BASE = _COLOUR_BASE + len(COLOURS)

_KINDS: tuple[str, ...] = ("digit", "letter", "shape", "colour", "texture")
_KIND_P = np.array([0.55, 0.2, 0.1, 0.05, 0.1])

# (template, weight); fields: name, digit, fg, bg
EVAL_TEMPLATE = "a photo of a {name}."  # the zero-shot prompt on the target domain, kept verbatim ("a eight")
_DIGIT_TEMPLATES: tuple[tuple[str, float], ...] = (
    (EVAL_TEMPLATE, 4.0),
    ("a photo of the digit {name}", 1.0),
    ("a photo of the number {name}.", 1.0),
    ("the number {digit}", 1.0),
    ("the digit {digit}", 1.0),
    ("a {name}", 1.0),
    ("a {fg} {name} on a {bg} background", 1.0),
)
_BLURRY_DIGIT_TEMPLATES: tuple[tuple[str, float], ...] = (
    *_DIGIT_TEMPLATES,
    ("a blurry photo of a {name}.", 1.0),
    ("a low resolution photo of the number {name}", 1.0),
)
_LETTER_TEMPLATES: tuple[tuple[str, float], ...] = (
    ("a photo of the letter {name}.", 3.0),
    ("the letter {name}", 1.0),
    ("the {case} letter {name}", 1.0),
    ("a {fg} letter {name} on a {bg} background", 1.0),
    ("the character {name}", 1.0),
)
_SHAPE_TEMPLATES: tuple[tuple[str, float], ...] = (
    ("a photo of a {name}.", 3.0),
    ("a {name}", 1.0),
    ("a {fg} {name}", 1.0),
    ("a {fg} {name} on a {bg} background", 2.0),
)
_COLOUR_TEMPLATES: tuple[tuple[str, float], ...] = (
    ("a photo of the colour {name}.", 2.0),
    ("the colour {name}", 1.0),
    ("a plain {name} image", 1.0),
    ("a {name} patch", 1.0),
)
_TEXTURE_TEMPLATES: tuple[tuple[str, float], ...] = (
    ("a photo of {noun}.", 2.0),
    ("a {adj} pattern", 1.0),
    ("a {fg} and {bg} {adj} texture", 1.0),
    ("a {adj} background", 1.0),
)

_LOWRES_SIDES: tuple[int, ...] = (6, 8, 8, 8, 10, 12, 16)
_MIN_CONTRAST = 70.0  # least luminance difference between a foreground colour and its background


def generate_batch(
    rng: np.random.Generator, n: int, target_share: float = 0.0
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Draw `n` captioned source images.

    `target_share` is the probability that an image is a digit in the target-like style (grey, centred, thick,
    low resolution) rather than a draw from the full mix: a curriculum knob. From scratch, the tiny ViT learns
    those in a few hundred steps but barely moves on the full mix, so pretraining starts there.

    Returns:
        images: uint8 `[n, IMAGE_SIZE, IMAGE_SIZE, 3]` RGB.
        captions: `n` strings, one per image.
        concepts: int64 `[n]`, indices into `CONCEPTS`.
    """
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions: list[str] = []
    concepts = np.empty(n, dtype=np.int64)
    kinds = rng.choice(len(_KINDS), size=n, p=_KIND_P)
    target_like = rng.random(n) < target_share
    for i, kind in enumerate(kinds):
        if target_like[i]:
            image, caption, concept = _render_digit(rng, style="target")
        else:
            image, caption, concept = _RENDERERS[_KINDS[int(kind)]](rng)
        images[i] = image
        captions.append(caption)
        concepts[i] = concept
    return images, captions, concepts


def digit_prompt(digit: int) -> str:
    """The evaluation prompt of a digit class, e.g. `"a photo of a seven."`."""
    return EVAL_TEMPLATE.format(name=DIGIT_NAMES[digit])


# ---------------------------------------------------------------------------------------------------------------
# renderers: rng -> (uint8 [S, S, 3], caption, concept id)


def _render_digit(rng: np.random.Generator, style: str | None = None) -> tuple[np.ndarray, str, int]:
    digit = int(rng.integers(len(DIGIT_NAMES)))
    if style is None:
        style = ("target", "blur", "clean")[int(rng.choice(3, p=[0.55, 0.15, 0.3]))]
    if style == "target":
        image, fg, bg = _target_like_glyph(rng, str(digit))
    else:
        image, fg, bg = _coloured_glyph(rng, str(digit))
        if style == "blur":
            image = _blur(rng, image)
    templates = _DIGIT_TEMPLATES if style == "clean" else _BLURRY_DIGIT_TEMPLATES
    caption = _caption(rng, templates, name=DIGIT_NAMES[digit], digit=str(digit), fg=fg, bg=bg)
    return image, caption, digit


def _render_letter(rng: np.random.Generator) -> tuple[np.ndarray, str, int]:
    index = int(rng.integers(len(LETTERS)))
    upper = bool(rng.random() < 0.5)
    char = LETTERS[index].upper() if upper else LETTERS[index]
    style = ("target", "blur", "clean")[int(rng.choice(3, p=[0.2, 0.15, 0.65]))]
    if style == "target":
        image, fg, bg = _target_like_glyph(rng, char)
    else:
        image, fg, bg = _coloured_glyph(rng, char)
        if style == "blur":
            image = _blur(rng, image)
    case = "capital" if upper else "lowercase"
    caption = _caption(rng, _LETTER_TEMPLATES, name=LETTERS[index], case=case, fg=fg, bg=bg)
    return image, caption, _LETTER_BASE + index


def _render_shape(rng: np.random.Generator) -> tuple[np.ndarray, str, int]:
    index = int(rng.integers(len(SHAPES)))
    background, bg_words, bg_mean = _background(rng)
    fg_name, fg_rgb = _contrasting_colour(rng, bg_mean, exclude=bg_words)
    mask = _shape_mask(rng, SHAPES[index])
    image = _composite(mask, np.asarray(fg_rgb, dtype=np.float32), background)
    if rng.random() < 0.2:
        image = _low_resolution(rng, image)
    caption = _caption(rng, _SHAPE_TEMPLATES, name=SHAPES[index], fg=fg_name, bg=bg_words)
    return image, caption, _SHAPE_BASE + index


def _render_colour(rng: np.random.Generator) -> tuple[np.ndarray, str, int]:
    names = tuple(COLOURS)
    index = int(rng.integers(len(names)))
    rgb = _jitter(rng, COLOURS[names[index]])
    shade = 1.0 + 0.15 * _gradient(rng)[..., None]  # gentle lighting
    noise = rng.normal(0.0, rng.uniform(0.0, 8.0), size=(IMAGE_SIZE, IMAGE_SIZE, 1))
    image = np.clip(rgb * shade + noise, 0, 255).astype(np.uint8)
    caption = _caption(rng, _COLOUR_TEMPLATES, name=names[index])
    return image, caption, _COLOUR_BASE + index


def _render_texture(rng: np.random.Generator) -> tuple[np.ndarray, str, int]:
    names = tuple(TEXTURES)
    index = int(rng.integers(len(names)))
    first, second = _colour_pair(rng)
    mask = _texture_mask(rng, names[index])
    image = _composite(mask, _jitter(rng, COLOURS[first]), _jitter(rng, COLOURS[second]))
    if rng.random() < 0.15:
        image = _blur(rng, image)
    noun, adjective = TEXTURES[names[index]]
    caption = _caption(rng, _TEXTURE_TEMPLATES, noun=noun, adj=adjective, fg=first, bg=second)
    return image, caption, _TEXTURE_BASE + index


_RENDERERS = {
    "digit": _render_digit,
    "letter": _render_letter,
    "shape": _render_shape,
    "colour": _render_colour,
    "texture": _render_texture,
}


# ---------------------------------------------------------------------------------------------------------------
# glyphs


@cache
def _font(file_name: str) -> ImageFont.FreeTypeFont:
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / file_name
    return ImageFont.truetype(str(path), _GLYPH_FONT_SIZE)


def _glyph_mask(
    rng: np.random.Generator,
    char: str,
    height: tuple[float, float],
    stroke: tuple[int, int],
    max_angle: float,
    stretch: tuple[float, float],
    shift: float,
) -> np.ndarray:
    """Coverage of one glyph, float32 `[S, S]` in [0, 1].

    `height` is the glyph's height as a fraction of the image side, `stroke` the inclusive range of the extra
    stroke width at the render size, `max_angle` the rotation range in degrees, `stretch` the width scale range,
    `shift` the largest offset of the glyph's centre from the image centre as a fraction of the side (a ViT with
    4x4 patches generalizes poorly across positions, and the target digits are centred).
    """
    font = _font(FONT_FILES[int(rng.integers(len(FONT_FILES)))])
    width = int(rng.integers(stroke[0], stroke[1] + 1))
    canvas = Image.new("L", (_GLYPH_CANVAS, _GLYPH_CANVAS), 0)
    centre = _GLYPH_CANVAS // 2
    ImageDraw.Draw(canvas).text(
        (centre, centre), char, font=font, fill=255, anchor="mm", stroke_width=width, stroke_fill=255
    )
    glyph = canvas.crop(canvas.getbbox())
    target_h = rng.uniform(*height) * IMAGE_SIZE
    target_w = glyph.width / glyph.height * target_h * rng.uniform(*stretch)
    size = (int(np.clip(round(target_w), 3, IMAGE_SIZE)), int(np.clip(round(target_h), 3, IMAGE_SIZE)))
    glyph = glyph.resize(size, Image.Resampling.LANCZOS)
    glyph = glyph.rotate(rng.uniform(-max_angle, max_angle), resample=Image.Resampling.BICUBIC, expand=True)
    if max(glyph.size) > IMAGE_SIZE:
        scale = IMAGE_SIZE / max(glyph.size)
        glyph = glyph.resize(
            (max(1, int(glyph.width * scale)), max(1, int(glyph.height * scale))), Image.Resampling.LANCZOS
        )
    x0, y0 = (
        int(np.clip(round((IMAGE_SIZE - side) / 2 + rng.uniform(-shift, shift) * IMAGE_SIZE), 0, IMAGE_SIZE - side))
        for side in glyph.size
    )
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    mask.paste(glyph, (x0, y0))
    return np.asarray(mask, dtype=np.float32) / 255.0


def _target_like_glyph(rng: np.random.Generator, char: str) -> tuple[np.ndarray, str, str]:
    """A grey, frame-filling, thick glyph seen at 6-16 px and upsampled, as the target digits are.

    Returns the uint8 `[S, S, 3]` image and the foreground and background colour words.
    """
    mask = _glyph_mask(rng, char, height=(0.8, 1.0), stroke=(1, 6), max_angle=12.0, stretch=(0.6, 1.3), shift=0.05)
    light_on_dark = bool(rng.random() < 0.8)
    ink, ground = rng.uniform(190, 255), rng.uniform(0, 50)
    if not light_on_dark:
        ink, ground = 255 - ink, 255 - ground
    grey = np.full(3, 1.0, dtype=np.float32)
    image = _low_resolution(rng, _composite(mask, grey * ink, grey * ground))
    return (image, "white", "black") if light_on_dark else (image, "black", "white")


def _coloured_glyph(rng: np.random.Generator, char: str) -> tuple[np.ndarray, str, str]:
    """A glyph of any size, angle and weight in one colour on a plain or gradient background."""
    mask = _glyph_mask(rng, char, height=(0.5, 0.95), stroke=(0, 4), max_angle=20.0, stretch=(0.7, 1.3), shift=0.12)
    fg, bg = _colour_pair(rng)
    background = _jitter(rng, COLOURS[bg])
    if rng.random() < 0.3:
        background = background * (1.0 + 0.2 * _gradient(rng)[..., None])
    return _composite(mask, _jitter(rng, COLOURS[fg]), background), fg, bg


# ---------------------------------------------------------------------------------------------------------------
# shapes and textures


def _shape_mask(rng: np.random.Generator, shape: str) -> np.ndarray:
    """Anti-aliased coverage of one filled shape, float32 `[S, S]` in [0, 1]."""
    big = IMAGE_SIZE * _SHAPE_SUPERSAMPLE
    radius = rng.uniform(0.15, 0.45) * IMAGE_SIZE
    cx, cy = (rng.uniform(radius, IMAGE_SIZE - radius) for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    s = _SHAPE_SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    box = [(cx - radius) * s, (cy - radius) * s, (cx + radius) * s, (cy + radius) * s]
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, outline=255, width=max(1, int(radius * s * rng.uniform(0.2, 0.4))))
    else:
        points = [((cx + x * radius) * s, (cy + y * radius) * s) for x, y in _outline(shape, angle)]
        draw.polygon(points, fill=255)
    small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _outline(shape: str, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of unit radius, rotated by `angle` radians."""
    if shape == "star":
        radii = [1.0 if k % 2 == 0 else 0.45 for k in range(10)]
    elif shape == "cross":
        arm = 0.35
        corners = [(arm, 1), (arm, arm), (1, arm), (1, -arm), (arm, -arm), (arm, -1)]
        corners += [(-x, -y) for x, y in corners]
        return [_rotate(x, y, angle) for x, y in corners]
    else:
        sides = {"square": 4, "triangle": 3, "pentagon": 5, "hexagon": 6, "diamond": 4}[shape]
        radii = [1.0] * sides
    points = []
    for k, r in enumerate(radii):
        theta = 2 * math.pi * k / len(radii)
        x, y = r * math.cos(theta), r * math.sin(theta)
        if shape == "diamond":
            x *= 0.6
        elif shape == "square":
            x, y = _rotate(x, y, math.pi / 4)
        points.append(_rotate(x, y, angle))
    return points


def _rotate(x: float, y: float, angle: float) -> tuple[float, float]:
    c, s = math.cos(angle), math.sin(angle)
    return c * x - s * y, s * x + c * y


_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)


def _texture_mask(rng: np.random.Generator, texture: str) -> np.ndarray:
    """One periodic or noise pattern, float32 `[S, S]` in [0, 1]."""
    if texture == "noise":
        side = int(rng.choice([4, 8, 16, 32]))
        coarse = Image.fromarray(rng.random((side, side)).astype(np.float32), mode="F")
        return np.clip(np.asarray(coarse.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)), 0.0, 1.0)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(6.0, 16.0)
    u = _XX * math.cos(angle) + _YY * math.sin(angle) + rng.uniform(0, period)
    v = -_XX * math.sin(angle) + _YY * math.cos(angle) + rng.uniform(0, period)
    if texture == "stripes":
        return ((u % period) < period * rng.uniform(0.35, 0.65)).astype(np.float32)
    if texture == "checks":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    du, dv = (u % period) - period / 2, (v % period) - period / 2
    if texture == "dots":
        return (np.hypot(du, dv) < period * rng.uniform(0.2, 0.4)).astype(np.float32)
    if texture == "grid":
        return (np.minimum(np.abs(du), np.abs(dv)) < rng.uniform(0.6, 1.6)).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}")


def _gradient(rng: np.random.Generator) -> np.ndarray:
    """A linear ramp in a random direction, float32 `[S, S]` in [-1, 1]."""
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (_XX - IMAGE_SIZE / 2) * math.cos(angle) + (_YY - IMAGE_SIZE / 2) * math.sin(angle)
    return ramp / (IMAGE_SIZE / 2 * math.sqrt(2))


def _background(rng: np.random.Generator) -> tuple[np.ndarray, str, np.ndarray]:
    """A plain, gradient or (softened) textured background for shapes.

    Returns float32 `[S, S, 3]`, the words naming it ("red", "striped"), and its mean colour `[3]`.
    """
    choice = rng.random()
    if choice < 0.55:
        name = _colour_name(rng)
        rgb = _jitter(rng, COLOURS[name])
        image = np.broadcast_to(rgb, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
        if choice < 0.15:
            image = image * (1.0 + 0.2 * _gradient(rng)[..., None])
        return image, name, rgb
    texture = tuple(TEXTURES)[int(rng.integers(len(TEXTURES)))]
    first, second = _colour_pair(rng)
    a, b = _jitter(rng, COLOURS[first]), _jitter(rng, COLOURS[second])
    b = a + 0.5 * (b - a)  # soften so a shape stays visible on it
    image = _composite(_texture_mask(rng, texture), b, a).astype(np.float32)
    return image, TEXTURES[texture][1], image.reshape(-1, 3).mean(axis=0)


# ---------------------------------------------------------------------------------------------------------------
# colours, compositing, degradation, captions


def _colour_name(rng: np.random.Generator) -> str:
    names = tuple(COLOURS)
    return names[int(rng.integers(len(names)))]


def _luminance(rgb: np.ndarray | Sequence[float]) -> float:
    r, g, b = (float(c) for c in rgb)
    return 0.299 * r + 0.587 * g + 0.114 * b


def _colour_pair(rng: np.random.Generator) -> tuple[str, str]:
    """Two colour names whose luminances differ by at least `_MIN_CONTRAST`."""
    while True:
        first, second = _colour_name(rng), _colour_name(rng)
        if abs(_luminance(COLOURS[first]) - _luminance(COLOURS[second])) >= _MIN_CONTRAST:
            return first, second


def _contrasting_colour(rng: np.random.Generator, mean: np.ndarray, exclude: str) -> tuple[str, np.ndarray]:
    """A colour name other than `exclude` that stands out against `mean`, and its jittered RGB `[3]`."""
    candidates = [
        name
        for name, rgb in COLOURS.items()
        if name != exclude and abs(_luminance(rgb) - _luminance(mean)) >= _MIN_CONTRAST / 2
    ]
    name = candidates[int(rng.integers(len(candidates)))]
    return name, _jitter(rng, COLOURS[name])


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float32) + rng.uniform(-20, 20, size=3), 0, 255).astype(np.float32)


def _composite(mask: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """`fg` over `bg` through coverage `mask` `[S, S]`; colours `[3]` or images `[S, S, 3]`; uint8 `[S, S, 3]`."""
    alpha = mask[..., None]
    image = np.asarray(bg, dtype=np.float32) * (1.0 - alpha) + np.asarray(fg, dtype=np.float32) * alpha
    return np.clip(np.broadcast_to(image, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255).round().astype(np.uint8)


def _low_resolution(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Box-downsample to a few pixels and upsample bicubic, as the target's 8x8 scans are; uint8 `[S, S, 3]`."""
    side = _LOWRES_SIDES[int(rng.integers(len(_LOWRES_SIDES)))]
    small = Image.fromarray(image).resize((side, side), Image.Resampling.BOX)
    return np.asarray(small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC))


def _blur(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    radius = rng.uniform(0.8, 2.5)
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def _caption(rng: np.random.Generator, templates: Sequence[tuple[str, float]], **fields: str) -> str:
    weights = np.array([w for _, w in templates], dtype=np.float64)
    template = templates[int(rng.choice(len(templates), p=weights / weights.sum()))][0]
    text = template.format(**fields)
    return text if template == EVAL_TEMPLATE else _ARTICLE.sub("an ", text)


_ARTICLE = re.compile(r"\ba (?=(?!one\b)[aeiou])")  # "an orange", "an eight", "a one"
