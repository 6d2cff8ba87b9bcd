"""TIR: hand-computed Sum and weights, insertion points, CLS untouched, identity at β = 0, the episode axis."""

from __future__ import annotations

import pytest
import torch

import cdfsl
from cdfsl.config import RunConfig, TirConfig
from cdfsl.errors import ConfigError
from cdfsl.methods.text_side import ClassText
from cdfsl.methods.tir.recalibration import TokenRecalibration, class_votes, resolve_blocks, token_weights
from episode_batching import assert_same_as_alone


def similarity_from_sets(marked: list[set[int]], tokens: int) -> torch.Tensor:
    """`[K, M]` similarities where class j's top-|set| tokens are exactly `marked[j]` (no ties)."""
    sim = torch.arange(tokens, dtype=torch.float32).repeat(len(marked), 1) * 0.01
    for j, chosen in enumerate(marked):
        for i in chosen:
            sim[j, i] = 1.0 + 0.001 * i
    return sim


# K = 5, M = 10, ratio 0.3 → k = 3 tokens per class. Sum per token: t0=5, t1=4, t2=3, t3=2, t4=1, t5..t9=0.
K5_SETS = [{0, 1, 2}, {0, 1, 2}, {0, 1, 2}, {0, 1, 3}, {0, 3, 4}]
K5_SUM = [5, 4, 3, 2, 1, 0, 0, 0, 0, 0]
# α = 3, β = 0.5: Sum 5→0, 4→0.5, 3→1, 2→1.5, 1→2, 0→1.
K5_WEIGHTS = {
    "full": [0.0, 0.5, 1.0, 1.5, 2.0, 1, 1, 1, 1, 1],
    "inhibit": [0.0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "enhance": [1, 1, 1, 1, 2.0, 1, 1, 1, 1, 1],
    "simplified": [0.0, 1, 1, 1, 2.0, 1, 1, 1, 1, 1],
}

# K = 7, M = 20, ratio 0.2 → k = 4. Tokens 0..6 get Sum 7, 6, 5, 4, 3, 2, 1 (each class marks exactly 4).
K7_SETS = [{0, 1, 2, 3}, {0, 1, 2, 4}, {0, 1, 2, 4}, {0, 1, 2, 4}, {0, 1, 3, 5}, {0, 1, 3, 5}, {0, 2, 3, 6}]
K7_SUM = [7, 6, 5, 4, 3, 2, 1] + [0] * 13
# auto: α = 4, β = 1/3: Sum 7→0, 6→1/3, 5→2/3, 4→1, 3→4/3, 2→5/3, 1→2; simplified Sum 1 → 1 + β(α−1) = 2.
K7_WEIGHTS = {
    "full": [0.0, 1 / 3, 2 / 3, 1.0, 4 / 3, 5 / 3, 2.0] + [1.0] * 13,
    "inhibit": [0.0] + [1.0] * 19,
    "enhance": [1.0] * 6 + [2.0] + [1.0] * 13,
    "simplified": [0.0] + [1.0] * 5 + [2.0] + [1.0] * 13,
}


def test_votes_k5_and_k7() -> None:
    assert class_votes(similarity_from_sets(K5_SETS, 10), 0.3).tolist() == K5_SUM
    assert class_votes(similarity_from_sets(K7_SETS, 20), 0.2).tolist() == K7_SUM


@pytest.mark.parametrize("variant", ["full", "inhibit", "enhance", "simplified"])
def test_weights_k5(variant: str) -> None:
    weights = token_weights(similarity_from_sets(K5_SETS, 10), ratio=0.3, variant=variant)
    assert torch.allclose(weights, torch.tensor(K5_WEIGHTS[variant]))
    explicit = token_weights(similarity_from_sets(K5_SETS, 10), ratio=0.3, alpha=3, beta=0.5, variant=variant)
    assert torch.equal(weights, explicit)


@pytest.mark.parametrize("variant", ["full", "inhibit", "enhance", "simplified"])
def test_weights_k7(variant: str) -> None:
    weights = token_weights(similarity_from_sets(K7_SETS, 20), ratio=0.2, variant=variant)
    assert torch.allclose(weights, torch.tensor(K7_WEIGHTS[variant]), atol=1e-6)


def test_weights_keep_leading_axes_and_clamp() -> None:
    sim = similarity_from_sets(K5_SETS, 10)
    batched = sim.expand(2, 3, 5, 10)
    weights = token_weights(batched, ratio=0.3)
    assert weights.shape == (2, 3, 10)
    assert torch.equal(weights[1, 2], token_weights(sim, ratio=0.3))
    # β = 1 would give Sum 5 → 1 − (5 − 3) = −1: clamped at 0.
    assert token_weights(sim, ratio=0.3, beta=1.0)[0] == 0.0


def test_beta_zero_gives_unit_weights() -> None:
    assert torch.equal(token_weights(similarity_from_sets(K5_SETS, 10), beta=0.0), torch.ones(10))


def test_bad_variant() -> None:
    with pytest.raises(ConfigError, match="variant"):
        token_weights(torch.zeros(5, 10), variant="sideways")


def test_insertion_points() -> None:
    assert resolve_blocks((-4, -2), 12) == (8, 10)
    assert resolve_blocks((8, 10), 12) == (8, 10)
    assert resolve_blocks((-4, -2), 6) == (2, 4)
    assert resolve_blocks((0, -1), 2) == (0, 1)
    for bad in ((12,), (-13,), (3, 40)):
        with pytest.raises(ConfigError, match="outside the 12-block"):
            resolve_blocks(bad, 12)


def test_tiny_tower_resolves_defaults(tiny) -> None:
    assert TokenRecalibration(TirConfig(), tiny).blocks == (8, 10)
    with pytest.raises(ConfigError):
        TokenRecalibration(TirConfig(blocks=(12,)), tiny)
    with pytest.raises(ConfigError, match="text_layer"):
        TokenRecalibration(TirConfig(text_layer=20), tiny)


NAMES = [["zero", "one", "two", "three", "four"], ["five", "six", "seven", "eight", "nine"]]


def texts(tiny, names: list[list[str]]) -> torch.Tensor:
    """The frozen template prompts' normalized features after text block 10 `[E, K, C]`."""
    return ClassText(tiny, "a photo of a {}.", layer=-2)(names)


def test_hook_leaves_cls_and_other_blocks(tiny) -> None:
    tir = TokenRecalibration(TirConfig(), tiny)
    hook = tir.hook(texts(tiny, NAMES))
    x = torch.randn(2, 3, 17, tiny.vision_width)
    assert torch.equal(hook(3, x), x)
    out = hook(8, x)
    assert torch.equal(out[:, :, 0], x[:, :, 0])
    assert not torch.equal(out, x)
    ratio = out[:, :, 1:, 0] / x[:, :, 1:, 0]
    allowed = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0])
    assert torch.isclose(ratio[..., None], allowed, atol=1e-4).any(-1).all()


