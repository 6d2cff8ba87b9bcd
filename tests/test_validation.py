"""Numbers that would give a result that looks right but is not: refused as configuration, or as a `TrainingError`.

Every numeric config field has a rule (`NUMERIC_RULES`); a nan or inf during an episode's training or in its query
logits is a `TrainingError` naming the episodes, and the runner stores nothing for that batch. Property tests drive
`--set` assignments of every numeric key through validation and, when accepted, one short fit on the tiny model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sqlite3
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cdfsl.methods.vtt.extension as vtt_module
from cdfsl.analysis.lost_layers import lost_layers_probe
from cdfsl.backbone.adapter import ClipAdapter, VisionOutput
from cdfsl.config import (
    MAX_DEPTH,
    MAX_EPISODES,
    MAX_ITERATIONS,
    MAX_SEED,
    MAX_WIDTH,
    METHODS,
    NUMERIC_RULES,
    RunConfig,
    apply_override,
    config_keys,
)
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.data.index import ImageIndex
from cdfsl.data.readers import load_index
from cdfsl.data.sampler import EpisodeSampler
from cdfsl.engine.runner import Runner
from cdfsl.errors import CdfslError, ConfigError, TrainingError
from cdfsl.methods import build_method
from cdfsl.methods.lora.method import LoraMethod, learning_rate_schedules
from cdfsl.methods.text_side import ClassText
from cdfsl.pretrain.train_tiny import pretrain_tiny
from cdfsl.recipes import RECIPES
from cdfsl.seeding import seed_of
from digits_world import DigitsWorld, tiny_config
from poison import Poison

NAN = float("nan")


def configured(*assignments: str, base: RunConfig | None = None) -> RunConfig:
    config = base if base is not None else RunConfig()
    for assignment in assignments:
        apply_override(config, assignment)
    return config


def value_at(config: RunConfig, key: str) -> Any:
    section, _, name = key.rpartition(".")
    return getattr(getattr(config, section) if section else config, name)


# ------------------------------------------------------------------------------------------- the rules


@pytest.mark.parametrize(
    ("assignments", "fragment"),
    [
        (["train.lr=nan"], r"train.lr must be a number in \(0, 1,000,000\] .*got nan"),
        (["train.lr=inf"], r"train.lr must be a number in \(0, 1,000,000\] .*got inf"),
        (["train.lr=-1e-4"], r"train.lr must be a number in \(0, 1,000,000\] .*got -0.0001"),
        (["train.lr=0"], r"train.lr must be a number in \(0, 1,000,000\] .*got 0.0"),
        (["vtt.lr=0"], r"vtt.lr must be a number in \(0, 1,000,000\] .*"),
        (["vtt.lr=-inf"], r"vtt.lr must be a number in \(0, 1,000,000\] .*, got -inf"),
        (["prompt.lr=nan"], r"prompt.lr must be a number in \(0, 1,000,000\]"),
        (["vtt.lr=1e300"], r"vtt.lr must be a number in \(0, 1,000,000\] \(a larger rate overflows"),
        (["train.weight_decay=-0.01"], r"train.weight_decay must be a number in \[0, 1,000,000\]"),
        (["train.weight_decay=inf"], r"train.weight_decay must be a number in \[0, 1,000,000\] .*, got inf"),
        (["prompt.weight_decay=nan"], r"prompt.weight_decay must be a number in \[0, 1,000,000\]"),
        (["prompt.weight_decay=1e300"], r"prompt.weight_decay must .* \(a larger decay overflows"),
        (["train.min_lr=-1e-6"], r"train.min_lr must be a number in \[0, 1,000,000\]"),
        (["train.beta1=1"], r"train.beta1 must be a number in \[0, 1\), got 1.0"),
        (["train.beta2=-0.1"], r"train.beta2 must be a number in \[0, 1\)"),
        (["train.beta2=nan"], r"train.beta2 must be a number in \[0, 1\), got nan"),
        (["prompt.momentum=1"], r"prompt.momentum must be a number in \[0, 1\)"),
        (["train.logit_scale=nan"], "train.logit_scale must be a finite number > 0, got nan"),
        (["train.logit_scale=0"], "train.logit_scale must be a finite number > 0"),
        (["train.schedule_horizon=inf"], r"train.schedule_horizon must be a number in \(0, 1,000,000\]"),
        (["train.schedule_horizon=0"], r"train.schedule_horizon must be a number in \(0, 1,000,000\]"),
        (["train.schedule_horizon=1e7"], r"train.schedule_horizon must be a number in \(0, 1,000,000\]"),
        (["lora.alpha=nan"], r"lora.alpha must be a number in \(0, 10,000\] \(alpha / sqrt\(rank\)"),
        (["lora.alpha=0"], r"lora.alpha must be a number in \(0, 10,000\]"),
        (["lora.alpha=1e300"], r"lora.alpha must be a number in \(0, 10,000\].*, got 1e\+300"),
        (["lora.dropout=1"], r"lora.dropout must be a number in \[0, 1\)"),
        (["lora.dropout=-0.1"], r"lora.dropout must be a number in \[0, 1\)"),
        (["lora.rank=0"], "lora.rank must be a positive integer <= 4,096, got 0"),
        (["lora.rank=4097"], "lora.rank must be a positive integer <= 4,096, got 4097"),
        (["augment.rotation=nan"], r"augment.rotation must be a number in \[0, 180\] \(degrees either way\), got nan"),
        (["augment.rotation=-1"], r"augment.rotation must be a number in \[0, 180\]"),
        (["augment.rotation=181"], r"augment.rotation must be a number in \[0, 180\]"),
        (["augment.jitter=1.5"], r"augment.jitter must be a number in \[0, 1\]"),
        (["augment.flip_p=-0.5"], r"augment.flip_p must be a number in \[0, 1\]"),
        (["tir.ratio=0"], r"tir.ratio must be a number in \(0, 1\], got 0.0"),
        (["tir.ratio=1.01"], r"tir.ratio must be a number in \(0, 1\]"),
        (["tir.alpha=nan"], r"tir.alpha must be a finite number or none \(auto\), got nan"),
        (["tir.beta=-inf"], r"tir.beta must be a finite number or none \(auto\), got -inf"),
        (["method=tir", "tir.alpha=5"], "tir.alpha=5 with tir.beta=auto .* needs alpha < ways = 5"),
        (["vtt.beta=-1"], "vtt.beta must be a finite number >= 0"),
        (["vtt.beta=inf"], "vtt.beta must be a finite number >= 0, got inf"),
        (["vtt.window=0"], "vtt.window must be a positive integer"),
        (["vtt.hidden=0"], "vtt.hidden must be a positive integer <= 4,096 or none"),
        (["vtt.state=100000"], "vtt.state must be a positive integer <= 4,096"),
        (["vtt.dt_rank=-1"], "vtt.dt_rank must be a positive integer <= 4,096"),
        (["vtt.conv=0"], "vtt.conv must be a positive integer <= 64"),
        (["vtt.ssm_layers=65"], "vtt.ssm_layers must be a positive integer <= 64"),
        (["ways=1"], r"ways must be at least 2 \(a whole number; an episode needs classes to tell apart\), got 1"),
        (["ways=-3"], "ways must be at least 2"),
        (["shots=0"], "shots must be a positive integer, got 0"),
        (["queries=-1"], "queries must be a positive integer"),
        (["episode_batch=0"], "episode_batch must be a positive integer"),
        (["episodes=0"], "episodes must be a positive integer <= 10,000,000"),
        (["episodes=10000000000"], "episodes must be a positive integer <= 10,000,000 or none .auto., got 10000000000"),
        (["seed=-1"], "seed must be a non-negative integer <= 9,223,372,036,854,775,807"),
        (["seed=18446744073709551615"], r"seed must be .* \(2\*\*63 - 1, the largest the result store holds\)"),
        (["seed=18446744073709551616"], "seed must be a non-negative integer"),
        (["train.iterations=-1"], "train.iterations must be a non-negative integer <= 1,000,000"),
        (["train.iterations=1000001"], "train.iterations must be a non-negative integer <= 1,000,000"),
        (["train.batch_size=0"], "train.batch_size must be a positive integer or 'all', got 0"),
    ],
)
def test_each_rule_refuses_with_a_one_line_message(assignments: list[str], fragment: str) -> None:
    config = configured(*assignments)
    with pytest.raises(ConfigError, match=fragment) as caught:
        config.validate()
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "assignments",
    [
        ["train.lr=1e-9", "train.weight_decay=0", "train.min_lr=0", "train.beta1=0", "train.beta2=0.9999"],
        ["lora.alpha=1e-3", "lora.alpha=1e4", "lora.dropout=0", "lora.rank=1", "lora.rank=4096"],
        ["augment.rotation=0", "augment.rotation=180", "augment.jitter=0", "augment.jitter=1", "augment.flip_p=1"],
        ["tir.ratio=1", "tir.alpha=-2", "tir.beta=0", "tir.text_layer=-100", "tir.blocks=-40,99"],
        ["vtt.beta=0", "vtt.window=1", "vtt.conv=64", "vtt.ssm_layers=1", "vtt.hidden=4096", "vtt.dt_rank=1"],
        ["ways=2", "episodes=10000000", "seed=0", "seed=9223372036854775807", "train.iterations=0"],
        ["train.iterations=1000000", "train.batch_size=all", "train.schedule_horizon=1e-3", "train.logit_scale=1e-3"],
        ["method=tir", "tir.alpha=4.5"],  # beta auto = 1 / (5 - 4.5)
        ["method=tir", "tir.alpha=7", "tir.beta=0.5"],
    ],
)
def test_values_at_the_edges_are_accepted(assignments: list[str]) -> None:
    """Accepted as given: validation neither clamps nor replaces a value, and the recipe keeps every value set."""
    config = configured(*assignments)
    given = dataclasses.asdict(config)
    assert config.validate() is config
    assert dataclasses.asdict(config) == given
    resolved = config.resolved()
    for key in {assignment.partition("=")[0] for assignment in assignments}:
        assert value_at(resolved, key) == value_at(config, key), key
        if key in NUMERIC_RULES:
            assert NUMERIC_RULES[key].allows(value_at(resolved, key)), key


def test_every_numeric_field_has_a_rule() -> None:
    """Registry-driven: a new int or float field (or list of them) without a rule in `NUMERIC_RULES` fails here."""
    numeric = set(numeric_keys())
    assert numeric, "no numeric fields found: the walk over the dataclasses is broken"
    missing = numeric - set(NUMERIC_RULES)
    assert not missing, f"numeric config fields without a rule in NUMERIC_RULES: {sorted(missing)}"
    assert set(NUMERIC_RULES) <= set(config_keys()), "a rule names a key that does not exist"
    assert {"train.lr", "seed", "tir.blocks", "vtt.dt_rank", "episodes", "train.batch_size"} <= numeric


def numeric_keys(obj: Any = None, prefix: str = "") -> Iterator[str]:
    """Dotted keys of every field whose type involves int or float (not bool), walking the dataclasses."""
    obj = RunConfig() if obj is None else obj
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from numeric_keys(value, f"{prefix}{f.name}.")
        elif _leaf_types(hints[f.name]) & {int, float}:
            yield prefix + f.name


def _leaf_types(annotation: Any) -> set[Any]:
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union, tuple):
        return {t for arg in typing.get_args(annotation) if arg is not Ellipsis for t in _leaf_types(arg)}
    return {annotation}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("method", METHODS)
def test_defaults_and_recipes_obey_every_rule(method: str, recipe: str) -> None:
    for dataset in ("digits", "isic2018", "eurosat"):
        config = RunConfig(method=method, recipe=recipe, dataset=dataset, data_root="/d")
        try:
            config = config.resolved()
        except ConfigError as error:  # a plug-in name whose base under this recipe cannot take it
            assert "cannot run on" in str(error)
            continue
        for key, rule in NUMERIC_RULES.items():
            assert rule.allows(value_at(config, key)), (key, value_at(config, key))


def test_python_api_values_of_the_wrong_type_are_refused() -> None:
    """Only `--set` converts types; in Python a bool, text or numpy scalar in a numeric field is refused."""
    for key, value in [("seed", True), ("ways", 5.0), ("lora.rank", "16"), ("train.lr", True), ("seed", 3.0)]:
        config = RunConfig()
        section, _, name = key.rpartition(".")
        setattr(getattr(config, section) if section else config, name, value)
        with pytest.raises(ConfigError, match=f"^{key} must be"):
            config.validate()


@pytest.mark.parametrize(
    "template", ["a {x} {}", "{0}", "{}{}", "a photo", "a {} {", "a } {}", "{!r}", "{:>9}", "{0} of {}", "{[0]}"]
)
def test_template_needs_exactly_one_plain_field(template: str) -> None:
    config = RunConfig()
    config.train.template = template
    with pytest.raises(ConfigError, match=r"train\.template") as caught:
        config.validate()
    assert repr(template) in str(caught.value)


@pytest.mark.parametrize(
    ("template", "prompt"),
    [
        ("{}", "seven"),
        ("a photo of a {}.", "a photo of a seven."),
        ("{{literal}} {} ", "{literal} seven "),
        ("x{}y, a=b", "xseveny, a=b"),
    ],
)
def test_templates_with_one_field_are_accepted(template: str, prompt: str) -> None:
    """Accepted, and the class prompt the frozen text side builds from it is the template with the name in its field."""
    config = RunConfig()
    config.train.template = template
    config.validate()
    assert config.train.template == template
    seen: list[str] = []

    def text_features(prompts: list[str]) -> torch.Tensor:
        seen.extend(prompts)
        return torch.ones(len(prompts), 4)

    backbone = types.SimpleNamespace(device=torch.device("cpu"), text_features=text_features)
    ClassText(backbone, config.train.template)([["seven"]])  # type: ignore[arg-type]
    assert seen == [prompt]


def test_seed_bound_is_what_the_pipeline_takes() -> None:
    """`seed_of` takes any non-negative integer; the store's SQLite INTEGER column is signed 64-bit: MAX_SEED."""
    with sqlite3.connect(":memory:") as connection:
        connection.execute("CREATE TABLE t (seed INTEGER NOT NULL)")
        connection.execute("INSERT INTO t VALUES (?)", (MAX_SEED,))
        with pytest.raises(OverflowError):
            connection.execute("INSERT INTO t VALUES (?)", (MAX_SEED + 1,))
    seed_of(MAX_SEED, MAX_EPISODES - 1, "episode")
    with pytest.raises(ValueError):
        seed_of(-1, 0, "episode")
    configured(f"seed={MAX_SEED}").validate()
    for seed in (-1, MAX_SEED + 1):
        with pytest.raises(ConfigError, match=r"^seed must be"):
            configured(f"seed={seed}").validate()


