"""The `vtt` plug-in declared: the `vtt` section, its rules and checks, the fields it reads under each fusion, and its
per-episode record (the step DLC switched `L_VtT` off). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cdfsl.errors import ConfigError
from cdfsl.registry import PlugIn, Record, Section, register_plugin, register_section, trained_base_only
from cdfsl.rules import LR_WHY, MAX_DEPTH, MAX_LR, MAX_WIDTH, check_choice, integer, number

if TYPE_CHECKING:
    from cdfsl.config import RunConfig
    from cdfsl.registry import MethodSpec

VTT_FUSIONS = ("release", "ssm", "attention", "lstm", "gru", "none")
VTT_SCANS = ("deep_to_shallow", "shallow_to_deep", "bidirectional")


@dataclass
class VttConfig:
    """VtT: fusion, absorption and DGSO (docs/vtt.md). `tia`, `fusion=none`, `correction` and `dlc` each remove one
    piece (the paper's ablation rows)."""

    beta: float = 7.0
    window: int = 50
    fusion: str | None = None  # release (vtt-release) | ssm (paper) | attention | lstm | gru | none
    scan: str = "deep_to_shallow"  # the paper-style fusions' scan order
    lr: float | None = None  # fusion learning rate; vtt-release 5e-4 (1e-3 on ISIC2018, ChestX)
    hidden: int | None = None  # paper-style fusions' width; None: the joint embedding width C
    state: int | None = None  # SSM state size N; None: 256 (the release, at C = 512), at most C/2 on narrower models
    dt_rank: int | None = None  # release fusion: rank of the step-size projection; None: equal to the state size
    conv: int = 4  # release fusion: causal convolution kernel
    ssm_layers: int = 2  # paper-style fusions' sequence layers
    tia: bool = True  # absorb through the text encoder; false: L_VtT compares the fused token with f directly
    correction: bool = True  # DGSO: project out the part of the combined gradient that opposes L_ce's
    dlc: bool = True  # DGSO: switch L_VtT off for the episode once the recent gradient agreement is <= 0
    placeholder: str = "X"


def _check_vtt(vtt: VttConfig, config: RunConfig) -> None:
    """Checked on every run: a bad value is refused even where VtT is unused."""
    check_choice("vtt.fusion", vtt.fusion, VTT_FUSIONS)
    check_choice("vtt.scan", vtt.scan, VTT_SCANS)


register_section(
    Section(
        "vtt",
        VttConfig,
        (
            number("vtt.beta", 0),
            integer("vtt.window", 1),
            number("vtt.lr", 0, MAX_LR, low_open=True, why=LR_WHY),
            integer("vtt.hidden", 1, MAX_WIDTH, optional=True),
            integer("vtt.state", 1, MAX_WIDTH, optional=True),
            integer("vtt.dt_rank", 1, MAX_WIDTH, optional=True),
            integer("vtt.conv", 1, MAX_DEPTH),
            integer("vtt.ssm_layers", 1, MAX_DEPTH),
        ),
        _check_vtt,
    )
)


def vtt_reads(config: RunConfig, spec: MethodSpec) -> tuple[str, ...]:
    """`beta`, `lr`, `fusion`, `tia`, `correction`, `dlc`; `window` with DLC; `placeholder` when absorbing through
    the text tower; the release fusion's `state`, `dt_rank`, `conv`; the paper-style fusions' `hidden`, `state`,
    `ssm_layers`, `scan`; and the `train` betas and weight decay of the AdamW that trains the fusion (with the base's
    tensors on the LoRA bases, alone on `maple`)."""
    vtt = config.vtt
    names = ["beta", "lr", "fusion", "tia", "correction", "dlc"]
    if vtt.dlc:
        names.append("window")
    if vtt.tia:
        names.append("placeholder")
    if vtt.fusion == "release":
        names += ["state", "dt_rank", "conv"]
    elif vtt.fusion != "none":
        names += ["hidden", "state", "ssm_layers", "scan"]
    return (*(f"vtt.{name}" for name in names), "train.beta1", "train.beta2", "train.weight_decay")


def _check_learns(config: RunConfig, spec: MethodSpec) -> None:
    if config.vtt.fusion == "none" and not config.vtt.tia:
        raise ConfigError("vtt.fusion=none with vtt.tia=false leaves VtT nothing to learn (-cos(f, f) is constant)")


register_plugin(
    PlugIn(
        "vtt",
        "VtT: per-layer vision features fused and absorbed through the text tower while training",
        "CVPR 2026 (zhenyuZ-HUST/CVPR26-VtT)",
        "vtt",
        trained_base_only("VtT's loss to shape", "lora+vtt"),
        builder="cdfsl.methods.vtt.extension:VttExtension",
        reads=vtt_reads,
        records=(Record("dlc_off_step", int, optional=True, summary="the step DLC switched L_VtT off (None: never)"),),
        validate=_check_learns,
    )
)
