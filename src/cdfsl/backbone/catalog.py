"""Which open_clip models cdfsl can run (`cdfsl backbones`), read from their configs without loading weights.

The adapter (`cdfsl.backbone.adapter.ClipAdapter`) runs two kinds of vision tower block by block: open_clip's own
`VisionTransformer` pooling the CLS token (CLIP, LAION, DataComp) and a timm ViT trunk inside open_clip's `TimmModel`
(PE-Core, SigLIP / SigLIP2; `cdfsl.backbone.timm_vision`), each with open_clip's text transformer. A model config
says which towers a model gets, so the catalogue classifies every name open_clip knows by its config; a timm trunk is
built on PyTorch's meta device (shapes only, no memory, no weights) and judged by the same check the adapter makes:

- `layers` given per stage: a ModifiedResNet (RN50, …);
- an `hf_model_name` in the text config: a Hugging Face text tower (XLM-R, mT5, NLLB, …);
- attentional or average pooling on an open_clip ViT (CoCa, CLIPA): no CLS feature;
- a timm trunk the tower check refuses (ConvNeXt, EVA's separate q/v biases, FastViT, Swin, ViTamin, …).

Every supported model runs every method. The diagnostics differ in one place: the sink probe records the CLS token's
attention, so it needs a CLS token (SigLIP has none). VtT's release fusion lays 2L + 1 features on a square grid
(L = the shallower tower's depth): 12 blocks give 25, 24 give 49; other depths need `--set vtt.fusion=ssm`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from cdfsl.backbone.small import TRUNK_PREFIX
from cdfsl.backbone.tiny import TINY_NAME

ALL_DIAGNOSTICS = ("sink", "lost-layers", "cka")
TRUNK_CACHE = "timm-trunks.json"


@dataclass(frozen=True)
class BackboneInfo:
    """One open_clip model: whether cdfsl runs it (`reason` says why not), and its tower shapes when it does."""

    name: str
    supported: bool
    reason: str
    family: str = ""
    vision: str = ""
    text: str = ""
    embed_dim: int = 0
    tags: tuple[str, ...] = ()
    vtt_release_fusion: bool = False
    diagnostics: tuple[str, ...] = ()


@dataclass(frozen=True)
class VisionShape:
    """What the catalogue needs of a vision tower: family, depth, width, input size, patch, CLS token or not."""

    family: str
    blocks: int
    width: int
    image_size: Any
    patch: Any
    has_cls: bool = True


def classify(
    name: str, config: dict[str, Any], tags: tuple[str, ...] = (), trunk_shape: VisionShape | str | None = None
) -> BackboneInfo:
    """The catalogue entry of open_clip model `name` with model config `config`.

    `trunk_shape`: for a timm vision trunk, its shape (`timm_trunk_shape`) or why the adapter refuses it.
    """
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if text.get("hf_model_name"):
        return BackboneInfo(name, False, f"Hugging Face text tower ({text['hf_model_name']}); not supported yet")
    if vision.get("timm_model_name"):
        if not isinstance(trunk_shape, VisionShape):
            why = trunk_shape or "not checked"
            return BackboneInfo(name, False, f"timm vision trunk {vision['timm_model_name']}: {why}")
        shape = trunk_shape
    elif isinstance(vision.get("layers"), list | tuple):
        return BackboneInfo(name, False, "ModifiedResNet vision tower; cdfsl needs a ViT")
    elif vision.get("attentional_pool") or vision.get("pool_type", "tok") != "tok" or "multimodal_cfg" in config:
        return BackboneInfo(name, False, "does not pool the CLS token (attentional or average pooling)")
    else:
        shape = VisionShape(
            "CLIP",
            int(vision.get("layers", 12)),
            vision.get("width", 0),
            vision.get("image_size"),
            vision.get("patch_size"),
        )
    text_blocks = int(text.get("layers", 12))
    depth = min(shape.blocks, text_blocks)
    square = math.isqrt(2 * depth + 1) ** 2 == 2 * depth + 1
    return BackboneInfo(
        name,
        True,
        "",
        family=shape.family,
        vision=f"{shape.blocks}×{shape.width}, {shape.image_size}px/{shape.patch}",
        text=f"{text_blocks}×{text.get('width', '?')}" + ("" if not text.get("no_causal_mask") else " (bidirectional)"),
        embed_dim=int(config.get("embed_dim", 0)),
        tags=tags,
        vtt_release_fusion=square,
        diagnostics=ALL_DIAGNOSTICS if shape.has_cls else tuple(d for d in ALL_DIAGNOSTICS if d != "sink"),
    )


def timm_trunk_shape(timm_name: str, pool: str | None) -> VisionShape | str:
    """The shape of timm model `timm_name` as open_clip builds it (global pool `pool`), built on the meta device; or
    why the adapter refuses it."""
    import timm
    import torch

    from cdfsl.backbone.timm_vision import TimmVisionTower

    own = timm_name.startswith(TRUNK_PREFIX)  # the small models' trunks (cdfsl.backbone.small)
    if not own and not timm.models.is_model_in_modules(timm_name, ["vision_transformer", "eva"]):
        return "is not one of timm's ViT or EVA models"
    kwargs = {"num_classes": 0, "global_pool": pool} if pool is not None else {}
    try:
        with torch.device("meta"):
            trunk = timm.create_model(timm_name, pretrained=False, **kwargs)
    except Exception as error:  # a trunk this timm cannot build
        return f"cannot be built here ({type(error).__name__})"
    why = TimmVisionTower.refusal(trunk)
    if why is not None:
        return why
    family = "PE-Core" if type(trunk).__name__ == "Eva" else "SigLIP"
    patch = trunk.patch_embed.patch_size
    return VisionShape(
        family,
        len(trunk.blocks),
        int(trunk.embed_dim),
        trunk.patch_embed.img_size[0],
        patch[0] if isinstance(patch, tuple | list) else patch,
        getattr(trunk, "cls_token", None) is not None,
    )


def catalogue() -> list[BackboneInfo]:
    """Every open_clip model name (and cdfsl's `tiny` and small models), classified; sorted by name."""
    import open_clip

    from cdfsl.backbone.factory import TINY_TAG
    from cdfsl.backbone.small import SMALL_NAMES, register_small_configs
    from cdfsl.backbone.tiny import register_tiny_config

    register_tiny_config()
    register_small_configs()
    cache = _TrunkCache()
    entries = []
    for name in open_clip.list_models():
        config = open_clip.get_model_config(name)
        if config is None:
            continue
        if name == TINY_NAME:
            shown, tags = "tiny", (TINY_TAG,)
        else:
            shown = name
            tags = ("none: random",) if name in SMALL_NAMES else tuple(open_clip.list_pretrained_tags_by_model(name))
        vision = config.get("vision_cfg", {})
        trunk = None
        if vision.get("timm_model_name") and not config.get("text_cfg", {}).get("hf_model_name"):
            trunk = cache.shape(vision["timm_model_name"], vision.get("timm_pool"))
        entries.append(classify(shown, config, tags, trunk))
    cache.save()
    return sorted(entries, key=lambda e: e.name.lower())


class _TrunkCache:
    """`timm_trunk_shape` answers remembered in `timm-trunks.json` in cdfsl's cache folder, keyed by the timm and
    cdfsl versions (building ~20 trunks on the meta device takes seconds, mostly timm's weight initialisers). An
    optimisation only: an unreadable or unwritable file is ignored."""

    def __init__(self) -> None:
        import timm

        from cdfsl.data.fingerprint import cache_dir
        from cdfsl.version import __version__

        folder = cache_dir()
        self.path = folder / TRUNK_CACHE if folder is not None else None
        self.versions = f"timm {timm.__version__}, cdfsl {__version__}"
        self.entries: dict[str, Any] = {}
        self.changed = False
        try:
            stored = json.loads(self.path.read_text(encoding="utf-8")) if self.path is not None else {}
            if stored.get("versions") == self.versions:
                self.entries = dict(stored["entries"])
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            pass

    def shape(self, timm_name: str, pool: str | None) -> VisionShape | str:
        key = f"{timm_name} {pool}"
        if timm_name.startswith(TRUNK_PREFIX):  # the small models' trunks: cheap, and defined by this package
            return timm_trunk_shape(timm_name, pool)
        if key not in self.entries:
            found = timm_trunk_shape(timm_name, pool)
            self.entries[key] = found if isinstance(found, str) else dataclasses.asdict(found)
            self.changed = True
        entry = self.entries[key]
        return entry if isinstance(entry, str) else VisionShape(**entry)

    def save(self) -> None:
        if not self.changed or self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"versions": self.versions, "entries": self.entries}, indent=1)
            self.path.write_text(text + "\n", encoding="utf-8")
        except OSError:
            pass
