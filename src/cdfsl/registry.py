"""The method names, declared once: fine-tuning bases, plug-ins, and how a method name combines them.

A method name is a base followed by plug-ins, joined by `+`: `lora`, `coop+lora+tir`, `lora+vtt`, `maple`. Names
made of plug-ins alone (`tir`, `vtt`, `tir+vtt`, the names of the first release) take their base from the recipe:
`coop+lora` under `tir-release` (the TIR release's base), `lora` under the others. Everything that needs to know a
method reads this module: the config's choices, recipe defaults, validation and run identity (`cdfsl.config`), the
builder (`cdfsl.methods.build_method`), the CLI's choices and `cdfsl methods`, the report's ordering, the tests.

A base decides the fields that make it what it is (`decides`: `lora` has no learned context, `coop` no LoRA); the
recipe fills the rest, and `--set` may change anything but a decided field (changing one names another base, and
validation says which). Kept free of torch so that configs and the CLI's help load fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cdfsl.errors import ConfigError

TIR_RELEASE = "tir-release"
VTT_RELEASE = "vtt-release"


@dataclass(frozen=True)
class Base:
    """A fine-tuning base: what it trains, where it comes from, and the config it owns.

    Attributes:
        name: the method name of the base alone.
        summary: one line for `cdfsl methods`.
        trains: what it learns, in words (README's table).
        source: the paper and released code it follows.
        sections: config sections that shape its results (beyond `train`), hashed into the run identity.
        decides: dotted config keys and the values this base fixes (over the recipe; `--set` may not change them).
        defaults: dotted config keys and the values this base starts from (over the recipe; `--set` wins).
        builder: `module:attribute` of the `Method` class built for it.
        learns_text: whether the text side (class texts) changes while it trains.
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

    @property
    def trains_anything(self) -> bool:
        return self.name != "zeroshot"


@dataclass(frozen=True)
class PlugIn:
    """A plug-in that stacks on a base: its config section and why a base may not take it.

    `refuses(base)` returns the reason the plug-in cannot run on `base` (a sentence), or None when it can.
    """

    name: str
    summary: str
    source: str
    section: str
    refuses: Callable[[Base], str | None]


def _tir_refuses(base: Base) -> str | None:
    if not base.trains_anything:
        return "zeroshot trains nothing for TIR to recalibrate; use lora+tir or coop+lora+tir"
    return None


def _vtt_refuses(base: Base) -> str | None:
    if not base.trains_anything:
        return "zeroshot trains nothing for VtT's loss to shape; use lora+vtt"
    return None


_LORA_SECTIONS = ("lora", "prompt", "augment")

BASES: dict[str, Base] = {
    base.name: base
    for base in (
        Base(
            "zeroshot",
            "CLIP's zero-shot classifier: class texts from the template, nothing trained",
            "nothing",
            "Radford et al., ICML 2021",
            builder="cdfsl.methods.zeroshot.method:ZeroShot",
        ),
        Base(
            "lora",
            "LoRA on the attention projections of the vision tower, the text tower or both (lora.towers)",
            "LoRA (q, k, v) in every block of lora.towers",
            "Zanella & Ben Ayed, CVPRW 2024 (MaxZanella/CLIP-LoRA)",
            _LORA_SECTIONS,
            {"prompt.context": ""},
        ),
        Base(
            "coop",
            "CoOp: a learned prompt context shared by the classes, the class name at the end; the towers frozen",
            "the prompt context (prompt.context words initialise it)",
            "Zhou et al., IJCV 2022 (KaiyangZhou/CoOp)",
            _LORA_SECTIONS,
            {"lora.towers": "none"},
            {"prompt.context": "a photo of a"},
            learns_text=True,
        ),
        Base(
            "coop+lora",
            "CoOp's learned context plus LoRA on lora.towers: the base of the TIR release",
            "the prompt context and LoRA in every block of lora.towers",
            "shuaiyi308/TIR (coop_lora_trainer.py)",
            _LORA_SECTIONS,
            defaults={"prompt.context": "a photo of a"},
            learns_text=True,
        ),
        Base(
            "maple",
            "MaPLe: learned prompts in the first maple.depth blocks of both towers, vision prompts coupled from text",
            "text prompts per block and the text-to-vision coupling maps",
            "Khattak et al., CVPR 2023 (muzairkhattak/multimodal-prompt-learning)",
            ("maple", "augment"),
            builder="cdfsl.methods.maple.method:MapleMethod",
            learns_text=True,
        ),
    )
}

PLUGINS: dict[str, PlugIn] = {
    plugin.name: plugin
    for plugin in (
        PlugIn(
            "tir",
            "TIR: reweights deep vision tokens by how many classes claim them",
            "CVPR 2026 (shuaiyi308/TIR)",
            "tir",
            _tir_refuses,
        ),
        PlugIn(
            "vtt",
            "VtT: per-layer vision features fused and absorbed through the text tower while training",
            "CVPR 2026 (zhenyuZ-HUST/CVPR26-VtT)",
            "vtt",
            _vtt_refuses,
        ),
    )
}

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
        return self.base.sections + tuple(p.section for p in self.plugins)


def split_method(name: str) -> tuple[str | None, tuple[str, ...]]:
    """`name` → (base name or None for plug-ins alone, plug-in names); raises `ConfigError` for an unknown name."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"method must be a name such as {', '.join(method_names())}; got {name!r}")
    parts = name.split("+")
    base = None
    for width in (2, 1):  # the longest base first: coop+lora before coop
        head = "+".join(parts[:width])
        if len(parts) >= width and head in BASES:
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
    combination that cannot work."""
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
    names = [*BASES, "tir", "vtt", "tir+vtt"]
    for base in BASES.values():
        for combo in (("tir",), ("vtt",), ("tir", "vtt")):
            if all(PLUGINS[p].refuses(base) is None for p in combo):
                names.append("+".join((base.name, *combo)))
    return tuple(names)


def describe(name: str, recipe: str | None = None) -> str:
    """One line for `cdfsl methods`: the base's summary for a base alone, else the plug-ins' on the base."""
    spec = parse_method(name, recipe or default_recipe(name))
    if not spec.plugins:
        return spec.base.summary
    return "; ".join(p.summary for p in spec.plugins) + f" (on {spec.base.name})"
