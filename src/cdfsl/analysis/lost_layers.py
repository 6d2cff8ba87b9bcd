"""The lost-layer probe (docs/diagnostics.md, `cdfsl diagnose lost-layers`).

For each text block l, the query accuracy when the class prompt features are computed with block l removed (its input
passes straight on) and with its residual update emphasized (`x + γ · (block(x) − x)`), against the unmodified
features; zero-shot and after fine-tuning with a method (fitted once per episode). Only the class prompt features
change: the images, and the text features TIR uses to recalibrate tokens, are those of the unmodified model. The VtT
paper's finding is that removing some middle text blocks helps under domain shift, and that VtT training removes that
effect.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cdfsl.analysis.figure_style import paper_style
from cdfsl.analysis.probe_output import condition_color, new_figure, save_figure, write_result
from cdfsl.analysis.probe_setup import ProbeSetup, accuracy, check_episodes, encode, fit, prepare
from cdfsl.config import RunConfig
from cdfsl.engine.runner import Runner
from cdfsl.errors import ConfigError
from cdfsl.methods import Method
from cdfsl.registry import parse_method
from cdfsl.stats import mean_ci95

ZEROSHOT = "zeroshot"


def lost_layers_probe(
    config: RunConfig,
    method: str = "lora",
    gamma: float = 2.0,
    episodes: int = 4,
    out: Path | None = None,
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Query accuracy with each text block removed or its residual update scaled by `gamma`, zero-shot and after
    fine-tuning with `method`.

    Args:
        config: dataset, backbone, episode shape and training recipe (`config.method` is not used).
        method: the fine-tuned condition, any method (`lora`, `coop`, `maple`, `lora+tir`, ...); `zeroshot` gives the
            zero-shot one only. A method that learns its class texts is scored against its own learned prompts with
            each block varied; the others against the template's features, varied once for the dataset.
        gamma: the factor on a block's residual update in the "emphasized" mode; a finite number.
        episodes: episodes `0 … episodes−1` of the config's sequence, fitted `config.episode_batch` at a time.
        out: folder for `lost_layers.json` and `lost_layers.png` (created); None writes nothing.
        runner: share loaded backbones and image caches with other runs.

    Returns:
        the JSON written: `text_blocks` (L) and per condition (`zeroshot`, then `method`) the mean accuracy in
        percent `unmodified` (with `unmodified_ci95`), per-block lists of length L `removed` and `emphasized`
        (and their differences to unmodified, `removed_delta`, `emphasized_delta`), the per-episode numbers, and
        `figures` (PNG file names in `out`).
    """
    started = time.perf_counter()
    check_episodes(episodes)
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not math.isfinite(gamma):
        raise ConfigError(f"gamma must be a finite number (the factor on a block's residual update), got {gamma!r}")
    parse_method(method, dataclasses.replace(config, method=method).recipe_name)  # refuses a name that is no method
    setup = prepare(config, runner)
    blocks = setup.backbone.num_text_blocks
    conditions = [ZEROSHOT] if method == ZEROSHOT else [ZEROSHOT, method]
    variants = _text_variants(setup, float(gamma))  # mode → [variants, N classes, C]
    per_episode: dict[str, dict[str, list]] = {name: {mode: [] for mode in variants} for name in conditions}
    for batch in setup.batches(episodes, with_views=method != ZEROSHOT):
        classes = torch.tensor([episode.classes for episode in batch.episodes], device=setup.device)  # [E, K]
        for name in conditions:
            fitted = fit(setup, name, batch)
            features = encode(fitted, batch.query, batch.class_names).features  # [E, Q, C]
            learned = _learned_variants(fitted, batch.class_names, blocks, float(gamma))
            for mode, texts in (learned or variants).items():
                scores = torch.stack(
                    [
                        accuracy(fitted, features, text if learned else text[classes], batch.query_labels)
                        for text in texts
                    ],
                    dim=1,
                )  # [E, variants]
                per_episode[name][mode] += scores.tolist()
    result: dict[str, Any] = {
        "probe": "lost-layers",
        "text_blocks": blocks,
        "gamma": float(gamma),
        "method": method,
        "episodes": episodes,
        "queries": config.ways * config.queries,
        "conditions": {name: _summary(per_episode[name]) for name in conditions},
        "config": config.to_dict(),
    }
    figures: list[Path] = []
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with paper_style():
            figures.append(save_figure(_figure(write_result(result, None, "", [])), out, "lost_layers"))
    result["seconds"] = time.perf_counter() - started
    return write_result(result, out, "lost_layers", figures)


@torch.no_grad()
def _text_variants(setup: ProbeSetup, gamma: float) -> dict[str, Tensor]:
    """Normalized class prompt features of every dataset class: `unmodified` `[1, N, C]`, and per text block with it
    `removed` or `emphasized` `[L, N, C]`."""
    backbone = setup.backbone
    tokens = backbone.tokenize([setup.config.train.template.format(name) for name in setup.index.class_names])
    blocks = range(backbone.num_text_blocks)

    def features(**change: Any) -> Tensor:
        return F.normalize(backbone.encode_text_tokens(tokens, **change).float(), dim=-1)

    return {
        "unmodified": features()[None],
        "removed": torch.stack([features(skip_blocks=[block]) for block in blocks]),
        "emphasized": torch.stack([features(block_scale={block: gamma}) for block in blocks]),
    }


