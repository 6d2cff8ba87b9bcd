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
    from cdfsl.methods.vtt.extension import aligned_layers

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


@torch.no_grad()
@pytest.mark.parametrize(
    ("name", "shape"), [("PE-Core-B-16", (224, 12, 768, 1024)), ("ViT-B-16-SigLIP2", (224, 12, 768, 768))]
)
def test_full_size_timm_towers_match_open_clip(name: str, shape: tuple[int, int, int, int]) -> None:
    """Full-size PE-Core-B-16 and SigLIP2-B/16 (random weights, moved by noise so no branch is near zero): the timm
    tower's block loop equals open_clip's `encode_image`, the text loop its `encode_text` on arbitrary token ids (so
    SigLIP2's Hugging Face tokenizer, a download, is not needed)."""
    import open_clip

    from cdfsl.backbone.adapter import ClipAdapter

    model = open_clip.create_model(name, pretrained=None).eval()
    generator = torch.Generator().manual_seed(0)
    for parameter in model.parameters():
        parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    backbone = ClipAdapter(model, open_clip.SimpleTokenizer(), (0.5,) * 3, (0.5,) * 3, name)
    assert (backbone.image_size, backbone.num_vision_blocks, backbone.vision_width, backbone.embed_dim) == shape
    image = torch.randn((1, 2, 3, 224, 224), generator=generator)
    features = backbone.encode_images(image).features[0]
    torch.testing.assert_close(features, model.encode_image(image[0]), atol=1e-4, rtol=1e-4)
    tokens = torch.randint(1, 40000, (2, model.text.context_length if hasattr(model.text, "context_length") else 32))
    torch.testing.assert_close(backbone.encode_text_tokens(tokens), model.encode_text(tokens), atol=1e-4, rtol=1e-4)
