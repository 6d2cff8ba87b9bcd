"""`build_method`: the method of a config by name, a base (`cdfsl.registry.BASES`) with its plug-ins attached at
construction. Each part is built from its registry entry's `builder` (`module:Class`): a base as
`Class(backbone, config, autocast_dtype, **plug_ins)`, a plug-in as `Class.build(config, backbone, autocast_dtype)`,
passed to the base under its class's `role` (`recalibration`: TIR; `extension`: VtT). `tir+vtt` is both on one loop.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.config import RunConfig
from cdfsl.methods.base import Method
from cdfsl.spec import RunSpec


def load_builder(builder: str) -> Any:
    """The attribute named by `module:attribute`."""
    module, _, attribute = builder.partition(":")
    return getattr(importlib.import_module(module), attribute)


def base_class(config: RunConfig) -> type[Method]:
    """The `Method` class of `config`'s base."""
    cls: type[Method] = load_builder(config.spec.base.builder)
    return cls


def build_method(
    config: RunConfig | RunSpec, backbone: ClipAdapter, autocast_dtype: torch.dtype | None = None
) -> Method:
    """The method `config.method` on `backbone`, trained by the config's recipe (a config is resolved here; a
    `RunSpec`'s config is resolved already)."""
    config = config.config if isinstance(config, RunSpec) else config.resolved()
    attached: dict[str, Any] = {}
    for plugin in config.spec.plugins:
        cls = load_builder(plugin.builder)
        attached[cls.role] = cls.build(config, backbone, autocast_dtype)
    method = base_class(config)(backbone, config, autocast_dtype, **attached)
    method.name = config.method
    return method


__all__ = ["Method", "base_class", "build_method", "load_builder"]
