"""Typed run configuration, recipes, and `--set key=value` overrides.

The CLI and the Python API build the same `RunConfig`. Every knob a spec names is a field here; `apply_override`
reaches any field by its dotted name (`tir.ratio`, `vtt.beta`, `lora.dropout`, `train.iterations`, `shots`).
Fields that a recipe decides (docs/recipes.md) default to `None`; `RunConfig.resolved()` fills them from the run's
recipe (`recipe`, or the method's default), and everything downstream runs on the resolved config.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import reprlib
import string
import tomllib
import types
import typing
from collections.abc import Collection, ItemsView, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdfsl.data.benchmarks import DATASETS as DATASET_SPECS
from cdfsl.data.benchmarks import resolve_template
from cdfsl.errors import ConfigError
from cdfsl.methods.lora.settings import LORA_TOWERS, LoraConfig, PromptConfig
from cdfsl.methods.maple.settings import MapleConfig
from cdfsl.methods.tir.settings import TIR_VARIANTS, TirConfig
from cdfsl.methods.training_settings import DEFAULT_CROP_SCALE, PRECISIONS, SCHEDULES, AugmentConfig, TrainConfig
from cdfsl.methods.vtt.settings import VTT_FUSIONS, VTT_SCANS, VttConfig
from cdfsl.recipes import RECIPES, Recipe
from cdfsl.registry import SECTIONS, MethodSpec, default_recipe, method_names, parse_method
from cdfsl.rules import (  # re-exported: the rules of every field, as before the parts declared their own
    ALL_SUPPORT,
    BLOCK_RANGE,
    DECAY_WHY,
    LR_WHY,
    MAX_DEPTH,
    MAX_HORIZON,
    MAX_ITERATIONS,
    MAX_LR,
    MAX_WIDTH,
    Rule,
    integer,
    integers,
    is_int,
    number,
)

from cdfsl.methods.lora.settings import LORA_ALPHA_WHY, MAX_LORA_ALPHA  # isort: skip
from cdfsl.rules import check_choice as _check_choice  # isort: skip

__all__ = [
    "ALL_SUPPORT", "BLOCK_RANGE", "DECAY_WHY", "LORA_ALPHA_WHY", "LORA_TOWERS", "LR_WHY", "MAX_DEPTH", "MAX_HORIZON",
    "MAX_ITERATIONS", "MAX_LORA_ALPHA", "MAX_LR", "MAX_WIDTH", "PRECISIONS", "SCHEDULES", "TIR_VARIANTS",
    "VTT_FUSIONS", "VTT_SCANS", "AugmentConfig", "LoraConfig", "MapleConfig", "PromptConfig", "Rule", "RunConfig",
    "TirConfig", "TrainConfig", "VttConfig", "integer", "integers", "number",
]  # fmt: skip
_is_int = is_int

if TYPE_CHECKING:
    from cdfsl.spec import RunSpec

DATASETS = tuple(DATASET_SPECS)
METHODS = method_names()  # every name `cdfsl methods` lists; others of the grammar are accepted too
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")  # cuda:N: the GPU of index N
ACTIVATIONS = ("auto", "gelu", "quickgelu")
PROTOCOLS = ("episodic", "all-way", "fixed-way", "meta-dataset")
"""`protocol`: episodes (the dataset's own episode protocol), one all-way K-shot fit (the CLIP few-shot suite's), or
an episode protocol by name: `fixed-way` (N-way K-shot, the fixed-shape variant on an `md-*` source) or
`meta-dataset` (`RunConfig.episode_protocol`)."""
EPISODIC = "episodic"
SHAPE_FIELDS = ("ways", "shots", "queries")
"""Given explicitly (typed, or by `--set`) on a dataset whose own protocol is not fixed-way, they select `fixed-way`
(`RunConfig.select_protocol`)."""
MAX_EPISODES = 10_000_000  # the to-do list and the store grow with it; the paper protocol is 400 or 800
MAX_SEED = 2**63 - 1  # the result store keeps the seed in an SQLite INTEGER, which is signed 64-bit
MAX_PRE_RESIZE = 8192  # pixels; the VtT release pre-resizes ChestX to 256, and ChestX's own images are 1024
BUILT_IN_SECTIONS = ("lora", "prompt", "train", "augment", "tir", "vtt", "maple")
"""The sections `RunConfig` holds as attributes; other registered sections are reached by `RunConfig.section`."""


@dataclass
class RunConfig:
    """One run: a method on a dataset's episodes. Field names are the public `--set` names.

    `method` is a base and plug-ins (`cdfsl.registry`: `lora`, `coop+lora+tir`, `maple`, ...). `recipe` names the
    training loop (docs/recipes.md); `None` is the method's default (`cdfsl.registry.default_recipe`).
    """

    dataset: str = "digits"
    data_root: str | None = None
    pre_resize: int | None = None  # square side images are first resized to when opened, 0: none; None: the recipe's
    method: str = "lora"
    recipe: str | None = None
    protocol: str = "episodic"  # episodic: the dataset's episodes; all-way: one fit on K shots of every class
    ways: int = 5
    shots: int = 1
    queries: int = 15
    episodes: int | None = None  # None: the paper protocol, 800 for 1-shot and 400 otherwise
    seed: int = 0
    backbone: str = "ViT-B-16"
    pretrained: str = "openai"
    activation: str = "auto"  # gelu or quickgelu; auto: from the model name, tag or checkpoint (docs/protocol.md)
    tokenizer: str | None = None  # a local Hugging Face tokenizer folder; None: the backbone's own (docs/backbones.md)
    device: str = "auto"
    episode_batch: int = 1
    deterministic: bool = False  # deterministic GPU kernels (engine/reproducibility.py); not in the run identity
    db: str = "results.sqlite"
    run_name: str | None = None
    cache_dir: str | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tir: TirConfig = field(default_factory=TirConfig)
    vtt: VttConfig = field(default_factory=VttConfig)
    maple: MapleConfig = field(default_factory=MapleConfig)

    _extra: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    """The registered sections beyond `BUILT_IN_SECTIONS` (a third party's part), by name; see `section`."""

    def __post_init__(self) -> None:
        # Sections given as mappings (`RunConfig(train={"lr": 1e-3})`) become their dataclasses.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mapping) and f.default_factory is not dataclasses.MISSING and f.init:
                setattr(self, f.name, _filled(f.default_factory(), value, f"{f.name}.", "config"))
        for name, section in SECTIONS.items():
            if name not in BUILT_IN_SECTIONS:
                self._extra[name] = section.settings()

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: a registered section that is not an attribute of its own.
        extra = self.__dict__.get("_extra")
        if extra is not None and name in extra:
            return extra[name]
        if extra is not None and not name.startswith("__") and name in SECTIONS:
            extra[name] = SECTIONS[name].settings()  # registered after this config was made
            return extra[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def section(self, name: str) -> Any:
        """The settings of section `name`: a built-in one (`config.lora`) or one a part registered
        (`cdfsl.registry.register_section`); raises `ConfigError` for an unknown section."""
        if name not in SECTIONS and name not in BUILT_IN_SECTIONS:
            raise ConfigError(f"unknown config section {name!r}; known: {', '.join(section_names(self))}")
        return getattr(self, name)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> RunConfig:
        """A config from a nested mapping, as a TOML or JSON file or a `--json` summary's `config` holds it: top-level
        keys, sections as mappings (or dotted keys), lists where a field holds a tuple. Keys left out keep their
        defaults; an unknown key or a value of the wrong type (`check_field`) is a `ConfigError` naming it (and
        `source`). Ranges and choices are checked by `validate`."""
        return update_from_dict(cls(), data, source)

    # ------------------------------------------------------------------ recipe
    @property
    def recipe_name(self) -> str:
        """The recipe this run follows: `recipe`, or the method's default."""
        return self.recipe if self.recipe is not None else default_recipe(self.method)

    @property
    def spec(self) -> MethodSpec:
        """The method's base and plug-ins (raises `ConfigError` for an unknown name or an impossible combination)."""
        return parse_method(self.method, self.recipe_name)

    def resolved(self) -> RunConfig:
        """A copy with the base's own fields and every unset (`None`) recipe field filled, and `recipe` named.

        Idempotent; fields the user set (by `--set` or in Python) are kept, except that a field the base decides
        (`lora` has no learned context, `coop` no LoRA) may only be set to the base's value.
        """
        _check_choice("recipe", self.recipe_name, tuple(RECIPES))
        base = self.spec.base
        config = copy.deepcopy(self)
        config.recipe = self.recipe_name
        for key, decided in base.decides.items():
            owner, name = _owner(config, key)
            if getattr(owner, name) not in (None, decided):
                raise ConfigError(
                    f"{key}={getattr(owner, name)!r} does not fit method {self.method}: the {base.name} base has "
                    f"{key}={decided!r}; choose the base that has it (see `cdfsl methods`)"
                )
            setattr(owner, name, decided)
        for key, default in base.defaults.items():
            owner, name = _owner(config, key)
            if getattr(owner, name) is None:
                setattr(owner, name, default)
        for value in RECIPES[config.recipe].values:
            owner, name = _owner(config, value.key)
            if getattr(owner, name) is None:
                setattr(owner, name, value.resolve(config))
        config.train.template = resolve_template(config.train.template, config.dataset)  # `coop`: the dataset's
        return config

    def resolve(self) -> RunSpec:
        """The frozen run spec of this config: validated once, resolved, its method parsed once (`cdfsl.spec`)."""
        from cdfsl.spec import RunSpec

        return RunSpec.of(self)

    def recipe_spec(self) -> Recipe:
        return RECIPES[self.recipe_name]

    # ------------------------------------------------------------------ validation
    def validate(self) -> RunConfig:
        """Raise `ConfigError` naming the first bad field (checked on the resolved values); return self.

        Numeric fields follow `NUMERIC_RULES`; fields left to the recipe are checked once the recipe has filled them.
        """
        self.validated()
        return self

    def validated(self) -> RunConfig:
        """Validate as `validate` does and return the resolved copy it checked (what `RunSpec.of` keeps): every
        validation passes here, with the one resolution it needs."""
        _check_choice("dataset", self.dataset, tuple(DATASET_SPECS))  # live: a benchmark registered later counts
        _check_choice("recipe", self.recipe_name, tuple(RECIPES))
        parse_method(self.method, self.recipe_name)  # refuses an unknown method or an impossible combination
        check_device(self.device)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("protocol", self.protocol, PROTOCOLS)
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer.strip()):
            raise ConfigError(
                f"tokenizer must be a folder path (or unset for the backbone's own); got {self.tokenizer!r}"
            )
        check_numbers(self, unset_ok=True)  # recipe values are computed from shots and dataset
        check_template(resolve_template(self.train.template, self.dataset))
        if DATASET_SPECS[self.dataset].needs_root and not self.data_root:
            raise ConfigError(f"--data-root is required for dataset {self.dataset!r}")
        resolved = self.resolved()
        check_numbers(resolved)
        for name, section in SECTIONS.items():
            if section.check is not None:
                section.check(getattr(resolved, name), resolved)
        resolved.spec.validate(resolved)
        return resolved

    @property
    def uses_tir(self) -> bool:
        return self.spec.uses("tir")

    @property
    def uses_vtt(self) -> bool:
        return self.spec.uses("vtt")

    @property
    def trains(self) -> bool:
        return self.spec.base.trains_anything

    def trains_text(self) -> bool:
        """Whether the text side learns (the base's own prompts, a prompt context, or LoRA on the text tower); needs a
        resolved config."""
        return self.spec.base.learns_text or bool(self.prompt.context) or self.lora.towers in ("text", "both")

    def resolved_episodes(self) -> int:
        """`episodes`, or the dataset's default (`Benchmark.episodes_for`: 800 for 1-shot and 400 otherwise for the
        built-in datasets, 600 for Meta-Dataset's sources)."""
        if self.episodes is not None:
            return self.episodes
        benchmark = DATASET_SPECS.get(self.dataset)
        if benchmark is not None:
            return benchmark.episodes_for(self.shots)
        return 800 if self.shots == 1 else 400

    @property
    def episode_protocol(self) -> str:
        """The registered episode protocol the run's episodes are drawn with: `protocol` when it names one
        (`fixed-way`, `meta-dataset`, `all-way`), otherwise (`episodic`) the dataset's own
        (`cdfsl.data.protocols.protocol_of`)."""
        from cdfsl.data.protocols import PROTOCOLS as EPISODE_PROTOCOLS
        from cdfsl.data.protocols import protocol_of

        return self.protocol if self.protocol in EPISODE_PROTOCOLS else protocol_of(self.dataset)

    def fewest_ways(self) -> int | None:
        """The fewest classes an episode of this run can have: `ways` under `fixed-way`, the protocol's own bound
        otherwise (5 under `meta-dataset`); None when the protocol states none."""
        from cdfsl.data.protocols import EpisodeSettings, get_protocol

        protocol = get_protocol(self.episode_protocol)
        if protocol.fewest_ways is None:
            return None
        return protocol.fewest_ways(EpisodeSettings(self.ways, self.shots, self.queries))

    def select_protocol(self, given: Collection[str]) -> RunConfig:
        """Apply the fixed-shape rule and return self: on a dataset whose own protocol is not `fixed-way` (the
        `md-*` sources draw Meta-Dataset's episodes), a config left at `protocol = "episodic"` whose `ways`, `shots`
        or `queries` were given explicitly (`given`: the fields typed on the command line or set by `--set`) gets
        `protocol = "fixed-way"`: those values then shape every episode."""
        from cdfsl.data.protocols import FIXED_WAY, protocol_of

        if self.protocol == EPISODIC and set(given) & set(SHAPE_FIELDS) and protocol_of(self.dataset) != FIXED_WAY:
            self.protocol = FIXED_WAY
        return self

    def to_dict(self) -> dict[str, Any]:
        """The config as a nested mapping (as stores and `--json` keep it); registered sections as top-level keys."""
        data = dataclasses.asdict(self)
        extra = data.pop("_extra")
        return {**data, **extra}

    def identity(
        self,
        precision: str,
        index_fingerprint: str,
        activation: str,
        device: str = "cpu",
        images: str = "",
        weights: str | None = None,
        tokenizer: str | None = None,
    ) -> dict[str, Any]:
        """The fields that determine per-episode results, on the resolved config; `run_id` hashes them.

        Besides the run's frame (dataset, method, recipe, episode shape, seed, backbone): the resolved precision, the
        dataset index fingerprint, the resolved activation, the device type of trained methods (their dropout masks
        come from generators on the compute device, which draw differently on CPU and CUDA), the image preprocessing
        rule, and `weights`: what identifies the pretrained weights (a checkpoint file's content digest; defaults to
        `pretrained` itself, right for tags and `none`), and `tokenizer`: the digest of a `--tokenizer` folder's
        files (present only when one is given). Of the settings sections it holds only the fields the method reads
        under this config (`MethodSpec.reads`: the base's and its plug-ins'), grouped by section, with
        `train.precision` as resolved; so a field the method never reads (`train.iterations` for `maple`) cannot
        split one run into two. Leaves out what never changes an episode's outcome (how many episodes, the episode
        batch, where results go). Runs stored under the identity of earlier versions are found by
        `legacy_identity`.
        """
        return self.resolved().resolved_identity(
            precision, index_fingerprint, activation, device, images, weights, tokenizer
        )

    def resolved_identity(
        self,
        precision: str,
        index_fingerprint: str,
        activation: str,
        device: str = "cpu",
        images: str = "",
        weights: str | None = None,
        tokenizer: str | None = None,
    ) -> dict[str, Any]:
        """`identity` of a config resolved already (a `RunSpec`'s), without resolving it again."""
        config = self
        ident = config._frame(precision, index_fingerprint, activation, device, images, weights, tokenizer)
        for key in sorted(config.spec.reads(config)):
            section, _, name = key.partition(".")
            value = precision if key == "train.precision" else _plain(getattr(config.section(section), name))
            ident.setdefault(section, {})[name] = value
        return ident

    def legacy_identity(
        self,
        precision: str,
        index_fingerprint: str,
        activation: str,
        device: str = "cpu",
        images: str = "",
        weights: str | None = None,
        tokenizer: str | None = None,
    ) -> dict[str, Any]:
        """The identity runs were stored under before it held only the fields a method reads: the whole `train`
        section (template and logit scale alone for `zeroshot`) and every section of `MethodSpec.sections`. The
        runner adopts a run stored under it (`ResultStore.adopt_run`) when the run's own id has no rows."""
        return self.resolved().resolved_legacy_identity(
            precision, index_fingerprint, activation, device, images, weights, tokenizer
        )

    def resolved_legacy_identity(
        self,
        precision: str,
        index_fingerprint: str,
        activation: str,
        device: str = "cpu",
        images: str = "",
        weights: str | None = None,
        tokenizer: str | None = None,
    ) -> dict[str, Any]:
        """`legacy_identity` of a config resolved already (a `RunSpec`'s), without resolving it again."""
        config = self
        ident = config._frame(precision, index_fingerprint, activation, device, images, weights, tokenizer)
        ident["train"] = {**dataclasses.asdict(config.train), "precision": precision}
        if not config.trains:
            ident["train"] = {"template": config.train.template, "logit_scale": config.train.logit_scale}
        for section in config.spec.sections:
            ident[section] = dataclasses.asdict(getattr(config, section))
            for name, default in _NEWER_THAN_LEGACY.get(section, {}).items():
                if ident[section].get(name) == default:
                    del ident[section][name]  # a field added later, at its old behaviour: the old id stays
        return ident

    def _frame(
        self,
        precision: str,
        index_fingerprint: str,
        activation: str,
        device: str,
        images: str,
        weights: str | None,
        tokenizer: str | None,
    ) -> dict[str, Any]:
        """The run-level part of both identities (of a resolved config)."""
        ident: dict[str, Any] = {
            "dataset": self.dataset,
            "index": index_fingerprint,
            "method": self.method,
            "recipe": self.recipe,
            "ways": self.ways,
            "shots": self.shots,
            "queries": self.queries,
            "seed": self.seed,
            "backbone": self.backbone,
            "pretrained": self.pretrained if weights is None else weights,
            "activation": activation,
            "precision": precision,
            "images": images,
        }
        if self.tokenizer is not None:
            ident["tokenizer"] = tokenizer or self.tokenizer
        if self.trains:
            ident["device"] = device
        return ident

    def reads(self) -> frozenset[str]:
        """The dotted settings keys this run's method reads under its resolved config (`MethodSpec.reads`)."""
        config = self.resolved()
        return config.spec.reads(config)


# Fields added to a section after the legacy identity was frozen, with the default that behaves as before they existed.
_NEWER_THAN_LEGACY: dict[str, dict[str, Any]] = {"augment": {"crop_scale": DEFAULT_CROP_SCALE}}


def _plain(value: Any) -> Any:
    """A field's value as `dataclasses.asdict` gives it (tuples stay tuples; JSON writes both as lists)."""
    return copy.deepcopy(value)


def _owner(config: RunConfig, key: str) -> tuple[Any, str]:
    """The object holding dotted `key` (`train.lr` → (config.train, "lr"); `shots` → (config, "shots"))."""
    section, _, name = key.rpartition(".")
    return (config.section(section) if section else config), name


def section_names(config: RunConfig | None = None) -> tuple[str, ...]:
    """The built-in sections, then every other registered one."""
    return (*BUILT_IN_SECTIONS, *(name for name in SECTIONS if name not in BUILT_IN_SECTIONS))


def run_id_of(identity: dict[str, Any]) -> str:
    """A short stable hash of a run identity (see `RunConfig.identity`)."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- numeric rules
RUN_RULES: dict[str, Rule] = {
    rule.key: rule
    for rule in (
        integer("ways", 2, why="an episode needs classes to tell apart"),
        integer("shots", 1),
        integer("queries", 1),
        integer("episodes", 1, MAX_EPISODES, optional=True),
        integer("seed", 0, MAX_SEED, why="2**63 - 1, the largest the result store holds"),
        integer("episode_batch", 1),
        integer("pre_resize", 0, MAX_PRE_RESIZE, why="0 for none"),
    )
}
"""The bounds of the run-level numeric fields; each section's are declared with it (`cdfsl.registry.Section`)."""


class _AllRules(Mapping[str, Rule]):
    """The bounds of every numeric config field by dotted key: the run's, then every registered section's (read
    live, so a part registered later is covered too)."""

    def _rules(self) -> dict[str, Rule]:
        rules = dict(RUN_RULES)
        for section in SECTIONS.values():
            rules.update((rule.key, rule) for rule in section.rules)
        return rules

    def __getitem__(self, key: str) -> Rule:
        return self._rules()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rules())

    def __len__(self) -> int:
        return len(self._rules())

    def items(self) -> ItemsView[str, Rule]:  # one composition for a whole walk (`check_numbers`)
        return self._rules().items()


