"""The registry of method parts: config sections, fine-tuning bases and plug-ins, and how a method name combines them.

A method name is a base followed by plug-ins, joined by `+`: `lora`, `coop+lora+tir`, `lora+vtt`, `maple`. Names
made of plug-ins alone (`tir`, `vtt`, `tir+vtt`, the names of the first release) take their base from the recipe:
`coop+lora` under `tir-release` (the TIR release's base), `lora` under the others.

Each part declares itself where it lives, in a torch-free module of its package (`cdfsl/methods/lora/settings.py`
declares `lora`, `coop` and `coop+lora`; `cdfsl/methods/training_settings.py` the shared loop's `train` and `augment`
sections): its settings dataclass and their rules (`Section`), the fields it reads under a resolved config (only these
enter the run identity), its per-episode records, its validation, and the `module:Class` it is built from
(`register_section`, `register_base`, `register_plugin`). `cdfsl.methods` imports the built-in parts so that they
register; this module imports none of them. A base decides the fields that make it what it is (`decides`: `lora`
has no learned context, `coop` no LoRA); the recipe fills the rest, and `--set` may change anything but a decided
field. Kept free of torch so that configs and the CLI's help load fast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cdfsl.errors import ConfigError
from cdfsl.rules import Rule

if TYPE_CHECKING:
    from cdfsl.config import RunConfig

TIR_RELEASE = "tir-release"
VTT_RELEASE = "vtt-release"

Reads = Callable[["RunConfig", "MethodSpec"], Iterable[str]]
"""The dotted config keys a part reads, given the resolved run config and the whole method (a plug-in may read
fields of the base's loop, as VtT's AdamW on `maple` reads `train.beta1`)."""
Check = Callable[["RunConfig", "MethodSpec"], None]
"""A part's validation of a resolved config (raises `ConfigError`), run when the method uses the part."""


def _reads_nothing(config: RunConfig, spec: MethodSpec) -> tuple[str, ...]:
    return ()


def _accepts(config: RunConfig, spec: MethodSpec) -> None:
    return None


@dataclass(frozen=True)
class Section:
    """A config section: `RunConfig.<name>` (or `RunConfig.section(name)`) holds a `settings` instance.

    Attributes:
        name: the section's key (`lora` in `--set lora.rank=8`).
        settings: the dataclass of its fields (defaults are the values a run starts from).
        rules: the bounds of its numeric fields, by dotted key (`check_numbers` applies them to every run).
        check: checks of its resolved fields on every run, used by the method or not (choices, combinations);
            `check(section_values, config)`.
    """

    name: str
    settings: type
    rules: tuple[Rule, ...] = ()
    check: Callable[[Any, RunConfig], None] | None = None


@dataclass(frozen=True)
class Record:
    """A per-episode value a part stores beside accuracy (the store's records column, shown by name in reports)."""

    name: str
    kind: type  # int, float, str or bool
    optional: bool = False  # None is a value too (VtT's switch-off step when DLC never switched L_VtT off)
    summary: str = ""

    @property
    def type_text(self) -> str:
        return self.kind.__name__ + (" | None" if self.optional else "")


@dataclass(frozen=True)
class Base:
    """A fine-tuning base: what it trains, where it comes from, and the config it owns.

    Attributes:
        name: the method name of the base alone.
        summary: one line for `cdfsl methods`.
        trains: what it learns, in words (README's table).
        source: the paper and released code it follows.
        sections: config sections that shaped its results in the identity of earlier versions (`legacy_identity`).
        decides: dotted config keys and the values this base fixes (over the recipe; `--set` may not change them).
        defaults: dotted config keys and the values this base starts from (over the recipe; `--set` wins).
        builder: `module:attribute` of the `Method` class built for it.
        learns_text: whether the text side (class texts) changes while it trains.
        learns: whether it trains anything at all (False: `zeroshot`; it has no training step, and plug-ins that act
            on training refuse it).
        reads: the dotted keys it reads under a resolved config; only these (and the plug-ins') enter the identity.
        records: what it stores per episode beyond accuracy and curves.
        validate: its checks of a resolved config that uses it.
    """

    name: str
    summary: str
    trains: str
    source: str
    sections: tuple[str, ...] = ()
    decides: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    builder: str = "cdfsl.methods.lora.method:LoraMethod"
    learns_text: bool = False
    learns: bool = True
    reads: Reads = _reads_nothing
    records: tuple[Record, ...] = ()
    validate: Check = _accepts

    @property
    def trains_anything(self) -> bool:
        return self.learns