def test_unit_weights_equal_plain_model(tiny) -> None:
    tir = TokenRecalibration(TirConfig(beta=0.0), tiny)
    images = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        plain = tiny.encode_images(images).features
        recalibrated = tiny.encode_images(images, block_input_hook=tir.hook(texts(tiny, NAMES))).features
    assert torch.equal(plain, recalibrated)


def test_weights_are_constant_for_autograd(tiny) -> None:
    tir = TokenRecalibration(TirConfig(), tiny)
    x = torch.randn(1, 2, 17, tiny.vision_width, requires_grad=True)
    out = tir.hook(texts(tiny, NAMES[:1]))(8, x)
    out.sum().backward()
    weights = tir.weights(x.detach()[:, :, 1:], texts(tiny, NAMES[:1]))
    assert torch.allclose(x.grad[:, :, 1:, 0], weights)
    assert torch.equal(x.grad[:, :, 0], torch.ones_like(x.grad[:, :, 0]))


@pytest.mark.batching
def test_episode_axis_matches_single_episodes(tiny) -> None:
    tir = TokenRecalibration(TirConfig(), tiny)
    images = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        together = tiny.encode_images(images, block_input_hook=tir.hook(texts(tiny, NAMES))).features
        for e in range(2):
            alone = tiny.encode_images(
                images[e : e + 1], block_input_hook=tir.hook(texts(tiny, NAMES[e : e + 1]))
            ).features
            assert_same_as_alone(alone[0], together[e])


@pytest.mark.parametrize("recipe", ["vtt-release", "tir-release"])
def test_tir_with_unit_weights_reproduces_lora_runs(tmp_path, recipe: str) -> None:
    """`--method tir --set tir.beta=0` gives its base's per-episode accuracies exactly under the same recipe (dropout
    on, E = 2): `lora` under vtt-release, the release's `coop+lora` (CoOp context + LoRA on both towers) under
    tir-release."""
    base = "coop+lora" if recipe == "tir-release" else "lora"
    per_episode = {}
    for method in (base, "tir"):
        config = RunConfig(
            dataset="digits", method=method, recipe=recipe, backbone="tiny", pretrained="none", shots=5, episodes=4,
            episode_batch=2, device="cpu", db=str(tmp_path / "runs.sqlite"),
        )  # fmt: skip
        config.train.iterations = 4
        config.train.lr = 1e-2  # large enough that the adapted model differs from zero-shot
        config.tir.beta = 0.0
        per_episode[method] = cdfsl.run(config).per_episode
    assert per_episode["tir"] == per_episode[base]
