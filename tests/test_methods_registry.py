"""Checks every registered method passes, driven by the registry (no hand-written list of methods).

For each name `cdfsl methods` lists, at tiny sizes on the tiny model and `digits`: fit and predict an episode, E
episodes at once equal E alone, a stored run resumes without training again, and `--set` reaches the config sections
the method uses (and only the fields it reads change its identity). Also the name grammar: plug-ins on a base, refused
combinations with a message, and the dataset table as the one source of dataset names.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from cdfsl.config import METHODS, RunConfig, apply_override, run_id_of
from cdfsl.data.readers import DATASETS as DATASET_SPECS
from cdfsl.engine.runner import Runner
from cdfsl.errors import ConfigError
from cdfsl.methods import build_method
from cdfsl.registry import BASES, PLUGINS, parse_method, split_method
from digits_world import DigitsWorld, configured
from episode_batching import assert_same_as_alone, logit_scale_of

# One short setting of every method: two steps (MaPLe: one epoch of two batches), one view per support image, a
# small VtT state.
TINY_SIZES = {
    "train__iterations": 2, "maple__epochs": 1, "maple__batch_size": 3, "augment__views": ("plain",),
    "vtt__state": 4,
}  # fmt: skip


def tiny(method: str, **changes: object) -> RunConfig:
    config = RunConfig(dataset="digits", method=method, backbone="tiny", pretrained="none", queries=2, device="cpu")
    return configured(config, **{**TINY_SIZES, **changes})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tiny: object) -> DigitsWorld:
    return DigitsWorld.of(tiny)  # type: ignore[arg-type]


@pytest.mark.batching
@pytest.mark.parametrize("method", METHODS)
def test_fits_predicts_and_episodes_at_once_equal_each_alone(method: str, world: DigitsWorld) -> None:
    config = tiny(method)
    together = build_method(config, world.backbone)
    batch = world.batch(config, [0, 1])
    together.fit(batch)
    both = together.predict(batch)
    assert both.shape == (2, 5 * 2, 5) and torch.isfinite(both).all()
    for position, episode in enumerate((0, 1)):
        alone = build_method(config, world.backbone)
        single = world.batch(config, [episode])
        alone.fit(single)
        assert_same_as_alone(alone.predict(single)[0], both[position], logit_scale_of(together))


@pytest.mark.parametrize("method", METHODS)
def test_a_stored_run_resumes(method: str, tmp_path: Path) -> None:
    config = tiny(method, episodes=1, db=str(tmp_path / "results.sqlite"))
    runner = Runner()
    first = runner.run(config)
    again = runner.run(config)
    assert (first.trained_episodes, again.trained_episodes) == (1, 0)
    assert again.per_episode == first.per_episode


def _changed(value: object) -> object:
    """Another valid value of a config field (numbers nudged, flags flipped)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5
    return None


SECTIONS = ("train", "lora", "prompt", "augment", "tir", "vtt", "maple")


def _shapes_results(config: RunConfig, changed: RunConfig, section: str, name: str) -> bool:
    """Whether `section.name` enters the run identity of `config`'s method: the method reads it, before or after the
    change (`MethodSpec.reads`; `tests/test_run_identity.py` checks every field and that the reads are true)."""
    return f"{section}.{name}" in config.reads() | changed.reads()


@pytest.mark.parametrize("method", METHODS)
def test_set_reaches_the_sections_the_method_uses(method: str) -> None:
    """Every numeric and on/off field of every section, nudged by `--set` to another valid value: the method accepts
    it, and its run identity changes exactly when the method uses the field."""
    config = tiny(method)
    reference = run_id_of(config.identity("fp32", "index", "gelu"))
    nudged: set[str] = set()
    for section in SECTIONS:
        for name, value in dataclasses.asdict(getattr(config.resolved(), section)).items():
            if _changed(value) is None:
                continue
            assignment = f"{section}.{name}={_changed(value)}"
            changed = tiny(method)
            apply_override(changed, assignment)
            try:
                changed.validate()
            except ConfigError as error:
                pytest.fail(f"{method}: the nudge {assignment} was refused ({error}); nudge it to a valid value")
            identity = run_id_of(changed.identity("fp32", "index", "gelu"))
            assert (identity != reference) == _shapes_results(config, changed, section, name), assignment
            nudged.add(section)
    assert nudged == set(SECTIONS)  # the walk found fields to nudge in every section


def test_every_base_and_plug_in_is_listed() -> None:
    listed = {split_method(name) for name in METHODS}
    assert {base for base, _ in listed} >= set(BASES)
    assert {p for _, plugins in listed for p in plugins} == set(PLUGINS)


@pytest.mark.parametrize(
    ("name", "base", "plugins"),
    [
        ("coop+lora+tir", "coop+lora", ("tir",)),
        ("coop+tir", "coop", ("tir",)),
        ("lora+vtt+tir", "lora", ("tir", "vtt")),  # plug-ins in any order
        ("tir", "coop+lora", ("tir",)),  # the TIR release's base under its recipe
    ],
)
def test_names_parse_into_a_base_and_plug_ins(name: str, base: str, plugins: tuple[str, ...]) -> None:
    spec = parse_method(name, RunConfig(method=name).recipe_name)
    assert (spec.base.name, tuple(p.name for p in spec.plugins)) == (base, plugins)


@pytest.mark.parametrize(
    ("method", "changes", "message"),
    [
        ("zeroshot+vtt", {}, "zeroshot trains nothing"),
        ("zeroshot+tir", {}, "zeroshot trains nothing"),
        ("lora+lora", {}, "not a base followed by plug-ins"),
        ("tir+tir", {}, "each at most once"),
        ("lora", {"prompt__context": "a photo of a"}, "prompt.context='a photo of a' does not fit method lora"),
        ("coop", {"lora__towers": "vision"}, "lora.towers='vision' does not fit method coop"),
        ("coop+lora", {"lora__towers": "none"}, "use the coop base"),
        ("coop", {"prompt__context": ""}, "needs its first words"),
    ],
)
def test_impossible_combinations_are_refused(method: str, changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny(method, **changes).validate()


def test_dataset_names_come_from_the_readers_table() -> None:
    assert [name for name, spec in DATASET_SPECS.items() if not spec.needs_root] == ["digits"]
    RunConfig(dataset="digits").validate()
    with pytest.raises(ConfigError, match="--data-root is required"):
        RunConfig(dataset="eurosat").validate()
