"""The frozen run spec: a run config resolved and validated once, with its method parsed once.

`RunSpec.of(config)` (or `config.resolve()`) validates `config`, resolves it against its recipe and parses its method
name, once; everything downstream (context, method, runner, reports) can take the spec instead of resolving,
validating and parsing the config again. `RunSpec.of` of a spec is the spec itself.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

from cdfsl.recipes import RECIPES, Recipe
from cdfsl.registry import MethodSpec, Record

if TYPE_CHECKING:
    from cdfsl.config import RunConfig


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A validated, resolved run.

    Attributes:
        config: the resolved config (every recipe value filled, `recipe` named); a private copy, not to be changed.
        method: the parsed method (base and plug-ins).
        recipe: the recipe the run follows.
        reads: the dotted settings keys the method reads (what its run identity holds of the settings).
    """

    config: RunConfig
    method: MethodSpec
    recipe: Recipe
    reads: frozenset[str]

    @classmethod
    def of(cls, config: RunConfig | RunSpec) -> RunSpec:
        """Validate and resolve `config` (raises `ConfigError` naming the first bad field); a spec is returned as
        it is."""
        if isinstance(config, RunSpec):
            return config
        resolved = config.validated()  # a fresh copy: later changes to `config` do not reach the spec
        method = resolved.spec
        return cls(resolved, method, RECIPES[resolved.recipe_name], method.reads(resolved))

    def replaced(self, **fields: Any) -> RunSpec:
        """This spec with top-level config `fields` replaced, without validating or resolving again: for values
        found from the spec itself and valid by construction (the weights' recorded name, an `auto` episode batch).
        The method and the fields it reads are the spec's own, so a field that changes them may not be given."""
        config = copy.deepcopy(self.config)
        for name, value in fields.items():
            if name in ("method", "recipe") or not hasattr(config, name):
                raise ValueError(f"RunSpec.replaced cannot set {name!r}")
            setattr(config, name, value)
        return dataclasses.replace(self, config=config)

    def identity(self, *frame: Any) -> dict[str, Any]:
        """`RunConfig.identity` of the spec's config (`frame`: its precision, index fingerprint, activation, device,
        image rule, weights and tokenizer digests), without resolving it again."""
        return self.config.resolved_identity(*frame)

    def legacy_identity(self, *frame: Any) -> dict[str, Any]:
        """`RunConfig.legacy_identity` of the spec's config, without resolving it again."""
        return self.config.resolved_legacy_identity(*frame)

    def resolved(self) -> RunConfig:
        """The resolved config (no work: it was resolved once)."""
        return self.config

    @property
    def trains(self) -> bool:
        """Whether the method trains anything per episode (every base but zero-shot)."""
        return self.method.base.trains_anything

    @property
    def records(self) -> tuple[Record, ...]:
        """The per-episode records the method declares."""
        return self.method.records