@dataclass(frozen=True)
class PlugIn:
    """A plug-in that stacks on a base: its config section, why a base may not take it, and what it reads.

    `refuses(base)` returns the reason the plug-in cannot run on `base` (a sentence), or None when it can. `builder`
    is the `module:Class` of the plug-in object the method is built with.
    """

    name: str
    summary: str
    source: str
    section: str
    refuses: Callable[[Base], str | None]
    builder: str = ""
    reads: Reads = _reads_nothing
    records: tuple[Record, ...] = ()
    validate: Check = _accepts


SECTIONS: dict[str, Section] = {}
BASES: dict[str, Base] = {}
PLUGINS: dict[str, PlugIn] = {}
_PARSED: dict[tuple[str, str], MethodSpec] = {}  # parse_method's answers; cleared when a part (un)registers


def register_section(section: Section) -> Section:
    """Add a config section (a part's settings); a third party's becomes reachable as `config.section(name)`, by
    `--set name.key=value` and in config files."""
    if section.name in SECTIONS and SECTIONS[section.name] != section:
        raise ValueError(f"config section {section.name!r} is registered already")
    SECTIONS[section.name] = section
    _PARSED.clear()
    return section


def register_base(base: Base) -> Base:
    """Add a base by its name (the name may not be taken by another base or a plug-in)."""
    if base.name in PLUGINS or (base.name in BASES and BASES[base.name] != base):
        raise ValueError(f"method part {base.name!r} is registered already")
    BASES[base.name] = base
    _PARSED.clear()
    return base


def register_plugin(plugin: PlugIn) -> PlugIn:
    """Add a plug-in by its name; its section must be registered (`register_section`)."""
    if plugin.name in BASES or (plugin.name in PLUGINS and PLUGINS[plugin.name] != plugin):
        raise ValueError(f"method part {plugin.name!r} is registered already")
    PLUGINS[plugin.name] = plugin
    _PARSED.clear()
    return plugin


@contextmanager
def registered(*parts: Section | Base | PlugIn) -> Iterator[None]:
    """Register `parts` for the duration of a block (a test's toy parts), then remove them."""
    for part in parts:
        if isinstance(part, Section):
            register_section(part)
        elif isinstance(part, Base):
            register_base(part)
        else:
            register_plugin(part)
    try:
        yield
    finally:
        for part in parts:
            table: dict[str, Any] = (
                SECTIONS if isinstance(part, Section) else BASES if isinstance(part, Base) else PLUGINS
            )
            table.pop(part.name, None)
        _PARSED.clear()


# Names of plug-ins alone: the base comes from the recipe (the first release's names).
RECIPE_BASE = {TIR_RELEASE: "coop+lora"}
DEFAULT_BASE = "lora"


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method name: its base and plug-ins (in the order of `PLUGINS`)."""

    name: str
    base: Base
    plugins: tuple[PlugIn, ...]

    def uses(self, plugin: str) -> bool:
        return any(p.name == plugin for p in self.plugins)

    @property
    def sections(self) -> tuple[str, ...]:
        """The sections of earlier versions' identities (`RunConfig.legacy_identity`)."""
        return self.base.sections + tuple(p.section for p in self.plugins)

    @property
    def records(self) -> tuple[Record, ...]:
        """Every per-episode record the method declares: the base's, then each plug-in's."""
        return self.base.records + tuple(r for p in self.plugins for r in p.records)

    def reads(self, config: RunConfig) -> frozenset[str]:
        """The dotted config keys the method reads under `config` (resolved): the base's and its plug-ins'."""
        keys = set(self.base.reads(config, self))
        for plugin in self.plugins:
            keys.update(plugin.reads(config, self))
        return frozenset(keys)

    def validate(self, config: RunConfig) -> None:
        """The base's and plug-ins' checks of the resolved `config` (raises `ConfigError`)."""
        self.base.validate(config, self)
        for plugin in self.plugins:
            plugin.validate(config, self)