NUMERIC_RULES: Mapping[str, Rule] = _AllRules()
"""The bounds of every numeric config field, by dotted key; `check_numbers` applies them (a test checks that every
numeric field has one)."""


def check_numbers(config: RunConfig, unset_ok: bool = False) -> None:
    """Apply `NUMERIC_RULES` to `config`; `unset_ok`: skip fields still `None` (before the recipe fills them)."""
    for key, rule in NUMERIC_RULES.items():
        section, _, name = key.rpartition(".")
        value = getattr(getattr(config, section) if section else config, name)
        if not (unset_ok and value is None):
            rule.check(value)


def check_device(device: object) -> None:
    """`device` must be `auto`, `cpu`, `cuda`, `cuda:N` (N a GPU index) or `mps`; whether it exists is checked when
    the run starts (`cdfsl.engine.context.resolve_device`)."""
    name = device if isinstance(device, str) else ""
    index = name.partition(":")[2] if name.startswith("cuda:") else None
    if name in ("auto", "cpu", "cuda", "mps") or (index is not None and index.isdigit() and index.isascii()):
        return
    raise ConfigError(f"device must be one of auto, cpu, cuda, cuda:N (a GPU index) or mps; got {device!r}")


def read_data_file(path: Path, label: str, kind: str) -> Any:
    """The data of the TOML (`kind="toml"`) or JSON (`"json"`) file at `path`; a `ConfigError` starting with `label`
    (`--config run.toml`, `sweep file grid.toml`) when it cannot be read, is not valid, or nests deeper than the
    parser can follow (a `RecursionError` inside `tomllib` or `json`)."""
    try:
        text = path.read_text(encoding="utf-8")
        return tomllib.loads(text) if kind == "toml" else json.loads(text)
    except OSError as error:
        raise ConfigError(f"cannot read {label}: {error.strerror or error}") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{label} is not valid {kind.upper()}: {error}") from None
    except RecursionError:
        raise ConfigError(
            f"{label} nests tables or lists too deeply to read (a config needs only a few levels)"
        ) from None


