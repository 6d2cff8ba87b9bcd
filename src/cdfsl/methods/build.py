"""`build_method`: the method of a config by name, a base (`cdfsl.registry.BASES`) with its plug-ins. TIR is a token
recalibration and VtT a training extension on the base's loop, not methods of their own;
`tir+vtt` is both on one loop."""

from __future__ import annotations

import importlib

import torch

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.config import RunConfig
from cdfsl.methods.base import Method
from cdfsl.methods.tir.recalibration import TokenRecalibration


def build_method(config: RunConfig, backbone: ClipAdapter, autocast_dtype: torch.dtype | None = None) -> Method:
    """The method `config.method` on `backbone`, trained by the config's recipe (the config is resolved here)."""
    config = config.resolved()
    spec = config.spec
    module, _, attribute = spec.base.builder.partition(":")
    base_class = getattr(importlib.import_module(module), attribute)
    if not spec.plugins:
        method: Method = base_class(backbone, config, autocast_dtype)
    else:
        recalibration = TokenRecalibration(config.tir, backbone) if spec.uses("tir") else None
        method = base_class(backbone, config, autocast_dtype, recalibration)
        if spec.uses("vtt"):
            from cdfsl.methods.vtt.extension import VttExtension

            method.extension = VttExtension(config, backbone, method.autocast)  # type: ignore[attr-defined]
    method.name = config.method
    return method


__all__ = ["Method", "build_method"]
