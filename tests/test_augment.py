"""Support views: shapes, plain view, seeded draws, rotation/jitter/flip by hand, bad view names."""

from __future__ import annotations

import pytest
import torch

from cdfsl.data.augment import DEFAULT_VIEWS, _jitter, _rotate, parse_view, support_views
from cdfsl.errors import ConfigError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Float images in [0, 1] `[N=3, 3, 16, 16]`."""
    return torch.rand((3, 3, 16, 16), generator=gen(0))


def test_shapes_and_range(images: torch.Tensor) -> None:
    views = support_views(images, DEFAULT_VIEWS, gen(1))
    assert views.shape == (3, 5, 3, 16, 16)
    assert views.dtype == images.dtype
    assert views.min() >= 0 and views.max() <= 1
    rect = torch.rand((2, 3, 8, 12), generator=gen(2))
    assert support_views(rect, ("plain", "flip", "rotate"), gen(1)).shape == (2, 3, 3, 8, 12)


def test_plain_view_is_the_input(images: torch.Tensor) -> None:
    views = support_views(images, DEFAULT_VIEWS, gen(1))
    torch.testing.assert_close(views[:, 0], images, atol=1e-6, rtol=0)
    only_plain = support_views(images, ("plain",), gen(1))
    torch.testing.assert_close(only_plain[:, 0], images, atol=1e-6, rtol=0)


def test_plain_view_is_bit_identical(images: torch.Tensor) -> None:
    assert torch.equal(support_views(images, DEFAULT_VIEWS, gen(1))[:, 0], images)


def test_same_seed_same_views_different_seed_different_views(images: torch.Tensor) -> None:
    first = support_views(images, DEFAULT_VIEWS, gen(7))
    again = support_views(images, DEFAULT_VIEWS, gen(7))
    other = support_views(images, DEFAULT_VIEWS, gen(8))
    assert torch.equal(first, again)
    for view in range(1, 5):  # every augmented view changes with the seed
        assert not torch.allclose(first[:, view], other[:, view])
    torch.testing.assert_close(first[:, 0], other[:, 0], atol=1e-6, rtol=0)


def test_views_are_not_all_the_same(images: torch.Tensor) -> None:
    views = support_views(images, DEFAULT_VIEWS, gen(3))
    for a in range(5):
        for b in range(a + 1, 5):
            assert not torch.allclose(views[:, a], views[:, b]), (a, b)


def test_parameters_drawn_for_every_view(images: torch.Tensor) -> None:
    """The draws do not depend on which transforms each view uses: the flip view is the same in both lists."""
    first = support_views(images, ("rotate", "flip"), gen(4))
    second = support_views(images, ("rotate+jitter", "flip"), gen(4))
    assert torch.equal(first[:, 1], second[:, 1])
    assert not torch.allclose(first[:, 0], second[:, 0])


def asymmetric_image() -> torch.Tensor:
    """`[1, 3, 8, 8]`: a smooth ramp in x and y with distinct channels (no symmetry)."""
    y, x = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    return torch.stack([x / 7, y / 7, (x + 2 * y) / 21])[None]


def test_rotate_180_is_double_flip() -> None:
    x = asymmetric_image()
    rotated = _rotate(x, torch.tensor([180.0]))
    torch.testing.assert_close(rotated, x.flip(-1).flip(-2), atol=1e-5, rtol=0)
    # -180 and 360 as well; 0 leaves the image exactly as it is.
    torch.testing.assert_close(_rotate(x, torch.tensor([-180.0])), x.flip(-1).flip(-2), atol=1e-5, rtol=0)
    torch.testing.assert_close(_rotate(x, torch.tensor([360.0])), x, atol=1e-5, rtol=0)
    assert torch.equal(_rotate(x, torch.tensor([0.0])), x)


def test_rotate_quarter_turn_and_small_angle() -> None:
    x = asymmetric_image()
    turned = _rotate(x, torch.tensor([90.0]))
    quarter_turns = [torch.rot90(x, k, dims=(-2, -1)) for k in (1, -1)]
    assert any(torch.allclose(turned, q, atol=1e-5) for q in quarter_turns)
    # A 45° turn of a constant image: the centre keeps its value, the corners fall outside (zero fill).
    constant = torch.full((1, 3, 16, 16), 0.5)
    turned = _rotate(constant, torch.tensor([45.0]))
    assert torch.allclose(turned[..., 6:10, 6:10], constant[..., 6:10, 6:10])
    assert (turned[..., 0, 0] == 0).all() and (turned[..., -1, -1] == 0).all()


def test_rotate_is_clockwise() -> None:
    x = asymmetric_image()
    torch.testing.assert_close(_rotate(x, torch.tensor([90.0])), torch.rot90(x, -1, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_rotate_view_uses_the_drawn_angle(images: torch.Tensor) -> None:
    """The rotate view's angle is the first draw `(u · 2 − 1) · rotation` of the generator for (image, view)."""
    views = support_views(images, ("plain", "rotate"), gen(11), rotation=30.0)
    u = torch.rand((3, 2), generator=gen(11))
    angles = (u[:, 1] * 2 - 1) * 30.0
    assert (angles.abs() <= 30).all()
    expected = _rotate(images, angles)
    torch.testing.assert_close(views[:, 1], expected, atol=1e-6, rtol=0)


