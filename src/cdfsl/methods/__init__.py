"""Methods by name: a base (`cdfsl.registry.BASES`) with its plug-ins, one package each (`zeroshot`, `lora`, `maple`,
`tir`, `vtt`). Importing this package loads no torch: `build_method` and `Method` are loaded when first used."""

from __future__ import annotations

from typing import Any

__all__ = ["Method", "build_method"]


def __getattr__(name: str) -> Any:
    if name == "build_method":
        from cdfsl.methods.build import build_method

        return build_method
    if name == "Method":
        from cdfsl.methods.base import Method

        return Method
    raise AttributeError(f"module 'cdfsl.methods' has no attribute {name!r}")
