"""A part declares itself where it lives: a third party's config section and base register without an edit to cdfsl,
reach `--set`, config files and validation, and enter the identity of the runs that read them; each built-in part
declares its fields, records and builder; the frozen run spec resolves a config once."""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any

import pytest

from cdfsl.config import RunConfig, apply_override, config_keys, run_id_of
from cdfsl.errors import ConfigError
from cdfsl.registry import (
    BASES,
    PLUGINS,
    SECTIONS,
    Base,
    MethodSpec,
    Record,
    Section,
    parse_method,
    registered,
)
from cdfsl.rules import integer
from cdfsl.spec import RunSpec


@dataclasses.dataclass
class ToyConfig:
    knob: int = 2
    mode: str = "soft"


def _check_toy(toy: ToyConfig, config: RunConfig) -> None:
    if toy.mode not in ("soft", "hard"):
        raise ConfigError(f"toy.mode must be soft or hard, got {toy.mode!r}")


def _toy_reads(config: RunConfig, spec: MethodSpec) -> tuple[str, ...]:
    return ("toy.knob", "train.template", "train.logit_scale")


TOY_SECTION = Section("toy", ToyConfig, (integer("toy.knob", 1, 10),), _check_toy)
TOY_BASE = Base(
    "toybase", "a toy", "nothing", "a test", builder="cdfsl.methods.zeroshot.method:ZeroShot", reads=_toy_reads,
    records=(Record("toy_count", int),),
)  # fmt: skip


@pytest.fixture
def toy() -> Any:
    with registered(TOY_SECTION, TOY_BASE):
        yield


def _id(config: RunConfig) -> str:
    return run_id_of(config.identity("fp32", "index", "gelu"))


def test_a_registered_section_is_reached_by_set_files_and_section(toy: None) -> None:
    config = RunConfig(method="toybase")
    assert config.section("toy") == ToyConfig() and config.toy.knob == 2
    apply_override(config, "toy.knob=3")
    assert config.section("toy").knob == 3
    from_file = RunConfig.from_dict({"method": "toybase", "toy": {"knob": 4, "mode": "hard"}})
    assert (from_file.toy.knob, from_file.toy.mode) == (4, "hard")
    assert RunConfig.from_dict({"toy.knob": 5}).toy.knob == 5
    assert {"toy.knob", "toy.mode"} <= set(config_keys())
    assert config.to_dict()["toy"] == {"knob": 3, "mode": "soft"}
    with pytest.raises(ConfigError, match=re.escape("toy.knob")):
        RunConfig.from_dict({"toy": {"knob": "many"}})


def test_a_registered_section_is_validated_by_its_rules_and_check(toy: None) -> None:
    RunConfig(method="toybase").validate()
    too_big = RunConfig(method="toybase")
    too_big.toy.knob = 11
    with pytest.raises(ConfigError, match=re.escape("toy.knob must be a positive integer <= 10, got 11")):
        too_big.validate()
    bad_mode = RunConfig(method="lora")  # checked on every run, as the built-in sections
    bad_mode.toy.mode = "loud"
    with pytest.raises(ConfigError, match=re.escape("toy.mode must be soft or hard")):
        bad_mode.validate()


def test_a_registered_section_enters_the_identity_of_the_runs_that_read_it(toy: None) -> None:
    toy_run, lora_run = RunConfig(method="toybase"), RunConfig(method="lora")
    toy_before, lora_before = _id(toy_run), _id(lora_run)
    toy_run.toy.knob, lora_run.toy.knob = 5, 5
    assert _id(toy_run) != toy_before and _id(lora_run) == lora_before
    knob_only = _id(toy_run)
    toy_run.toy.mode = "hard"  # a field the toy base does not read
    assert _id(toy_run) == knob_only
    assert toy_run.identity("fp32", "i", "gelu")["toy"] == {"knob": 5}
    assert parse_method("toybase", "vtt-release").records == (Record("toy_count", int),)


