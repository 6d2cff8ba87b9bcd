"""The backbone adapter's explicit block loops against open_clip's own encoders, and checkpoint loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.backbone.factory import load_backbone
from cdfsl.errors import BackboneError
from episode_batching import assert_same_as_alone

TEMPLATE = "a photo of a {}."
PROMPTS = ["a photo of a dog.", "a photo of a sea or lake.", "an x-ray of a chest showing a large pleural effusion."]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Normalized-looking images `[E=2, B=3, 3, 64, 64]`."""
    return torch.randn((2, 3, 3, 64, 64), generator=torch.Generator().manual_seed(1))


def test_shapes_of_the_tiny_model(tiny: ClipAdapter) -> None:
    assert (tiny.num_vision_blocks, tiny.num_text_blocks) == (12, 12)
    assert (tiny.vision_width, tiny.text_width, tiny.embed_dim) == (96, 96, 64)
    assert (tiny.image_size, tiny.num_patches) == (64, 16)
    assert not any(p.requires_grad for p in tiny.parameters())
    assert not tiny.model.training


@torch.no_grad()
def test_encode_images_matches_open_clip(tiny: ClipAdapter, images: torch.Tensor) -> None:
    output = tiny.encode_images(images)
    reference = tiny.model.encode_image(images.flatten(0, 1))
    assert output.features.shape == (2, 3, 64)
    torch.testing.assert_close(output.features.flatten(0, 1), reference, atol=1e-5, rtol=1e-5)
    assert output.layer_features is None and output.block_inputs == [] and output.cls_attention == []


@pytest.mark.batching
@torch.no_grad()
def test_episode_axis_is_only_a_reshape(tiny: ClipAdapter, images: torch.Tensor) -> None:
    together = tiny.encode_images(images).features
    for e in range(images.shape[0]):
        alone = tiny.encode_images(images[e : e + 1]).features
        assert_same_as_alone(alone[0], together[e])


@torch.no_grad()
def test_layer_features(tiny: ClipAdapter, images: torch.Tensor) -> None:
    output = tiny.encode_images(images, layer_features=True)
    assert output.layer_features is not None
    assert output.layer_features.shape == (12, 2, 3, 64)
    assert torch.equal(output.layer_features[-1], output.features)
    torch.testing.assert_close(output.features, tiny.encode_images(images).features, atol=1e-6, rtol=1e-6)
    # Different blocks give different pooled features (the stack is not one tensor repeated).
    assert not torch.allclose(output.layer_features[0], output.layer_features[-1])


@torch.no_grad()
def test_block_inputs_vision_block_and_project_tokens(tiny: ClipAdapter, images: torch.Tensor) -> None:
    output = tiny.encode_images(images, keep_block_inputs=True)
    assert len(output.block_inputs) == 12
    assert output.block_inputs[0].shape == (2, 3, 17, 96)
    embedded = tiny.embed_images(images.flatten(0, 1)).reshape(2, 3, 17, 96)
    assert torch.equal(output.block_inputs[0], embedded)
    for layer in (0, 5):
        following, _ = tiny.vision_block(layer, output.block_inputs[layer])
        torch.testing.assert_close(following, output.block_inputs[layer + 1], atol=1e-5, rtol=1e-5)
    final, _ = tiny.vision_block(11, output.block_inputs[11])
    projected = tiny.project_tokens(final)
    assert projected.shape == (2, 3, 17, 64)
    torch.testing.assert_close(projected[:, :, 0], output.features, atol=1e-5, rtol=1e-5)
    by_hand = tiny.visual.ln_post(final[:, :, 3]) @ tiny.visual.proj
    torch.testing.assert_close(projected[:, :, 3], by_hand)


@torch.no_grad()
def test_block_input_hook_sees_and_replaces_tokens(tiny: ClipAdapter, images: torch.Tensor) -> None:
    seen: list[int] = []

    def identity(layer: int, x: torch.Tensor) -> torch.Tensor:
        seen.append(layer)
        assert x.shape == (2, 3, 17, 96)
        return x

    plain = tiny.encode_images(images).features
    assert torch.equal(tiny.encode_images(images, block_input_hook=identity).features, plain)
    assert seen == list(range(12))

    def zero_patches_at_11(layer: int, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :, :1], torch.zeros_like(x[:, :, 1:])], dim=2) if layer == 11 else x

    assert not torch.allclose(tiny.encode_images(images, block_input_hook=zero_patches_at_11).features, plain)


