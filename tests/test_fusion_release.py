"""The VtT release's fusion (`ReleaseFusion`): shapes, parameter counts, the four shared-weight scan orders,
causality, the episode axis, initialisation, gradients and bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdfsl.methods.vtt.fusion import ReleaseFusion, ReleaseMamba, parameter_count


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def small(seeds: tuple[int, ...] = (0, 1), grid: int = 3, width: int = 16, outputs: int = 16) -> ReleaseFusion:
    return ReleaseFusion(generators(*seeds), grid, width, outputs, state=8, dt_rank=8)


def sequence(episodes: int = 2, batch: int = 3, grid: int = 3, width: int = 16, seed: int = 7) -> torch.Tensor:
    return torch.randn(episodes, batch, grid * grid, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("outputs", [16, 24])
def test_output_shape(outputs: int) -> None:
    fusion = small(outputs=outputs)
    assert fusion.forward(sequence()).shape == (2, 3, outputs)
    assert (fusion.head is None) == (outputs == 16)


def test_wrong_sequence_length_raises() -> None:
    with pytest.raises(ValueError, match="grid"):
        small()(torch.randn(2, 3, 8, 16))


def test_invalid_constructor_arguments_raise() -> None:
    for kwargs in ({"grid": 0}, {"width": 0}, {"outputs": 0}, {"state": 0}, {"dt_rank": 0}, {"conv": 0}):
        arguments = {"grid": 3, "width": 16, "outputs": 16, "state": 8, "dt_rank": 8, "conv": 4} | kwargs
        with pytest.raises(ValueError):
            ReleaseFusion(generators(0), **arguments)


def test_parameter_count_matches_the_release() -> None:
    fusion = ReleaseFusion(generators(0), grid=5, width=512, outputs=512)
    assert parameter_count(fusion) == 2_821_120
    assert parameter_count(fusion.token_mlp) == 1_100_800
    assert math.prod(fusion.position.shape[1:]) == 12_800
    assert parameter_count(fusion.block) == 1_445_376
    assert parameter_count(fusion.residual) == 262_144
    assert fusion.head is None


def test_parameter_count_is_per_episode() -> None:
    assert parameter_count(small(seeds=(0,))) == parameter_count(small(seeds=(0, 1, 2)))


def test_four_orders_share_one_block() -> None:
    fusion, x = small(), sequence()
    blocks = [module for module in fusion.modules() if isinstance(module, ReleaseMamba)]
    assert blocks == [fusion.block]
    e, b, _, c = x.shape
    s = fusion.grid
    with torch.no_grad():
        tokens = fusion.token_mlp(x) + fusion.position[:, None]

        def transpose(t: torch.Tensor) -> torch.Tensor:
            return t.view(e, b, s, s, c).transpose(2, 3).reshape(e, b, s * s, c)

        row = fusion.block(tokens)
        row_flip = fusion.block(tokens.flip(2)).flip(2)
        column = transpose(fusion.block(transpose(tokens)))
        column_flip = transpose(fusion.block(transpose(tokens).flip(2)).flip(2))
        expected = (row + row_flip + column + column_flip).mean(2) + x.mean(2) @ fusion.residual.weight
        torch.testing.assert_close(fusion(x), expected, atol=1e-5, rtol=1e-5)


def test_token_order_matters() -> None:
    fusion, x = small(), sequence()
    with torch.no_grad():
        assert not torch.allclose(fusion(x), fusion(x.flip(2)), atol=1e-4)


def test_conv_and_scan_are_causal() -> None:
    block = small().block
    x = sequence()
    t = 5
    perturbed = x.clone()
    perturbed[:, :, t] += 1.0
    with torch.no_grad():
        before, after = block(x), block(perturbed)
    torch.testing.assert_close(before[:, :, :t], after[:, :, :t], atol=0.0, rtol=0.0)
    assert not torch.allclose(before[:, :, t], after[:, :, t])


def test_episodes_at_once_equal_separate_modules() -> None:
    seeds = (3, 4, 5)
    joint = small(seeds=seeds, outputs=24)
    x = sequence(episodes=3).requires_grad_()
    out = joint(x)
    out.square().sum().backward()
    assert x.grad is not None
    for e, seed in enumerate(seeds):
        single = small(seeds=(seed,), outputs=24)
        x_e = x[e : e + 1].detach().clone().requires_grad_()
        out_e = single(x_e)
        out_e.square().sum().backward()
        torch.testing.assert_close(out[e : e + 1], out_e, atol=1e-5, rtol=1e-5)
        assert x_e.grad is not None
        torch.testing.assert_close(x.grad[e : e + 1], x_e.grad, atol=1e-5, rtol=1e-5)


def test_episode_weights_do_not_depend_on_companions() -> None:
    first = ReleaseFusion(generators(11, 12), 3, 16, 24, state=8, dt_rank=8)
    second = ReleaseFusion(generators(11, 13), 3, 16, 24, state=8, dt_rank=8)
    named_second = dict(second.named_parameters())
    for name, parameter in first.named_parameters():
        torch.testing.assert_close(parameter[0], named_second[name][0], atol=0.0, rtol=0.0)
    assert not torch.equal(first.block.in_proj.weight[1], second.block.in_proj.weight[1])


def test_initialisation_follows_the_release() -> None:
    fusion = ReleaseFusion(generators(0, 1), grid=5, width=512, outputs=512, state=8, dt_rank=8)
    block = fusion.block
    dt = F.softplus(block.dt_bias)
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6
    assert dt.std() > 0
    expected_a_log = torch.log(torch.arange(1, 9, dtype=torch.float32)).expand(2, 512, 8)
    torch.testing.assert_close(block.a_log, expected_a_log, atol=0.0, rtol=0.0)
    assert torch.equal(block.skip, torch.ones(2, 512))
    assert 0.015 < fusion.position[0].std() < 0.025
    assert fusion.position.abs().max() <= 2.0
    assert block.conv_weight.abs().max() <= 0.5 and block.dt_proj.weight.abs().max() <= 8**-0.5
    assert torch.equal(fusion.token_mlp.norm_weight, torch.ones(2, 25, 1024))
    assert torch.equal(fusion.token_mlp.norm_bias, torch.zeros(2, 25, 1024))


def test_gradients_reach_every_parameter() -> None:
    fusion = small(outputs=24)
    fusion(sequence()).sum().backward()
    for name, parameter in fusion.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_runs_under_bf16_autocast() -> None:
    fusion = small(outputs=24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fusion(sequence())
    assert out.shape == (2, 3, 24)
    assert torch.isfinite(out.float()).all()


def test_layer_norm_spans_the_whole_sample() -> None:
    mlp = small().token_mlp
    x = sequence()
    hidden = mlp.fc1(x)
    mean = hidden.mean(dim=(-2, -1), keepdim=True)
    var = hidden.var(dim=(-2, -1), keepdim=True, unbiased=False)
    expected = mlp.fc2(F.leaky_relu((hidden - mean) / torch.sqrt(var + 1e-5), 0.1))
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)


def test_block_matches_a_reference_conv1d() -> None:
    block = small(seeds=(0,)).block
    x = sequence(episodes=1)[0]  # [B, L, C]
    width, kernel = x.shape[-1], block.conv
    conv = nn.Conv1d(width, width, kernel, groups=width, padding=kernel - 1)
    with torch.no_grad():
        conv.weight.copy_(block.conv_weight[0][:, None])
        conv.bias.copy_(block.conv_bias[0])
        expected = conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        torch.testing.assert_close(block.causal_conv(x[None])[0], expected, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ memory-bounded scan (states recomputed in backward)
def fusion_gradients(recompute: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from cdfsl.methods.vtt import fusion as fusion_module

    fusion = small(seeds=(0,), grid=5)
    inputs = sequence(episodes=1, batch=2, grid=5).requires_grad_()
    default = fusion_module.RECOMPUTE_SCAN
    fusion_module.RECOMPUTE_SCAN = recompute
    try:
        out = fusion(inputs)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), [inputs, *fusion.parameters()])
    finally:
        fusion_module.RECOMPUTE_SCAN = default
    return out.detach(), list(grads)


def test_recomputed_scan_gives_the_plain_scans_outputs_and_gradients() -> None:
    """The memory-bounded path (the default) against the plain scan that keeps every state: the same forward, and
    every gradient (the fusion's inputs and each parameter) bit for bit, 25 scan steps in chunks of 5."""
    plain_out, plain = fusion_gradients(recompute=False)
    out, recomputed = fusion_gradients(recompute=True)
    assert torch.equal(out, plain_out)
    assert all(torch.equal(a, b) for a, b in zip(recomputed, plain, strict=True))


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_recomputed_scan_matches_for_any_length(steps: int) -> None:
    from cdfsl.methods.vtt.fusion import selective_scan

    g = torch.Generator().manual_seed(steps)
    delta, u = torch.rand(2, 3, steps, 4, generator=g), torch.randn(2, 3, steps, 4, generator=g)
    b, c = torch.randn(2, 3, steps, 5, generator=g), torch.randn(2, 3, steps, 5, generator=g)
    a_log = torch.rand(2, 4, 5, generator=g)
    leaves = [t.requires_grad_() for t in (delta, u, b, c, a_log)]
    results = []
    for recompute in (False, True):
        y = selective_scan(delta, u, b, c, -torch.exp(a_log)[:, None], recompute=recompute)
        results.append((y, torch.autograd.grad(y.square().sum(), leaves)))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


def test_recomputed_scan_keeps_no_state_for_backward() -> None:
    """What the scan saves for backward: its inputs only (no `[E, B, H, N]` state), against at least 2 states a step
    for the plain scan."""
    from cdfsl.methods.vtt.fusion import selective_scan

    e, b, s, h, n = 1, 2, 9, 4, 32
    inputs = [torch.rand(e, b, s, h), torch.randn(e, b, s, h), torch.randn(e, b, s, n), torch.randn(e, b, s, n)]
    a = -torch.rand(e, 1, h, n)
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    for recompute in (False, True):
        saved.clear()
        leaves = [t.clone().requires_grad_() for t in inputs]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            selective_scan(*leaves, a, recompute=recompute)
        states = sum(shape == (e, b, h, n) for shape in saved)
        if recompute:
            assert states == 0
        else:
            assert states >= 2 * s - 1  # at least h_{t-1} and exp(Δ_t A) a step (h_{-1} = 0 is not a product)
