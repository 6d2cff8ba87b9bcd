"""The CLIP few-shot suite: the eleven datasets CoOp introduced for CLIP adaptation (its `DATASETS.md`), read as the
CLIP-LoRA release reads them, as benchmark entries `cdfsl.data.benchmarks` registers (`docs/benchmarks.md`).

Each benchmark names its reader (`readers.split_zhou` for the nine with a `split_zhou_*.json` file,
`readers.fgvc_aircraft`, `readers.imagenet`), its class-name rule, the template both releases use (`a photo of a {}.`)
and its template in CoOp's zero-shot trainer (`trainers/zsclip.py`, `CUSTOM_TEMPLATES`; `--set train.template=coop`).
Their episodes (5-way K-shot, 15 queries per class, 800 episodes at 1 shot and 400 otherwise, as for the four CDFSL
benchmarks) are drawn from the test split (`episodic_split`); the train and val splits are for the all-way protocol
(`Benchmark.read_splits`).
"""

from __future__ import annotations

from typing import Any

from cdfsl.data.readers.split_zhou import SPLIT_LAYOUTS

SUITE = "clip-fewshot"

_SPLIT_NAMES = "the split file's class names, underscores as spaces"

COOP_TEMPLATES: dict[str, str] = {
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "eurosat_coop": "a centered satellite photo of {}.",
}
"""Benchmark -> its template in CoOp's zero-shot trainer (`CUSTOM_TEMPLATES`, keyed there by CoOp's dataset class)."""

CLASS_NAME_RULES: dict[str, str] = {
    "caltech101": f"{_SPLIT_NAMES}; CoOp's renamings (airplanes → airplane, Faces → face, Leopards → leopard, "
    "Motorbikes → motorbike); BACKGROUND_Google and Faces_easy never read",
    "oxford_pets": _SPLIT_NAMES,
    "stanford_cars": _SPLIT_NAMES,
    "oxford_flowers": _SPLIT_NAMES,
    "food101": _SPLIT_NAMES,
    "fgvc_aircraft": "the variants of variants.txt as written",
    "sun397": _SPLIT_NAMES,
    "dtd": _SPLIT_NAMES,
    "ucf101": _SPLIT_NAMES,
    "imagenet": "classnames.txt's name of each wnid folder (CLIP's names)",
    "eurosat_coop": f"{_SPLIT_NAMES}; CoOp's descriptive names (AnnualCrop → Annual Crop Land, ...)",
}
"""Benchmark -> its class-name rule, in words (`Benchmark.class_names`)."""

READERS_OF: dict[str, str] = {
    **{name: layout.reader for name, layout in SPLIT_LAYOUTS.items()},
    "fgvc_aircraft": "fgvc_aircraft",
    "imagenet": "imagenet",
}
"""Benchmark -> its registered reader."""

SUITE_ORDER = (
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "ucf101",
    "imagenet",
    "eurosat_coop",
)
"""The suite in the order `cdfsl datasets` lists it."""

CLIP_FEWSHOT: tuple[dict[str, Any], ...] = tuple(
    {
        "name": name,
        "reader": READERS_OF[name],
        "class_names": CLASS_NAME_RULES[name],
        "suite": SUITE,
        "episodic_split": "test",
        "coop_template": COOP_TEMPLATES[name],
    }
    for name in SUITE_ORDER
)
"""The `Benchmark` fields of each suite dataset, in `SUITE_ORDER`; `cdfsl.data.benchmarks` registers them (plain values,
so this module imports nothing of it and no import cycle forms)."""
