"""A run's identity holds what its method reads, and nothing else (issue 28).

For every registered method and every settings field (every dotted `--set` key but the run-level ones), changing the
field to another valid value changes the run identity exactly when the method reads the field
(`MethodSpec.reads`). The reads are true, not only declared: for a sample of fields a method does not read, a tiny
run gives the same predictions either way. Runs stored under the identity of earlier versions
(`RunConfig.legacy_identity`) keep serving: the recorded reference ids are the legacy ids, and a store holding a run
under its legacy id serves it without training.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cdfsl.config import (
    LORA_TOWERS,
    METHODS,
    PRECISIONS,
    SCHEDULES,
    TIR_VARIANTS,
    VTT_FUSIONS,
    VTT_SCANS,
    RunConfig,
    config_keys,
    run_id_of,
)
from cdfsl.engine.context import build_context
from cdfsl.engine.runner import Runner, legacy_run_id
from cdfsl.engine.store import ResultStore
from cdfsl.errors import ConfigError
from stored_reference import FIXTURE, reference_config

pytestmark = pytest.mark.usefixtures("one_thread")

# Settings every method's identity holds by construction (`train.precision` enters as the resolved precision, one
# of the run-level values); the other keys without a dot are the run's frame, paths and sizes.
RUN_LEVEL_SETTINGS = ("train.precision",)
SETTINGS_KEYS = [key for key in config_keys() if "." in key and key not in RUN_LEVEL_SETTINGS]
CHOICES = {
    "lora.towers": LORA_TOWERS, "train.schedule": SCHEDULES, "train.precision": PRECISIONS, "tir.variant": TIR_VARIANTS,
    "vtt.fusion": VTT_FUSIONS, "vtt.scan": VTT_SCANS,
}  # fmt: skip
OTHER_TEXTS = {
    "train.template": ("itap of a {}.",), "prompt.context": ("a photo", "a photo of a"), "maple.context": ("a photo",),
    "vtt.placeholder": ("Y",), "augment.views": (("plain", "rotate"), ("plain", "jitter"), ("plain", "flip")),
    "lora.targets": (("q", "v"),), "tir.blocks": ((-3, -1),), "train.batch_size": (3, "all"),
}  # fmt: skip


def base_config(method: str) -> RunConfig:
    return RunConfig(dataset="digits", method=method, backbone="tiny", shots=1, queries=2, device="cpu")


def value_at(config: RunConfig, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(config.section(section), name)


def candidates(key: str, value: Any) -> list[Any]:
    """Other values of field `key` (now `value`), most ordinary first."""
    if key in CHOICES:
        return [choice for choice in CHOICES[key] if choice != value]
    if key in OTHER_TEXTS:
        return [other for other in OTHER_TEXTS[key] if other != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1]
    if isinstance(value, float):
        return [value * 0.5, value * 1.5]
    if value is None:
        return [2, 0.5]  # an automatic value set by hand: vtt.hidden, tir.alpha, ...
    return []


def identity(config: RunConfig) -> str:
    precision = "bf16" if config.train.precision == "bf16" else "fp32"
    return run_id_of(config.identity(precision, "index", "gelu", "cpu", "images"))


def changed(method: str, key: str, value: Any) -> RunConfig | None:
    """The method's base config with `key` set to `value`, or None when validation refuses it."""
    config = base_config(method)
    section, _, name = key.partition(".")
    setattr(config.section(section), name, value)
    try:
        config.validate()
    except ConfigError:
        return None
    return config


def test_every_settings_field_is_checked() -> None:
    assert len(SETTINGS_KEYS) > 50 and "maple.epochs" in SETTINGS_KEYS and "train.iterations" in SETTINGS_KEYS


@pytest.mark.parametrize("method", METHODS)
def test_a_field_changes_the_identity_iff_the_method_reads_it(method: str) -> None:
    reference = base_config(method)
    resolved = reference.resolved()
    before, reads = identity(reference), reference.reads()
    checked = 0
    for key in SETTINGS_KEYS:
        for value in candidates(key, value_at(resolved, key)):
            config = changed(method, key, value)
            if config is None:
                continue  # refused for this method (a field its base decides, a value out of range): try another
            read = key in reads or key in config.reads()
            assert (identity(config) != before) == read, f"{method}: {key}={value!r} (read: {read})"
            checked += 1
            break
    assert checked >= len(SETTINGS_KEYS) - 6, "most fields have another valid value"


def test_maple_does_not_read_the_step_counted_loop() -> None:
    reads = base_config("maple").reads()
    loop = {"train.iterations", "train.lr", "train.schedule", "train.min_lr", "train.batch_size", "train.logit_scale"}
    assert not reads & loop
    assert {"train.beta1", "train.beta2", "train.weight_decay"} <= base_config("maple+vtt").reads()
    assert not {key for key in base_config("lora").reads() if key.startswith("prompt.")}


# ------------------------------------------------------------------------------------------- the reads are true
SMALL = {"train.iterations": 2, "maple.epochs": 1, "maple.batch_size": 3, "augment.views": ("plain",)}


def small(method: str, db: Path, **changes: Any) -> RunConfig:
    config = RunConfig(
        dataset="digits", method=method, backbone="tiny", pretrained="none", queries=2, episodes=1, device="cpu",
        db=str(db),
    )  # fmt: skip
    for key, value in {**SMALL, **changes}.items():
        section, _, name = key.partition(".")
        setattr(config.section(section), name, value)
    return config


def predictions(config: RunConfig) -> list[list[int]]:
    run_id = Runner().run(config).run_id
    with ResultStore(Path(config.db), read_only=True) as store:
        return [queries.predicted for queries in store.episode_queries(run_id).values() if queries is not None]


@pytest.mark.parametrize(
    ("method", "key", "value"),
    [("maple", "train.iterations", 7), ("lora", "prompt.lr", 0.5), ("lora", "augment.rotation", 10.0)],
)
def test_a_field_the_method_does_not_read_leaves_its_predictions(
    method: str, key: str, value: Any, tmp_path: Path
) -> None:
    plain, other = small(method, tmp_path / "plain.sqlite"), small(method, tmp_path / "other.sqlite", **{key: value})
    assert key not in plain.reads() and identity(plain) == identity(other)
    assert value_at(other, key) != value_at(plain.resolved(), key)
    first = predictions(plain)
    assert first and predictions(other) == first


# ------------------------------------------------------------------------------------------- legacy identities
RECORDED_IDS = {name: seen["run_id"] for name, seen in json.loads(FIXTURE.read_text())["methods"].items()}


@pytest.mark.parametrize("method", sorted(RECORDED_IDS))
def test_the_recorded_run_ids_are_the_legacy_ids(method: str, tmp_path: Path) -> None:
    context = build_context(reference_config(method, tmp_path / "results.sqlite"))
    assert legacy_run_id(context) == RECORDED_IDS[method]


def test_a_run_stored_under_its_legacy_id_is_served_without_training(tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite"
    config = reference_config("maple", db)
    config.episodes = 1
    first = Runner().run(config)
    old_id = legacy_run_id(build_context(config))
    assert old_id != first.run_id  # maple's identity held train.*, which it never reads
    with sqlite3.connect(db) as connection:  # the store as an earlier version left it
        for table in ("runs", "episodes"):
            connection.execute(f"UPDATE {table} SET run_id = ? WHERE run_id = ?", (old_id, first.run_id))
    again = Runner().run(config)
    assert (again.run_id, again.trained_episodes, again.per_episode) == (first.run_id, 0, first.per_episode)
    with ResultStore(db, read_only=True) as store:
        assert [run.run_id for run in store.runs()] == [first.run_id]
