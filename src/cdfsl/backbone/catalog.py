"""Which open_clip models cdfsl can run (`cdfsl backbones`), read from their configs without building them.

The adapter (`cdfsl.backbone.adapter.ClipAdapter`) runs open_clip's own ViT towers block by block: a `VisionTransformer`
that pools the CLS token and a `TextTransformer`, both of `nn.MultiheadAttention` blocks. A model config says which
towers a model gets, so the catalogue classifies every name open_clip knows by its config:

- a `timm_model_name` in the vision config: a timm trunk (SigLIP / SigLIP2, PE-Core, EVA, ConvNeXt, ViTamin, …);
- `layers` given per stage: a ModifiedResNet (RN50, …);
- an `hf_model_name` in the text config: a Hugging Face text tower (XLM-R, mT5, …);
- attentional pooling or a pooling other than the CLS token (CoCa, CLIPA's average pooling): no CLS feature.

Everything else is a CLIP ViT the adapter runs with every method and diagnostic; the one method setting that depends on
the depths is VtT's release fusion, which lays 2L + 1 features on a square grid (L = the shallower tower's depth):
12 blocks give 25, 24 give 49; other depths need `--set vtt.fusion=ssm`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cdfsl.backbone.tiny import TINY_NAME


@dataclass(frozen=True)
class BackboneInfo:
    """One open_clip model: whether cdfsl runs it (`reason` says why not), and its tower shapes when it does."""

    name: str
    supported: bool
    reason: str
    vision: str = ""
    text: str = ""
    embed_dim: int = 0
    tags: tuple[str, ...] = ()
    vtt_release_fusion: bool = False


def classify(name: str, config: dict[str, Any], tags: tuple[str, ...] = ()) -> BackboneInfo:
    """The catalogue entry of open_clip model `name` with model config `config`."""
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if vision.get("timm_model_name"):
        return BackboneInfo(name, False, f"timm vision trunk ({vision['timm_model_name']}); not supported yet")
    if isinstance(vision.get("layers"), list | tuple):
        return BackboneInfo(name, False, "ModifiedResNet vision tower; cdfsl needs a ViT")
    if text.get("hf_model_name"):
        return BackboneInfo(name, False, f"Hugging Face text tower ({text['hf_model_name']}); not supported yet")
    if vision.get("attentional_pool") or vision.get("pool_type", "tok") != "tok" or "multimodal_cfg" in config:
        return BackboneInfo(name, False, "does not pool the CLS token (attentional or average pooling)")
    vision_blocks, text_blocks = int(vision.get("layers", 12)), int(text.get("layers", 12))
    depth = min(vision_blocks, text_blocks)
    square = math.isqrt(2 * depth + 1) ** 2 == 2 * depth + 1
    patch, size = vision.get("patch_size", "?"), vision.get("image_size", "?")
    return BackboneInfo(
        name,
        True,
        "",
        vision=f"{vision_blocks}×{vision.get('width', '?')}, {size}px/{patch}",
        text=f"{text_blocks}×{text.get('width', '?')}",
        embed_dim=int(config.get("embed_dim", 0)),
        tags=tags,
        vtt_release_fusion=square,
    )


def catalogue() -> list[BackboneInfo]:
    """Every open_clip model name (and cdfsl's `tiny`), classified; sorted by name."""
    import open_clip

    from cdfsl.backbone.tiny import register_tiny_config

    register_tiny_config()
    entries = []
    for name in open_clip.list_models():
        config = open_clip.get_model_config(name)
        if config is None:
            continue
        tags = () if name == TINY_NAME else tuple(open_clip.list_pretrained_tags_by_model(name))
        shown = "tiny" if name == TINY_NAME else name
        entries.append(classify(shown, config, ("shipped",) if name == TINY_NAME else tags))
    return sorted(entries, key=lambda e: e.name.lower())
