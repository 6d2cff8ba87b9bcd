"""Methods by name. `tir+vtt` is the TIR component plus the VtT extension on one LoRA loop, not a third method."""

from __future__ import annotations

import torch

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.config import RunConfig
from cdfsl.methods.base import Method
from cdfsl.methods.lora import LoraMethod
from cdfsl.methods.tir import TokenRecalibration
from cdfsl.methods.zeroshot import ZeroShot


def build_method(config: RunConfig, backbone: ClipAdapter, autocast_dtype: torch.dtype | None = None) -> Method:
    """The method `config.method` on `backbone`, trained by the config's recipe (the config is resolved here)."""
    config = config.resolved()
    if config.method == "zeroshot":
        return ZeroShot(backbone, config, autocast_dtype)
    recalibration = TokenRecalibration(config.tir, backbone) if config.uses_tir else None
    method = LoraMethod(backbone, config, autocast_dtype, recalibration)
    if config.uses_vtt:
        from cdfsl.methods.vtt import VttExtension

        method.extension = VttExtension(config, backbone, method.autocast)
    method.name = config.method
    return method


__all__ = ["Method", "build_method"]
