"""The CKA probe (docs/diagnostics.md, `cdfsl diagnose cka`): where domain information lives, layer by layer.

Linear CKA (Kornblith et al., 2019) between the per-layer features of two image sets of equal size: one dataset
before vs after fine-tuning, or two datasets (or backbones). A layer's feature of an image is the mean of its patch
tokens entering that vision block, optionally after dropping the tokens every class claims (`sum_k`, Sum = K) or
exactly one class claims (`sum_1`, Sum = 1), with the Sum score of docs/tir.md — the TIR paper's probe of whether domain
information sits in the sink tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cdfsl.analysis.figure_style import paper_style
from cdfsl.analysis.probe_output import condition_color, new_figure, save_figure, write_result
from cdfsl.analysis.probe_setup import ProbeSetup, check_episodes, class_marks, encode, fit, prepare, probe_images
from cdfsl.config import RunConfig
from cdfsl.engine.runner import Runner
from cdfsl.errors import ConfigError

MASKS = ("none", "sum_k", "sum_1")
MASK_LABELS = {"none": "all patch tokens", "sum_k": "Sum = K tokens dropped", "sum_1": "Sum = 1 tokens dropped"}
ZEROSHOT = "zeroshot"


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two feature sets of the same n examples.

    `CKA = ‖Yᶜᵀ Xᶜ‖²_F / (‖Xᶜᵀ Xᶜ‖_F · ‖Yᶜᵀ Yᶜ‖_F)` with column-centered `Xᶜ`, `Yᶜ` (the HSIC form with linear
    kernels). Invariant to orthogonal transforms and isotropic scaling of either set; 1 for identical sets.

    Args: `x` `[n, d1]`, `y` `[n, d2]` (computed in float64). Returns a float in [0, 1]; NaN if either set is
    constant.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"linear_cka needs [n, d1] and [n, d2] with the same n, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    x = x.double() - x.double().mean(dim=0)
    y = y.double() - y.double().mean(dim=0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    scale = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if scale == 0:
        return float("nan")
    return float(cross / scale)


@dataclass
class PooledFeatures:
    """Per-layer pooled features of one image set under each mask, and how many tokens each mask dropped."""

    masks: tuple[str, ...]
    layers: dict[str, list[list[Tensor]]] = field(default_factory=dict)  # mask → layer → batches of [E·B, D]
    dropped: dict[str, list[list[float]]] = field(default_factory=dict)  # mask → layer → per-batch fractions
    final: list[Tensor] = field(default_factory=list)  # batches of final image features [E·B, C]

    def stacked(self, mask: str) -> list[Tensor]:
        """Per layer `[n, D]`."""
        return [torch.cat(batches) for batches in self.layers[mask]]


def cka_probe(
    config: RunConfig,
    other: RunConfig | None = None,
    masks: str | Sequence[str] = MASKS,
    episodes: int = 4,
    out: Path | None = None,
    images: str = "query",
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Linear CKA per vision layer between two image sets' pooled patch-token features.

    Args:
        config: set A. With `other` None, set A is `config`'s images through the plain backbone and set B the same
            images after fine-tuning with `config.method` (which must train).
        other: set B: its own dataset, backbone and episodes, each set through its own config's method
            (`zeroshot` = the plain backbone). Both towers need the same depth; the larger set is cut to the size of
            the smaller one (episode order).
        masks: any of `none`, `sum_k` (drop Sum = K tokens before pooling), `sum_1` (drop Sum = 1 tokens).
        episodes: episodes `0 … episodes−1` of each config's sequence.
        out: folder for `cka.json` and `cka.png` (created); None writes nothing.
        images: `query` or `support` (the first view of each support image).
        runner: share loaded backbones and image caches.

    Returns:
        the JSON written: `layers` (L), `n`, per mask a per-layer CKA list of length L (`cka`), the CKA of the final
        image features, the share of tokens each mask dropped per set and layer, and `figures`.
    """
    started = time.perf_counter()
    check_episodes(episodes)
    masks = (masks,) if isinstance(masks, str) else tuple(masks)
    if not masks or any(mask not in MASKS for mask in masks):
        raise ConfigError(f"cka masks must be among {', '.join(MASKS)}; got {', '.join(masks) or 'none'}")
    runner = runner or Runner()
    setup_a = prepare(config, runner)
    if other is None:
        if not config.trains:
            raise ConfigError(
                "the cka probe compares before and after fine-tuning, which needs a trained method (e.g. lora); "
                "or give a second dataset to compare with"
            )
        setup_b, method_a, method_b = setup_a, ZEROSHOT, config.method
    else:
        setup_b, method_a, method_b = prepare(other, runner), config.method, other.method
    layers = setup_a.backbone.num_vision_blocks
    if setup_b.backbone.num_vision_blocks != layers:
        raise ConfigError(
            f"cka compares layer by layer, but the backbones have {layers} and "
            f"{setup_b.backbone.num_vision_blocks} vision blocks; choose backbones of the same depth"
        )
    feats_a = _pooled(setup_a, method_a, masks, episodes, images)
    feats_b = _pooled(setup_b, method_b, masks, episodes, images)
    n = min(len(torch.cat(feats_a.final)), len(torch.cat(feats_b.final)))
    cka = {
        mask: [linear_cka(a[:n], b[:n]) for a, b in zip(feats_a.stacked(mask), feats_b.stacked(mask), strict=True)]
        for mask in masks
    }
    result: dict[str, Any] = {
        "probe": "cka",
        "layers": layers,
        "layer_meaning": "mean of the patch tokens entering vision block l (before any recalibration)",
        "n": n,
        "episodes": episodes,
        "images": images,
        "masks": list(masks),
        "sets": {"a": _describe(setup_a, method_a), "b": _describe(setup_b, method_b)},
        "cka": cka,
        "final_features_cka": linear_cka(torch.cat(feats_a.final)[:n], torch.cat(feats_b.final)[:n]),
        "dropped_fraction": {
            "a": {mask: [float(np.mean(v)) for v in feats_a.dropped[mask]] for mask in masks},
            "b": {mask: [float(np.mean(v)) for v in feats_b.dropped[mask]] for mask in masks},
        },
        "config": config.to_dict(),
        "other_config": other.to_dict() if other is not None else None,
    }
    figures: list[Path] = []
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with paper_style():
            figures.append(save_figure(_figure(write_result(result, None, "", [])), out, "cka"))
    result["seconds"] = time.perf_counter() - started
    return write_result(result, out, "cka", figures)


