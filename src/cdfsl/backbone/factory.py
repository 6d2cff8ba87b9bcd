"""Backbones by name: open_clip architectures with a pretrained tag, a local checkpoint, or random weights.

- `tiny`: the embedded tiny CLIP; its one pretrained tag is `shipped` (the default tag `openai` names it too and is
  recorded as `shipped`; any other tag is refused), besides `none` and a file path.
- any open_clip model name (`ViT-B-16`, ...): `--pretrained TAG` (e.g. `openai`, downloads when online),
  `--pretrained PATH` (a local checkpoint; safetensors or a `torch.load(weights_only=True)` file, never pickled code
  and never a TorchScript archive), or `--pretrained none` (random weights: tests, speed benchmarks).

Activation (GELU or QuickGELU). OpenAI's CLIP weights were trained with QuickGELU; open_clip's plain names
(`ViT-B-16`) build GELU and its `-quickgelu` names (`ViT-B-16-quickgelu`) build QuickGELU. Weights run with the other
activation give features that are wrong but look plausible, so `resolve_activation` decides it before anything is
built, without loading weights: an explicit `activation` (`--set activation=gelu|quickgelu`) wins; otherwise the tiny
model uses its own config, a `-quickgelu` name (or a config with `quick_gelu`) gives QuickGELU, a pretrained tag uses
open_clip's record for that tag, random weights use the model config, a local checkpoint of a model none of whose
pretrained tags was trained with QuickGELU (PE-Core, SigLIP, the small models) uses the model config, and a local
checkpoint with another plain name is identified by an `open_clip_config.json` next to it (open_clip's Hugging Face
export layout) or by the keys that only OpenAI's state dicts carry (`input_resolution`, `context_length`,
`vocab_size`). A checkpoint whose origin cannot be told is refused rather than guessed. The resolved activation is
part of a run's identity: see `docs/protocol.md`.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import open_clip
import torch

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.backbone.downloads import check_download
from cdfsl.backbone.small import register_small_configs
from cdfsl.backbone.tags import DEFAULT_TAG, TINY, TINY_TAG, weights_alias
from cdfsl.backbone.tiny import CONFIG_PATH as TINY_CONFIG_PATH
from cdfsl.backbone.tiny import create_tiny_model, register_tiny_config
from cdfsl.backbone.tokenizers import load_tokenizer
from cdfsl.data.fingerprint import file_digest
from cdfsl.errors import BackboneError

# Random weights (`--pretrained none`) are a function of the architecture: resumed runs and separate processes agree.
RANDOM_WEIGHTS_SEED = 0

AUTO = "auto"
GELU = "gelu"
QUICKGELU = "quickgelu"
ACTIVATIONS = (GELU, QUICKGELU)
# Top-level entries of OpenAI's CLIP state dicts (the `clip` package's TorchScript models) that open_clip lacks.
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
# The config open_clip writes next to the weights in its Hugging Face exports.
OPEN_CLIP_CONFIG = "open_clip_config.json"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_HOW_TO_CHOOSE = (
    "choose it: an open_clip -quickgelu model name (e.g. --backbone ViT-B-16-quickgelu) or "
    "--set activation=quickgelu for OpenAI weights, --set activation=gelu for weights trained with GELU"
)


def resolve_activation(name: str, pretrained: str, activation: str = AUTO) -> str:
    """The MLP activation ("gelu" or "quickgelu") backbone `name` with weights `pretrained` is built with.

    Cheap and deterministic (it keys stored results): reads configs and, for a local checkpoint with a plain model
    name, the checkpoint's keys, never its weights into a model. `activation` is "auto" or an explicit "gelu" /
    "quickgelu", which always wins. Raises `BackboneError` for an unknown name, tag, activation or missing file, for a
    TorchScript archive, and for a checkpoint whose activation cannot be told from the file.
    """
    return _resolve(name, pretrained, activation)[0]


def resolve_pretrained(name: str, pretrained: str) -> str:
    """The weights `pretrained` names for backbone `name`, as a run records them (run identity, stored rows,
    `model.json`): `none` and checkpoint paths as given; on `tiny`, `shipped` for `shipped` or the default tag `openai`
    (the same weights); on other models the tag itself, which must be one open_clip knows for `name` (the small test
    models have none). Raises `BackboneError` for a tag the backbone does not have, or an unknown backbone."""
    if pretrained in ("none", "") or _checkpoint_file(pretrained) is not None:
        return pretrained
    if name == TINY:
        if weights_alias(name, pretrained) == TINY_TAG:
            return TINY_TAG
        raise BackboneError(
            f"tiny has no pretrained tag {pretrained!r}; its one set of weights is {TINY_TAG!r} (what the default "
            f"{DEFAULT_TAG!r} loads too); use 'none' for random weights or a checkpoint path"
        )
    _model_config(name)  # an unknown name is refused first
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise BackboneError(
            f"{name} has no pretrained tag {pretrained!r}; known tags: {', '.join(tags) or 'none'} "
            "(or give a checkpoint path, or 'none' for random weights)"
        )
    return pretrained


def weights_identity(pretrained: str) -> str:
    """What identifies the weights `pretrained` names in a run's identity: `sha256:<hex>` of a checkpoint file's bytes
    (so a file rebuilt at the same path is a new run, and the same file under another path is the same run), the tag
    or `none` otherwise. Digests are cached by path and file metadata (`cdfsl.data.fingerprint`)."""
    checkpoint = _checkpoint_file(pretrained)
    return pretrained if checkpoint is None else f"sha256:{file_digest(checkpoint)}"


def load_backbone(
    name: str,
    pretrained: str = "openai",
    device: str | torch.device = "cpu",
    activation: str = AUTO,
    tokenizer: str | None = None,
) -> ClipAdapter:
    """Build the frozen backbone `name` with weights `pretrained` on `device`, wrapped in a `ClipAdapter`.

    The MLP activation is `resolve_activation(name, pretrained, activation)`; the tokenizer is the model's own, or
    the Hugging Face tokenizer in folder `tokenizer` (`cdfsl.backbone.tokenizers`); the image normalization is
    `image_normalization(name, checkpoint, model)`.
    """
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # open_clip logs at root level
    resolved, checkpoint = _resolve(name, pretrained, activation)
    config = _model_config(name)
    text_tokenizer = load_tokenizer(name, config.get("text_cfg", {}), tokenizer)  # before the weights: fails fast
    if name == TINY:
        model = _create_tiny(pretrained, checkpoint, resolved)
    else:
        model = _create_open_clip(name, pretrained, checkpoint, resolved)
    mean, std = image_normalization(name, checkpoint, model)
    adapter = ClipAdapter(model, text_tokenizer, mean, std, name)
    return adapter.to(device)


def image_normalization(
    name: str, checkpoint: Path | None, model: torch.nn.Module
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The image mean and std of backbone `name` (weights from `checkpoint`, or a tag or random when None).

    A pretrained tag: open_clip's record for it (set on the model). A checkpoint file: the `preprocess_cfg` of an
    `open_clip_config.json` next to it, else the one normalization every pretrained tag of `name` shares (PE-Core and
    SigLIP use 0.5, not OpenAI's statistics: a checkpoint of theirs normalized like CLIP gives features that look
    plausible and are wrong). Otherwise (random weights, tags that disagree): the model config's (open_clip's
    default, OpenAI's statistics).
    """
    preprocess = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    if checkpoint is not None:
        exported = (_exported_config(checkpoint) or {}).get("preprocess_cfg")
        if isinstance(exported, dict) and "mean" in exported and "std" in exported:
            preprocess["mean"], preprocess["std"] = exported["mean"], exported["std"]
        elif name != TINY:
            shared = {
                (tuple(cfg["mean"]), tuple(cfg["std"])) for cfg in _tag_configs(name) if "mean" in cfg and "std" in cfg
            }
            if len(shared) == 1:
                preprocess["mean"], preprocess["std"] = shared.pop()
    mean = tuple(float(v) for v in preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in preprocess.get("std", open_clip.OPENAI_DATASET_STD))
    return mean, std