def _learned_variants(
    method: Method, class_names: list[list[str]], blocks: int, gamma: float
) -> dict[str, list[Tensor]] | None:
    """For a method that learns its class texts, its own class features `[E, K, C]` per variant (unmodified, each
    block removed, each block emphasized), from its learned prompts; None for one whose texts are the template's."""
    unmodified = method.varied_class_features(class_names)
    if unmodified is None:
        return None

    def vary(**change: Any) -> Tensor:
        features = method.varied_class_features(class_names, **change)
        assert features is not None
        return features

    return {
        "unmodified": [unmodified],
        "removed": [vary(skip_blocks=[block]) for block in range(blocks)],
        "emphasized": [vary(block_scale={block: gamma}) for block in range(blocks)],
    }


def _summary(per_episode: dict[str, list]) -> dict[str, Any]:
    """Per-episode accuracies in [0, 1] (`unmodified` `[n][1]`, modes `[n][L]`) → means in percent per block."""
    unmodified = np.asarray(per_episode["unmodified"])[:, 0]
    mean, ci95 = mean_ci95(unmodified.tolist())
    summary: dict[str, Any] = {"unmodified": mean, "unmodified_ci95": ci95}
    for mode in ("removed", "emphasized"):
        values = np.asarray(per_episode[mode]) * 100.0  # [n, L]
        summary[mode] = values.mean(axis=0)
        summary[f"{mode}_delta"] = values.mean(axis=0) - mean
    summary["per_episode"] = {
        "unmodified": unmodified * 100.0,
        "removed": np.asarray(per_episode["removed"]) * 100.0,
        "emphasized": np.asarray(per_episode["emphasized"]) * 100.0,
    }
    return summary


def _figure(data: dict[str, Any]) -> Any:
    """Accuracy against the removed / emphasized text block, one panel per condition, unmodified as a line.

    Points far from the rest (removing block 0 often breaks the model outright) would squash the interesting
    range, so the y-axis covers the others and each off-scale point is drawn on the axis edge with its value.
    """
    conditions = list(data["conditions"])
    blocks = np.arange(data["text_blocks"])
    figure = new_figure(0.7 + 1.35 * len(conditions))
    axes = np.atleast_1d(figure.subplots(len(conditions), 1, sharex=True, sharey=True))
    modes = (
        ("removed", "o", "-", condition_color(1), "block removed"),
        ("emphasized", "s", "--", condition_color(2), f"update scaled by γ = {data['gamma']:g}"),
    )
    bottom, top = _focus_range(data)
    for ax, name in zip(axes, conditions, strict=True):
        row = data["conditions"][name]
        for key, marker, dashes, color, label in modes:
            values = np.asarray(row[key], dtype=float)
            ax.plot(blocks, values, marker=marker, linestyle=dashes, color=color, label=label)
            for block, value in zip(blocks, values, strict=True):
                if not bottom <= value <= top:
                    edge = bottom if value < bottom else top
                    ax.plot(block, edge, marker="v" if value < bottom else "^", color=color, clip_on=False)
                    ax.annotate(
                        f"{value:.0f}%",
                        (block, edge),
                        xytext=(4, 2 if value < bottom else -8),
                        textcoords="offset points",
                        color=color,
                    )
        ax.axhline(row["unmodified"], color=condition_color(0), linestyle=":", label="unmodified")
        ax.set_title("zero-shot" if name == ZEROSHOT else f"after {name}", pad=2)
        ax.set_ylabel("query accuracy (%)")
    axes[0].set_ylim(bottom, top)
    axes[-1].set_xlabel("text block")
    axes[-1].set_xticks(blocks)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside upper center", ncols=2, frameon=False)
    return figure


def _focus_range(data: dict[str, Any]) -> tuple[float, float]:
    """A y-range over every accuracy but the outliers: points more than max(10, 5 × the median absolute
    deviation) percentage points from their condition's unmodified accuracy."""
    kept, deviations = [], []
    for row in data["conditions"].values():
        values = np.asarray(row["removed"] + row["emphasized"], dtype=float)
        deviations.append(np.abs(values - row["unmodified"]))
        kept.append((values, row["unmodified"]))
    threshold = max(10.0, 5.0 * float(np.median(np.concatenate(deviations))))
    inside = [row_unmodified for _, row_unmodified in kept]
    for values, unmodified in kept:
        inside += values[np.abs(values - unmodified) <= threshold].tolist()
    low, high = min(inside), max(inside)
    pad = max(1.0, 0.08 * (high - low))
    return max(0.0, low - pad), min(100.0, high + pad)