def test_jitter_factors_one_is_identity(images: torch.Tensor) -> None:
    torch.testing.assert_close(_jitter(images, torch.ones(3, 3)), images, atol=1e-6, rtol=0)
    jitter_zero = support_views(images, ("jitter", "rotate+jitter+flip"), gen(5), jitter=0.0, rotation=0.0, flip_p=0)
    torch.testing.assert_close(jitter_zero, images[:, None].expand(-1, 2, -1, -1, -1), atol=1e-6, rtol=0)


def test_jitter_by_hand() -> None:
    colour = torch.tensor([0.8, 0.4, 0.2]).view(1, 3, 1, 1).expand(1, 3, 4, 4).clone()
    # brightness 0.5 halves every channel.
    torch.testing.assert_close(_jitter(colour, torch.tensor([[0.5, 1.0, 1.0]])), colour * 0.5)
    # brightness 2 clamps at 1.
    torch.testing.assert_close(
        _jitter(colour, torch.tensor([[2.0, 1.0, 1.0]]))[0, :, 0, 0], torch.tensor([1.0, 0.8, 0.4])
    )
    # saturation 0: every channel becomes the luma 0.299 r + 0.587 g + 0.114 b.
    luma = 0.299 * 0.8 + 0.587 * 0.4 + 0.114 * 0.2
    torch.testing.assert_close(_jitter(colour, torch.tensor([[1.0, 1.0, 0.0]])), torch.full((1, 3, 4, 4), luma))
    # contrast 0: every pixel becomes the image's mean luma (a constant image is its own mean).
    half = torch.cat([colour[..., :2], torch.zeros(1, 3, 4, 2)], dim=-1)
    flat = _jitter(half, torch.tensor([[1.0, 0.0, 1.0]]))
    torch.testing.assert_close(flat, torch.full((1, 3, 4, 4), luma / 2))


def test_flip(images: torch.Tensor) -> None:
    always = support_views(images, ("plain", "flip"), gen(6), flip_p=1.0)
    torch.testing.assert_close(always[:, 1], images.flip(-1), atol=1e-6, rtol=0)
    never = support_views(images, ("flip",), gen(6), flip_p=0.0)
    torch.testing.assert_close(never[:, 0], images, atol=1e-6, rtol=0)
    # p = 0.5: the drawn decisions (third draw) choose flip or not per image.
    some = support_views(images, ("flip",), gen(6), flip_p=0.5)
    generator = gen(6)
    torch.rand((3, 1), generator=generator)
    torch.rand((3, 1, 3), generator=generator)
    decisions = (torch.rand((3, 1), generator=generator) < 0.5)[:, 0]
    for n in range(3):
        expected = images[n].flip(-1) if decisions[n] else images[n]
        torch.testing.assert_close(some[n, 0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", ["blur", "rotate+blur", "rotate+", "", "Plain"])
def test_bad_view_name(images: torch.Tensor, bad: str) -> None:
    with pytest.raises(ConfigError, match="unknown augmentation"):
        support_views(images, ("plain", bad), gen(0))


def test_parse_view() -> None:
    assert parse_view("plain") == frozenset()
    assert parse_view("rotate+jitter+flip") == {"rotate", "jitter", "flip"}
    assert parse_view("flip + rotate") == {"flip", "rotate"}
