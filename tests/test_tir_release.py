"""The tir-release base on the tiny model: the CoOp context, LoRA on the text tower, class texts recomputed every
step, the SGD context group, full-support batches, the shot rule for the logit scale, and the episode axis."""

from __future__ import annotations

import copy

import pytest
import torch

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.config import RunConfig
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.methods import build_method
from cdfsl.methods.lora.method import LoraMethod
from cdfsl.methods.text_side import ClassText, TextSide
from digits_world import DigitsWorld, tiny_config
from episode_batching import assert_same_as_alone, logit_scale_of


@pytest.fixture(scope="module")
def world(tiny: ClipAdapter) -> DigitsWorld:
    return DigitsWorld.of(tiny)


def tir_config(shots: int = 1, **changes: object) -> RunConfig:
    return tiny_config("tir", shots=shots, **changes)


def batch_of(world: DigitsWorld, config: RunConfig, episodes: list[int]) -> EpisodeBatch:
    return world.batch(config, episodes)


def test_context_starts_as_the_embeddings_of_a_photo_of_a(world) -> None:
    backbone = world.backbone
    side = TextSide(backbone, tir_config().resolved())
    side.start(0, [0, 1])
    tokens = backbone.tokenize(["a photo of a"])[0, 1:5]
    assert side.context is not None and side.context.shape == (2, 4, backbone.text_width)
    torch.testing.assert_close(side.context[1], backbone.token_embedding(tokens))


@torch.no_grad()
def test_untrained_learned_prompts_equal_the_template_prompts(world) -> None:
    """Context = "a photo of a", text LoRA B = 0: the learned side gives the frozen features of the template."""
    backbone = world.backbone
    config = tir_config().resolved()
    side = TextSide(backbone, config)
    side.start(0, [0, 1])
    side.train(False)
    names = [["zero", "one", "two"], ["seven", "eight", "nine"]]
    final, (after_10,) = side.features(names, (10,))
    torch.testing.assert_close(final, ClassText(backbone, config.train.template)(names), atol=1e-5, rtol=1e-5)
    frozen_after_10 = ClassText(backbone, config.train.template, 10, normalize=False)(names)  # raw, as VtT reads them
    torch.testing.assert_close(after_10, frozen_after_10, atol=1e-5, rtol=1e-5)


def test_context_and_both_towers_receive_gradients(world) -> None:
    """After one step, B factors (zero at the start) of both towers and the context (no weight decay) have moved:
    only a non-zero gradient moves them."""
    config = tir_config(train__iterations=1, prompt__weight_decay=0.0)
    batch = batch_of(world, config, [0])
    method = build_method(config, world.backbone)
    assert isinstance(method, LoraMethod)
    method.fit(batch)
    assert method.lora is not None and method.text_side.lora is not None and method.text_side.context is not None
    assert all(b.abs().sum() > 0 for b in method.lora.lora_b)
    assert all(b.abs().sum() > 0 for b in method.text_side.lora.lora_b)
    start = TextSide(world.backbone, method.config)
    start.start(0, [0])
    assert (method.text_side.context - start.context).abs().amax(dim=-1).gt(0).all()  # every context vector


@pytest.mark.parametrize(("shots", "scale"), [(1, 2.0), (5, 4.0)])
def test_logit_scale_follows_the_shot_rule(world, shots: int, scale: float) -> None:
    method = build_method(tir_config(shots=shots), world.backbone)
    features = torch.nn.functional.normalize(torch.randn(1, 4, world.backbone.embed_dim), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(1, 5, world.backbone.embed_dim), dim=-1)
    torch.testing.assert_close(method.logits(features, text), scale * features @ text.transpose(1, 2))


def test_full_support_batches_see_every_view_each_step(world, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tir_config()
    batch = batch_of(world, config, [0])
    method = build_method(config, world.backbone)
    sizes: list[int] = []
    real = world.backbone.encode_images

    def spy(images, *args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(images.shape[1])
        return real(images, *args, **kwargs)

    monkeypatch.setattr(world.backbone, "encode_images", spy)
    method.fit(batch)
    assert sizes == [batch.support.shape[1]] * 3 == [5 * 1 * 5] * 3


def test_class_texts_are_recomputed_every_step(world, monkeypatch: pytest.MonkeyPatch) -> None:
    """TIR's Sum uses the learned prompts of the same step (text block 10 of the LoRA'd text tower)."""
    config = tir_config()
    batch = batch_of(world, config, [0])
    method = build_method(config, world.backbone)
    calls: list[tuple[int, ...]] = []
    real = method.text_side.features

    def spy(names, layers=()):  # type: ignore[no-untyped-def]
        calls.append(tuple(layers))
        return real(names, layers)

    monkeypatch.setattr(method.text_side, "features", spy)
    method.fit(batch)
    assert calls == [(10,)] * 3


@pytest.mark.batching
def test_three_episodes_at_once_equal_three_single_runs(world) -> None:
    """Equal to float tolerance. AdamW's first steps are ±lr (2e-4) for any gradient above its eps, so an element whose
    gradient is at rounding level in one of the two runs may differ by a fraction of a step: tolerance 1e-4 = lr/2."""
    config = tir_config(lora__dropout=0.25)
    episodes = [0, 4, 9]
    together = build_method(config, world.backbone)
    batch = batch_of(world, config, episodes)
    together.fit(batch)
    logits = together.predict(batch)
    for position, episode in enumerate(episodes):
        alone = build_method(copy.deepcopy(config), world.backbone)
        single = batch_of(world, config, [episode])
        alone.fit(single)
        assert alone.text_side.context is not None and together.text_side.context is not None
        torch.testing.assert_close(alone.text_side.context[0], together.text_side.context[position], atol=1e-6, rtol=0)
        for a, b in zip(alone.lora.tensors(), together.lora.tensors(), strict=True):
            torch.testing.assert_close(a[0], b[position], atol=1e-4, rtol=0)
        for a, b in zip(alone.text_side.lora.tensors(), together.text_side.lora.tensors(), strict=True):
            torch.testing.assert_close(a[0], b[position], atol=1e-4, rtol=0)
        assert_same_as_alone(alone.predict(single)[0], logits[position], logit_scale_of(together))


def test_tir_release_learns_on_the_tiny_model(world) -> None:
    """A few full-support steps move the learned prompts and LoRA factors and keep predictions finite."""
    config = tir_config(train__iterations=5)
    batch = batch_of(world, config, [2])
    method = build_method(config, world.backbone)
    method.fit(batch)
    assert method.text_side.context is not None
    start = TextSide(world.backbone, method.config)
    start.start(0, [2])
    assert not torch.allclose(method.text_side.context, start.context)
    assert any(b.abs().sum() > 0 for b in method.lora.lora_b)
    assert torch.isfinite(method.predict(batch)).all()
