"""MaPLe: deep prompts in the adapter against open_clip's own blocks, the release's schedule and initialisation, the
plain template at depth 1, gradients, E episodes equal E single runs, learning, and the non-finite check."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from cdfsl.backbone.adapter import ClipAdapter, VisionOutput
from cdfsl.config import MapleConfig, RunConfig
from cdfsl.errors import ConfigError, TrainingError
from cdfsl.methods.maple.method import EpisodePrompts, EpochRates, MapleMethod, epoch_learning_rates
from cdfsl.seeding import torch_stream
from digits_world import DigitsWorld, tiny_config
from episode_batching import assert_same_as_alone, logit_scale_of
from poison import Poison

SMALL = {"shots": 1, "queries": 2, "augment__views": ("plain", "flip")}  # 5 ways x 1 shot x 2 views = 10 views


def maple_config(**changes: object) -> RunConfig:
    """A resolved tiny-model config for MaPLe: method `maple` where the config accepts it, else `lora` (MapleMethod
    reads only `maple.*`, the seed and the resolved recipe)."""
    changes = {**SMALL, **changes}
    try:
        return tiny_config("maple", **changes).resolved()
    except ConfigError:
        return tiny_config("lora", **changes).resolved()


def fresh_prompts(backbone: ClipAdapter, method: MapleMethod, episodes: list[int], seed: int = 0) -> EpisodePrompts:
    generators = [torch_stream(seed, i, "maple_init") for i in episodes]
    return EpisodePrompts(method.context_init, method.config.maple.depth, backbone.vision_width, generators)


@pytest.fixture(scope="module")
def world(tiny: ClipAdapter) -> DigitsWorld:
    return DigitsWorld.of(tiny)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------- adapter


def random_prompts(e: int, depth: int, n: int, width: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn((e, n, width), generator=generator) * 0.5 for _ in range(depth)]


@torch.no_grad()
def test_vision_deep_prompts_match_open_clip_blocks(tiny: ClipAdapter) -> None:
    """Block-0 prompts appended before ln_pre, deeper ones replace the last P tokens, kept after depth J; CLS pooled."""
    e, b, n, depth = 2, 3, 2, 4
    images = torch.randn((e, b, 3, 64, 64), generator=torch.Generator().manual_seed(1))
    prompts = random_prompts(e, depth, n, tiny.vision_width, seed=2)
    seen: list[int] = []
    output = tiny.encode_images(
        images, block_input_hook=lambda layer, x: seen.append(x.shape[2]) or x, keep_cls_attention=True, prompts=prompts
    )
    visual = tiny.visual
    for episode in range(e):
        x = visual.conv1(images[episode]).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(b, 1, -1), x], dim=1) + visual.positional_embedding
        x = visual.ln_pre(torch.cat([x, prompts[0][episode].expand(b, -1, -1)], dim=1))
        for layer, block in enumerate(visual.transformer.resblocks):
            if 0 < layer < depth:
                x = torch.cat([x[:, :-n], prompts[layer][episode].expand(b, -1, -1)], dim=1)
            x = block(x)
        reference = visual.ln_post(x[:, 0]) @ visual.proj
        torch.testing.assert_close(output.features[episode], reference, atol=1e-5, rtol=1e-5)
    assert seen == [1 + tiny.num_patches + n] * tiny.num_vision_blocks
    assert output.cls_attention[0].shape[-1] == 1 + tiny.num_patches + n
    with pytest.raises(ValueError, match="one P"):
        tiny.encode_images(images, prompts=[prompts[0], prompts[1][:, :1]])


@torch.no_grad()
def test_text_deep_prompts_match_open_clip_blocks(tiny: ClipAdapter) -> None:
    """Positions 1..P: block-0 prompts before the positional embedding, deeper ones replace the hidden tokens."""
    e, n, depth = 2, 2, 3
    names = ["dog", "sea or lake", "chest x-ray"]
    tokens = tiny.tokenize([f"a photo of a {name}." for name in names])
    prompts = random_prompts(e, depth, n, tiny.text_width, seed=3)
    embeddings = tiny.token_embedding(tokens).expand(e, -1, -1, -1)
    pooled = tiny.pool_positions(tokens)
    output = tiny.encode_text_embeddings(embeddings, pooled, layers=[5], prompts=prompts)
    text = tiny.text
    for episode in range(e):
        x = tiny.token_embedding(tokens)
        x = torch.cat([x[:, :1], prompts[0][episode].expand(len(names), -1, -1), x[:, 1 + n :]], dim=1)
        x = x + text.positional_embedding
        after_5 = None
        for layer, block in enumerate(text.transformer.resblocks):
            if 0 < layer < depth:
                x = torch.cat([x[:, :1], prompts[layer][episode].expand(len(names), -1, -1), x[:, 1 + n :]], dim=1)
            x = block(x, attn_mask=text.attn_mask)
            if layer == 5:
                after_5 = text.ln_final(x[torch.arange(len(names)), pooled]) @ text.text_projection
        reference = text.ln_final(x[torch.arange(len(names)), pooled]) @ text.text_projection
        torch.testing.assert_close(output.features[episode], reference, atol=1e-5, rtol=1e-5)
        assert output.layer_features is not None
        torch.testing.assert_close(output.layer_features[0, episode], after_5, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="reach a pooled token"):
        tiny.encode_text_embeddings(embeddings, pooled, prompts=random_prompts(e, 1, 9, tiny.text_width, seed=4))


# ---------------------------------------------------------------------------------------------------- release


def test_schedule_is_dassl_constant_warmup_then_cosine_per_epoch() -> None:
    # Dassl's ConstantWarmupScheduler(CosineAnnealingLR(T_max=5), 1 epoch, 1e-5), stepped after each epoch
    # (dassl/optim/lr_scheduler.py, run under this torch): the rate of each of the 5 epochs.
    expected = [1e-5, 0.0035, 0.00316578, 0.00229078, 0.00120922]
    assert epoch_learning_rates(MapleConfig()) == pytest.approx(expected, rel=1e-5)
    no_warmup = epoch_learning_rates(MapleConfig(warmup_epochs=0, epochs=4, lr=1.0))
    assert no_warmup == pytest.approx([(1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])


def test_epoch_schedule_sets_each_epochs_rate_for_its_steps_as_the_loop_steps_it() -> None:
    """The shared loop steps MaPLe's schedule once per step: 3 steps per epoch run at exactly their epoch's rate."""
    rates = epoch_learning_rates(MapleConfig())
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    schedule = EpochRates(optimizer, rates, steps_per_epoch=3)
    seen = []
    for _ in range(3 * len(rates)):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == [rate for rate in rates for _ in range(3)]


def test_init_is_per_episode_and_as_the_release(tiny: ClipAdapter) -> None:
    method = MapleMethod(tiny, maple_config(maple__depth=4))
    together = fresh_prompts(tiny, method, [0, 5])
    for row, episode in enumerate([0, 5]):
        alone = fresh_prompts(tiny, method, [episode])
        for name, tensor in together.named_parameters():
            assert torch.equal(tensor[row], getattr(alone, name)[0]), name
    assert together.context.shape == (2, 2, 96) and together.compound.shape == (2, 3, 2, 96)
    assert together.weight.shape == (2, 4, 96, 96) and together.bias.shape == (2, 4, 96)
    # The context starts as the token embeddings of "a photo"; maps as nn.Linear(96, 96); the deeper maps share one
    # draw (the release deep-copies one layer), different from block 0's.
    photo = tiny.token_embedding(tiny.tokenize(["a photo"])[0, 1:3])
    assert torch.equal(together.context[0], photo) and torch.equal(together.context[1], photo)
    bound = 1 / math.sqrt(96)
    assert together.weight.abs().max() <= bound and together.bias.abs().max() <= bound
    assert torch.equal(together.weight[:, 1], together.weight[:, 3]) and torch.equal(
        together.bias[:, 2], together.bias[:, 3]
    )
    assert not torch.equal(together.weight[:, 0], together.weight[:, 1])
    assert 0.01 < float(together.compound.detach().std()) < 0.03
    assert not torch.equal(together.weight[0], together.weight[1])


def test_config_errors(tiny: ClipAdapter) -> None:
    with pytest.raises(ConfigError, match=r"maple\.depth=13"):
        MapleMethod(tiny, maple_config(maple__depth=13))
    with pytest.raises(ConfigError, match=r"maple\.tokens=5 exceeds the 4 tokens"):
        MapleMethod(tiny, maple_config(maple__tokens=5))


# ---------------------------------------------------------------------------------------------------- method


@torch.no_grad()
def test_depth_1_untrained_text_is_the_plain_template(tiny: ClipAdapter, world: DigitsWorld) -> None:
    config = maple_config(maple__depth=1)
    batch = world.batch(config, [0, 1])
    method = MapleMethod(tiny, config)
    method.prompts = fresh_prompts(tiny, method, batch.indices)
    features = method.class_features(batch.class_names)
    for row, names in enumerate(batch.class_names):
        plain = F.normalize(tiny.text_features([f"a photo of a {name}." for name in names]), dim=-1)
        torch.testing.assert_close(features[row], plain, atol=1e-5, rtol=1e-5)
    plain_layer = F.normalize(tiny.text_layer_features([f"a photo of a {n}." for n in batch.class_names[0]])[4], dim=-1)
    torch.testing.assert_close(method.class_features(batch.class_names, 4)[0], plain_layer, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_prompt_and_no_backbone_weight(tiny: ClipAdapter, world: DigitsWorld) -> None:
    config = maple_config(maple__depth=9)
    batch = world.batch(config, [0, 1])
    method = MapleMethod(tiny, config)
    prompts = fresh_prompts(tiny, method, batch.indices)
    text, _ = method._texts(prompts, batch.class_names)
    features = tiny.encode_images(batch.support[:, :4], prompts=prompts.vision_prompts()).features
    logits = method.logits(features, text)
    F.cross_entropy(logits.transpose(1, 2), batch.support_labels[:, :4], reduction="none").mean(dim=1).sum().backward()
    for name, tensor in prompts.named_parameters():
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all(), name
        per_block = tensor.grad.flatten(2).abs().sum(dim=-1) if tensor.dim() > 3 else tensor.grad.abs().sum(dim=-1)
        assert (per_block > 0).all(), name  # every episode, and every block of the compound prompts and maps
    assert all(p.grad is None and not p.requires_grad for p in tiny.parameters())


def test_fit_predict_encode_shapes_and_steps(
    tiny: ClipAdapter, world: DigitsWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = maple_config(maple__depth=3, maple__epochs=2, maple__warmup_epochs=1)
    batch = world.batch(config, [0, 1])
    method = MapleMethod(tiny, config)
    calls: list[int] = []
    original = ClipAdapter.encode_images

    def counting(adapter: ClipAdapter, images: torch.Tensor, *args: Any, **kwargs: Any) -> VisionOutput:
        calls.append(images.shape[1])
        return original(adapter, images, *args, **kwargs)

    monkeypatch.setattr(ClipAdapter, "encode_images", counting)
    method.fit(batch)
    assert calls == [4, 4, 2] * 2  # 10 views in batches of 4, the last smaller, per epoch
    monkeypatch.undo()
    logits = method.predict(batch)
    assert logits.shape == (2, 10, 5) and torch.isfinite(logits).all()
    assert method.class_features(batch.class_names).shape == (2, 5, 64)
    observed: list[tuple[int, ...]] = []
    output = method.encode(batch.query, batch.class_names, lambda layer, x: observed.append(tuple(x.shape)), True)
    assert output.features.shape == (2, 10, 64)
    assert observed == [(2, 10, 17, 96)] * 12  # CLS + 16 patches: the prompt tokens are hidden from probes
    assert [a.shape for a in output.cls_attention] == [(2, 10, 3, 17)] * 12  # 3 heads
    records = method.episode_records()
    assert len(records) == 2 and set(records[0]) == {"maple_first_epoch_loss", "maple_last_epoch_loss", "curves"}
    assert records[0]["curves"]["step"] == [1, 6]  # 2 epochs of 3 steps: step 1 and the last
    assert method.name == "maple" and not any(p.requires_grad for p in method.prompts.parameters())


@pytest.mark.batching
def test_batched_episodes_equal_single_runs(tiny: ClipAdapter, world: DigitsWorld) -> None:
    config = maple_config(maple__depth=3, maple__epochs=1, maple__warmup_epochs=0, maple__lr=0.05)
    batch = world.batch(config, [0, 1, 2])
    method = MapleMethod(tiny, config)
    method.fit(batch)
    together, trained = method.predict(batch), method.prompts
    assert trained is not None
    start = fresh_prompts(tiny, method, batch.indices)
    assert not torch.allclose(trained.compound, start.compound)  # the episodes did train
    for row, episode in enumerate(batch.indices):
        alone = MapleMethod(tiny, config)
        single = world.batch(config, [episode])
        alone.fit(single)
        assert_same_as_alone(alone.predict(single)[0], together[row], logit_scale_of(method))


def support_loss(method: MapleMethod, batch: Any) -> torch.Tensor:
    with torch.no_grad():
        logits = method.logits(
            method.encode(batch.support, batch.class_names).features, method.class_features(batch.class_names)
        )
        return F.cross_entropy(logits.transpose(1, 2), batch.support_labels, reduction="none").mean(dim=1)


def test_fit_lowers_the_training_loss(tiny: ClipAdapter, world: DigitsWorld) -> None:
    config = maple_config(maple__depth=3, maple__epochs=2, maple__warmup_epochs=0, maple__lr=0.05)
    batch = world.batch(config, [0, 1])
    method = MapleMethod(tiny, config)
    method.prompts = fresh_prompts(tiny, method, batch.indices, batch.seed)
    before = support_loss(method, batch)
    method.fit(batch)
    after = support_loss(method, batch)
    assert (after < before - 0.01).all(), (before, after)


def test_non_finite_loss_is_a_training_error(
    tiny: ClipAdapter, world: DigitsWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = maple_config(maple__depth=2, maple__epochs=1)
    batch = world.batch(config, [3, 7])
    method = MapleMethod(tiny, config)
    poison = Poison(monkeypatch, [1])
    with pytest.raises(TrainingError, match=r"^episode 7: the training loss became nan or inf") as caught:
        method.fit(batch)
    assert "Try a lower maple.lr (now 0.0035)" in str(caught.value)
    poison.rows = []
    with pytest.raises(TrainingError, match="cannot predict after a failed fit: episode 7"):
        method.predict(batch)
    method.fit(batch)  # a later good fit clears the refusal
    assert torch.isfinite(method.predict(batch)).all()
