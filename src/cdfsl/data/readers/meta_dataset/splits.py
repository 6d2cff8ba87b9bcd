"""Meta-Dataset's official class splits: `MD_CLASS_SPLITS[source] -> {"train": [...], "valid": [...], "test": [...]}`
(class keys, as each `md-*` reader names its classes), read from the package data `cdfsl/assets/meta_dataset/`.

Their source (google-research/meta-dataset, `meta_dataset/dataset_conversion/`; the folder's README says the same):

- `aircraft`, `cu_birds`, `dtd`, `fungi`, `mscoco`, `quickdraw`, `traffic_sign`, `vgg_flower`: the published split
  lists `splits/<source>_splits.json`, as published (the two sources without train classes, MSCOCO and Traffic
  Signs, have empty lists there).
- `ilsvrc_2012`: the leaves of each split's WordNet subgraph in the published
  `dataset_specs/ilsvrc_2012_dataset_spec.json` (712 train, 158 valid under 'carnivore' n02075296, 130 test
  under 'device' n03183080), sorted by wnid.
- `omniglot`: Lake's background alphabets for train and valid (the 5 with the fewest characters held out for valid),
  the evaluation alphabets for test, per `dataset_specs/omniglot_dataset_spec.json`; class key `alphabet/character`.
"""

from __future__ import annotations

import json
from importlib import resources
from types import MappingProxyType
from typing import Final

MD_SOURCES: Final = (
    "ilsvrc_2012",
    "omniglot",
    "aircraft",
    "cu_birds",
    "dtd",
    "quickdraw",
    "fungi",
    "vgg_flower",
    "traffic_sign",
    "mscoco",
)
"""Meta-Dataset's ten sources, in its order; the benchmark of source `s` is `md-s`."""

SPLITS: Final = ("train", "valid", "test")
_ASSETS = resources.files("cdfsl") / "assets" / "meta_dataset"


def _load(source: str) -> dict[str, tuple[str, ...]]:
    text = (_ASSETS / f"{source}.json").read_text(encoding="utf-8")
    lists = json.loads(text)
    return {split: tuple(lists[split]) for split in SPLITS}


MD_CLASS_SPLITS: Final = MappingProxyType({source: MappingProxyType(_load(source)) for source in MD_SOURCES})
"""Source -> split -> the class keys of that split (see the module docstring for where each list comes from)."""


def ilsvrc_duplicates() -> frozenset[str]:
    """The ILSVRC-2012 training images Meta-Dataset skips because they also appear in Caltech-101, Caltech-256 or
    CUB-200-2011 (`ImageNet_*_duplicates.txt`), as `wnid/file name`."""
    text = (_ASSETS / "ilsvrc_2012_duplicates.txt").read_text(encoding="utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip())
