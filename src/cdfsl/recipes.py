"""Recipes: named, documented bundles of config values — the training loop of each released code, or the papers' words.

The published numbers came from the authors' released code, which differs from the papers' wording in places, so
each loop is a named recipe (docs/recipes.md). A recipe fills every config field left unset (`None`); anything set by
`--set` or in Python wins. Each value carries its source: the paper section or the release file it comes from, or
"cdfsl" where the choice is ours (written down in docs/recipes.md).

Values whose field has a fixed default (not `None`) are listed for the record; a test checks that they equal the
default, so the listing never disagrees with what runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cdfsl.config import RunConfig

# Datasets on which the VtT release's README commands double both learning rates.
HIGH_LR_DATASETS = ("isic2018", "chestx")
BASE_LORA_LR = 2e-4
# The benchmark's five support views: the VtT and TIR releases' loaders (docs/protocol.md; `cdfsl.data.augment`).
RELEASE_VIEWS = ("plain", "rotate+jitter+flip", "rotate", "jitter", "flip")
# clip-lora-release's support views: each a random resized crop and a coin-flip mirror, drawn once per episode.
CLIP_LORA_VIEW_COUNT = 8
CLIP_LORA_VIEWS = ("crop+flip",) * CLIP_LORA_VIEW_COUNT
# The CLIP-LoRA release's steps per shot (`run_utils.py` `--n_iters 500`; `lora.py` `total_iters = n_iters * shots`).
CLIP_LORA_ITERATIONS_PER_SHOT = 500
# Datasets the VtT release's loader resizes to a square of this side when opening an image (before the model's resize).
VTT_PRE_RESIZE = {"chestx": 256}


def tir_logit_scale(shots: int) -> float:
    """The TIR release's logit scale: 4 at 5 shots, 2 at 1 shot (`coop_lora_trainer.py`). Other shot counts are our
    rule: 2 below 5 shots, 4 from 5 shots up (the release's `4 if n_shot == 5 else 2` would give 10 shots 2)."""
    return 4.0 if shots >= 5 else 2.0


@dataclass(frozen=True)
class RecipeValue:
    """One value of a recipe: the dotted config key, the value (or a function of the run config), and its source."""

    key: str
    value: Any
    source: str
    rule: str = ""  # how a value that depends on the run is chosen, in words (for listings)

    def resolve(self, config: RunConfig) -> Any:
        return self.value(config) if callable(self.value) else self.value


@dataclass(frozen=True)
class Recipe:
    """A named bundle of config values with their sources."""

    name: str
    summary: str
    values: tuple[RecipeValue, ...]

    def value(self, key: str) -> RecipeValue | None:
        return next((v for v in self.values if v.key == key), None)


def _with(values: tuple[RecipeValue, ...], *changes: RecipeValue) -> tuple[RecipeValue, ...]:
    """`values` with the entries of the same keys replaced by `changes` (in place, keeping the order)."""
    by_key = {change.key: change for change in changes}
    return tuple(by_key.get(value.key, value) for value in values)


def _lr_doubled(config: RunConfig) -> float:
    return 2 * BASE_LORA_LR if config.dataset in HIGH_LR_DATASETS else BASE_LORA_LR


def _vtt_lr(config: RunConfig) -> float:
    return 1e-3 if config.dataset in HIGH_LR_DATASETS else 5e-4


def _tir_logit_scale(config: RunConfig) -> float:
    """From the run's shots; episodes whose shots vary per class (`meta-dataset`: 1 to 100, most classes well above 5
    in a typical episode, `docs/protocol.md`) take the many-shot value, as one recipe value serves every episode."""
    from cdfsl.data.protocols import get_protocol

    varies = get_protocol(config.episode_protocol).varies_shots
    return tir_logit_scale(VARIABLE_SHOTS if varies else config.shots)


VARIABLE_SHOTS = 5
"""The shots `tir_logit_scale` is read at for episodes of varying shots: the release's many-shot setting."""


def _vtt_pre_resize(config: RunConfig) -> int:
    return VTT_PRE_RESIZE.get(config.dataset, 0)


def _clip_lora_iterations(config: RunConfig) -> int:
    return CLIP_LORA_ITERATIONS_PER_SHOT * config.shots


_VTT = "zhenyuZ-HUST/CVPR26-VtT"
_TIR = "shuaiyi308/TIR"
_CLIP_LORA = "MaxZanella/CLIP-LoRA"

# The loop both VtT and the baseline (CLIP-LoRA-Vision) were measured with in the VtT release.
_VTT_LOOP = (
    RecipeValue("lora.towers", "vision", f"{_VTT} README commands (`--encoder vision`)"),
    RecipeValue("prompt.context", "", f"{_VTT} VtT.py: fixed template 'a photo of a {{}}.', no learned context"),
    RecipeValue("lora.rank", 16, f"{_VTT} README commands (`--r 16`)"),
    RecipeValue("lora.alpha", 8.0, f"{_VTT} README commands (`--alpha 8`); scale alpha/sqrt(r) in loralib/layers.py"),
    RecipeValue("lora.dropout", 0.25, f"{_VTT} run_utils.py (`--dropout_rate 0.25`)"),
    RecipeValue("train.iterations", 250, f"{_VTT} README commands (`--epochs 250`, counted as steps in VtT.py)"),
    RecipeValue("train.batch_size", 25, f"{_VTT} VtT.py (`batch_size = 25`, reshuffled each pass)"),
    RecipeValue(
        "train.lr",
        _lr_doubled,
        f"{_VTT} run_utils.py (`--lr 2e-4`); README commands use 4e-4 on ISIC and ChestX",
        rule="2e-4; 4e-4 on isic2018, chestx",
    ),
    RecipeValue("train.weight_decay", 0.01, f"{_VTT} VtT.py (AdamW weight_decay=1e-2)"),
    RecipeValue("train.schedule", "cosine", f"{_VTT} VtT.py (CosineAnnealingLR, stepped every iteration)"),
    RecipeValue("train.schedule_horizon", 8.0, f"{_VTT} VtT.py (`T_max = total_iters * 8`)"),
    RecipeValue("train.min_lr", 1e-6, f"{_VTT} VtT.py (`eta_min=1e-6`)"),
    RecipeValue("train.logit_scale", 100.0, f"{_VTT} main.py (`logit_scale = 100`)"),
    RecipeValue("vtt.fusion", "release", f"{_VTT} VtT.py Mamba_Net + Mamba_models/mamba_ffn_neck.py"),
    RecipeValue(
        "vtt.lr",
        _vtt_lr,
        f"{_VTT} run_utils.py (`--mamba_lr 5e-4`); README commands use 1e-3 on ISIC and ChestX",
        rule="5e-4; 1e-3 on isic2018, chestx",
    ),
    RecipeValue("vtt.beta", 7.0, f"{_VTT} run_utils.py (`--beta 7`)"),
    RecipeValue("vtt.window", 50, f"{_VTT} run_utils.py (`--grad_steps 50`)"),
    RecipeValue(
        "augment.views",
        RELEASE_VIEWS,
        f"{_VTT} fslcd_datasets_aug2/ loaders: five transform lists per support image (docs/protocol.md)",
    ),
    RecipeValue(
        "pre_resize",
        _vtt_pre_resize,
        f"{_VTT} fslcd_datasets_aug2/Chest_few_shot_da.py (`.resize((256, 256)).convert('RGB')` on opening); "
        "the other datasets' loaders open images as they are",
        rule="256 on chestx; 0 (none) elsewhere",
    ),
)

# The CLIP-LoRA release's loop (`main.py`, `lora.py`, `run_utils.py`, `loralib/`), as its README runs it: the
# argparse defaults, which the README's command does not change. Line numbers are of the release's main branch.
_CLIP_LORA_LOOP = (
    RecipeValue("lora.towers", "both", f"{_CLIP_LORA} run_utils.py:33 (`--encoder` default 'both')"),
    RecipeValue(
        "prompt.context",
        "",
        f"{_CLIP_LORA} lora.py:94-95 (the fixed `dataset.template[0]`, no learned context)",
    ),
    RecipeValue("lora.rank", 2, f"{_CLIP_LORA} run_utils.py:35 (`--r` default 2)"),
    RecipeValue(
        "lora.alpha",
        1.0,
        f"{_CLIP_LORA} run_utils.py:36 (`--alpha` default 1); scale alpha/sqrt(r) in loralib/layers.py:42",
    ),
    RecipeValue("lora.dropout", 0.25, f"{_CLIP_LORA} run_utils.py:37 (`--dropout_rate` default 0.25)"),
    RecipeValue(
        "lora.targets",
        ("q", "k", "v"),
        f"{_CLIP_LORA} run_utils.py:34 (`--params` default q k v); `--position all`: every block "
        "(run_utils.py:32, loralib/utils.py INDEX_POSITIONS_*['all'])",
    ),
    RecipeValue(
        "train.iterations",
        _clip_lora_iterations,
        f"{_CLIP_LORA} lora.py:73 (`total_iters = args.n_iters * args.shots`), run_utils.py:29 (`--n_iters 500`)",
        rule="500 x shots",
    ),
    RecipeValue(
        "train.batch_size",
        32,
        f"{_CLIP_LORA} run_utils.py:30 (`--batch_size 32`); main.py:48 (DataLoader, shuffle=True, every pass)",
    ),
    RecipeValue("train.lr", BASE_LORA_LR, f"{_CLIP_LORA} run_utils.py:28 (`--lr 2e-4`, every dataset)"),
    RecipeValue("train.weight_decay", 0.01, f"{_CLIP_LORA} lora.py:75 (AdamW weight_decay=1e-2)"),
    RecipeValue("train.beta1", 0.9, f"{_CLIP_LORA} lora.py:75 (AdamW betas=(0.9, 0.999))"),
    RecipeValue("train.beta2", 0.999, f"{_CLIP_LORA} lora.py:75 (AdamW betas=(0.9, 0.999))"),
    RecipeValue("train.schedule", "cosine", f"{_CLIP_LORA} lora.py:76,122 (CosineAnnealingLR, stepped every step)"),
    RecipeValue("train.schedule_horizon", 1.0, f"{_CLIP_LORA} lora.py:76 (`T_max = total_iters`)"),
    RecipeValue("train.min_lr", 1e-6, f"{_CLIP_LORA} lora.py:76 (`eta_min=1e-6`)"),
    RecipeValue("train.logit_scale", 100.0, f"{_CLIP_LORA} main.py:22 (`logit_scale = 100`), lora.py:112"),
    RecipeValue(
        "train.template",
        "a photo of a {}.",
        f"{_CLIP_LORA} datasets/*.py (`template = ['a photo of a {{}}.']`, e.g. dtd.py:10, imagenet.py:188)",
    ),
    RecipeValue(
        "train.precision",
        "auto",
        f"{_CLIP_LORA} lora.py:98-119 (fp16 autocast and GradScaler); cdfsl: bf16 autocast on CUDA, fp32 on CPU",
    ),
    RecipeValue(
        "augment.views",
        CLIP_LORA_VIEWS,
        f"{_CLIP_LORA} main.py:38-43 (RandomResizedCrop + RandomHorizontalFlip, fresh for every sample); cdfsl: "
        f"{CLIP_LORA_VIEW_COUNT} crop+flip views per support image, drawn once per episode",
        rule=f"{CLIP_LORA_VIEW_COUNT} x crop+flip",
    ),
    RecipeValue(
        "augment.crop_scale",
        (0.08, 1.0),
        f"{_CLIP_LORA} main.py:39 (`RandomResizedCrop(size=224, scale=(0.08, 1))`, bicubic)",
    ),
    RecipeValue("augment.flip_p", 0.5, f"{_CLIP_LORA} main.py:40 (`RandomHorizontalFlip(p=0.5)`)"),
    RecipeValue(
        "vtt.fusion", "release", "cdfsl (as vtt-release, for the vtt plug-in; the CLIP-LoRA release has no VtT)"
    ),
    RecipeValue(
        "vtt.lr", _vtt_lr, "cdfsl (as vtt-release, for the vtt plug-in)", rule="5e-4; 1e-3 on isic2018, chestx"
    ),
    RecipeValue(
        "pre_resize",
        0,
        f"{_CLIP_LORA} datasets/utils.py:44 (`Image.open(path).convert('RGB')`): no pre-resize",
    ),
)

RECIPES: dict[str, Recipe] = {
    "vtt-release": Recipe(
        "vtt-release",
        "the VtT release's loop: LoRA on the vision tower, 250 steps of 25 views, AdamW, cosine over 8x the steps",
        _VTT_LOOP,
    ),
    "tir-release": Recipe(
        "tir-release",
        "the TIR release's loop (augmented variant): CoOp context + LoRA on both towers, 100 full-support steps",
        (
            RecipeValue("lora.towers", "both", f"{_TIR} options/options_coop_lora.py (`-encoder both`)"),
            RecipeValue(
                "prompt.context", "a photo of a", f"{_TIR} options/options_coop_lora.py (`-ctx_init`, `-n_ctx 4`)"
            ),
            RecipeValue("prompt.lr", 2e-3, f"{_TIR} coop_lora_trainer.py (SGD, `-coop_lr 2e-3`)"),
            RecipeValue("prompt.momentum", 0.9, f"{_TIR} coop_lora_trainer.py (SGD momentum=0.9)"),
            RecipeValue("prompt.weight_decay", 5e-4, f"{_TIR} coop_lora_trainer.py (SGD weight_decay=5e-4)"),
            RecipeValue("lora.rank", 16, f"{_TIR} README command (`-r 16`)"),
            RecipeValue("lora.alpha", 8.0, f"{_TIR} README command (`-alpha 8`); scale alpha/sqrt(r)"),
            RecipeValue("lora.dropout", 0.25, f"{_TIR} options/options_coop_lora.py (`-dropout_rate 0.25`)"),
            RecipeValue("train.iterations", 100, f"{_TIR} options/options_coop_lora.py (`-total_epoch 100`)"),
            RecipeValue("train.batch_size", "all", f"{_TIR} coop_lora_trainer.py (`batch_size = 9999`: every view)"),
            RecipeValue("train.lr", BASE_LORA_LR, f"{_TIR} README command (`-lora_lr 2e-4`, every dataset)"),
            RecipeValue("train.weight_decay", 0.01, f"{_TIR} coop_lora_trainer.py (AdamW with torch defaults)"),
            RecipeValue("train.schedule", "none", f"{_TIR} coop_lora_trainer.py (no scheduler)"),
            RecipeValue("train.schedule_horizon", 8.0, "cdfsl (as vtt-release; unused without a schedule)"),
            RecipeValue(
                "train.logit_scale",
                _tir_logit_scale,
                f"{_TIR} coop_lora_trainer.py (`logit_scale = 4 if n_shot == 5 else 2`); cdfsl for other shots",
                rule="4 from 5 shots, 2 below; 4 for episodes of varying shots",
            ),
            RecipeValue(
                "tir.blocks",
                (-4, -2),
                f"{_TIR} clip/model.py (`i == 8 or i == 10` of 12 blocks); counted from the end on other depths "
                "(20, 22 of 24), where the release's literal 8 and 10 would stay",
            ),
            RecipeValue("tir.ratio", 0.3, f"{_TIR} README command (`-top_ratio 0.3`; the code default 0.0 is a no-op)"),
            RecipeValue("tir.text_layer", -2, f"{_TIR} options/options_coop_lora.py (`-txtlayer 10`, 0-based)"),
            RecipeValue("vtt.fusion", "release", "cdfsl (VtT cannot train with a learned text side; unused)"),
            RecipeValue("vtt.lr", _vtt_lr, "cdfsl (as vtt-release; unused)", rule="5e-4; 1e-3 on isic2018, chestx"),
            RecipeValue(
                "pre_resize",
                0,
                f"{_TIR} data/dataset_aug.py (`Image.open(...).convert('RGB')`, every dataset alike), then "
                "data/datamgr_aug.py (`Resize([224, 224])`): no pre-resize",
            ),
            RecipeValue(
                "augment.views",
                RELEASE_VIEWS,
                f"{_TIR} data/datamgr_aug.py: five transform lists per support image (docs/protocol.md)",
            ),
        ),
    ),
    "paper": Recipe(
        "paper",
        "the papers' wording where it differs from the code: CLIP-LoRA-Vision base, tau 0.01, single-direction fusion",
        _with(
            _VTT_LOOP,
            RecipeValue("lora.towers", "vision", "TIR paper: CLIP-LoRA-Vision base"),
            RecipeValue("prompt.context", "", f"{_CLIP_LORA} paper: fixed template 'a photo of a {{}}.'"),
            RecipeValue("train.logit_scale", 100.0, "TIR and VtT papers: temperature tau = 0.01"),
            RecipeValue("vtt.fusion", "ssm", "VtT paper: deep-to-shallow scan of 2L tokens, 2-layer SSM, adapter"),
        ),
    ),
    "clip-lora-release": Recipe(
        "clip-lora-release",
        "the CLIP-LoRA release's loop: rank-2 LoRA on q/k/v of both towers, 500 x shots steps of 32 crops, cosine",
        _CLIP_LORA_LOOP,
    ),
}