def _exported_config(checkpoint: Path) -> dict[str, Any] | None:
    """The `open_clip_config.json` next to `checkpoint` (open_clip's Hugging Face export layout), or None when there
    is none; an unreadable one is a `BackboneError`."""
    sibling = checkpoint.parent / OPEN_CLIP_CONFIG
    if not sibling.is_file():
        return None
    try:
        exported = json.loads(sibling.read_text(encoding="utf-8"))
        if not isinstance(exported, dict):
            raise ValueError("it does not hold a JSON object")
    except (OSError, ValueError, RecursionError) as error:
        raise BackboneError(
            f"cannot read {sibling} (the open_clip config next to checkpoint {checkpoint}): "
            f"{'it nests too deeply' if isinstance(error, RecursionError) else error}; fix or remove it"
        ) from None
    return exported


def _tag_configs(name: str) -> list[dict[str, Any]]:
    """open_clip's record of every pretrained tag of model `name`."""
    return [open_clip.get_pretrained_cfg(name, tag) for tag in open_clip.list_pretrained_tags_by_model(name)]


# ------------------------------------------------------------------------------------------- activation


def _resolve(name: str, pretrained: str, activation: str) -> tuple[str, Path | None]:
    """Validate the request; return the activation and the checkpoint file (None for a tag or random weights)."""
    if activation not in (AUTO, *ACTIVATIONS):
        raise BackboneError(f"unknown activation {activation!r}; use auto, gelu or quickgelu")
    checkpoint = _checkpoint_file(pretrained)
    config = _model_config(name)
    random_weights = pretrained in ("none", "")
    pretrained = resolve_pretrained(name, pretrained)
    if activation != AUTO:
        return activation, checkpoint
    from_config = QUICKGELU if config.get("quick_gelu", False) else GELU
    if name == TINY or random_weights or from_config == QUICKGELU or name.endswith("-quickgelu"):
        return (QUICKGELU if name.endswith("-quickgelu") else from_config), checkpoint
    if checkpoint is None:  # a pretrained tag: open_clip records how it was trained
        tag_quick_gelu = open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu")
        if tag_quick_gelu is None:
            return from_config, None
        return (QUICKGELU if tag_quick_gelu else GELU), None
    if name != TINY and not any(cfg.get("quick_gelu") for cfg in _tag_configs(name)):
        return from_config, checkpoint  # no weights of this model were trained with QuickGELU (PE-Core, SigLIP)
    return _checkpoint_activation(checkpoint), checkpoint