def test_huge_episode_count_is_refused_before_any_work() -> None:
    config = configured("episodes=10000000000")
    with pytest.raises(ConfigError, match="episodes must be"):
        Runner().run(config)  # refused by validate(), before the to-do list is built


def test_lost_layers_gamma_must_be_finite() -> None:
    config = tiny_config("lora")
    for gamma in (NAN, math.inf, -math.inf):
        with pytest.raises(ConfigError, match="gamma must be a finite number"):
            lost_layers_probe(config, "zeroshot", gamma=gamma, episodes=1)


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"steps": 0}, "steps must be a positive integer, got 0"),
        ({"steps": -5}, "steps must be a positive integer"),
        ({"steps": 10, "supervised_steps": 11}, r"supervised_steps must be in \[0, steps=10\]"),
        ({"steps": 10, "supervised_steps": -1}, "supervised_steps must be in"),
        ({"steps": 10, "supervised_steps": 5, "threads": 0}, "threads must be a positive integer"),
        ({"steps": 10, "supervised_steps": 5, "seed": -1}, "seed must be an integer in"),
        ({"steps": 10, "supervised_steps": 5, "lr": NAN}, "lr must be a finite number > 0"),
        ({"steps": 10, "supervised_steps": 5, "eval_every": 0}, "eval_every must be a positive integer"),
        ({"steps": 10, "supervised_steps": 5, "target_share": 2.0}, "target_share must be a number in"),
    ],
)
def test_pretrain_tiny_refuses_bad_arguments_before_any_work(
    arguments: dict[str, Any], fragment: str, tmp_path: Path
) -> None:
    out = tmp_path / "tiny.safetensors"
    with pytest.raises(ConfigError, match=fragment):
        pretrain_tiny(out, **arguments)
    assert not out.exists()


