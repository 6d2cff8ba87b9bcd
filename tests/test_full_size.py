"""Full-size builds of the papers' CLIP ViTs (random weights) against open_clip's own forward passes. Slow (each
builds a full model): `make test-slow`."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@torch.no_grad()
@pytest.mark.parametrize(("name", "shape"), [("ViT-B-16", (224, 12, 768)), ("ViT-L-14", (224, 24, 1024))])
def test_full_size_clip_vits_match_open_clip(name: str, shape: tuple[int, int, int]) -> None:
    """Full-size builds (random weights) of the papers' other CLIP ViTs: the adapter's block loops equal open_clip's
    `encode_image` and `encode_text`, and VtT's aligned layers span both towers (ViT-L-14: 24 vision, 12 text)."""
    from cdfsl.backbone.factory import load_backbone
    from cdfsl.methods.vtt import aligned_layers

    backbone = load_backbone(name, "none")
    assert (backbone.image_size, backbone.num_vision_blocks, backbone.vision_width) == shape
    image = torch.randn((1, 1, 3, 224, 224), generator=torch.Generator().manual_seed(0))
    output = backbone.encode_images(image, layer_features=True)
    torch.testing.assert_close(output.features[0], backbone.model.encode_image(image[0]), atol=1e-4, rtol=1e-4)
    prompts = ["a photo of a dog."]
    reference = backbone.model.encode_text(backbone.tokenize(prompts))
    torch.testing.assert_close(backbone.text_features(prompts), reference, atol=1e-4, rtol=1e-4)
    depth = min(backbone.num_vision_blocks, backbone.num_text_blocks)
    assert aligned_layers(backbone.num_vision_blocks, depth)[-1] == backbone.num_vision_blocks - 1
    assert output.layer_features is not None and output.layer_features.shape[0] == backbone.num_vision_blocks