def check_template(template: str) -> None:
    """`train.template` must have exactly one `{}` (the class name) and no other format field (`{0}`, `{x}`, `{!r}`)."""
    hint = "use {{ and }} for literal braces"
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)]
    except ValueError as error:
        raise ConfigError(f"train.template is not a format string ({error}; {hint}), got {template!r}") from None
    fields = [field for field in fields if field[0] is not None]
    if fields != [("", "", None)]:
        raise ConfigError(
            f"train.template must contain exactly one {{}} for the class name and no other format field ({hint}), "
            f"got {template!r}"
        )


def apply_override(config: RunConfig, assignment: str) -> None:
    """Apply one `key=value` (dotted key) to `config` in place, converting the value to the field's type."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    key, raw = key.strip(), raw.strip()
    target: Any = config
    parts = key.split(".")
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(target) or part not in _field_types(target):
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(config_keys())}")
        target = getattr(target, part)
    name = parts[-1]
    types_of = _field_types(target) if dataclasses.is_dataclass(target) else {}
    if name not in types_of or dataclasses.is_dataclass(getattr(target, name)):
        raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(config_keys())}")
    setattr(target, name, _parse_value(key, raw, types_of[name]))


def update_from_dict(config: RunConfig, data: Mapping[str, Any], source: str) -> RunConfig:
    """Set the fields `data` names on `config` (in place; returned): a file's typed values, sections as mappings or
    dotted keys (`{"train": {"lr": 1e-3}}` or `{"train.lr": 1e-3}`). Each value must have its field's type
    (`check_field`); an unknown key or a wrong type is a `ConfigError` naming `source` and the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source} must hold a table of config keys, got {_shown_value(data)}")
    return _filled(config, data, "", source)


