"""Backbones by name: open_clip architectures with a pretrained tag, a local checkpoint, or random weights.

- `tiny`: the embedded tiny CLIP; any `--pretrained` but `none` or a file path gives the shipped weights.
- any open_clip model name (`ViT-B-16`, ...): `--pretrained TAG` (e.g. `openai`, downloads when online),
  `--pretrained PATH` (a local checkpoint; safetensors or a `torch.load(weights_only=True)` file, never pickled code),
  or `--pretrained none` (random weights: tests, speed benchmarks).
"""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip
import torch

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.backbone.tiny import TINY_NAME, create_tiny_model, register_tiny_config
from cdfsl.errors import BackboneError

TINY = "tiny"
# Random weights (`--pretrained none`) are a function of the architecture: resumed runs and separate processes agree.
RANDOM_WEIGHTS_SEED = 0


def load_backbone(name: str, pretrained: str = "openai", device: str | torch.device = "cpu") -> ClipAdapter:
    """Build the frozen backbone `name` with weights `pretrained` on `device`, wrapped in a `ClipAdapter`."""
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # open_clip logs at root level
    checkpoint = Path(pretrained).expanduser() if pretrained not in ("none", "") else None
    is_file = checkpoint is not None and checkpoint.is_file()
    if (
        checkpoint is not None
        and not is_file
        and ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors")))
    ):
        raise BackboneError(f"checkpoint file {pretrained} not found")
    if name == TINY:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = create_tiny_model(load_weights=pretrained != "none" and not is_file)
        arch = register_tiny_config()
        if is_file:
            _load_checkpoint(model, checkpoint)
    else:
        arch = name
        model = _create_open_clip(name, pretrained, checkpoint if is_file else None)
    tokenizer = open_clip.get_tokenizer(arch if name != TINY else TINY_NAME)
    preprocess = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = preprocess.get("std", open_clip.OPENAI_DATASET_STD)
    adapter = ClipAdapter(model, tokenizer, mean, std, name)
    return adapter.to(device)


def _create_open_clip(name: str, pretrained: str, checkpoint: Path | None) -> torch.nn.Module:
    if name not in open_clip.list_models():
        raise BackboneError(f"unknown backbone {name!r}; use 'tiny' or an open_clip model name such as ViT-B-16")
    if pretrained == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            return open_clip.create_model(name, pretrained=None)
    if checkpoint is not None:
        model = open_clip.create_model(name, pretrained=None)
        _load_checkpoint(model, checkpoint)
        return model
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise BackboneError(
            f"{name} has no pretrained tag {pretrained!r}; known tags: {', '.join(tags) or 'none'} "
            "(or give a checkpoint path, or 'none' for random weights)"
        )
    quick_gelu = bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
    try:
        return open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu)
    except (OSError, RuntimeError) as error:
        raise BackboneError(
            f"could not load {name} weights {pretrained!r} ({error}); offline machines need a local checkpoint: "
            "--pretrained PATH"
        ) from None


def _load_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Load a state dict into `model` without executing code from the file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
        state = {k.removeprefix("module."): v.float() for k, v in state.items()}
        model.load_state_dict(state, strict=True)
    except Exception as error:  # a user's file: report what is wrong instead of a traceback
        raise BackboneError(f"cannot load checkpoint {path}: {error}") from None
