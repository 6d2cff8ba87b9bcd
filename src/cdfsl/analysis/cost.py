"""The cost of one training step (`cdfsl cost`): trainable parameters and FLOPs, VtT beside its paper.

One training step of a method's recipe on one episode (E = 1): a synthetic episode of random normalized images
(`synthetic_batch`), the method built with `train.iterations = 1`, its frozen text caches warmed, then `method.fit`
(forward, the backward pass(es) — VtT's DGSO adds a second one at step 1 —, the optimizer step) counted under
`torch.utils.flop_counter.FlopCounterMode`. That counter counts 2 FLOPs per multiply-add and sees only matrix
multiplications, convolutions and attention: elementwise work (the SSM scan and causal convolution of the release
fusion, norms, activations, the optimizer update) is not counted. Its registry knows the CUDA attention kernels but
not the CPU one, so `flop_counter` adds the same formulas for the CPU kernel: counts do not depend on the device.

For a method with the VtT plug-in (`vtt`, `tir+vtt`, `maple+vtt`, …) the same step is also counted for the method
without it (same recipe: `vtt` → `lora`, `tir+vtt` → `lora+tir`, `maple+vtt` → `maple`), and the plug-in's two pieces
are counted alone on inputs of the step's shapes: the fusion (forward and backward, gradients flowing to its inputs
as in the step) and the absorption text pass (the base's text tower, forward and backward to the absorbed token).

Trainable parameters are counted per episode from the modules the step built (`parameter_count`: a parameter
`[E, ...]` counts `prod(shape[1:])`), split by part; their total is what the step's optimizers held.

The paper's figures and the counts from the VtT authors' release are quoted constants (`PAPER_*`, `RELEASE_*`),
never derived from our modules.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.table import Table
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.config import RunConfig
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.data.index import Episode
from cdfsl.data.protocols import FIXED_WAY
from cdfsl.engine.autobatch import largest_shape
from cdfsl.engine.context import build_context
from cdfsl.engine.runner import Runner
from cdfsl.errors import ConfigError
from cdfsl.methods import Method, build_method
from cdfsl.methods.build import base_class
from cdfsl.methods.training import TrainedBase, frozen_class_texts
from cdfsl.methods.vtt.extension import state_sizes
from cdfsl.spec import RunSpec

# Quoted: the VtT paper's cost table (its counting convention for FLOPs is not stated).
PAPER_VTT_PARAMETERS = 3_900_000  # "3.9 M" trainable parameters
PAPER_VTT_GFLOPS = 148.5
PAPER_MAPLE_PARAMETERS = 3_100_000  # MaPLe in the same table
PAPER_MAPLE_GFLOPS = 205.0

# Quoted: counted from the VtT authors' release on ViT-B/16 (C = 512), recipe vtt-release.
RELEASE_VISION_LORA = 884_736  # rank 16 on q, k, v of the 12 vision blocks
RELEASE_FUSION = 2_821_120  # Mamba_Net with its neck (mamba_ffn_neck.py) and one Mamba block
RELEASE_UNUSED_LINEAR = 262_144  # a bias-free C×C Linear the release builds and hands to its optimiser, never used
RELEASE_TOTAL = RELEASE_VISION_LORA + RELEASE_FUSION + RELEASE_UNUSED_LINEAR  # 3,968,000 ≈ the paper's "3.9 M"

FLOP_CONVENTION = (
    "torch.utils.flop_counter.FlopCounterMode: 2 FLOPs per multiply-add; counts matrix multiplications, convolutions "
    "and attention (its formulas also applied to the CPU attention kernel) only; elementwise work such as the SSM "
    "scan, norms, activations and the optimizer update is not counted"
)

# The base method of each method with the VtT plug-in.


def without_vtt(config: RunConfig) -> str | None:
    """The method `config.method` names without its VtT plug-in (what VtT's added cost is measured against), or None
    when it has none: `lora+tir+vtt` → `lora+tir`, `vtt` → its base under the recipe (`lora`)."""
    spec = config.spec
    if not spec.uses("vtt"):
        return None
    return "+".join([spec.base.name, *(p.name for p in spec.plugins if p.name != "vtt")])


def _cpu_attention_flops(
    query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *_: Any, **__: Any
) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(
    grad_out_shape: torch.Size,
    query_shape: torch.Size,
    key_shape: torch.Size,
    value_shape: torch.Size,
    *_: Any,
    **__: Any,
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _cpu_attention_formulas() -> dict[Any, Any]:
    """FLOP formulas for the CPU kernel of `scaled_dot_product_attention`, which FlopCounterMode's registry lacks
    (it has the CUDA flash, memory-efficient and cuDNN kernels): the same formulas, so counts agree across devices."""
    formulas: dict[Any, Any] = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_attention_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_attention_backward_flops),
    ):
        if hasattr(torch.ops.aten, name):
            formulas[getattr(torch.ops.aten, name)] = formula
    return formulas


def flop_counter() -> FlopCounterMode:
    """A silent `FlopCounterMode` (2 FLOPs per multiply-add) that also counts attention on CPU."""
    return FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())


def synthetic_batch(config: RunConfig, backbone: ClipAdapter) -> EpisodeBatch:
    """One episode (E = 1) of random normalized images in the shapes a real episode of `config` has: the largest
    its protocol may yield (`engine.autobatch.largest_shape`: `ways × shots` for fixed-way episodes, 50 classes and
    500 supports for Meta-Dataset's), supports spread over the classes as evenly as they go.

    Support: `S` images with `len(augment.views)` views each, image-major as `build_batch` lays them out:
    `[1, S·V, 3, H, W]`, labels `[1, S·V]`. Query: one image per class `[1, K, 3, H, W]`. Class names are "class 0"
    … "class K−1". Images are uniform in [0, 1] (from a generator seeded with `config.seed`), then normalized with
    the backbone's mean and std.
    """
    shape = largest_shape(config)
    ways, supports, views = shape.ways, shape.supports, len(config.augment.views)
    shots = [supports // ways + (1 if c < supports % ways else 0) for c in range(ways)]
    starts = [sum(shots[:c]) for c in range(ways)]
    size = backbone.image_size
    generator = torch.Generator().manual_seed(config.seed)
    support = torch.rand(1, supports * views, 3, size, size, generator=generator)
    query = torch.rand(1, ways, 3, size, size, generator=generator)
    device = backbone.device
    episode = Episode(
        index=0,
        classes=tuple(range(ways)),
        support=tuple(tuple(range(starts[c], starts[c] + shots[c])) for c in range(ways)),
        query=tuple((c,) for c in range(ways)),
    )
    per_image = torch.tensor(shots, device=device) * views
    return EpisodeBatch(
        episodes=[episode],
        class_names=[[f"class {c}" for c in range(ways)]],
        support=backbone.normalize(support.to(device)),
        support_labels=torch.arange(ways, device=device).repeat_interleave(per_image)[None],
        query=backbone.normalize(query.to(device)),
        query_labels=torch.arange(ways, device=device)[None],
        seed=config.seed,
    )


def _varied_shape(config: RunConfig) -> dict[str, Any]:
    """For a protocol whose episodes vary in shape, the largest episode the step was counted at (else nothing)."""
    if config.episode_protocol == FIXED_WAY:
        return {}
    shape = largest_shape(config)
    return {"protocol": config.episode_protocol, "counted_shape": dataclasses.asdict(shape)}


def per_episode_count(tensors: Iterable[Tensor]) -> int:
    """Parameters of ONE episode among tensors `[E, ...]` (each counts `prod(shape[1:])`)."""
    return sum(math.prod(tensor.shape[1:]) for tensor in tensors)


@dataclass
class StepCount:
    """One counted training step: its FLOPs, the method that ran it, and the trainable parts it built.

    `parameters` maps a part (`vision_lora`, `text_lora`, `prompt_context`, `vtt_fusion`, `other`) to its
    per-episode count; `total` is the per-episode count of everything the step's optimizers held; `labels` gives the
    words each part declared for itself (`Method.part_labels`, `TrainingExtension.cost_label`).
    """

    flops: int
    method: Method
    parameters: dict[str, int] = field(default_factory=dict)
    total: int = 0
    labels: dict[str, str] = field(default_factory=dict)


def count_step(
    config: RunConfig, backbone: ClipAdapter, batch: EpisodeBatch, autocast_dtype: torch.dtype | None = None
) -> StepCount:
    """Count one training step of `config` (resolved, `train.iterations = 1`; MaPLe: one epoch of one batch) on
    `batch` (E = 1).

    The frozen class texts (final, TIR's text layer, VtT's per-layer ones) are computed before counting, as a run
    computes them once per class name; a learned text side recomputes them inside the step, and they count there.
    """
    method = build_method(config, backbone, autocast_dtype)
    if not isinstance(method, TrainedBase):
        raise ConfigError(f"{config.method} does not train: it has no training step to count")
    frozen_class_texts(method, batch.class_names)  # the frozen texts every step reads, computed once per name
    extension = method.extension
    held: dict[int, Tensor] = {}
    modules: list[nn.Module] = []

    def record(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        for group in optimizer.param_groups:
            held.update((id(p), p) for p in group["params"])
        for module in extension.trained_modules() if extension is not None else []:  # `finish` drops them
            if not any(module is seen for seen in modules):
                modules.append(module)

    handle = register_optimizer_step_pre_hook(record)
    try:
        with flop_counter() as counter:
            method.fit(batch)
    finally:
        handle.remove()

    parts = method.cost_parts()
    labels = dict(method.part_labels)
    if extension is not None:
        parts[extension.cost_part] = per_episode_count(p for m in modules for p in m.parameters())
        labels[extension.cost_part] = extension.cost_label
    total = per_episode_count(held.values())
    if total != sum(parts.values()):
        parts["other"] = total - sum(parts.values())
        labels["other"] = OTHER_LABEL
    return StepCount(int(counter.get_total_flops()), method, parts, total, labels)


def vtt_piece_flops(step: StepCount, batch: EpisodeBatch, batch_size: int) -> dict[str, int]:
    """FLOPs of VtT's pieces alone, each forward + backward, on inputs of one step's shapes (E = 1, b views).

    - `vtt_fusion`: the absorption token from per-layer CLS features `[L, 1, b, C]`, the final feature `[1, b, C]`
      (both requiring gradients, as the trained vision features do) and per-layer class texts `[1, K, L, C]`;
      backward to the fusion's parameters and its inputs.
    - `vtt_absorption` (when `vtt.tia`): the base's text tower over its class prompt with the class name's embedding
      replaced by tokens `[1, b, W]` ("a photo of a X." through the frozen tower for the lora base), backward to those
      tokens.

    Uses the extension of `step.method` (after its counted step) with fresh per-episode state, dropped afterwards.
    """
    method = step.method
    if not isinstance(method, TrainedBase) or method.extension is None:
        raise ValueError("vtt_piece_flops needs the counted step of a method with the VtT plug-in")
    return method.extension.piece_flops(batch, batch_size, method.absorber(), flop_counter)


def release_comparable(config: RunConfig, backbone: ClipAdapter) -> bool:
    """Whether the release's counts (`RELEASE_*`) describe this run: ViT-B/16 shapes (12 × 768 vision, C = 512, text
    width 512) with the vtt-release modules (rank-16 q, k, v LoRA on the vision tower, the release fusion with state
    256, dt_rank 256, conv 4)."""
    vtt, lora = config.vtt, config.lora
    return (
        config.uses_vtt
        and (backbone.num_vision_blocks, backbone.vision_width, backbone.embed_dim) == (12, 768, 512)
        and backbone.num_text_blocks == 12
        and backbone.text_width == 512
        and (lora.rank, tuple(sorted(lora.targets)), lora.towers) == (16, ("k", "q", "v"), "vision")
        and not config.trains_text()
        and (vtt.fusion, *state_sizes(vtt.state, vtt.dt_rank, backbone.embed_dim), vtt.conv, vtt.tia)
        == ("release", 256, 256, 4, True)
    )


def training_cost(config: RunConfig, runner: Runner | None = None) -> dict[str, Any]:
    """Trainable parameters and FLOPs of one training step of `config`'s method and recipe, one episode.

    Args:
        config: the run config (validated and resolved here; `train.iterations` is set to 1, `lora.dropout` kept).
        runner: supplies (and caches) the backbone; loaded for this call alone when None.

    Returns:
        Plain numbers: `method`, `base_method` (None without VtT), `recipe`, `backbone`, `pretrained`, `device`,
        `precision`, `episodes` (1), `ways`, `shots`, `views` (per support image), `support_views`, `batch_size`
        (views per step), `dims` (tower depths and widths, joint width C), `parameters` (per-episode counts by part,
        with `total`; `vtt_fusion` only with VtT), `part_labels` (the words each part declared for itself), `flops`
        (`step`; with VtT also `base_step`, `vtt_added` = step − base_step, `vtt_fusion`, `vtt_absorption` and
        `vtt_rest` = vtt_added minus the two pieces),
        `flop_convention`, and with VtT `reference`: the paper's and the release's quoted figures and whether the
        release's counts describe this run (`release_comparable`).

    Raises:
        ConfigError: a bad config, or a method that does not train (zeroshot).
    """
    spec = RunSpec.of(config)  # validated and resolved once
    if not spec.trains:
        raise ConfigError(f"{config.method} does not train: it has no training step to count; use lora, tir or vtt")
    context = build_context(spec, runner.loads if runner is not None else None, load_data=False)
    config, device, backbone = copy.deepcopy(context.config), context.device, context.backbone
    config.train.iterations = 1
    precision, autocast_dtype = context.precision, context.autocast_dtype
    batch = synthetic_batch(config, backbone)
    support_views = batch.support.shape[1]
    base = base_class(config)
    assert issubclass(base, TrainedBase)
    batch, batch_size = base.one_step(config, batch)  # MaPLe: one epoch of one batch, at the full rate

    step = count_step(config, backbone, batch, autocast_dtype)
    parameters = {**step.parameters, "total": step.total}
    flops: dict[str, int] = {"step": step.flops}
    result: dict[str, Any] = {
        "method": config.method,
        "base_method": without_vtt(config),
        "recipe": config.recipe,
        "backbone": config.backbone,
        "pretrained": config.pretrained,
        "device": str(device),
        "precision": precision,
        "episodes": 1,
        "ways": config.ways,
        "shots": config.shots,
        **_varied_shape(config),
        "views": len(config.augment.views),
        "support_views": support_views,
        "batch_size": batch_size,
        "dims": {
            "vision_blocks": backbone.num_vision_blocks,
            "vision_width": backbone.vision_width,
            "text_blocks": backbone.num_text_blocks,
            "text_width": backbone.text_width,
            "embed_dim": backbone.embed_dim,
        },
        "parameters": parameters,
        "part_labels": {part: step.labels.get(part, part) for part in step.parameters},
        "flops": flops,
        "flop_convention": FLOP_CONVENTION,
    }
    if config.uses_vtt:
        base_config = dataclasses.replace(config, method=without_vtt(config))  # same recipe, resolved
        base_count = count_step(base_config, backbone, batch, autocast_dtype)
        pieces = vtt_piece_flops(step, batch, batch_size)
        flops["base_step"] = base_count.flops
        flops["vtt_added"] = step.flops - base_count.flops
        flops.update(pieces)
        flops["vtt_rest"] = flops["vtt_added"] - sum(pieces.values())
        result["reference"] = {
            "paper_parameters": PAPER_VTT_PARAMETERS,
            "paper_gflops": PAPER_VTT_GFLOPS,
            "paper_maple_parameters": PAPER_MAPLE_PARAMETERS,
            "paper_maple_gflops": PAPER_MAPLE_GFLOPS,
            "release_vision_lora": RELEASE_VISION_LORA,
            "release_fusion": RELEASE_FUSION,
            "release_unused_linear": RELEASE_UNUSED_LINEAR,
            "release_total": RELEASE_TOTAL,
            "release_comparable": release_comparable(config, backbone),
        }
    return result


# ---------------------------------------------------------------------------------------------------------- tables
OTHER_LABEL = "other (held by the optimizers)"


def _gflops(flops: int | float) -> str:
    return f"{flops / 1e9:,.2f}"


def cost_header(result: dict[str, Any]) -> str:
    """One line naming what was counted: method, recipe, backbone, device, episode shape, views per step."""
    return (
        f"{result['method']} ({result['recipe']}) on {result['backbone']} ({result['pretrained']} weights), "
        f"{result['device']} {result['precision']}: one training step of {result['episodes']} episode, "
        f"{result['ways']}-way {result['shots']}-shot, {result['support_views']} support views "
        f"({result['views']} per image), {result['batch_size']} per step"
    )


def parameter_table(result: dict[str, Any]) -> Table:
    """Trainable parameters per episode by part; with VtT, the release's counts (quoted) beside ours."""
    parameters: dict[str, int] = result["parameters"]
    labels: dict[str, str] = result.get("part_labels", {})  # as each part declared them
    reference: dict[str, Any] | None = result.get("reference")
    table = Table(title="Trainable parameters per episode", title_justify="left")
    table.add_column("part")
    table.add_column("ours", justify="right")
    release = {}
    if reference is not None:
        table.add_column("VtT release (quoted, ViT-B/16)", justify="right")
        table.add_column("")
        release = {
            "vision_lora": reference["release_vision_lora"],
            "vtt_fusion": reference["release_fusion"],
            "total": reference["release_total"],
        }
    comparable = reference is not None and reference["release_comparable"]
    for part, count in parameters.items():
        if part == "total":
            continue
        row = [labels.get(part, part), f"{count:,}"]
        if reference is not None:
            row += _release_cells(release.get(part), count, comparable)
        table.add_row(*row)
    if reference is not None:
        unused = reference["release_unused_linear"]
        table.add_row("unused bias-free Linear C×C", "–", f"{unused:,}", "built, given to the optimiser, never used")
    row = ["total", f"{parameters['total']:,}"]
    if reference is not None:
        row += [f"{reference['release_total']:,}", f"paper (quoted): {reference['paper_parameters'] / 1e6:.1f} M"]
    table.add_row(*row, style="bold")
    return table


def _release_cells(quoted: int | None, ours: int, comparable: bool) -> list[str]:
    if quoted is None:
        return ["–", ""]
    if not comparable:
        return [f"{quoted:,}", "not comparable (other backbone or config)"]
    return [f"{quoted:,}", "= ours" if quoted == ours else f"[red]DIFFERS from ours by {ours - quoted:+,}[/red]"]


def flop_table(result: dict[str, Any]) -> Table:
    """GFLOPs of one training step; with VtT, the base step, the difference and the plug-in's pieces."""
    flops: dict[str, int] = result["flops"]
    method, base = result["method"], result["base_method"]
    table = Table(title="FLOPs of one training step (FlopCounterMode)", title_justify="left")
    table.add_column("what")
    table.add_column("GFLOPs", justify="right")
    if "base_step" not in flops:
        table.add_row(f"{method} step: forward, backward, optimizer step", _gflops(flops["step"]))
        return table
    table.add_row(f"{base} step (base: {method} without the VtT plug-in)", _gflops(flops["base_step"]))
    table.add_row(f"{method} step (DGSO's second backward included)", _gflops(flops["step"]))
    table.add_row("difference: what VtT adds per step", _gflops(flops["vtt_added"]), style="bold")
    table.add_row("  VtT fusion, forward + backward (alone)", _gflops(flops["vtt_fusion"]))
    if "vtt_absorption" in flops:
        table.add_row("  absorption text pass, forward + backward (alone)", _gflops(flops["vtt_absorption"]))
    table.add_row("  rest: DGSO's extra L_ce backward, per-layer CLS projections", _gflops(flops["vtt_rest"]))
    reference = result["reference"]
    table.add_row(
        "paper (quoted): VtT, counting convention unknown", f"{reference['paper_gflops']:,.1f}", style="dim italic"
    )
    return table


def cost_notes(result: dict[str, Any]) -> list[str]:
    """How the FLOPs were counted; with VtT, how our parameter count relates to the paper's 3.9 M and the release's
    count (quoted figures)."""
    notes = [f"FLOPs: {result['flop_convention']}."]
    if "maple_coupling" in result["parameters"]:
        ours = result["parameters"]["total"]
        notes.append(
            f"VtT paper's cost table (quoted): MaPLe {PAPER_MAPLE_PARAMETERS / 1e6:.1f} M trainable parameters, "
            f"{PAPER_MAPLE_GFLOPS:g} GFLOPs (convention not stated); ours on {result['backbone']}: {ours:,} "
            f"({ours / 1e6:.2f} M), one step of {result['batch_size']} views."
        )
    reference = result.get("reference")
    if reference is None:
        return notes
    ours = result["parameters"]["total"]
    notes += [
        f"Paper (quoted): VtT {reference['paper_parameters'] / 1e6:.1f} M trainable parameters, "
        f"{reference['paper_gflops']} GFLOPs; MaPLe {reference['paper_maple_parameters'] / 1e6:.1f} M, "
        f"{reference['paper_maple_gflops']:g} GFLOPs; the paper does not state how it counts FLOPs.",
        f"Release (quoted, ViT-B/16, C = 512): LoRA {reference['release_vision_lora']:,} + fusion "
        f"{reference['release_fusion']:,} + an unused bias-free C×C Linear {reference['release_unused_linear']:,} "
        f"that it hands to its optimiser = {reference['release_total']:,} ≈ the paper's 3.9 M. Ours has no unused "
        f"Linear: {ours:,} ({ours / 1e6:.2f} M).",
    ]
    if not reference["release_comparable"]:
        notes.append("The release's counts are for ViT-B/16 with the vtt-release modules; this run differs.")
    return notes
