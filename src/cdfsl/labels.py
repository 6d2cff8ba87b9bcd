"""What a run changed: the settings every run label shows.

A label names a run's method and recipe. Every setting that shapes the run's results and differs from what the
recipe gives, with the project's defaults and the protocol's episode shape (15 queries, seed 0, `openai` weights),
for the same method, dataset, ways, shots and backbone follows as `key=value` in the `--set` syntax
(`tir / tir-release [train.iterations=10]`), always, so a pasted table says what was run. `changed_settings` is the
one place that decides it: report rows, `compare`, and the sweep plan and status read it.

Only what enters the run identity counts (`RunConfig.identity`), which holds only the fields the method reads
(`MethodSpec.reads`): a field it never reads (`train.iterations` for `maple`, the sections of plug-ins it does
not use), the episode count, the device, the paths and the run name never make a difference. The dataset, ways,
shots and backbone are the table's columns or the label's other parts, so they are not repeated as settings.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

from cdfsl.backbone.tags import weights_alias
from cdfsl.config import RunConfig, section_names
from cdfsl.errors import ConfigError

# Identity keys a label or a table shows elsewhere, or that duplicate another key (`precision` is `train.precision`).
_SHOWN_ELSEWHERE = frozenset(
    {"dataset", "index", "method", "recipe", "ways", "shots", "backbone", "images", "device", "precision"}
)
# Config fields the reference run takes from the run itself: its frame, and fields that never change results.
_FRAME_FIELDS = (
    "dataset",
    "data_root",
    "method",
    "recipe",
    "ways",
    "shots",
    "backbone",
    "episodes",
    "device",
    "episode_batch",
    "db",
    "run_name",
    "cache_dir",
)
PROTOCOL_WAYS = 5  # the field's episodes; a run of other ways says so in its label
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def changed_settings(config: RunConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Dotted key → value of every result-shaping setting of a run that differs from its recipe's (module docstring).

    `config` is a run config, or one as a result store keeps it (`RunRecord.config`, the resolved config as a
    mapping; keys this version does not know are left out). Keys come in the order of the run identity. A method or
    recipe this version does not know gives `{}`: there is nothing to compare with.
    """
    try:
        run = config if isinstance(config, RunConfig) else _from_stored(config)
    except ConfigError:  # stored by a version that let a value of another type through: nothing to compare with
        return {}
    reference = RunConfig(**{name: getattr(run, name) for name in _FRAME_FIELDS})
    try:
        mine, recipe = _settings(run), _settings(reference)
    except ConfigError:
        return {}
    return {
        key: value
        for key, value in mine.items()
        if json.dumps(value, sort_keys=True, default=str) != json.dumps(recipe.get(key), sort_keys=True, default=str)
    }


def run_label(method: str, recipe: str | None, variant: str | None = None) -> str:
    """`method / recipe [variant]`: how every table names a run (`variant`: its changed settings, see
    `settings_text`, and what else tells it apart); runs stored before recipes existed show none."""
    text = method + (f" / {recipe}" if recipe else "")
    return text + (f" [{variant}]" if variant else "")


def variant_text(ways: int | None, changes: Mapping[str, Any]) -> str | None:
    """What a label adds to method and recipe: `N-way` off the protocol's ways, then `changes` (a run's
    `changed_settings`) as `key=value`; None when neither. `ways` None: episodes of varying ways (`episode_ways`),
    which no `N-way` describes."""
    parts = ["" if ways is None or ways == PROTOCOL_WAYS else f"{ways}-way", settings_text(changes)]
    return ", ".join(part for part in parts if part) or None


def episode_ways(config: RunConfig | Mapping[str, Any]) -> int | None:
    """The ways of every episode of a run (a config, or one as a store keeps it): its `ways` when its episodes are
    fixed-way, None when its protocol draws each episode's ways (`meta-dataset`)."""
    from cdfsl.data.protocols import FIXED_WAY, PROTOCOLS, protocol_of

    stored = config.to_dict() if isinstance(config, RunConfig) else config
    ways, protocol, dataset = stored.get("ways"), stored.get("protocol"), stored.get("dataset")
    name = protocol if protocol in PROTOCOLS else protocol_of(str(dataset))
    return int(ways) if name == FIXED_WAY and isinstance(ways, int) else None


def settings_text(changes: Mapping[str, Any]) -> str:
    """`key=value, key=value` in the `--set` syntax ('' when nothing changed)."""
    return ", ".join(f"{key}={format_value(value)}" for key, value in changes.items())


def format_value(value: Any) -> str:
    """A setting's value as `--set` takes it: `true`, `-4,-2`, `0.0004`, `none`; an empty text as `""`."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ",".join(format_value(item) for item in value)
    if isinstance(value, str):
        return visible(value) if value else '""'
    return str(value)


def visible(text: str) -> str:
    """`text` with control characters (newline, tab, …) written as escapes (`\\n`), so a label stays on its line in
    every table format."""
    return _CONTROL.sub(lambda match: match.group(0).encode("unicode_escape").decode("ascii"), text)


def _settings(config: RunConfig) -> dict[str, Any]:
    """The run identity's settings (flattened, dotted) without the frame keys, and every other top-level setting
    (those the identity holds in a derived form, such as `pre_resize` in its image rule); raises `ConfigError` for
    an unknown method or recipe."""
    resolved = config.resolved()
    resolved.pretrained = weights_alias(resolved.backbone, resolved.pretrained)  # as the run context records it
    identity = resolved.identity(
        precision=resolved.train.precision, index_fingerprint="", activation=resolved.activation, device=""
    )
    settings = {key: value for key, value in _flatten(identity).items() if key not in _SHOWN_ELSEWHERE}
    for f in dataclasses.fields(resolved):
        value = getattr(resolved, f.name)
        if f.init and f.name not in _FRAME_FIELDS and f.name not in settings and not dataclasses.is_dataclass(value):
            settings[f.name] = value
    return settings


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _from_stored(data: Mapping[str, Any]) -> RunConfig:
    """A run config from a stored mapping, keeping only the keys this version knows."""
    return RunConfig.from_dict(_known(data, RunConfig()), source="a stored run")


def _known(data: Mapping[str, Any], target: Any) -> dict[str, Any]:
    names = {f.name: getattr(target, f.name) for f in dataclasses.fields(target) if f.init}
    if isinstance(target, RunConfig):
        names.update((name, target.section(name)) for name in section_names())
    kept: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            continue
        current = names[key]
        if dataclasses.is_dataclass(current):
            if isinstance(value, Mapping):
                kept[key] = _known(value, current)
        else:
            kept[key] = value
    return kept
