"""VtT: gradient correction, the dynamic switch, absorption, per-layer features, prediction without VtT modules,
every fusion/scan option, and the episode axis including per-episode switch-off."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cdfsl.config import RunConfig
from cdfsl.methods import build_method
from cdfsl.methods.text_side import TemplateAbsorber
from cdfsl.methods.vtt.extension import LossSwitch, aligned_layers, correct_gradient, scan_sequence
from cdfsl.methods.vtt.fusion import selective_scan
from digits_world import DigitsWorld, tiny_config

# ---------------------------------------------------------------- the selective scan


def test_selective_scan_matches_the_recurrence_by_hand() -> None:
    """Two steps, one channel, two state entries: h_0 = Δ0·u0·B0, h_1 = exp(Δ1·A)·h_0 + Δ1·u1·B1, y_t = h_t·C_t."""
    delta = torch.tensor([0.5, 2.0]).view(1, 1, 2, 1)
    u = torch.tensor([1.0, -3.0]).view(1, 1, 2, 1)
    b = torch.tensor([[1.0, 2.0], [0.5, -1.0]]).view(1, 1, 2, 2)
    c = torch.tensor([[1.0, 1.0], [2.0, -1.0]]).view(1, 1, 2, 2)
    a = torch.tensor([-1.0, -0.5]).view(1, 1, 1, 2)
    h0 = [0.5 * 1.0 * 1.0, 0.5 * 1.0 * 2.0]  # [0.5, 1.0]
    h1 = [math.exp(-2.0) * h0[0] + 2.0 * -3.0 * 0.5, math.exp(-1.0) * h0[1] + 2.0 * -3.0 * -1.0]
    expected = torch.tensor([h0[0] + h0[1], 2.0 * h1[0] - h1[1]])
    torch.testing.assert_close(selective_scan(delta, u, b, c, a).view(2), expected)


# ---------------------------------------------------------------- gradient correction on hand-made vectors


def test_conflicting_gradient_loses_its_opposing_part() -> None:
    g_ce = torch.tensor([1.0, 0.0])
    g = torch.tensor([-1.0, 1.0])  # cos = −1/√2
    corrected, cos = correct_gradient(g, g_ce)
    assert cos.shape == ()
    assert cos.item() == pytest.approx(-(2**-0.5))
    assert torch.allclose(corrected, torch.tensor([0.0, 1.0]))


def test_aligned_and_orthogonal_gradients_unchanged() -> None:
    g_ce = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    aligned = 3 * g_ce
    corrected, cos = correct_gradient(aligned, g_ce)
    assert cos.item() == pytest.approx(1.0)
    assert torch.equal(corrected, aligned)
    orthogonal = torch.tensor([[2.0, -1.0], [0.0, 0.0]])
    corrected, cos = correct_gradient(orthogonal, g_ce)
    assert cos.item() == pytest.approx(0.0)
    assert torch.equal(corrected, orthogonal)


def test_zero_gradient_counts_as_agreement() -> None:
    zero = torch.zeros(3)
    corrected, cos = correct_gradient(zero, torch.tensor([1.0, 2.0, 3.0]))
    assert cos.item() == 1.0 and torch.equal(corrected, zero)
    g = torch.tensor([-1.0, 0.5, 2.0])
    corrected, cos = correct_gradient(g, zero)
    assert cos.item() == 1.0 and torch.equal(corrected, g)


def test_corrected_gradient_is_orthogonal_to_ce() -> None:
    generator = torch.Generator().manual_seed(0)
    g_ce = torch.randn(4, 5, generator=generator)
    g = -g_ce + 0.3 * torch.randn(4, 5, generator=generator)
    corrected, cos = correct_gradient(g, g_ce)
    assert cos.item() < 0
    assert (corrected * g_ce).sum().abs().item() < 1e-5


# ---------------------------------------------------------------- dynamic switch-off


def test_switch_fires_when_window_mean_reaches_zero_and_stays_off() -> None:
    switch = LossSwitch(window=3)
    # history [1.0, -0.2] → mean 0.4; [1.0, -0.2, -0.5] → 0.1; [-0.2, -0.5, -0.3] → −1/3 ≤ 0: off.
    assert switch.update(-0.2) is True
    assert switch.update(-0.5) is True
    assert switch.update(-0.3) is False
    assert switch.off_at == 3
    assert switch.update(5.0) is False  # never re-enabled
    assert switch.history == [1.0, -0.2, -0.5, -0.3]


def test_switch_boundary_is_inclusive() -> None:
    switch = LossSwitch(window=2)
    assert switch.update(-1.0) is False  # mean(1.0, −1.0) = 0 → off
    assert LossSwitch(window=50).update(0.5) is True


def test_switch_window_starts_with_one() -> None:
    switch = LossSwitch(window=50)
    for _ in range(49):
        switch.update(-0.0204)  # (1 − 49·0.0204)/50 > 0 until the 1.0 leaves... it never leaves within 50
    assert switch.on
    assert switch.update(-0.5) is False  # window now holds 50 negatives


# ---------------------------------------------------------------- sequence and layers


def test_scan_orders() -> None:
    vision = torch.arange(3).float().view(3, 1, 1, 1).expand(3, 1, 1, 2)  # layer l has value l
    text = (10 + torch.arange(3)).float().view(1, 1, 3, 1).expand(1, 1, 3, 2)
    deep = scan_sequence(vision, text, "deep_to_shallow")[0, 0, :, 0].tolist()
    shallow = scan_sequence(vision, text, "shallow_to_deep")[0, 0, :, 0].tolist()
    assert deep == [2, 12, 1, 11, 0, 10]
    assert shallow == [0, 10, 1, 11, 2, 12]


def test_aligned_layers() -> None:
    assert aligned_layers(12, 12) == list(range(12))
    assert aligned_layers(24, 12) == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23]


# ---------------------------------------------------------------- on the tiny model


@pytest.fixture(scope="module")
def world(tiny) -> DigitsWorld:
    return DigitsWorld.of(tiny)


def vtt_config(iterations: int = 3) -> RunConfig:
    return tiny_config("vtt", train__iterations=iterations, lora__dropout=0.0)


def batch_of(world: DigitsWorld, config: RunConfig, episodes: list[int]):
    return world.batch(config, episodes)


def test_absorbing_the_placeholder_embedding_reproduces_the_prompt(world) -> None:
    backbone = world.backbone
    absorb = build_method(vtt_config(), backbone).text_side.absorber("X")
    assert isinstance(absorb, TemplateAbsorber) and absorb.prefix is not None  # the cached "a photo of a"
    tokens, position = absorb.tokens, absorb.position
    with torch.no_grad():
        own_embedding = backbone.token_embedding(tokens[:, position])  # [1, W]
        injected = backbone.encode_text_tokens(tokens, position, own_embedding)
        plain = backbone.model.encode_text(backbone.tokenize(["a photo of a X."]))
        through_absorber = absorb(own_embedding.expand(2, 3, -1))  # [E, B, C]
    assert torch.allclose(injected, plain, atol=1e-5)
    assert torch.allclose(through_absorber, plain.expand(2, 3, -1), atol=1e-5)


def test_last_layer_feature_is_the_image_feature(world) -> None:
    backbone = world.backbone
    images = torch.randn(1, 2, 3, 64, 64)
    with torch.no_grad():
        output = backbone.encode_images(images, layer_features=True)
        plain = backbone.model.encode_image(images[0])
    assert torch.allclose(output.layer_features[-1, 0], plain, atol=1e-6)


def test_prediction_needs_no_vtt_module(world) -> None:
    config = vtt_config(iterations=2)
    batch = batch_of(world, config, [0])
    method = build_method(config, world.backbone)
    method.fit(batch)
    assert method.extension.fusion is None and method.extension.absorb is None
    method.extension = None  # delete VtT entirely before predicting
    logits = method.predict(batch)
    assert logits.shape == (1, 15, 5)


@pytest.mark.parametrize(
    ("fusion", "scan"),
    [("release", "deep_to_shallow"), ("none", "deep_to_shallow"), ("ssm", "deep_to_shallow"),
     ("ssm", "shallow_to_deep"), ("ssm", "bidirectional"), ("attention", "deep_to_shallow"),
     ("lstm", "deep_to_shallow"), ("gru", "bidirectional")],
)  # fmt: skip
def test_every_fusion_and_scan_trains(world, fusion: str, scan: str) -> None:
    config = vtt_config(iterations=2)
    config.vtt.fusion, config.vtt.scan = fusion, scan
    batch = batch_of(world, config, [0, 1])
    method = build_method(config, world.backbone)
    before = [t.detach().clone() for t in method._new_vision_lora(batch).tensors()]
    method.fit(batch)
    after = method.lora.tensors()
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert torch.isfinite(method.predict(batch)).all()


@pytest.mark.parametrize("hidden", [None, 32])
def test_fusion_width_defaults_to_the_joint_embedding_width(world, hidden: int | None) -> None:
    backbone = world.backbone
    config = vtt_config()
    config.vtt.hidden, config.vtt.fusion = hidden, "ssm"
    batch = batch_of(world, config, [0])
    method = build_method(config, backbone)
    method.start(batch)
    method.extension.start(batch, method.trained_tensors(), method.absorber())
    width = hidden or backbone.embed_dim  # 64 on the tiny model
    assert method.extension.fusion.position.shape == (1, 2 * backbone.num_vision_blocks, width)


@pytest.mark.parametrize("fusion", ["release", "ssm"])
def test_vtt_gradient_reaches_lora_and_fusion(world, fusion: str) -> None:
    config = vtt_config()
    config.vtt.fusion = fusion
    batch = batch_of(world, config, [0])
    method = build_method(config, world.backbone)
    extension = method.extension
    method.start(batch)
    method.extension.start(batch, method.trained_tensors(), method.absorber())
    lora = method._training_lora
    images = batch.support[:, :5]
    output = world.backbone.encode_images(images, lora, layer_features=True)
    class_layers = method._texts(batch.class_names)[2]
    loss = extension.vtt_loss(output, batch.support_labels[:, :5], class_layers)
    assert loss.shape == (1,) and -1.0 <= loss.item() <= 1.0
    loss.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in extension.fusion.parameters())
    assert lora.lora_a[0].grad is not None  # through the per-layer features and the final feature


@pytest.mark.batching
def test_episode_axis_matches_single_runs_including_switch_off(world) -> None:
    config = vtt_config(iterations=12)
    config.vtt.window, config.vtt.beta = 3, 50.0  # makes some episodes switch off early (seen: episode 3 at step 4)
    episodes = [0, 1, 2, 3]
    together = build_method(config, world.backbone)
    together.fit(batch_of(world, config, episodes))
    off_together = [switch.off_at for switch in together.extension.switches]
    assert any(off is not None for off in off_together) and len(set(off_together)) > 1
    for position, episode in enumerate(episodes):
        alone = build_method(copy.deepcopy(config), world.backbone)
        alone.fit(batch_of(world, config, [episode]))
        assert alone.extension.switches[0].off_at == off_together[position]
        for a, b in zip(alone.lora.tensors(), together.lora.tensors(), strict=True):
            assert torch.allclose(a[0], b[position], atol=1e-5), f"episode {episode}"


def test_beta_zero_reproduces_lora(world) -> None:
    config = vtt_config(iterations=4)
    config.vtt.beta = 0.0
    config.lora.dropout = 0.25
    lora_config = copy.deepcopy(config)
    lora_config.method = "lora"
    batch = batch_of(world, config, [0, 1])
    vtt, lora = build_method(config, world.backbone), build_method(lora_config, world.backbone)
    vtt.fit(batch)
    lora.fit(batch)
    for a, b in zip(vtt.lora.tensors(), lora.lora.tensors(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(vtt.predict(batch), lora.predict(batch))