def _model_config(name: str) -> dict[str, Any]:
    if name == TINY:
        config: dict[str, Any] = json.loads(TINY_CONFIG_PATH.read_text(encoding="utf-8"))
        return config
    register_small_configs()
    if name not in open_clip.list_models():
        raise BackboneError(f"unknown backbone {name!r}; use 'tiny' or an open_clip model name such as ViT-B-16")
    return dict(open_clip.get_model_config(name) or {})


def _checkpoint_file(pretrained: str) -> Path | None:
    """`pretrained` as an existing checkpoint file, None for a tag or `none`; refuses TorchScript archives."""
    if pretrained in ("none", ""):
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        _refuse_torchscript(path)
        return path
    if "/" in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES):
        raise BackboneError(f"checkpoint file {pretrained} not found")
    return None


def _refuse_torchscript(path: Path) -> None:
    """Raise if `path` is a TorchScript archive; decided from the zip's member names, nothing is loaded."""
    if path.suffix == ".safetensors" or not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return  # not a readable zip: the loader reports what is wrong with it
    for member in names:
        parts = member.split("/")
        if "code" in parts[:-1] or parts[-1] == "constants.pkl":
            raise BackboneError(
                f"{path} is a TorchScript archive (like OpenAI's original ViT-B-16.pt from the clip package); loading "
                "it would run code stored in the file, so cdfsl refuses it. Convert it once: load the model with "
                "open_clip's `openai` pretrained tag on a machine with internet, or, for a file you trust, save "
                "`torch.jit.load(PATH).state_dict()` with safetensors.torch.save_file and pass that .safetensors file"
            )


