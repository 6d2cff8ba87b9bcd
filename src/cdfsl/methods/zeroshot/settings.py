"""The `zeroshot` base declared: it trains nothing and reads only the class template and the logit scale.
Torch-free."""

from __future__ import annotations

from typing import TYPE_CHECKING

import cdfsl.methods.training_settings  # noqa: F401  (the `train` section it reads is registered first)
from cdfsl.registry import Base, register_base

if TYPE_CHECKING:
    from cdfsl.config import RunConfig
    from cdfsl.registry import MethodSpec


def zeroshot_reads(config: RunConfig, spec: MethodSpec) -> tuple[str, ...]:
    """Class texts from `train.template`, logits scaled by `train.logit_scale`; nothing else."""
    return ("train.template", "train.logit_scale")


register_base(
    Base(
        "zeroshot",
        "CLIP's zero-shot classifier: class texts from the template, nothing trained",
        "nothing",
        "Radford et al., ICML 2021",
        builder="cdfsl.methods.zeroshot.method:ZeroShot",
        learns=False,
        reads=zeroshot_reads,
    )
)
