"""Methods by name: a base (`cdfsl.registry.BASES`) with its plug-ins, one package each (`zeroshot`, `lora`, `maple`,
`tir`, `vtt`), each declaring itself in its torch-free `settings.py`; importing this package registers them (in the
order `cdfsl methods` lists them). Importing it loads no torch: `build_method` and `Method` are loaded when first
used."""

from __future__ import annotations

from typing import Any

from cdfsl.methods import training_settings as training_settings  # the shared loop's `train` and `augment`

from cdfsl.methods import zeroshot as zeroshot  # isort: skip
from cdfsl.methods import lora as lora  # isort: skip
from cdfsl.methods import maple as maple  # isort: skip
from cdfsl.methods import tir as tir  # isort: skip
from cdfsl.methods import vtt as vtt  # isort: skip

__all__ = ["Method", "build_method"]


def __getattr__(name: str) -> Any:
    if name == "build_method":
        from cdfsl.methods.build import build_method

        return build_method
    if name == "Method":
        from cdfsl.methods.base import Method

        return Method
    raise AttributeError(f"module 'cdfsl.methods' has no attribute {name!r}")
