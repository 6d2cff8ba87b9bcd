"""The attention-sink probe (docs/diagnostics.md, `cdfsl diagnose sink`).

For a set of episodes, the vision pass over the query (or support) images before fine-tuning and after fine-tuning
with each given method is observed at every layer (the tokens entering each vision block, docs/tir.md's insertion
points):

- the Sum score of every patch token (how many of the episode's K class texts rank it in their top
  `floor(tir.ratio · M)`, texts taken after text block `tir.text_layer`, exactly as TIR computes it) → per layer a
  histogram over Sum = 0 … K, and the mean token L2 norm grouped by Sum;
- the CLS query's attention in that block → the share taken by the top 1% of tokens (at least one), its entropy,
  and the share that lands on Sum = K patch tokens, averaged over heads, images and episodes;
- for a few images, which tokens each class ranks in its top-k at one deep layer, drawn over the image.

The papers' observation is that plain fine-tuning stacks large norms and CLS attention on Sum = K tokens in the deep
layers, and that TIR undoes it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from torch import Tensor

from cdfsl.analysis.figure_style import paper_style
from cdfsl.analysis.probe_output import condition_color, new_figure, save_figure, write_result
from cdfsl.analysis.probe_setup import (
    accuracy,
    check_episodes,
    class_marks,
    encode,
    fit,
    prepare,
    probe_images,
    resolve_layers,
)
from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.config import METHODS, RunConfig
from cdfsl.engine.autobatch import largest_shape
from cdfsl.engine.runner import Runner
from cdfsl.errors import BackboneError, ConfigError
from cdfsl.methods.tir.recalibration import resolve_blocks
from cdfsl.registry import split_method

BEFORE = "before"
TOP_SHARE = 0.01
HISTOGRAM_LAYERS = 4  # the deepest layers shown in the Sum histogram figure


@dataclass
class SinkStats:
    """Running sums of one condition over episodes, per layer (L layers, K classes)."""

    layers: int
    classes: int
    top_share: float
    counts: Tensor = field(init=False)  # [L, K+1] patch tokens per Sum value
    norm_sums: Tensor = field(init=False)  # [L, K+1] summed token L2 norms per Sum value
    top_sums: Tensor = field(init=False)  # [L] summed top-1% attention shares
    entropy_sums: Tensor = field(init=False)  # [L]
    sink_sums: Tensor = field(init=False)  # [L] summed attention shares on Sum = K tokens
    attention_rows: Tensor = field(init=False)  # [L] number of (image, head) attention rows summed
    accuracies: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        shape = (self.layers, self.classes + 1)
        self.counts = torch.zeros(shape, dtype=torch.int64)
        self.norm_sums = torch.zeros(shape, dtype=torch.float64)
        self.top_sums, self.entropy_sums, self.sink_sums, self.attention_rows = (
            torch.zeros(self.layers, dtype=torch.float64) for _ in range(4)
        )

    def add_tokens(self, layer: int, votes: Tensor, norms: Tensor) -> None:
        """Sum scores `[E, B, M]` and patch-token norms `[E, B, M]` at `layer`."""
        votes, norms = votes.flatten().cpu(), norms.flatten().double().cpu()
        self.counts[layer] += torch.bincount(votes, minlength=self.classes + 1)
        self.norm_sums[layer].index_add_(0, votes, norms)

    def add_attention(self, layer: int, attention: Tensor, votes: Tensor) -> None:
        """CLS attention `[E, B, H, T]` of block `layer` and the Sum scores `[E, B, M]` of its input patches."""
        attention = attention.float()
        tokens = attention.shape[-1]
        top = max(1, math.floor(self.top_share * tokens))
        self.top_sums[layer] += float(attention.topk(top, dim=-1).values.sum(dim=-1).double().sum())
        self.entropy_sums[layer] += float(torch.special.entr(attention).sum(dim=-1).double().sum())
        on_sinks = (attention[..., 1:] * (votes == self.classes)[:, :, None].to(attention.dtype)).sum(dim=-1)
        self.sink_sums[layer] += float(on_sinks.double().sum())
        self.attention_rows[layer] += attention[..., 0].numel()

    def to_json(self) -> dict[str, Any]:
        counts = self.counts.double()
        totals = counts.sum(dim=1, keepdim=True)
        rows = self.attention_rows
        return {
            "accuracy": 100.0 * float(np.mean(self.accuracies)) if self.accuracies else None,
            "per_episode_accuracy": [100.0 * a for a in self.accuracies],
            "sum_counts": self.counts,
            "sum_fraction": counts / totals,
            "mean_norm_by_sum": self.norm_sums / counts,  # NaN (→ null) where no token has that Sum
            "mean_norm": self.norm_sums.sum(dim=1) / counts.sum(dim=1),
            "attention_top_share": self.top_sums / rows,
            "attention_entropy": self.entropy_sums / rows,
            "attention_on_sum_k": self.sink_sums / rows,
        }


def sink_probe(
    config: RunConfig,
    methods: Sequence[str] = ("lora", "tir"),
    episodes: int = 4,
    out: Path | None = None,
    images: str = "query",
    overlay_images: int = 3,
    overlay_layer: int | None = None,
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Sum-score histograms, norms by Sum and CLS attention concentration per vision layer, before and after
    fine-tuning with each of `methods`.

    Args:
        config: dataset, backbone, episode shape, training recipe and TIR knobs (`tir.ratio`, `tir.text_layer`
            define the Sum score); `config.method` is not used.
        methods: trained methods to compare with the plain backbone (`lora`, `tir`, `vtt`, `tir+vtt`).
        episodes: episodes `0 … episodes−1` of the config's sequence, fitted `config.episode_batch` at a time.
        out: folder for `sink.json` and the figures (created); None writes nothing.
        images: `query` or `support` (the first view of each support image).
        overlay_images: how many images of episode 0 (one per class, first classes) get a token overlay.
        overlay_layer: the layer drawn in the overlays; None is the deepest TIR insertion point.
        runner: share loaded backbones and image caches with other runs.

    Returns:
        the JSON written: `layers` (L), `classes` (K), per condition (`before`, then each method) per-layer lists of
        length L (`sum_counts` and `sum_fraction` `[L][K+1]`, `mean_norm_by_sum` `[L][K+1]`, `mean_norm`,
        `attention_top_share`, `attention_entropy`, `attention_on_sum_k`), query accuracy, the overlay marks, and
        `figures` (PNG file names in `out`).
    """
    started = time.perf_counter()
    check_episodes(episodes)
    methods = _check_methods(methods)
    setup = prepare(config, runner)
    backbone = setup.backbone
    if not backbone.has_cls_token:
        raise BackboneError(
            f"the sink probe measures the CLS token's attention and {config.backbone} has no CLS token (SigLIP pools "
            "by attention); its other diagnostics (lost-layers, cka) run, see `cdfsl backbones`"
        )
    layers, classes = backbone.num_vision_blocks, largest_shape(config).ways  # any episode's K fits [K+1] bins
    if overlay_layer is None:
        overlay_layer = resolve_blocks(config.tir.blocks, layers)[-1]
    overlay_layer = resolve_layers([overlay_layer], layers, "overlay_layer")[0]
    conditions = [BEFORE, *methods]
    stats = {name: SinkStats(layers, classes, TOP_SHARE) for name in conditions}
    overlays: dict[str, Any] = {"layer": overlay_layer, "episode": 0, "positions": [], "labels": [], "marks": {}}
    overlay_pixels: Tensor | None = None
    views = len(setup.context.config.augment.views) if methods else 1  # the views `batches` draws (resolved)
    for batch in setup.batches(episodes, with_views=bool(methods)):
        pictures, labels = probe_images(batch, images, views)
        first = batch.indices[0] == 0
        if first:
            positions = _overlay_positions(labels[0], overlay_images)
            overlays["positions"], overlays["labels"] = positions, labels[0, positions]
            overlays["class_names"] = batch.class_names[0]
            overlay_pixels = _display(backbone, pictures[0, positions])
        for name in conditions:
            method = fit(setup, "zeroshot" if name == BEFORE else name, batch)
            text = method.class_features(batch.class_names, config.tir.text_layer)
            votes_by_layer: dict[int, Tensor] = {}
            keep_marks: dict[int, Tensor] = {}
            observe = _observer(backbone, text, config.tir.ratio, stats[name], votes_by_layer, keep_marks)
            output = encode(method, pictures, batch.class_names, observe, keep_cls_attention=True)
            if first:
                overlays["marks"][name] = keep_marks[overlay_layer][0, overlays["positions"]].to(torch.int64)
            for layer, attention in enumerate(output.cls_attention):
                stats[name].add_attention(layer, attention, votes_by_layer[layer])
            final_text = method.class_features(batch.class_names)
            stats[name].accuracies += accuracy(method, output.features, final_text, labels).tolist()
    patches = backbone.num_patches
    result: dict[str, Any] = {
        "probe": "sink",
        "layers": layers,
        "layer_meaning": "tokens entering vision block l (before any recalibration)",
        "classes": classes,
        "sum_values": list(range(classes + 1)),
        "patch_tokens": patches,
        "patch_grid": list(_grid(patches)),
        "ratio": config.tir.ratio,
        "tokens_per_class": math.floor(config.tir.ratio * patches),
        "text_layer": config.tir.text_layer,
        "top_share": TOP_SHARE,
        "top_tokens": max(1, math.floor(TOP_SHARE * (patches + 1))),
        "max_entropy": math.log(patches + 1),
        "images": images,
        "episodes": episodes,
        "methods": list(methods),
        "conditions": {name: stats[name].to_json() for name in conditions},
        "overlays": overlays,
        "config": config.to_dict(),
    }
    figures: list[Path] = []
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        data = write_result(result, None, "sink", [])
        with paper_style():
            figures.append(save_figure(_histogram_figure(data), out, "sink_sum_histogram"))
            figures.append(save_figure(_norm_figure(data), out, "sink_norm_by_sum"))
            figures.append(save_figure(_attention_figure(data), out, "sink_attention"))
            if overlay_pixels is not None and data["overlays"]["positions"]:
                figures.append(save_figure(_overlay_figure(data, overlay_pixels), out, "sink_overlays"))
    result["seconds"] = time.perf_counter() - started
    return write_result(result, out, "sink", figures)


