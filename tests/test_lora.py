"""Episode-batched LoRA: zero start, merge, E episodes equal E separate runs, Kaiming init, target subsets."""

from __future__ import annotations

import math

import pytest
import torch

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.backbone.lora import EpisodeLoRA
from cdfsl.config import LoraConfig
from cdfsl.seeding import torch_stream
from episode_batching import assert_same_as_alone

SEED = 3


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """`[E=3, B=2, 3, 64, 64]`."""
    return torch.randn((3, 2, 3, 64, 64), generator=torch.Generator().manual_seed(5))


def make_lora(
    tiny: ClipAdapter, episodes: list[int], config: LoraConfig | None = None, with_dropout: bool = True
) -> EpisodeLoRA:
    config = config or LoraConfig(rank=4, alpha=8.0, dropout=0.25)
    return EpisodeLoRA(
        config,
        tiny.num_vision_blocks,
        tiny.vision_width,
        [torch_stream(SEED, i, "lora_init") for i in episodes],
        [torch_stream(SEED, i, "dropout") for i in episodes] if with_dropout else None,
    )


def randomize_b(lora: EpisodeLoRA, episodes: list[int], scale: float = 0.25) -> None:
    """Fill B with values that depend only on (layer, episode index), so batched and single LoRAs agree."""
    with torch.no_grad():
        for layer, b in enumerate(lora.lora_b):
            for e, episode in enumerate(episodes):
                generator = torch.Generator().manual_seed(1000 * episode + layer)
                b[e] = torch.randn(b.shape[1:], generator=generator) * scale


def test_shapes_and_scale(tiny: ClipAdapter) -> None:
    lora = make_lora(tiny, [0, 1], LoraConfig(rank=4, alpha=2.0, targets=("v", "q")))
    assert lora.episodes == 2
    assert len(lora.lora_a) == len(lora.lora_b) == 12
    assert lora.lora_a[0].shape == (2, 2, 4, 96)
    assert lora.lora_b[0].shape == (2, 2, 96, 4)
    assert lora.slots == [0, 2]  # sorted q, v whatever the given order
    assert lora.scale == 1.0  # alpha / sqrt(rank) = 2 / 2
    assert all(torch.equal(b, torch.zeros_like(b)) for b in lora.lora_b)
    assert len(lora.tensors()) == 24
    assert sum(p.numel() for p in lora.parameters()) == 12 * 2 * 2 * (4 * 96 * 2)


@torch.no_grad()
@pytest.mark.parametrize("training", [False, True])
def test_zero_b_gives_the_plain_model(tiny: ClipAdapter, images: torch.Tensor, training: bool) -> None:
    lora = make_lora(tiny, [0, 1, 2])
    lora.train(training)
    plain = tiny.encode_images(images).features
    assert torch.equal(tiny.encode_images(images, lora).features, plain)


@torch.no_grad()
def test_merge_equals_unmerged(tiny: ClipAdapter, images: torch.Tensor) -> None:
    lora = make_lora(tiny, [0, 1, 2])
    randomize_b(lora, [0, 1, 2])
    lora.eval()
    unmerged = tiny.encode_images(images, lora).features
    assert not torch.allclose(unmerged, tiny.encode_images(images).features, atol=1e-3)
    frozen = [block.attn.in_proj_weight for block in tiny.vision_blocks]
    lora.merge(frozen)
    assert lora.merged
    merged = tiny.encode_images(images, lora).features
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    # merge does not touch the frozen weights; unmerge restores the factorized path exactly.
    assert all(w is block.attn.in_proj_weight for w, block in zip(frozen, tiny.vision_blocks, strict=True))
    lora.unmerge()
    assert not lora.merged
    assert torch.equal(tiny.encode_images(images, lora).features, unmerged)


