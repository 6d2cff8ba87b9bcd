"""Reduced-size members of each backbone family, for tests and CPU benchmarks (random weights only).

`small-clip` (open_clip ViT), `small-pe-core` (timm Eva trunk with PE-Core's design: CLS token, rotary embeddings,
attention pooling) and `small-siglip2` (timm ViT trunk with SigLIP2's design: no CLS token, attention pooling; a
bidirectional text tower pooling the last token). All three share the vision tower's size (12 blocks, width 64, 2 heads,
64 px input with patch 16: 16 patches) and 12 text blocks, so the methods' defaults (TIR's blocks, VtT's release
fusion, MaPLe's depth) apply unchanged and the families' costs compare at one size. `small-pe-core`'s joint width (96)
differs from its vision width (64), as PE-Core-B's does (1024 vs 768). The text towers use open_clip's BPE tokenizer
(SigLIP2's real tokenizer is a download; `--tokenizer DIR` takes a local Hugging Face tokenizer instead).

The open_clip configs ship as JSON beside the tiny model's; the two timm trunks are registered with timm here.
"""

from __future__ import annotations

from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import open_clip
from torch import nn

SMALL_NAMES = ("small-clip", "small-pe-core", "small-siglip2")
TRUNK_PREFIX = "cdfsl_"  # the timm names of the small trunks: cdfsl_small_pe_core, cdfsl_small_siglip
_ASSETS = resources.files("cdfsl") / "assets"
_WIDTH, _DEPTH, _HEADS, _IMAGE, _PATCH = 64, 12, 2, 64, 16
_SIZE: dict[str, Any] = dict(img_size=_IMAGE, patch_size=_PATCH, embed_dim=_WIDTH, depth=_DEPTH, num_heads=_HEADS)

_registered = False


def _small_pe_core(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """PE-Core-B's trunk settings (timm's `vit_pe_core_base_patch16_224`) at the reduced size."""
    from timm.models.eva import Eva

    grid = _IMAGE // _PATCH
    args: dict[str, Any] = dict(
        _SIZE,
        mlp_ratio=4.0,
        global_pool="map",
        attn_type="rope",
        use_pre_transformer_norm=True,
        use_rot_pos_emb=True,
        ref_feat_shape=(grid, grid),
        rope_grid_offset=1.0,
        rope_grid_indexing="xy",
        attn_pool_num_heads=_HEADS,
        attn_pool_mlp_ratio=4.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-5),
    )
    return Eva(**{**args, **_model_kwargs(kwargs)})


def _small_siglip(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """SigLIP2-B's trunk settings (timm's `vit_base_patch16_siglip_224`) at the reduced size."""
    from timm.models.vision_transformer import VisionTransformer

    args: dict[str, Any] = dict(_SIZE, class_token=False, global_pool="map")
    return VisionTransformer(**{**args, **_model_kwargs(kwargs)})


def _model_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """timm's `create_model` arguments meant for the model (not its pretrained-weights bookkeeping)."""
    return {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}


def register_small_configs() -> tuple[str, ...]:
    """Make the small models known to open_clip (and their trunks to timm); returns their names."""
    global _registered
    if not _registered:
        from timm.models import register_model

        for trunk in (_small_pe_core, _small_siglip):
            trunk.__name__ = TRUNK_PREFIX + trunk.__name__.lstrip("_")  # timm names a model after its function
            register_model(trunk)
        for name in SMALL_NAMES:
            open_clip.add_model_config(Path(str(_ASSETS / f"{name}.json")))
        _registered = True
    return SMALL_NAMES