# ---------------------------------------------------------------------------------------------------- helpers


def _check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = (methods,)
    trained = tuple(m for m in METHODS if m != "zeroshot")
    for name in methods:
        if split_method(name)[0] == "zeroshot":  # raises for a name that is no method
            raise ConfigError(
                f"sink probe methods must be trained methods (such as {', '.join(trained)}); got {name!r} "
                "(the plain backbone is always the 'before' condition)"
            )
    if len(set(methods)) != len(methods):
        raise ConfigError(f"sink probe methods are repeated: {', '.join(methods)}")
    return tuple(methods)


def _observer(
    backbone: ClipAdapter,
    text: Tensor,
    ratio: float,
    stats: SinkStats,
    votes_by_layer: dict[int, Tensor],
    marks_by_layer: dict[int, Tensor],
) -> Callable[[int, Tensor], None]:
    """Records Sum scores and norms of the patch tokens entering each block into `stats`; keeps each layer's Sum
    `[E, B, M]` and class marks `[E, B, K, M]` for the attention statistics and the overlays."""

    def observe(layer: int, x: Tensor) -> None:
        patches = x[:, :, backbone.patch_start : backbone.image_tokens].float()
        marks = class_marks(backbone, patches, text, ratio)
        votes = marks.sum(dim=-2)
        votes_by_layer[layer], marks_by_layer[layer] = votes, marks
        stats.add_tokens(layer, votes, patches.norm(dim=-1))

    return observe


