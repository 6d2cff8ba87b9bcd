"""The backbone families through the adapter, at reduced size: open_clip's ViT (CLIP), timm's Eva trunk (PE-Core)
and timm's attention-pooled ViT (SigLIP2).

Against the model's own plain path (`encode_image`, `encode_text`), against hand computation (each slice of a packed
q/k/v gets its own LoRA factors; a token pooled alone; TIR leaves prefix and prompt tokens), by symmetry (prompt tokens
carry no rotary position), and every registered method on every family (E episodes at once equal each alone).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.backbone.factory import load_backbone
from cdfsl.backbone.lora import EpisodeLoRA
from cdfsl.backbone.small import SMALL_NAMES
from cdfsl.cli import app
from cdfsl.config import METHODS, LoraConfig, RunConfig, TirConfig
from cdfsl.methods import build_method
from cdfsl.methods.tir.recalibration import TokenRecalibration
from digits_world import DigitsWorld, configured
from episode_batching import assert_same_as_alone, logit_scale_of

pytestmark = pytest.mark.usefixtures("one_thread")
TIMM_FAMILIES = ("small-pe-core", "small-siglip2")


@pytest.fixture(scope="module")
def perturbed() -> dict[str, ClipAdapter]:
    """Each small model with its random weights moved by N(0, 0.05²) noise, so no branch is degenerate (timm's
    initialisation leaves PE-Core's pooled features near zero)."""
    found = {}
    generator = torch.Generator().manual_seed(0)
    for name in SMALL_NAMES:
        adapter = copy.deepcopy(load_backbone(name, "none"))
        with torch.no_grad():
            for parameter in adapter.model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        found[name] = adapter
    return found


def images(count: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_the_block_loops_equal_open_clip(name: str, perturbed: dict[str, ClipAdapter]) -> None:
    adapter = perturbed[name]
    pictures = adapter.normalize(images())
    tokens = adapter.tokenize(["a photo of a cat.", "x", "a satellite tile of a river and a road."])
    with torch.no_grad():
        output = adapter.encode_images(pictures[None], layer_features=True)
        expected = adapter.model.encode_image(pictures)
        torch.testing.assert_close(output.features[0], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(output.layer_features[-1, 0], expected)
        assert output.layer_features.shape == (12, 1, 3, adapter.embed_dim)
        torch.testing.assert_close(
            adapter.encode_text_tokens(tokens), adapter.model.encode_text(tokens), atol=1e-5, rtol=1e-5
        )
    assert expected.std() > 0.1  # not a degenerate tower


def test_widths_are_read_from_the_model(perturbed: dict[str, ClipAdapter]) -> None:
    pe_core, siglip = perturbed["small-pe-core"], perturbed["small-siglip2"]
    assert (pe_core.vision_width, pe_core.text_width, pe_core.embed_dim) == (64, 96, 96)
    assert (pe_core.patch_start, pe_core.image_tokens, pe_core.has_cls_token) == (1, 17, True)
    assert (siglip.patch_start, siglip.image_tokens, siglip.has_cls_token) == (0, 16, False)
    assert not siglip.text_is_causal and pe_core.text_is_causal


def test_each_slice_of_a_packed_qkv_gets_its_own_factors(perturbed: dict[str, ClipAdapter]) -> None:
    adapter = perturbed["small-pe-core"]
    lora = EpisodeLoRA(
        LoraConfig(rank=16, alpha=8.0),
        adapter.num_vision_blocks,
        adapter.vision_width,
        [torch.Generator().manual_seed(0)],
    )
    with torch.no_grad():
        for layer in range(adapter.num_vision_blocks):
            lora.lora_b[layer][:, 2].normal_()  # only v's B is non-zero
    lora.eval()
    weight, bias = adapter.vision_tower.qkv_parameters(3)
    h = torch.randn(1, 5, adapter.vision_width)
    with torch.no_grad():
        out, plain = lora(3, h, weight, bias), F.linear(h, weight, bias)
        width = adapter.vision_width
        torch.testing.assert_close(out[..., : 2 * width], plain[..., : 2 * width])  # q and k untouched
        a, b = lora.lora_a[3][0, 2], lora.lora_b[3][0, 2]  # v's factors [r, D], [D, r]
        torch.testing.assert_close(out[..., 2 * width :], plain[..., 2 * width :] + lora.scale * h @ a.T @ b.T)
        pictures = adapter.normalize(images())[None]
        unmerged = adapter.encode_images(pictures, lora).features
        lora.merge(adapter.vision_qkv_weights())
        torch.testing.assert_close(adapter.encode_images(pictures, lora).features, unmerged, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(unmerged, adapter.encode_images(pictures).features)


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_a_token_projected_is_the_token_pooled_alone(name: str, perturbed: dict[str, ClipAdapter]) -> None:
    adapter = perturbed[name]
    tokens = torch.randn(2, 7, adapter.vision_width)
    with torch.no_grad():
        alone = adapter.vision_tower.pool(tokens.reshape(14, 1, -1)).reshape(2, 7, -1)
        torch.testing.assert_close(adapter.project_tokens(tokens), alone)


def test_attention_pooling_of_one_token_is_its_value_path(perturbed: dict[str, ClipAdapter]) -> None:
    """By hand: the latent query's softmax over one key is 1, so the pooled token is proj(v(x)) + MLP residual."""
    adapter = perturbed["small-siglip2"]
    trunk, width = adapter.visual.trunk, adapter.vision_width
    pool = trunk.attn_pool
    token = torch.randn(4, width)
    with torch.no_grad():
        x = trunk.norm(token)
        value = F.linear(x, pool.kv.weight[width:], pool.kv.bias[width:])
        pooled = pool.proj(value)
        pooled = pooled + pool.mlp(pool.norm(pooled))
        expected = adapter.visual.head(trunk.head(trunk.fc_norm(pooled)))
        torch.testing.assert_close(adapter.project_tokens(token), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_tir_reweights_the_patches_only(name: str, perturbed: dict[str, ClipAdapter]) -> None:
    adapter = perturbed[name]
    tir = TokenRecalibration(TirConfig(blocks=(-1,)), adapter)
    text = F.normalize(torch.randn(1, 5, adapter.embed_dim), dim=-1)
    x = torch.randn(1, 2, adapter.image_tokens + 3, adapter.vision_width)  # 3 prompt tokens after the image's
    with torch.no_grad():
        out = tir.hook(text)(adapter.num_vision_blocks - 1, x)
    start, end = adapter.patch_start, adapter.image_tokens
    assert torch.equal(out[:, :, :start], x[:, :, :start]) and torch.equal(out[:, :, end:], x[:, :, end:])
    ratio = out[:, :, start:end].norm(dim=-1) / x[:, :, start:end].norm(dim=-1)
    assert (ratio > 1.001).any()  # tokens claimed by few classes amplified


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_prompt_tokens_carry_no_position(name: str, perturbed: dict[str, ClipAdapter]) -> None:
    """Swapping two prompt tokens in every block changes nothing pooled from the image's tokens: prompts get no
    positional or rotary embedding (a rotated prompt would make the order matter)."""
    adapter = perturbed[name]
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randn(1, 2, adapter.vision_width, generator=generator) for _ in range(4)]
    swapped = [p.flip(1) for p in prompts]
    pictures = adapter.normalize(images(2))[None]
    with torch.no_grad():
        first = adapter.encode_images(pictures, prompts=prompts).features
        second = adapter.encode_images(pictures, prompts=swapped).features
        plain = adapter.encode_images(pictures).features
    torch.testing.assert_close(first, second, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first, plain, atol=1e-3)  # the prompts do act, through attention


# ----------------------------------------------------------------------------------- every method on every family
SIZES = {
    "train__iterations": 2, "maple__epochs": 1, "maple__batch_size": 3, "augment__views": ("plain",),
    "vtt__state": 4,
}  # fmt: skip


@pytest.fixture(scope="module")
def worlds() -> dict[str, DigitsWorld]:
    return {name: DigitsWorld.of(load_backbone(name, "none")) for name in TIMM_FAMILIES}


@pytest.mark.batching
@pytest.mark.parametrize("family", TIMM_FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_the_family(method: str, family: str, worlds: dict[str, DigitsWorld]) -> None:
    world = worlds[family]
    config = configured(
        RunConfig(dataset="digits", method=method, backbone=family, pretrained="none", queries=2, device="cpu"), **SIZES
    )
    together = build_method(config, world.backbone)
    together.fit(world.batch(config, [0, 1]))
    both = together.predict(world.batch(config, [0, 1]))
    assert both.shape == (2, 10, 5) and torch.isfinite(both).all()
    alone = build_method(config, world.backbone)
    alone.fit(world.batch(config, [1]))
    assert_same_as_alone(alone.predict(world.batch(config, [1]))[0], both[1], logit_scale_of(together))


# ----------------------------------------------------------------------------------- the commands on each family
@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_cost_counts_tir_and_vtt_on_the_family(family: str) -> None:
    """FLOPs are counted under torch's module tracker, which refuses a grad-requiring view made under no_grad (what
    TIR's per-token pooling once received on SigLIP, whose patches start at index 0)."""
    result = CliRunner().invoke(app, ["cost", "--method", "tir+vtt", "--backbone", family, "--pretrained", "none"])
    assert result.exit_code == 0, result.output


def test_the_sink_probe_refuses_a_tower_without_a_cls_token(tmp_path: Path) -> None:
    args = ["diagnose", "sink", "--dataset", "digits", "--backbone", "small-siglip2", "--pretrained", "none"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "sink")])
    assert result.exit_code == 2 and "no CLS token" in result.output


def test_a_timm_family_checkpoint_loads_without_an_activation_question(tmp_path: Path) -> None:
    """No pretrained tag of PE-Core or SigLIP was trained with QuickGELU, so a local checkpoint of theirs needs no
    `open_clip_config.json` to say which activation (a CLIP ViT's does: OpenAI's weights need QuickGELU)."""
    from safetensors.torch import save_file

    from cdfsl.backbone.factory import resolve_activation

    source = load_backbone("small-pe-core", "none")
    path = tmp_path / "pe-core.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    assert resolve_activation("PE-Core-B-16", str(path)) == resolve_activation("ViT-B-16-SigLIP2", str(path)) == "gelu"
    loaded = load_backbone("small-pe-core", str(path))
    pictures = loaded.normalize(images())[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_images(pictures).features, source.encode_images(pictures).features)


def test_the_cka_probe_pools_every_patch_of_a_tower_without_a_cls_token() -> None:
    """SigLIP's patches start at token 0: the probe's pooled patch features are the mean of all M of them."""
    from cdfsl.analysis.cka import _pooled
    from cdfsl.analysis.probe_setup import prepare, probe_images

    config = RunConfig(
        dataset="digits", method="zeroshot", backbone="small-siglip2", pretrained="none", queries=2, device="cpu"
    )
    setup = prepare(config)
    features = _pooled(setup, "zeroshot", ("none",), 1, "query")
    pictures, _ = probe_images(next(iter(setup.batches(1, with_views=False))), "query", 1)
    with torch.no_grad():
        inputs = setup.backbone.encode_images(pictures, keep_block_inputs=True).block_inputs
    for layer in (0, 11):
        expected = inputs[layer].mean(dim=2).flatten(0, 1).float()
        torch.testing.assert_close(features.layers["none"][layer][0], expected)