def split_method(name: str) -> tuple[str | None, tuple[str, ...]]:
    """`name` → (base name or None for plug-ins alone, plug-in names); raises `ConfigError` for an unknown name."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"method must be a name such as {', '.join(method_names())}; got {name!r}")
    parts = name.split("+")
    base = None
    for width in range(len(parts), 0, -1):  # the longest base first: coop+lora before coop
        head = "+".join(parts[:width])
        if head in BASES:
            base, parts = head, parts[width:]
            break
    unknown = [p for p in parts if p not in PLUGINS]
    if unknown or len(set(parts)) != len(parts):
        raise ConfigError(
            f"method {name!r} is not a base followed by plug-ins: bases {', '.join(BASES)}; plug-ins "
            f"{', '.join(PLUGINS)}, each at most once (e.g. coop+lora+tir); see `cdfsl methods`"
        )
    return base, tuple(p for p in PLUGINS if p in parts)


def parse_method(name: str, recipe: str) -> MethodSpec:
    """The base and plug-ins of method `name` under `recipe`; raises `ConfigError` for an unknown name or a
    combination that cannot work. Parsed once per name and recipe (until a part is registered)."""
    if not isinstance(name, str) or not isinstance(recipe, str):
        return _parse(name, recipe)
    key = (name, recipe)
    if key not in _PARSED:
        _PARSED[key] = _parse(name, recipe)
    return _PARSED[key]


def _parse(name: str, recipe: str) -> MethodSpec:
    base_name, plugins = split_method(name)
    base = BASES[base_name or RECIPE_BASE.get(recipe, DEFAULT_BASE)]
    for plugin in plugins:
        reason = PLUGINS[plugin].refuses(base)
        if reason is not None:
            raise ConfigError(f"{plugin} cannot run on the {base.name} base of method {name!r}: {reason}")
    return MethodSpec(name, base, tuple(PLUGINS[p] for p in plugins))


def default_recipe(name: str) -> str:
    """The recipe a method runs when none is named: `tir-release` for TIR on its released base (`tir`,
    `coop+lora+tir`), `vtt-release` otherwise."""
    base, plugins = split_method(name)
    if "tir" in plugins and "vtt" not in plugins and base in (None, "coop+lora"):
        return TIR_RELEASE
    return VTT_RELEASE


def method_names() -> tuple[str, ...]:
    """Every base, the first release's plug-in names, then each base with each plug-in set that it takes."""
    names = [*BASES, *(p for p in ("tir", "vtt", "tir+vtt") if all(q in PLUGINS for q in p.split("+")))]
    combos = [(p,) for p in PLUGINS] + [(a, b) for i, a in enumerate(PLUGINS) for b in list(PLUGINS)[i + 1 :]]
    for base in BASES.values():
        for combo in combos:
            if all(PLUGINS[p].refuses(base) is None for p in combo):
                names.append("+".join((base.name, *combo)))
    return tuple(names)


def describe(name: str, recipe: str | None = None) -> str:
    """One line for `cdfsl methods`: the base's summary for a base alone, else the plug-ins' on the base."""
    spec = parse_method(name, recipe or default_recipe(name))
    if not spec.plugins:
        return spec.base.summary
    return "; ".join(p.summary for p in spec.plugins) + f" (on {spec.base.name})"


def trained_base_only(what: str, example: str) -> Callable[[Base], str | None]:
    """A plug-in's `refuses`: it needs a base that trains something (`what` it would do; `example`: a name that
    works)."""

    def refuses(base: Base) -> str | None:
        return None if base.trains_anything else f"{base.name} trains nothing for {what}; use {example}"

    return refuses


def section_fields(config: RunConfig, section: str) -> tuple[str, ...]:
    """Every dotted key of `section` (a helper for parts that read all of a section)."""
    return tuple(f"{section}.{f.name}" for f in dataclasses.fields(config.section(section)))
