"""The frozen run spec: a run config resolved and validated once, with its method parsed once.

`RunSpec.of(config)` (or `config.resolve()`) validates `config`, resolves it against its recipe and parses its method
name, once; everything downstream (context, method, runner, reports) can take the spec instead of resolving,
validating and parsing the config again. `RunSpec.of` of a spec is the spec itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cdfsl.recipes import RECIPES, Recipe
from cdfsl.registry import MethodSpec, Record

if TYPE_CHECKING:
    from cdfsl.config import RunConfig


@dataclass(frozen=True)
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
        resolved = copy.deepcopy(config).validate().resolved()
        method = resolved.spec
        return cls(resolved, method, RECIPES[resolved.recipe_name], method.reads(resolved))

    def resolved(self) -> RunConfig:
        """The resolved config (no work: it was resolved once)."""
        return self.config

    @property
    def records(self) -> tuple[Record, ...]:
        """The per-episode records the method declares."""
        return self.method.records