def _filled(target: Any, data: Mapping[str, Any], prefix: str, source: str) -> Any:
    """`target` (a config dataclass) with the fields in `data` set and type-checked; sections recurse."""
    types_of = _field_types(target)
    for name, value in data.items():
        key = prefix + str(name)
        head, dot, rest = str(name).partition(".")
        if name not in types_of and dot and dataclasses.is_dataclass(getattr(target, head, None)):
            _filled(getattr(target, head), {rest: value}, f"{prefix}{head}.", source)
            continue
        if name not in types_of:
            raise ConfigError(f"{source}: unknown config key {key!r}; known keys: {', '.join(config_keys())}")
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{source}: {key} is a section; give it as a table of keys, got {_shown_value(value)}"
                )
            _filled(current, value, key + ".", source)
        else:
            setattr(target, name, check_field(key, value, types_of[name], source))
    return target


# ------------------------------------------------------------------------------------------- field types
_WRONG = object()  # `_conformed`'s answer for a value of another type


def check_field(key: str, value: Any, annotation: Any, source: str = "config") -> Any:
    """`value` as field `key` of type `annotation` holds it, or a `ConfigError` naming `source` and `key`.

    The one type check of values read from files (TOML, JSON, sweep files, a classifier's model.json), driven by the
    config dataclasses' type hints: a bool field takes only true/false (never 1, "false" or "no"), an int field only
    an integer (not a bool), a float field an integer or a float, a str field only a string, a tuple field a list or
    tuple of items of its type (never a string, whose characters would be read as items; a list becomes a tuple),
    an optional field also None (JSON null), a `Literal` one of its values. Ranges are `NUMERIC_RULES`' business."""
    conformed = _conformed(value, annotation)
    if conformed is _WRONG:
        hint = ""
        options = _options(annotation)
        if isinstance(value, str) and bool in options and value.strip().lower() in ("true", "false"):
            hint = f"; write {value.strip().lower()} without quotes"
        elif isinstance(value, str) and any(typing.get_origin(option) is tuple for option in options):
            hint = f"; give a list, e.g. [{_shown_value(value)}]"
        raise ConfigError(
            f"{source}: {key} must be {_described(annotation)}, got {_shown_value(value)} ({_kind_of(value)}){hint}"
        )
    return conformed


