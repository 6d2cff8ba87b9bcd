"""Meta-Dataset's ten sources as benchmarks (Triantafillou et al., ICLR 2020): `md-ilsvrc_2012`, `md-omniglot`,
`md-aircraft`, `md-cu_birds`, `md-dtd`, `md-quickdraw`, `md-fungi`, `md-vgg_flower`, `md-traffic_sign`, `md-mscoco`.

Each reads its source's own download layout (`cdfsl.data.readers.meta_dataset`, `docs/benchmarks.md`) and evaluates
on the source's official test classes (`MD_CLASS_SPLITS`); episodes are drawn by the `meta-dataset` protocol, 600 per
run by default. `cdfsl.data.benchmarks` registers these entries (`MD_BENCHMARK_FIELDS`) with the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cdfsl.data.md_hierarchy import Alphabets, ClassHierarchy, md_structure
from cdfsl.data.readers.meta_dataset import MD_CLASS_SPLITS, MD_SOURCES, read_md_split

if TYPE_CHECKING:
    from cdfsl.data.benchmarks import Benchmark

__all__ = [
    "MD_BENCHMARK_FIELDS",
    "MD_CLASS_SPLITS",
    "MD_SOURCES",
    "META_DATASET",
    "Alphabets",
    "ClassHierarchy",
    "md_benchmarks",
    "md_structure",
    "read_md_split",
]

META_DATASET = "meta-dataset"
"""The protocol (Meta-Dataset's variable-way, variable-shot sampler) and the suite these benchmarks belong to."""

MD_EPISODES = 600

_CLASS_NAMES = {
    "ilsvrc_2012": "the first of the wnid's words in words.txt",
    "omniglot": "'<alphabet> character <n>'",
    "aircraft": "the variant",
    "cu_birds": "the species folder without its number, '_' as spaces",
    "dtd": "the texture",
    "quickdraw": "the class",
    "fungi": "the species name (the category's name)",
    "vgg_flower": "the flower's name",
    "traffic_sign": "the sign's name",
    "mscoco": "the category name",
}
_TEMPLATES = {  # CoOp's templates for the sources the CLIP few-shot suite shares; the photo template elsewhere
    "aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "vgg_flower": "a photo of a {}, a type of flower.",
}

MD_BENCHMARK_FIELDS: tuple[dict[str, Any], ...] = tuple(
    {
        "name": f"md-{source}",
        "reader": f"md-{source}",
        "class_names": _CLASS_NAMES[source],
        "protocol": META_DATASET,
        "episodes": MD_EPISODES,
        "episodes_by_shots": (),
        "coop_template": _TEMPLATES.get(source),
        "suite": META_DATASET,
    }
    for source in MD_SOURCES
)
"""The ten benchmarks' fields; `cdfsl.data.benchmarks` registers `Benchmark(**fields)` for each (kept as data so
that this module need not import that one, which imports this one)."""


def md_benchmarks() -> dict[str, Benchmark]:
    """The ten registered benchmarks, by name (as in `cdfsl.data.benchmarks.DATASETS`)."""
    from cdfsl.data.benchmarks import DATASETS

    return {fields["name"]: DATASETS[fields["name"]] for fields in MD_BENCHMARK_FIELDS}
