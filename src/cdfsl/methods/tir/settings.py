"""The `tir` plug-in declared: the `tir` section, its rules and checks, and the fields it reads. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from cdfsl.errors import ConfigError
from cdfsl.registry import PlugIn, Section, register_plugin, register_section, trained_base_only
from cdfsl.rules import BLOCK_RANGE, check_choice, integer, integers, number

if TYPE_CHECKING:
    from cdfsl.config import RunConfig
    from cdfsl.registry import MethodSpec

TIR_VARIANTS = ("full", "inhibit", "enhance", "simplified")


@dataclass
class TirConfig:
    """Token Importance Recalibration (docs/tir.md)."""

    blocks: tuple[int, ...] = (-4, -2)
    ratio: float = 0.3
    alpha: float | None = None  # None: auto, (K+1)/2
    beta: float | None = None  # None: auto, 1/(K - alpha)
    text_layer: int = -2
    variant: str = "full"
    at_prediction: bool = True


def _check_tir(tir: TirConfig, config: RunConfig) -> None:
    check_choice("tir.variant", tir.variant, TIR_VARIANTS)


register_section(
    Section(
        "tir",
        TirConfig,
        (
            integers("tir.blocks", f"vision block indices, {BLOCK_RANGE}"),
            number("tir.ratio", 0, 1, low_open=True),
            number("tir.alpha", optional=True),
            number("tir.beta", optional=True),
            integer("tir.text_layer", why=f"a text block index, {BLOCK_RANGE}"),
        ),
        _check_tir,
    )
)


def tir_reads(config: RunConfig, spec: MethodSpec) -> tuple[str, ...]:
    """Every `tir` field: the blocks it recalibrates, how tokens are weighted, the text layer, and whether it
    recalibrates at prediction too."""
    return tuple(f"tir.{f.name}" for f in fields(TirConfig))


def _check_alpha(config: RunConfig, spec: MethodSpec) -> None:
    """Auto beta is 1 / (K − alpha) for an episode of K classes: alpha must stay below the fewest ways an episode of
    the run can have (`ways` for fixed-way episodes, 5 for Meta-Dataset's; unchecked when the protocol states none)."""
    tir = config.tir
    fewest = config.fewest_ways()
    if tir.alpha is not None and tir.beta is None and fewest is not None and tir.alpha >= fewest:
        raise ConfigError(
            f"tir.alpha={tir.alpha:g} with tir.beta=auto (1 / (ways - alpha)) needs alpha < ways = {fewest} (the "
            "fewest ways of an episode); "
            "set tir.beta too, or a smaller tir.alpha"
        )


register_plugin(
    PlugIn(
        "tir",
        "TIR: reweights deep vision tokens by how many classes claim them",
        "CVPR 2026 (shuaiyi308/TIR)",
        "tir",
        trained_base_only("TIR to recalibrate", "lora+tir or coop+lora+tir"),
        builder="cdfsl.methods.tir.recalibration:TokenRecalibration",
        reads=tir_reads,
        validate=_check_alpha,
    )
)