def _conformed(value: Any, annotation: Any) -> Any:
    """`value` as a field of type `annotation` holds it (a list as a tuple), or `_WRONG`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        for option in args:
            conformed = _conformed(value, option)
            if conformed is not _WRONG:
                return conformed
        return _WRONG
    if origin is typing.Literal:
        return value if any(type(value) is type(a) and value == a for a in args) else _WRONG
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return _WRONG
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            return _WRONG
        items = [_conformed(item, kind) for item, kind in zip(value, item_types, strict=True)]
        return _WRONG if any(item is _WRONG for item in items) else tuple(items)
    if annotation is type(None):
        return value if value is None else _WRONG
    if annotation is bool:
        return value if isinstance(value, bool) else _WRONG
    if annotation is int:
        return value if _is_int(value) else _WRONG
    if annotation is float:
        # An integer is a number (`alpha = 16`), kept as given: the run identity of such files does not change.
        return value if isinstance(value, int | float) and not isinstance(value, bool) else _WRONG
    if annotation is str:
        return value if isinstance(value, str) else _WRONG
    if annotation is Any:
        return value
    raise TypeError(f"config fields of type {annotation!r} have no type check")  # a new field type: add it above


def _options(annotation: Any) -> tuple[Any, ...]:
    """The types a union holds, or `(annotation,)`."""
    is_union = typing.get_origin(annotation) in (types.UnionType, typing.Union)
    return typing.get_args(annotation) if is_union else (annotation,)


def _described(annotation: Any) -> str:
    """What a field of type `annotation` takes, in words: `true or false`, `an integer or none`, ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        words = [_described(option) for option in args if option is not type(None)]
        if type(None) in args:
            words.append("none (unset)")
        return ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        item = args[0] if args else Any
        return f"a list of {_PLURALS.get(item, _described(item))}"
    return _WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