def _checkpoint_activation(path: Path) -> str:
    """The activation of a checkpoint loaded under a plain (GELU) model name: its origin decides, else refuse."""
    exported = _exported_config(path)
    if exported is not None:
        model_cfg = exported.get("model_cfg", exported)
        if not isinstance(model_cfg, dict):
            raise BackboneError(
                f"{path.parent / OPEN_CLIP_CONFIG}: its model_cfg is not a JSON object; fix or remove it"
            )
        return QUICKGELU if model_cfg.get("quick_gelu", False) else GELU
    if path.suffix not in (".npz", ".npy") and all(key in _checkpoint_keys(path) for key in OPENAI_EXTRA_KEYS):
        return QUICKGELU
    raise BackboneError(
        f"the activation of checkpoint {path} cannot be told from the file (no {OPEN_CLIP_CONFIG} next to it, not an "
        f"OpenAI state dict); OpenAI CLIP weights need QuickGELU and give plausible but wrong features with GELU; "
        + _HOW_TO_CHOOSE
    )


def _checkpoint_keys(path: Path) -> set[str]:
    """The state-dict keys of a checkpoint file (safetensors: the header only; torch: loaded `weights_only`)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return set(handle.keys())
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # a user's file: report what is wrong instead of a traceback
        raise BackboneError(f"cannot load checkpoint {path}: {error}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"cannot load checkpoint {path}: it holds a {type(state).__name__}, not a state dict")
    return {str(key).removeprefix("module.") for key in state}


# ------------------------------------------------------------------------------------------- building


def _create_tiny(pretrained: str, checkpoint: Path | None, activation: str) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        model = create_tiny_model(load_weights=pretrained != "none" and checkpoint is None)
        if activation != _tiny_activation():  # an explicit choice against the tiny config: same weights, other act
            other = open_clip.create_model(register_tiny_config(), pretrained=None, quick_gelu=activation == QUICKGELU)
            other.load_state_dict(model.state_dict(), strict=True)
            model = other.eval()
    if checkpoint is not None:
        _load_checkpoint(model, checkpoint)
    return model


def _tiny_activation() -> str:
    return QUICKGELU if _model_config(TINY).get("quick_gelu", False) else GELU


def _create_open_clip(name: str, pretrained: str, checkpoint: Path | None, activation: str) -> torch.nn.Module:
    # `quick_gelu=False` is a constructor override that beats a `-quickgelu` config: the explicit choice wins.
    act: dict[str, bool] = {"force_quick_gelu": True} if activation == QUICKGELU else {"quick_gelu": False}
    if pretrained in ("none", "") or checkpoint is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = open_clip.create_model(name, pretrained=None, **act)
        if checkpoint is not None:
            _load_open_clip_checkpoint(model, checkpoint, name)
        return model
    check_download(name, pretrained, open_clip.get_pretrained_cfg(name, pretrained))
    try:
        return open_clip.create_model(name, pretrained=pretrained, **act)
    except (OSError, RuntimeError) as error:
        raise BackboneError(
            f"could not load {name} weights {pretrained!r} ({error}); offline machines need a local checkpoint: "
            "--pretrained PATH"
        ) from None


def _load_open_clip_checkpoint(model: torch.nn.Module, path: Path, name: str) -> None:
    """Load through open_clip (OpenAI/3rd-party key layouts, position-embedding resizes), `weights_only`.

    OpenAI's extra top-level entries are the only keys allowed beyond the model's: open_clip loads non-strictly and
    the remaining key mismatches are checked here, which equals stripping those entries and loading strictly.
    """
    try:
        incompatible = open_clip.load_checkpoint(model, str(path), strict=False, weights_only=True)
    except Exception as error:  # a user's file: report what is wrong instead of a traceback
        raise BackboneError(f"cannot load checkpoint {path}: {error}") from None
    missing = list(getattr(incompatible, "missing_keys", []))
    unexpected = [k for k in getattr(incompatible, "unexpected_keys", []) if k not in OPENAI_EXTRA_KEYS]
    if missing or unexpected:
        raise BackboneError(
            f"cannot load checkpoint {path}: it does not match backbone {name} (missing keys: "
            f"{', '.join(missing[:5]) or 'none'}; unexpected keys: {', '.join(unexpected[:5]) or 'none'}); "
            "check --backbone"
        )


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