def _overlay_positions(labels: Tensor, count: int) -> list[int]:
    """The first image of each of the first `count` episode classes (positions within the image set)."""
    positions = []
    for label in range(count):
        hits = (labels == label).nonzero().flatten()
        if len(hits):
            positions.append(int(hits[0]))
    return positions


def _display(backbone: ClipAdapter, images: Tensor) -> Tensor:
    """Normalized images `[n, 3, H, W]` → displayable `[n, H, W, 3]` in [0, 1] on the CPU."""
    pixels = images.float() * backbone.std + backbone.mean
    return pixels.clamp(0, 1).permute(0, 2, 3, 1).cpu()


def _grid(tokens: int) -> tuple[int, int]:
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else (1, tokens)


def _label(name: str) -> str:
    return "before fine-tuning" if name == BEFORE else f"after {name}"


def _legend_top(figure: Any, handles: list, labels: list[str], columns: int, title: str | None = None) -> None:
    figure.legend(handles, labels, loc="outside upper center", ncols=columns, frameon=False, title=title)


def _histogram_figure(data: dict[str, Any]) -> Any:
    """Share of patch tokens per Sum value at the deepest layers, grouped bars per condition."""
    conditions = list(data["conditions"])
    layers = list(range(max(0, data["layers"] - HISTOGRAM_LAYERS), data["layers"]))
    columns = 2 if len(layers) > 1 else 1
    rows = math.ceil(len(layers) / columns)
    figure = new_figure(0.6 + 1.35 * rows)
    axes = np.atleast_1d(figure.subplots(rows, columns, sharex=True, sharey=True)).flatten()
    sums = np.asarray(data["sum_values"])
    width = 0.8 / len(conditions)
    for ax, layer in zip(axes, layers, strict=False):
        for position, name in enumerate(conditions):
            fraction = np.asarray(data["conditions"][name]["sum_fraction"][layer], dtype=float) * 100
            offset = (position - (len(conditions) - 1) / 2) * width
            ax.bar(sums + offset, fraction, width, color=condition_color(position), label=_label(name))
        ax.set_title(f"layer {layer}", pad=2)
        ax.set_xticks(sums)
    for ax in axes[len(layers) :]:
        ax.set_visible(False)
    figure.supxlabel("Sum score (number of classes claiming the token)")
    figure.supylabel("patch tokens (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    _legend_top(figure, handles, labels, len(conditions))
    return figure


def _norm_figure(data: dict[str, Any]) -> Any:
    """Mean patch-token norm per Sum value against layer, one panel per condition."""
    conditions = list(data["conditions"])
    sums = data["sum_values"]
    layers = np.arange(data["layers"])
    figure = new_figure(0.75 + 1.15 * len(conditions))
    axes = np.atleast_1d(figure.subplots(len(conditions), 1, sharex=True, sharey=True))
    colors = colormaps["viridis"](np.linspace(0.0, 0.9, len(sums)))
    values = np.asarray(
        [[row for row in data["conditions"][name]["mean_norm_by_sum"]] for name in conditions], dtype=float
    )  # [conditions, L, K+1], NaN where no token
    for ax, name, grid in zip(axes, conditions, values, strict=True):
        for s in sums:
            ax.plot(layers, grid[:, s], marker="o", color=colors[s], label=str(s))
        ax.set_title(_label(name), pad=2)
        ax.set_ylabel("mean token norm")
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:
        axes[0].set_yscale("log")
    axes[-1].set_xlabel("vision layer (block input)")
    axes[-1].set_xticks(layers)
    handles, labels = axes[0].get_legend_handles_labels()
    _legend_top(figure, handles, labels, len(sums), title="Sum score")
    return figure


def _attention_figure(data: dict[str, Any]) -> Any:
    """CLS attention concentration against layer, a line per condition."""
    conditions = list(data["conditions"])
    layers = np.arange(data["layers"])
    top, classes = data["top_tokens"], data["classes"]
    panels = [
        ("attention_top_share", f"CLS attn. share of\ntop-{top} token{'s' if top > 1 else ''} (%)", 100.0),
        ("attention_entropy", "CLS attention\nentropy (nats)", 1.0),
        ("attention_on_sum_k", f"CLS attn. share of\nSum = {classes} tokens (%)", 100.0),
    ]
    figure = new_figure(0.7 + 1.05 * len(panels))
    axes = figure.subplots(len(panels), 1, sharex=True)
    for ax, (key, ylabel, scale) in zip(axes, panels, strict=True):
        for position, name in enumerate(conditions):
            series = np.asarray(data["conditions"][name][key], dtype=float) * scale
            ax.plot(layers, series, marker="o", color=condition_color(position), label=_label(name))
        ax.set_ylabel(ylabel)
    axes[1].axhline(data["max_entropy"], color="0.6", linestyle=":", linewidth=0.9)
    axes[1].annotate(
        "uniform",
        (layers[-1], data["max_entropy"]),
        xytext=(0, -9),
        textcoords="offset points",
        ha="right",
        color="0.4",
    )
    axes[-1].set_xlabel("vision layer (block)")
    axes[-1].set_xticks(layers)
    handles, labels = axes[0].get_legend_handles_labels()
    _legend_top(figure, handles, labels, len(conditions))
    return figure


def _overlay_figure(data: dict[str, Any], pixels: Tensor) -> Any:
    """Per image (rows) and condition (columns): the image, a dot per class on each patch that class ranks in its
    top-k, and a frame around tokens every class claims."""
    overlays = data["overlays"]
    conditions = [name for name in data["conditions"] if name in overlays["marks"]]
    classes = data["classes"]
    grid_h, grid_w = data["patch_grid"]
    rows = len(overlays["positions"])
    class_colors = [to_hex(color) for color in colormaps["tab10"](np.arange(classes) % 10)]
    panel = min(1.1, 3.2 / len(conditions))
    figure = new_figure(0.75 + panel * rows, width_in=max(3.5, 0.3 + panel * len(conditions)))
    axes = np.asarray(figure.subplots(rows, len(conditions), squeeze=False))
    marker_pt = 0.65 * (panel * 72 / grid_w) / max(classes, 1)  # dot diameter: a share of a patch cell
    for row in range(rows):
        for column, name in enumerate(conditions):
            ax = axes[row, column]
            ax.imshow(pixels[row].numpy(), extent=(0, grid_w, grid_h, 0), alpha=0.55, interpolation="nearest")
            marks = np.asarray(overlays["marks"][name][row], dtype=bool)  # [K, M]
            for j in range(classes):
                r, c = np.divmod(np.flatnonzero(marks[j]), grid_w)
                x = c + 0.12 + 0.76 * (j + 0.5) / classes
                ax.scatter(x, r + 0.5, s=marker_pt**2, color=class_colors[j], linewidths=0, zorder=3)
            for token in np.flatnonzero(marks.all(axis=0)):
                r, c = divmod(int(token), grid_w)
                ax.add_patch(Rectangle((c + 0.04, r + 0.04), 0.92, 0.92, fill=False, edgecolor="black", linewidth=1))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlim(0, grid_w)
            ax.set_ylim(grid_h, 0)
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_linewidth(0.5)
            if row == 0:
                ax.set_title(_label(name).replace(" fine-tuning", ""), pad=2)
            if column == 0:
                ax.set_ylabel(overlays["class_names"][overlays["labels"][row]])
    handles = [Line2D([], [], marker="o", linestyle="", color=class_colors[j], markersize=4) for j in range(classes)]
    labels = list(overlays["class_names"])
    handles.append(Patch(fill=False, edgecolor="black", linewidth=1.0))
    labels.append(f"all {classes} classes")
    figure.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=min(3, len(labels)),
        frameon=False,
        title=f"top-{data['tokens_per_class']} tokens per class at layer {overlays['layer']}",
    )
    return figure