_WORDS: dict[Any, str] = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    type(None): "none (unset)",
}
_PLURALS: dict[Any, str] = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _kind_of(value: Any) -> str:
    """The TOML/JSON kind of a value, for messages: `a string`, `a boolean`, `a list`, ..."""
    kinds = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"))
    for kind, words in kinds:
        if isinstance(value, kind):
            return words
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__


def _shown_value(value: Any) -> str:
    """A value as a one-line message shows it: nested and long values shortened with `...`."""
    return _SHORT_REPR.repr(value)


def _short_repr() -> reprlib.Repr:
    shortened = reprlib.Repr()  # keyword arguments need Python 3.12
    shortened.maxlevel, shortened.maxlist, shortened.maxtuple, shortened.maxdict = 2, 4, 4, 4
    shortened.maxstring, shortened.maxother, shortened.maxlong = 60, 60, 40
    return shortened


_SHORT_REPR = _short_repr()


def config_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """All dotted keys `--set` accepts (the sections a part registered after the built-in ones)."""
    obj = RunConfig() if obj is None else obj
    keys: list[str] = []
    for name in _field_types(obj):
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            keys.extend(config_keys(value, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


def _field_types(obj: Any) -> dict[str, Any]:
    """Field name → type of a config dataclass; a `RunConfig`'s registered sections count as its fields."""
    hints = typing.get_type_hints(type(obj))
    if isinstance(obj, RunConfig):
        hints.pop("_extra", None)
        hints.update((name, type(section)) for name, section in obj._extra.items())
        hints.update((name, SECTIONS[name].settings) for name in SECTIONS if name not in hints)
    return hints


def _parse_value(key: str, raw: str, annotation: Any) -> Any:
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if raw == "" and str in inner:
            return ""  # an empty text, e.g. `prompt.context=` (no learned context)
        if type(None) in args and raw.lower() in ("none", "null", "auto", ""):
            return None  # unset: the recipe (or the field's documented rule) decides
        for option in inner[:-1]:
            try:
                return _parse_value(key, raw, option)
            except ConfigError:
                continue
        return _parse_value(key, raw, inner[-1])
    try:
        if annotation is bool:
            lowered = raw.lower()  # true/false only, as in a file: `no`, `off` or `0` might mean either to a reader
            if lowered in ("true", "false"):
                return lowered == "true"
            raise ValueError(raw)
        if annotation is int:
            return int(raw)
        if annotation is float:
            return float(raw)
        if annotation is str:
            return raw
        if origin is tuple:
            items = [s.strip() for s in raw.strip("()[]").split(",") if s.strip()]
            return tuple(_parse_value(key, s, args[0]) for s in items)
    except ValueError:
        raise ConfigError(f"{key} expects {_type_name(annotation)}, got {raw!r}") from None
    raise ConfigError(f"{key} cannot be set from the command line")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is tuple:
        return f"a comma-separated list of {typing.get_args(annotation)[0].__name__}"
    if annotation is bool:
        return "true or false"
    return getattr(annotation, "__name__", str(annotation))
