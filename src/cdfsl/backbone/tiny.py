"""The embedded tiny CLIP (docs/embedded.md): an open_clip architecture whose weights ship with the package.

12 vision and 12 text blocks (so TIR's default insertion points sit where they do on ViT-B/16), width 96,
64 px input with patch 16 (16 patch tokens), the standard open_clip BPE tokenizer.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import open_clip
import torch

TINY_NAME = "cdfsl-tiny"
_ASSETS = resources.files("cdfsl") / "assets"
CONFIG_PATH = Path(str(_ASSETS / f"{TINY_NAME}.json"))  # open_clip names a model after its config stem
CHECKPOINT_PATH = Path(str(_ASSETS / "tiny-clip.safetensors"))

_registered = False


def register_tiny_config() -> str:
    """Make the tiny architecture known to open_clip's model registry under `TINY_NAME`; return that name."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_PATH)
        _registered = True
    return TINY_NAME


def create_tiny_model(load_weights: bool = True) -> torch.nn.Module:
    """The tiny CLIP in fp32 on CPU, with the shipped weights (or random weights when `load_weights` is False)."""
    model = open_clip.create_model(register_tiny_config(), pretrained=None)
    if load_weights:
        if not CHECKPOINT_PATH.is_file():
            from cdfsl.errors import BackboneError

            raise BackboneError(
                f"the tiny model's weights are missing ({CHECKPOINT_PATH}); reinstall the package or use "
                "--pretrained none for random weights"
            )
        from safetensors.torch import load_file

        state = {k: v.float() for k, v in load_file(str(CHECKPOINT_PATH)).items()}
        model.load_state_dict(state, strict=True)
    return model.eval()