@torch.no_grad()
def test_merged_weight_by_hand(tiny: ClipAdapter) -> None:
    """Merged weight of block 0 = W + scale · B @ A on the target rows, W elsewhere."""
    config = LoraConfig(rank=2, alpha=3.0, dropout=0.0, targets=("k",))
    lora = make_lora(tiny, [4], config, with_dropout=False)
    randomize_b(lora, [4])
    weight = tiny.vision_blocks[0].attn.in_proj_weight
    lora.merge([weight])
    merged = lora._merged[0][0]
    d = 96
    update = (3.0 / math.sqrt(2)) * lora.lora_b[0][0, 0] @ lora.lora_a[0][0, 0]
    torch.testing.assert_close(merged[d : 2 * d], weight[d : 2 * d] + update)
    assert torch.equal(merged[:d], weight[:d]) and torch.equal(merged[2 * d :], weight[2 * d :])


@torch.no_grad()
def test_rank_16_alpha_8_adds_twice_the_low_rank_product(tiny: ClipAdapter) -> None:
    """The released scale alpha/sqrt(r): with r 16, alpha 8 the update is 2 · x Aᵀ Bᵀ, merged and unmerged."""
    lora = make_lora(tiny, [1], LoraConfig(rank=16, alpha=8.0, dropout=0.0, targets=("q", "k", "v")), False)
    randomize_b(lora, [1])
    lora.eval()
    weight, bias = tiny.vision_blocks[0].attn.in_proj_weight, tiny.vision_blocks[0].attn.in_proj_bias
    x = torch.randn((1, 7, 96), generator=torch.Generator().manual_seed(0))
    frozen = torch.nn.functional.linear(x, weight, bias)
    a, b = lora.lora_a[0][0], lora.lora_b[0][0]  # [P, r, D], [P, D, r]
    expected = torch.cat([2.0 * x[0] @ a[p].T @ b[p].T for p in range(3)], dim=-1)
    torch.testing.assert_close(lora(0, x, weight, bias)[0] - frozen[0], expected, atol=1e-5, rtol=1e-5)
    lora.merge([block.attn.in_proj_weight for block in tiny.vision_blocks])
    torch.testing.assert_close(lora(0, x, weight, bias)[0] - frozen[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.batching
def test_batched_equals_separate(tiny: ClipAdapter, images: torch.Tensor) -> None:
    """3 episodes in one LoRA = 3 single-episode LoRAs from the same streams (train mode, dropout 0.25)."""
    episodes = [0, 7, 2]

    def fresh() -> tuple[EpisodeLoRA, list[EpisodeLoRA]]:
        batched = make_lora(tiny, episodes)
        singles = [make_lora(tiny, [i]) for i in episodes]
        randomize_b(batched, episodes)
        for single, i in zip(singles, episodes, strict=True):
            randomize_b(single, [i])
        for lora in (batched, *singles):
            lora.train()
        return batched, singles

    batched, singles = fresh()
    for layer in range(12):
        for e, single in enumerate(singles):
            assert torch.equal(batched.lora_a[layer][e], single.lora_a[layer][0])
    # Different episodes start from different A (their own streams).
    assert not torch.equal(batched.lora_a[0][0], batched.lora_a[0][1])

    with torch.no_grad():
        h = torch.randn((3, 10, 96), generator=torch.Generator().manual_seed(9))
        for layer in (0, 1):  # two calls: each episode's dropout stream advances the same way
            together = batched.delta(layer, h)
            assert together.shape == (3, 3, 10, 96)
            for e, single in enumerate(singles):
                torch.testing.assert_close(single.delta(layer, h[e : e + 1])[0], together[e], atol=1e-6, rtol=1e-5)

    batched, singles = fresh()
    together = tiny.encode_images(images, batched).features
    for e, single in enumerate(singles):
        alone = tiny.encode_images(images[e : e + 1], single).features
        assert_same_as_alone(alone[0], together[e])

    # Gradients: the summed loss gives each episode's factors exactly its own gradient.
    batched, singles = fresh()
    tiny.encode_images(images, batched).features.square().sum(dim=(1, 2)).sum().backward()
    for e, single in enumerate(singles):
        tiny.encode_images(images[e : e + 1], single).features.square().sum().backward()
        for layer in (0, 11):
            torch.testing.assert_close(
                single.lora_b[layer].grad[0], batched.lora_b[layer].grad[e], atol=1e-4, rtol=1e-4
            )
            torch.testing.assert_close(
                single.lora_a[layer].grad[0], batched.lora_a[layer].grad[e], atol=1e-4, rtol=1e-4
            )


@torch.no_grad()
def test_dropout_only_in_training(tiny: ClipAdapter) -> None:
    lora = make_lora(tiny, [0])
    randomize_b(lora, [0])
    h = torch.randn((1, 10, 96), generator=torch.Generator().manual_seed(9))
    lora.eval()
    first, second = lora.delta(0, h), lora.delta(0, h)
    assert torch.equal(first, second)
    lora.train()
    dropped = lora.delta(0, h)
    assert not torch.allclose(dropped, first)
    # By hand: the first training call draws one keep-mask [P, n, D] from the episode's dropout stream; kept inputs
    # are scaled by 1 / 0.75 and each target's update is scale · B (A (h · mask / 0.75)).
    mask = torch.rand((3, 10, 96), generator=torch_stream(SEED, 0, "dropout")) < 0.75
    assert 0.7 < mask.float().mean() < 0.8
    for slot in range(3):
        x = h[0] * mask[slot] / 0.75
        expected = lora.scale * (x @ lora.lora_a[0][0, slot].T) @ lora.lora_b[0][0, slot].T
        torch.testing.assert_close(dropped[0, slot], expected, atol=1e-5, rtol=1e-5)
    without_generators = make_lora(tiny, [0], with_dropout=False)
    without_generators.train()
    with pytest.raises(RuntimeError, match="dropout generators"):
        without_generators.delta(0, h)


def test_kaiming_uniform_init(tiny: ClipAdapter) -> None:
    lora = make_lora(tiny, [0, 1], LoraConfig(rank=16, alpha=8.0))
    bound = 1.0 / math.sqrt(96)
    values = torch.cat([a.detach().flatten() for a in lora.lora_a])
    assert values.numel() == 12 * 2 * 3 * 16 * 96
    assert values.abs().max() <= bound
    assert values.abs().max() > 0.99 * bound
    # Uniform on [-bound, bound]: mean 0, variance bound²/3, equal counts in 8 bins.
    assert abs(values.mean().item()) < 0.01 * bound
    assert values.var().item() == pytest.approx(bound**2 / 3, rel=0.02)
    counts = torch.histc(values, bins=8, min=-bound, max=bound)
    expected = values.numel() / 8
    assert ((counts - expected).abs() < 0.05 * expected).all(), counts
    # The same bound as torch's own nn.Linear initialisation (kaiming_uniform_, a = sqrt(5)) for an [r, D] weight.
    reference = torch.empty(16, 96)
    torch.nn.init.kaiming_uniform_(reference, a=math.sqrt(5))
    assert reference.abs().max() <= bound


@torch.no_grad()
def test_targets_subset_leaves_k_untouched(tiny: ClipAdapter) -> None:
    lora = make_lora(tiny, [0, 1], LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q", "v")), with_dropout=False)
    randomize_b(lora, [0, 1])
    lora.eval()
    block = tiny.vision_blocks[3]
    h = torch.randn((2, 6, 96), generator=torch.Generator().manual_seed(2))
    weight, bias = block.attn.in_proj_weight, block.attn.in_proj_bias
    plain = torch.nn.functional.linear(h, weight, bias)
    adapted = lora(3, h, weight, bias)
    assert adapted.shape == (2, 6, 288)
    q, k, v = adapted.split(96, dim=-1)
    plain_q, plain_k, plain_v = plain.split(96, dim=-1)
    assert torch.equal(k, plain_k)
    assert not torch.allclose(q, plain_q) and not torch.allclose(v, plain_v)
    # q and v get scale · (h A^T) B^T of their own slot.
    for slot, (got, base) in enumerate(((q, plain_q), (v, plain_v))):
        expected = base + lora.scale * (h @ lora.lora_a[3][:, slot].transpose(1, 2)) @ lora.lora_b[3][
            :, slot
        ].transpose(1, 2)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Merged: same numbers, k rows of the merged weight are the frozen ones.
    lora.merge([b.attn.in_proj_weight for b in tiny.vision_blocks])
    torch.testing.assert_close(lora(3, h, weight, bias), adapted, atol=1e-5, rtol=1e-5)
    assert torch.equal(lora._merged[3][:, 96:192], weight[96:192].expand(2, -1, -1))