@torch.no_grad()
def test_cls_attention(tiny: ClipAdapter, images: torch.Tensor) -> None:
    output = tiny.encode_images(images, keep_cls_attention=True, keep_block_inputs=True)
    assert len(output.cls_attention) == 12
    heads = tiny.vision_blocks[0].attn.num_heads
    for attention in output.cls_attention:
        assert attention.shape == (2, 3, heads, 17)
        assert (attention >= 0).all()
        torch.testing.assert_close(attention.sum(-1), torch.ones(2, 3, heads))
    # Against torch's own attention weights for the CLS query row.
    layer = 7
    block = tiny.vision_blocks[layer]
    h = block.ln_1(output.block_inputs[layer].flatten(0, 1))
    _, weights = block.attn(h, h, h, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(output.cls_attention[layer].flatten(0, 1), weights[:, :, 0], atol=1e-5, rtol=1e-4)
    # Asking for attention does not change the features.
    assert torch.equal(output.features, tiny.encode_images(images).features)


@torch.no_grad()
def test_text_features_match_open_clip(tiny: ClipAdapter) -> None:
    features = tiny.text_features(PROMPTS)
    assert features.shape == (3, 64)
    reference = tiny.model.encode_text(tiny.tokenize(PROMPTS))
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=1e-5)
    # A prompt's feature does not depend on the other prompts of the batch (sequences are cut at the longest EOS).
    torch.testing.assert_close(tiny.text_features(PROMPTS[:1])[0], features[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_text_layer_features(tiny: ClipAdapter) -> None:
    layers = tiny.text_layer_features(PROMPTS)
    assert layers.shape == (12, 3, 64)
    torch.testing.assert_close(layers[-1], tiny.text_features(PROMPTS), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(layers[0], layers[-1])


@torch.no_grad()
def test_placeholder_replacement_reproduces_plain_text(tiny: ClipAdapter) -> None:
    tokens, position = tiny.placeholder_position(TEMPLATE, "X")
    assert torch.equal(tokens, tiny.tokenize(["a photo of a X."]))
    assert position == 5  # <start> a photo of a X
    same = tiny.encode_text_tokens(tokens, position, tiny.token_embedding(tokens[:, position]))
    torch.testing.assert_close(same, tiny.text_features(["a photo of a X."]), atol=1e-6, rtol=1e-6)
    # Injecting the embedding of "dog" at the placeholder gives the feature of "a photo of a dog.".
    dog = tiny.tokenize(["dog"])[:, 1]
    injected = tiny.encode_text_tokens(tokens, position, tiny.token_embedding(dog))
    torch.testing.assert_close(injected, tiny.text_features(["a photo of a dog."]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(injected, same)
    # Several rows, one replacement each.
    both = tiny.encode_text_tokens(tokens.expand(2, -1), position, tiny.token_embedding(torch.cat([dog, tokens[:, 5]])))
    torch.testing.assert_close(both, torch.cat([injected, same]), atol=1e-5, rtol=1e-5)


def test_cached_prefix_equals_the_full_prompt_forward_and_backward(tiny: ClipAdapter) -> None:
    tokens, position = tiny.placeholder_position(TEMPLATE, "X")
    prefix = tiny.cache_text_prefix(tokens, position)
    assert prefix.keys_values[0][0].shape[2] == position  # keys of "<start> a photo of a"
    dog = tiny.token_embedding(tiny.tokenize(["dog"])[:, 1])
    with torch.no_grad():
        torch.testing.assert_close(
            tiny.encode_after_prefix(prefix, dog), tiny.text_features(["a photo of a dog."]), atol=1e-5, rtol=1e-5
        )
    replacement = 0.02 * torch.randn((4, tiny.text_width), generator=torch.Generator().manual_seed(0))
    replacement.requires_grad_()
    weights = torch.randn((4, tiny.embed_dim), generator=torch.Generator().manual_seed(1))
    full = tiny.encode_text_tokens(tokens.expand(4, -1), position, replacement)
    cached = tiny.encode_after_prefix(prefix, replacement)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    (grad_full,) = torch.autograd.grad((full * weights).sum(), replacement)
    (grad_cached,) = torch.autograd.grad((cached * weights).sum(), replacement)
    torch.testing.assert_close(grad_cached, grad_full, atol=1e-4, rtol=1e-4)


def test_prefix_cache_needs_a_causal_text_tower(tiny: ClipAdapter, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens, position = tiny.placeholder_position(TEMPLATE, "X")
    with pytest.raises(ValueError, match="not before the pooled token"):
        tiny.cache_text_prefix(tokens, 9)
    monkeypatch.setattr(tiny.text, "attn_mask", None)
    assert not tiny.text_is_causal
    with pytest.raises(BackboneError, match="not causal"):
        tiny.cache_text_prefix(tokens, position)


def test_placeholder_errors(tiny: ClipAdapter) -> None:
    with pytest.raises(BackboneError, match="single token"):
        tiny.placeholder_position(TEMPLATE, "hippopotamus")
    tokens, position = tiny.placeholder_position(TEMPLATE, "X")
    with pytest.raises(ValueError, match="replacement"):
        tiny.encode_text_tokens(tokens, position, None)


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 6, 11])
def test_skip_and_scale_blocks(tiny: ClipAdapter, layer: int) -> None:
    tokens = tiny.tokenize(PROMPTS)
    plain = tiny.encode_text_tokens(tokens)
    skipped = tiny.encode_text_tokens(tokens, skip_blocks=[layer])
    assert torch.equal(tiny.encode_text_tokens(tokens, block_scale={layer: 0.0}), skipped)
    assert not torch.allclose(skipped, plain)
    torch.testing.assert_close(tiny.encode_text_tokens(tokens, block_scale={layer: 1.0}), plain, atol=1e-5, rtol=1e-5)
    # γ = 0.5 lies between: x + 0.5 (block(x) − x) at that block, by hand on the layer features.
    half = tiny.encode_text_tokens(tokens, block_scale={layer: 0.5})
    assert not torch.allclose(half, plain) and not torch.allclose(half, skipped)
    # Skipping the last block: the last-layer feature is the previous block's feature.
    if layer == 11:
        layers = tiny.encode_text_tokens(tokens, layer_features=True)
        torch.testing.assert_close(skipped, layers[10], atol=1e-6, rtol=1e-6)


def test_normalize(tiny: ClipAdapter) -> None:
    ones = torch.ones(2, 3, 4, 4)
    expected = (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    )
    torch.testing.assert_close(tiny.normalize(ones)[1, :, 2, 3], expected)


# ------------------------------------------------------------------------------------------- loading


def test_unknown_backbone_name() -> None:
    with pytest.raises(BackboneError, match="unknown backbone 'ViT-Q-99'"):
        load_backbone("ViT-Q-99", "none")


def test_unknown_pretrained_tag() -> None:
    with pytest.raises(BackboneError, match="no pretrained tag 'nosuchtag'"):
        load_backbone("ViT-B-32", "nosuchtag")


@pytest.mark.parametrize("name", ["missing.pt", "missing.safetensors", "sub/missing.bin"])
def test_missing_checkpoint(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for given in (str(tmp_path / name), name):
        with pytest.raises(BackboneError, match="not found"):
            load_backbone("tiny", given)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt-wrapped"])
def test_load_checkpoint_file(tiny: ClipAdapter, tmp_path: Path, fmt: str) -> None:
    state = {k: v.clone().contiguous() for k, v in tiny.model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "tiny.safetensors"
        save_file(state, str(path))
    elif fmt == "pt":
        path = tmp_path / "tiny.pt"
        torch.save(state, path)
    else:  # a training checkpoint: {"state_dict": {"module.<key>": ...}}
        path = tmp_path / "tiny-ddp.pt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = load_backbone("tiny", str(path))
    assert_same_weights(loaded.model, tiny.model)
    images = torch.randn((1, 2, 3, 64, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded.encode_images(images).features, tiny.encode_images(images).features)


def test_checkpoint_with_wrong_keys(tiny: ClipAdapter, tmp_path: Path) -> None:
    state = dict(tiny.model.state_dict())
    state.pop("visual.proj")
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(BackboneError, match="cannot load checkpoint"):
        load_backbone("tiny", str(path))


class CreatesAFile:
    """Unpickling this calls `open(marker, "w")`: a stand-in for arbitrary code in a pickled checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"visual.proj": CreatesAFile(marker)}, path)
    assert not marker.exists()
    with pytest.raises(BackboneError, match="cannot load checkpoint"):
        load_backbone("tiny", str(path))
    assert not marker.exists()


def test_random_weights_are_reproducible() -> None:
    """`pretrained='none'` weights depend only on the architecture (a resumed run in another process agrees),
    and loading them leaves the global random stream alone."""
    torch.manual_seed(1)
    first = load_backbone("tiny", "none")
    after_load = torch.rand(3)
    torch.manual_seed(2)
    second = load_backbone("tiny", "none")
    assert_same_weights(first.model, second.model)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_load)


@torch.no_grad()
def test_real_open_clip_architecture() -> None:
    """ViT-B-32 with random weights: the adapter's block loop equals open_clip's `encode_image` at 224 px."""
    torch.manual_seed(0)
    backbone = load_backbone("ViT-B-32", "none")
    assert (backbone.image_size, backbone.num_vision_blocks, backbone.vision_width) == (224, 12, 768)
    image = torch.randn((1, 1, 3, 224, 224), generator=torch.Generator().manual_seed(0))
    features = backbone.encode_images(image).features
    reference = backbone.model.encode_image(image[0])
    torch.testing.assert_close(features[0], reference, atol=1e-4, rtol=1e-4)
    prompts = ["a photo of a dog."]
    torch.testing.assert_close(
        backbone.text_features(prompts), backbone.model.encode_text(backbone.tokenize(prompts)), atol=1e-4, rtol=1e-4
    )
    tokens, position = backbone.placeholder_position(TEMPLATE, "X")
    dog = backbone.token_embedding(backbone.tokenize(["dog"])[:, 1])
    torch.testing.assert_close(
        backbone.encode_after_prefix(backbone.cache_text_prefix(tokens, position), dog),
        backbone.text_features(prompts),
        atol=1e-4,
        rtol=1e-4,
    )