# ------------------------------------------------------------------------------------------- TrainingError


@pytest.fixture(scope="module")
def world(tiny: ClipAdapter) -> DigitsWorld:
    return DigitsWorld.of(tiny)


def short(method: str, **changes: object) -> RunConfig:
    return tiny_config(method, queries=2, train__iterations=1, **changes).resolved()


@pytest.mark.parametrize("method", ["lora", "tir", "vtt"])
def test_nan_during_training_is_a_training_error(
    method: str, world: DigitsWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison = Poison(monkeypatch)
    config = short(method)
    batch = world.batch(config, [3, 7])
    fitted = build_method(config, world.backbone)
    poison.rows = [1]
    with pytest.raises(TrainingError) as caught:
        fitted.fit(batch)
    message = str(caught.value)
    assert message.startswith("episode 7: the training loss became nan or inf")
    assert "no result is stored for this batch (episodes 3, 7)" in message
    assert "Try a lower learning rate (now train.lr=0.0002" in message and "\n" not in message
    poison.rows = []
    with pytest.raises(TrainingError, match="cannot predict after a failed fit: episode 7"):
        fitted.predict(batch)  # the diverged weights are never used
    fitted.fit(batch)  # a later good fit clears the refusal
    assert torch.isfinite(fitted.predict(batch)).all()


@pytest.mark.parametrize("method", ["zeroshot", "lora"])
def test_nan_query_logits_are_a_training_error(
    method: str, world: DigitsWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before this check, nan logits argmax to class 0 and were stored as a chance-level accuracy."""
    poison = Poison(monkeypatch)
    config = short(method)
    batch = world.batch(config, [0, 1, 2])
    fitted = build_method(config, world.backbone)
    fitted.fit(batch)
    poison.rows = [0, 2]
    with pytest.raises(TrainingError, match=r"^episodes 0, 2: the query logits became nan or inf") as caught:
        fitted.predict(batch)
    expected = "a lower learning rate" if method == "lora" else "another checkpoint (--pretrained none)"
    assert expected in str(caught.value) and "train.logit_scale (now 100)" in str(caught.value)


@pytest.mark.parametrize(("correction", "dlc"), [(True, True), (False, False)])
def test_nan_in_the_vtt_loss_alone_is_caught_in_training(
    correction: bool, dlc: bool, world: DigitsWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L_ce stays finite; the combined loss the extension backpropagates does not: fit refuses, not only predict."""
    original = vtt_module.VttExtension.vtt_loss

    def vtt_loss(
        self: vtt_module.VttExtension, output: VisionOutput, labels: torch.Tensor, class_layers: torch.Tensor
    ) -> torch.Tensor:
        loss = original(self, output, labels, class_layers)
        return torch.cat([loss[:1], loss[1:] * NAN])

    monkeypatch.setattr(vtt_module.VttExtension, "vtt_loss", vtt_loss)
    config = short("vtt", vtt__correction=correction, vtt__dlc=dlc)
    batch = world.batch(config, [4, 5])
    with pytest.raises(TrainingError, match=r"^episode 5: the training loss .* vtt.lr=0.0005.*vtt.beta \(now 7\)"):
        build_method(config, world.backbone).fit(batch)


def test_a_huge_finite_vtt_beta_is_caught_without_any_patch(world: DigitsWorld) -> None:
    config = short("vtt", vtt__beta=1e300)  # finite, allowed, but beta * L_VtT overflows fp32
    batch = world.batch(config, [0])
    with pytest.raises(TrainingError, match=r"^episode 0: the training loss became nan or inf"):
        build_method(config, world.backbone).fit(batch)


def test_runner_stores_nothing_of_a_diverged_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Episodes 0, 1 (first batch) are stored; episode 2 diverges, so neither 2 nor 3 is; a clean rerun resumes."""
    poison = Poison(monkeypatch)
    original_fit = LoraMethod.fit

    def fit(self: LoraMethod, batch: EpisodeBatch) -> None:
        poison.rows = [row for row, index in enumerate(batch.indices) if index == 2]
        try:
            original_fit(self, batch)
        finally:
            poison.rows = []

    monkeypatch.setattr(LoraMethod, "fit", fit)
    db = tmp_path / "diverged.sqlite"
    config = RunConfig(
        dataset="digits", method="lora", backbone="tiny", pretrained="none", episodes=4, episode_batch=2,
        queries=2, device="cpu", db=str(db),
    )  # fmt: skip
    config.train.iterations = 1
    runner = Runner()
    with pytest.raises(TrainingError, match=r"^episode 2: .* no result is stored for this batch \(episodes 2, 3\)"):
        runner.run(config)
    with sqlite3.connect(db) as connection:
        assert [row[0] for row in connection.execute("SELECT episode FROM episodes ORDER BY episode")] == [0, 1]
    monkeypatch.setattr(LoraMethod, "fit", original_fit)
    resumed = runner.run(config)
    assert resumed.trained_episodes == 2 and [i for i, _ in resumed.per_episode] == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------- properties

FLOAT_TEXT = st.one_of(
    st.sampled_from(["nan", "-nan", "inf", "-inf", "1e309", "-0.0", "0", "5e-324", "1e-300", "1e300", "-1e300"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(min_value=-2, max_value=2).map(repr),  # where most bounds are
    st.floats(min_value=-200, max_value=200).map(repr),
    st.integers(-3, 300).map(str),
)
INT_TEXT = st.one_of(
    st.sampled_from(["-1", "0", "1", "2", str(MAX_SEED), str(MAX_SEED + 1), str(2**64 - 1), str(2**64)]),
    st.integers(-(2**70), 2**70).map(str),
    st.integers(-3, 8).map(str),
    st.floats(allow_nan=True).map(repr),  # not an integer: refused by --set
)


def cheap_ints(cap: int) -> st.SearchStrategy[str]:
    """Integers for a size that costs memory: small ones (fitted), and negative or beyond `cap` (refused)."""
    return st.one_of(
        st.integers(-3, 6).map(str), st.integers(cap + 1, 2**70).map(str), st.integers(-(2**70), -1).map(str)
    )


BLOCKS_TEXT = st.lists(st.integers(-14, 14), max_size=3).map(lambda xs: ",".join(map(str, xs)))
SPECIAL = {
    "lora.rank": cheap_ints(MAX_WIDTH),
    "vtt.state": cheap_ints(MAX_WIDTH),
    "vtt.dt_rank": cheap_ints(MAX_WIDTH),
    "vtt.hidden": cheap_ints(MAX_WIDTH),
    "vtt.conv": cheap_ints(MAX_DEPTH),
    "vtt.ssm_layers": cheap_ints(MAX_DEPTH),
    "tir.blocks": st.one_of(BLOCKS_TEXT, INT_TEXT),
    "tir.text_layer": st.one_of(st.integers(-14, 14).map(str), INT_TEXT),
    "train.batch_size": st.one_of(st.just("all"), cheap_ints(25)),
    "maple.tokens": cheap_ints(MAX_DEPTH),
    "maple.depth": cheap_ints(MAX_DEPTH),
    "maple.batch_size": cheap_ints(MAX_ITERATIONS),
    "maple.epochs": cheap_ints(MAX_ITERATIONS),
    "maple.warmup_epochs": cheap_ints(MAX_ITERATIONS),
}


def text_for(key: str) -> st.SearchStrategy[str]:
    if key in SPECIAL:
        return SPECIAL[key]
    return (
        INT_TEXT if int in _leaf_types(typing.get_type_hints(_owner_type(key))[key.rpartition(".")[2]]) else FLOAT_TEXT
    )


def _owner_type(key: str) -> type:
    section = key.rpartition(".")[0]
    return type(getattr(RunConfig(), section)) if section else RunConfig


# Each group: a method (and changes) and the keys drawn together, so one example costs one tiny fit.
FIT_GROUPS: dict[str, tuple[str, dict[str, object], tuple[str, ...]]] = {
    "lora": (
        "lora",
        {},
        (
            "train.lr", "train.weight_decay", "train.beta1", "train.beta2", "train.schedule_horizon", "train.min_lr",
            "train.logit_scale", "train.batch_size", "lora.alpha", "lora.dropout", "lora.rank", "augment.rotation",
            "augment.jitter", "augment.flip_p",
        ),
    ),
    "tir": (
        "tir",
        {},
        (
            "prompt.lr", "prompt.momentum", "prompt.weight_decay", "tir.ratio", "tir.alpha", "tir.beta",
            "tir.text_layer", "tir.blocks", "train.lr", "train.logit_scale", "lora.alpha",
        ),
    ),
    "vtt-release": ("vtt", {}, ("vtt.beta", "vtt.lr", "vtt.window", "vtt.state", "vtt.dt_rank", "vtt.conv")),
    "vtt-ssm": ("vtt", {"vtt__fusion": "ssm"}, ("vtt.beta", "vtt.lr", "vtt.hidden", "vtt.state", "vtt.ssm_layers")),
    "maple": (
        "maple",
        {"maple__epochs": 1, "maple__depth": 2},
        (
            "maple.tokens", "maple.depth", "maple.lr", "maple.momentum", "maple.weight_decay", "maple.batch_size",
            "maple.epochs", "maple.warmup_epochs", "maple.warmup_lr",
        ),
    ),
}  # fmt: skip
# Keys whose accepted values decide the episode shape or the amount of work: validated, then given to their consumer.
SHAPE_KEYS = (
    "ways", "shots", "queries", "episodes", "episode_batch", "seed", "train.iterations", "train.schedule_horizon",
    "pre_resize",  # decoding cost grows with it (up to 8192²); its range is checked in test_trust_recipes2.py
    "augment.crop_scale",  # a pair; its rule is checked in test_config.py and test_recipe_clip_lora.py
)  # fmt: skip


def test_every_numeric_key_is_in_a_property() -> None:
    drawn = {key for _, _, keys in FIT_GROUPS.values() for key in keys} | set(SHAPE_KEYS)
    assert set(numeric_keys()) <= drawn, sorted(set(numeric_keys()) - drawn)


def assignments(keys: tuple[str, ...]) -> st.SearchStrategy[dict[str, str]]:
    return st.fixed_dictionaries({}, optional={key: text_for(key) for key in keys}).filter(bool)


def accepted(config: RunConfig, drawn: dict[str, str]) -> bool:
    """Apply the assignments and validate; False if refused (ConfigError, and nothing else, may refuse)."""
    try:
        for key, raw in drawn.items():
            apply_override(config, f"{key}={raw}")
        config.validate()
    except ConfigError:
        return False
    resolved = config.resolved()
    for key in drawn:
        value = value_at(resolved, key)
        for item in value if isinstance(value, tuple) else (value,):
            assert not (isinstance(item, float) and not math.isfinite(item)), (key, item)
    return True


PROPERTY = settings(
    deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
FITS_PER_GROUP = 30  # x 4 groups x about 0.2 s per accepted example on 2 cores


@pytest.mark.parametrize("group", list(FIT_GROUPS))
def test_assignments_are_refused_or_train_to_finite_logits(group: str, world: DigitsWorld) -> None:
    method, changes, keys = FIT_GROUPS[group]

    @settings(PROPERTY, max_examples=FITS_PER_GROUP)
    @given(drawn=assignments(keys))
    def check(drawn: dict[str, str]) -> None:
        config = tiny_config(method, queries=2, train__iterations=1, **changes)
        if not accepted(config, drawn):
            return
        resolved = config.resolved()
        try:
            fitted = build_method(resolved, world.backbone)  # block indices are checked against the backbone here
        except ConfigError:
            return
        batch = world.batch(resolved, [0])
        try:
            fitted.fit(batch)
            logits = fitted.predict(batch)
        except TrainingError:
            return  # refused, not stored
        assert torch.isfinite(logits).all()
        assert logits.shape == (1, resolved.ways * resolved.queries, resolved.ways)

    check()


@settings(PROPERTY, max_examples=200)
@given(drawn=assignments(SHAPE_KEYS))
def test_episode_shape_assignments_are_refused_or_usable(drawn: dict[str, str]) -> None:
    """Accepted shapes reach their consumers without a traceback: the sampler (which may refuse with a
    `DatasetError`: digits has 10 classes), the random streams, the store's seed column and the schedule."""
    config = RunConfig(backbone="tiny", pretrained="none")
    if not accepted(config, drawn):
        return
    resolved = config.resolved()
    assert 1 <= resolved.resolved_episodes() <= MAX_EPISODES
    seed_of(resolved.seed, resolved.resolved_episodes() - 1, "dropout")
    with sqlite3.connect(":memory:") as connection:
        connection.execute("SELECT ?", (resolved.seed,))
    assert resolved.train.iterations is not None and 0 <= resolved.train.iterations <= MAX_ITERATIONS
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=resolved.train.lr)
    learning_rate_schedules([optimizer], resolved)
    try:
        EpisodeSampler(digits_index(), resolved.ways, resolved.shots, resolved.queries, resolved.seed).episode(0)
    except CdfslError as error:
        assert "needs" in str(error), error


@functools.cache
def digits_index() -> ImageIndex:
    return load_index("digits", None)