def test_registered_parts_leave_with_their_block() -> None:
    with registered(TOY_SECTION, TOY_BASE):
        assert "toybase" in BASES and "toy" in SECTIONS
    assert "toybase" not in BASES and "toy" not in SECTIONS
    assert not any(key.startswith("toy.") for key in config_keys())
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'toy.knob'")):
        apply_override(RunConfig(), "toy.knob=3")


def test_a_name_cannot_be_registered_twice() -> None:
    with (
        pytest.raises(ValueError, match="registered already"),
        registered(dataclasses.replace(BASES["lora"], summary="another lora")),
    ):
        pass
    assert BASES["lora"].summary.startswith("LoRA")


def test_the_built_in_parts_declare_their_builders_records_and_sections() -> None:
    assert {name: base.builder for name, base in BASES.items()} == {
        "zeroshot": "cdfsl.methods.zeroshot.method:ZeroShot",
        "lora": "cdfsl.methods.lora.method:LoraMethod",
        "coop": "cdfsl.methods.lora.method:LoraMethod",
        "coop+lora": "cdfsl.methods.lora.method:LoraMethod",
        "maple": "cdfsl.methods.maple.method:MapleMethod",
    }
    assert {name: plugin.builder for name, plugin in PLUGINS.items()} == {
        "tir": "cdfsl.methods.tir.recalibration:TokenRecalibration",
        "vtt": "cdfsl.methods.vtt.extension:VttExtension",
    }
    assert [(r.name, r.type_text) for r in parse_method("maple+vtt", "vtt-release").records] == [
        ("maple_first_epoch_loss", "float"), ("maple_last_epoch_loss", "float"), ("dlc_off_step", "int | None"),
    ]  # fmt: skip
    assert list(SECTIONS)[:7] == ["train", "augment", "lora", "prompt", "maple", "tir", "vtt"]


def test_the_config_and_the_registry_load_no_torch() -> None:
    assert "cdfsl.registry" in sys.modules
    import subprocess

    code = "import sys, cdfsl.config, cdfsl.spec, cdfsl.methods; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------- the frozen run spec
def test_a_run_spec_is_the_config_resolved_and_validated_once() -> None:
    config = RunConfig(method="tir", shots=5)
    spec = config.resolve()
    assert spec.config == config.resolved() and spec.config is not config
    assert (spec.method.base.name, [p.name for p in spec.method.plugins]) == ("coop+lora", ["tir"])
    assert spec.recipe.name == "tir-release" and spec.config.train.logit_scale == 4.0
    assert spec.reads == config.reads() and "tir.ratio" in spec.reads
    assert RunSpec.of(spec) is spec and spec.resolved() is spec.config
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.reads = frozenset()  # type: ignore[misc]
    config.train.iterations = 3  # the spec keeps what it resolved
    assert spec.config.train.iterations == 100


def test_a_run_spec_refuses_a_bad_config() -> None:
    config = RunConfig(method="lora")
    config.lora.rank = 0
    with pytest.raises(ConfigError, match=re.escape("lora.rank must be a positive integer")):
        RunSpec.of(config)


def test_a_method_name_is_parsed_once_per_recipe() -> None:
    assert parse_method("lora+tir", "vtt-release") is parse_method("lora+tir", "vtt-release")


def test_a_label_shows_only_settings_the_method_reads() -> None:
    from cdfsl.labels import changed_settings

    maple = RunConfig(method="maple")
    maple.train.iterations, maple.train.lr = 7, 1e-3  # MaPLe runs its epochs with its own SGD
    assert changed_settings(maple) == {}
    maple.maple.epochs = 2
    assert changed_settings(maple) == {"maple.epochs": 2}
    lora = RunConfig(method="lora")
    lora.prompt.lr = 0.5  # no learned context: lora reads no prompt field
    assert changed_settings(lora) == {}


def test_a_label_shows_a_registered_sections_setting(toy: None) -> None:
    from cdfsl.labels import changed_settings

    config = RunConfig(method="toybase")
    assert changed_settings(config) == {}
    config.toy.knob = 7
    assert changed_settings(config) == {"toy.knob": 7}
    assert changed_settings(config.resolved().to_dict()) == {"toy.knob": 7}  # as a store keeps it