def _pooled(setup: ProbeSetup, method: str, masks: tuple[str, ...], episodes: int, images: str) -> PooledFeatures:
    """Pooled per-layer features of `setup`'s episode images through `method` (fitted per episode batch)."""
    config = setup.config
    backbone = setup.backbone
    layers = backbone.num_vision_blocks
    trains = method != ZEROSHOT
    features = PooledFeatures(masks)
    features.layers = {mask: [[] for _ in range(layers)] for mask in masks}
    features.dropped = {mask: [[] for _ in range(layers)] for mask in masks}
    views = len(setup.context.config.augment.views) if trains else 1  # the views `batches` draws (resolved)
    for batch in setup.batches(episodes, with_views=trains):
        pictures, _ = probe_images(batch, images, views)
        fitted = fit(setup, method, batch)
        text = fitted.class_features(batch.class_names, config.tir.text_layer)

        def observe(layer: int, x: Tensor, text: Tensor = text) -> None:
            patches = x[:, :, backbone.patch_start : backbone.image_tokens].float()  # [E, B, M, D]
            classes = text.shape[1]
            votes = class_marks(backbone, patches, text, config.tir.ratio).sum(dim=-2)  # [E, B, M]
            for mask in masks:
                drop = torch.zeros_like(votes, dtype=torch.bool)
                if mask == "sum_k":
                    drop = votes == classes
                elif mask == "sum_1":
                    drop = votes == 1
                keep = (~drop).float()
                keep = torch.where(keep.sum(dim=-1, keepdim=True) > 0, keep, torch.ones_like(keep))
                pooled = (patches * keep[..., None]).sum(dim=2) / keep.sum(dim=-1)[..., None]
                features.layers[mask][layer].append(pooled.flatten(0, 1).cpu())
                features.dropped[mask][layer].append(float(drop.float().mean()))

        output = encode(fitted, pictures, batch.class_names, observe)
        features.final.append(output.features.float().flatten(0, 1).cpu())
    return features


def _describe(setup: ProbeSetup, method: str) -> dict[str, Any]:
    config = setup.config
    stage = "before fine-tuning" if method == ZEROSHOT else f"after {method}"
    return {
        "dataset": config.dataset,
        "backbone": config.backbone,
        "pretrained": config.pretrained,
        "method": method,
        "classes": config.ways,
        "label": f"{config.dataset}, {stage}",
    }


def _figure(data: dict[str, Any]) -> Any:
    """CKA against layer, one line per mask (distinct markers and dashes, so coinciding lines stay visible)."""
    layers = np.arange(data["layers"])
    figure = new_figure(3.0)
    ax = figure.subplots()
    styles = (("o", "-"), ("s", "--"), ("^", ":"))
    sets = data["sets"]
    classes = {sets["a"]["classes"], sets["b"]["classes"]}
    k = str(classes.pop()) if len(classes) == 1 else "K"
    for position, mask in enumerate(data["masks"]):
        series = np.asarray(data["cka"][mask], dtype=float)
        marker, dashes = styles[MASKS.index(mask)]
        label = MASK_LABELS[mask].replace("Sum = K", f"Sum = {k}")
        ax.plot(layers, series, marker=marker, linestyle=dashes, color=condition_color(position), label=label)
    values = np.asarray([v for mask in data["masks"] for v in data["cka"][mask]], dtype=float)
    low = float(np.nanmin(values)) if np.isfinite(values).any() else 0.0
    bottom = 0.0 if low < 0.5 else np.floor((low - 0.01) * 20) / 20  # zoom in when every value is close to 1
    ax.set_ylim(bottom, 1.0 + 0.03 * (1.0 - bottom))
    ax.set_xticks(layers)
    ax.set_xlabel("vision layer (block input)")
    ax.set_ylabel("linear CKA")
    ax.set_title(f"A: {sets['a']['label']}\nB: {sets['b']['label']}  (n = {data['n']} images)", pad=3, loc="left")
    figure.legend(loc="outside lower center", ncols=1, frameon=False)
    return figure
