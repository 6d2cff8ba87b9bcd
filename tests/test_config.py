"""RunConfig: `--set` overrides by type, validation errors, paper presets, and the run identity."""

from __future__ import annotations

import copy

import pytest

from cdfsl.config import RunConfig, apply_override, config_keys, run_id_of
from cdfsl.errors import ConfigError
from cdfsl.recipes import BASE_LORA_LR

DIGITS_LR = BASE_LORA_LR  # the embedded target follows the recipe's rate

# ------------------------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    ("assignment", "path", "expected"),
    [
        ("shots=5", "shots", 5),
        ("train.iterations=3", "train.iterations", 3),
        ("lora.rank = 4", "lora.rank", 4),
        ("seed=7", "seed", 7),
        ("tir.text_layer=-3", "tir.text_layer", -3),
        ("lora.dropout=0.1", "lora.dropout", 0.1),
        ("tir.ratio=.2", "tir.ratio", 0.2),
        ("lora.alpha=16", "lora.alpha", 16.0),
        ("vtt.beta=5", "vtt.beta", 5.0),
        ("train.lr=1e-3", "train.lr", 1e-3),
        ("lora.merge_for_prediction=false", "lora.merge_for_prediction", False),
        ("lora.merge_for_prediction=False", "lora.merge_for_prediction", False),
        ("vtt.dlc=false", "vtt.dlc", False),
        ("tir.at_prediction=TRUE", "tir.at_prediction", True),
        ("vtt.correction=True", "vtt.correction", True),
        ("train.batch_size=all", "train.batch_size", "all"),
        ("train.batch_size=12", "train.batch_size", 12),
        ("prompt.context=", "prompt.context", ""),
        ("prompt.context=a photo of a", "prompt.context", "a photo of a"),
        ("prompt.context=none", "prompt.context", None),
        ("recipe=paper", "recipe", "paper"),
        ("train.schedule_horizon=1", "train.schedule_horizon", 1.0),
        ("train.template=an image of {}, a=b", "train.template", "an image of {}, a=b"),
        ("vtt.fusion=gru", "vtt.fusion", "gru"),
        ("lora.targets=q,v", "lora.targets", ("q", "v")),
        ("lora.targets=(q, k)", "lora.targets", ("q", "k")),
        ("augment.views=plain,flip", "augment.views", ("plain", "flip")),
        ("augment.views=plain,rotate+jitter", "augment.views", ("plain", "rotate+jitter")),
        ("tir.blocks=-4,-2,-1", "tir.blocks", (-4, -2, -1)),
        ("tir.blocks=[3]", "tir.blocks", (3,)),
        ("tir.beta=auto", "tir.beta", None),
        ("tir.alpha=none", "tir.alpha", None),
        ("tir.alpha=2.5", "tir.alpha", 2.5),
        ("episodes=none", "episodes", None),
        ("episodes=12", "episodes", 12),
        ("vtt.lr=null", "vtt.lr", None),
        ("run_name=sweep-1", "run_name", "sweep-1"),
    ],
)
def test_apply_override_converts_to_field_type(assignment: str, path: str, expected: object) -> None:
    config = RunConfig()
    apply_override(config, assignment)
    target: object = config
    for part in path.split("."):
        target = getattr(target, part)
    assert target == expected
    assert type(target) is type(expected)


def test_apply_override_touches_only_its_field() -> None:
    config = RunConfig()
    apply_override(config, "tir.beta=0.5")
    apply_override(config, "tir.beta=auto")
    assert config == RunConfig()
    apply_override(config, "lora.rank=2")
    expected = RunConfig()
    expected.lora.rank = 2
    assert config == expected


def test_every_listed_key_is_reachable() -> None:
    """`config_keys()` lists every leaf field by dotted name, and each accepts its own current value."""
    keys = config_keys()
    assert {"shots", "tir.ratio", "vtt.beta", "lora.dropout", "train.iterations", "augment.views"} <= set(keys)
    assert "lora" not in keys and "train" not in keys
    config = RunConfig()
    for key in keys:
        section, _, name = key.rpartition(".")
        owner = getattr(config, section) if section else config
        value = getattr(owner, name)
        if value is None:
            raw = "none"
        elif isinstance(value, tuple):
            raw = ",".join(str(v) for v in value)
        else:
            raw = str(value)
        apply_override(config, f"{key}={raw}")
    assert config == RunConfig()


@pytest.mark.parametrize(
    "assignment",
    ["nosuch=1", "lora.nosuch=1", "nosection.rank=1", "lora=1", "lora.rank.deeper=1", "shots.x=1"],
)
def test_unknown_key_names_the_key(assignment: str) -> None:
    key = assignment.split("=")[0]
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        apply_override(RunConfig(), assignment)


@pytest.mark.parametrize(
    ("assignment", "key"),
    [
        ("shots=three", "shots"),
        ("shots=1.5", "shots"),
        ("lora.dropout=high", "lora.dropout"),
        ("lora.merge_for_prediction=maybe", "lora.merge_for_prediction"),
        ("tir.blocks=-4,x", "tir.blocks"),
        ("train.lr=fast", "train.lr"),
        ("episodes=many", "episodes"),
    ],
)
def test_bad_value_names_the_key(assignment: str, key: str) -> None:
    config = RunConfig()
    with pytest.raises(ConfigError, match=f"^{key} expects"):
        apply_override(config, assignment)
    assert config == RunConfig()


def test_assignment_without_equals() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        apply_override(RunConfig(), "shots")


# ------------------------------------------------------------------------------------------- validate


def test_default_config_is_valid() -> None:
    config = RunConfig()
    assert config.validate() is config


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "finetune"}, "method .finetune. is not a base followed by plug-ins"),
        ({"dataset": "mnist"}, "dataset must be one of"),
        ({"device": "tpu"}, "device must be one of"),
        ({"ways": 1}, "ways must be at least 2"),
        ({"ways": 0}, "ways must be at least 2"),
        ({"shots": 0}, "shots must be a positive integer"),
        ({"queries": 0}, "queries must be a positive integer"),
        ({"episodes": 0}, "episodes must be a positive integer"),
        ({"episodes": 10**10}, "episodes must be a positive integer <= 10,000,000 or none .auto., got 10000000000"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"episode_batch": 0}, "episode_batch must be a positive integer"),
        ({"dataset": "eurosat"}, "--data-root is required for dataset 'eurosat'"),
        ({"dataset": "chestx", "data_root": ""}, "--data-root is required for dataset 'chestx'"),
    ],
)
def test_validate_errors(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        RunConfig(**changes).validate()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("lora.targets=q,x", "lora.targets"),
        ("lora.dropout=1.0", "lora.dropout"),
        ("lora.rank=0", "lora.rank"),
        ("tir.ratio=0", "tir.ratio"),
        ("tir.variant=strong", "tir.variant"),
        ("vtt.fusion=mlp", "vtt.fusion"),
        ("vtt.hidden=0", "vtt.hidden must be a positive integer"),
        ("vtt.state=0", "vtt.state must be a positive integer"),
        ("vtt.ssm_layers=-1", "vtt.ssm_layers must be a positive integer"),
        ("train.template=a photo", "train.template"),
        ("train.iterations=-1", "train.iterations"),
        ("train.precision=fp16", "train.precision"),
        ("augment.views=,", "augment.views"),  # `augment.views=` alone hands the views back to the recipe
        ("augment.crop_scale=0.5,0.2", "augment.crop_scale"),
    ],
)
def test_validate_errors_in_sections(assignment: str, message: str) -> None:
    config = RunConfig()
    apply_override(config, assignment)
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_validate_accepts_data_root_and_zero_iterations() -> None:
    config = RunConfig(dataset="eurosat", data_root="/data/eurosat")
    config.train.iterations = 0
    assert config.validate() is config
    resolved = config.resolved()
    assert (resolved.data_root, resolved.train.iterations) == ("/data/eurosat", 0)  # not the recipe's 250


# ------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    ("dataset", "lr", "vtt_lr"),
    [
        ("eurosat", 2e-4, 5e-4),
        ("cropdiseases", 2e-4, 5e-4),
        ("digits", DIGITS_LR, 5e-4),
        ("imagefolder", 2e-4, 5e-4),
        ("isic2018", 4e-4, 1e-3),
        ("chestx", 4e-4, 1e-3),
    ],
)
def test_learning_rate_presets(dataset: str, lr: float, vtt_lr: float) -> None:
    config = RunConfig(dataset=dataset, data_root=".")
    resolved = config.resolved()
    assert (resolved.train.lr, resolved.vtt.lr) == (lr, vtt_lr)
    config.train.lr, config.vtt.lr = 3e-5, 7e-5
    resolved = config.resolved()
    assert (resolved.train.lr, resolved.vtt.lr) == (3e-5, 7e-5)


@pytest.mark.parametrize(("shots", "episodes"), [(1, 800), (5, 400), (3, 400)])
def test_episode_presets(shots: int, episodes: int) -> None:
    assert RunConfig(shots=shots).resolved_episodes() == episodes
    assert RunConfig(shots=shots, episodes=7).resolved_episodes() == 7


def test_recipe_defaults() -> None:
    """The baseline loop (recipe vtt-release) is the default for lora."""
    config = RunConfig().resolved()
    assert (config.lora.rank, config.lora.alpha, config.lora.dropout, config.lora.targets) == (
        16,
        8.0,
        0.25,
        tuple("qkv"),
    )
    assert (config.train.iterations, config.train.batch_size, config.train.weight_decay) == (250, 25, 0.01)
    assert (config.train.beta1, config.train.beta2, config.train.min_lr) == (0.9, 0.999, 1e-6)
    assert (config.train.logit_scale, config.train.template) == (100.0, "a photo of a {}.")
    assert config.augment.views == ("plain", "rotate+jitter+flip", "rotate", "jitter", "flip")
    assert (config.ways, config.queries) == (5, 15)


# ------------------------------------------------------------------------------------------- identity


def run_id(config: RunConfig, precision: str = "fp32", fingerprint: str = "f" * 16, activation: str = "gelu") -> str:
    return run_id_of(config.identity(precision, fingerprint, activation))


def changed(base: RunConfig, *assignments: str) -> RunConfig:
    config = copy.deepcopy(base)
    for assignment in assignments:
        apply_override(config, assignment)
    return config


@pytest.mark.parametrize("method", ["zeroshot", "lora", "tir", "vtt", "tir+vtt"])
def test_identity_ignores_where_and_how_many(method: str) -> None:
    base = RunConfig(method=method)
    other = changed(
        base, "episode_batch=8", "episodes=3", "db=/elsewhere/x.sqlite", "device=cuda", "run_name=x", "cache_dir=/c"
    )
    assert run_id(base) == run_id(other)
    assert base.identity("fp32", "abc", "gelu") == other.identity("fp32", "abc", "gelu")


def test_identity_depends_on_episode_shape_data_and_precision() -> None:
    base = RunConfig()
    reference = run_id(base)
    for assignment in ("ways=4", "shots=5", "queries=10", "seed=1", "backbone=ViT-B-32", "pretrained=none"):
        assert run_id(changed(base, assignment)) != reference, assignment
    assert run_id(base, precision="bf16") != reference
    assert run_id(base, fingerprint="0" * 16) != reference
    assert run_id(base, activation="quickgelu") != reference
    assert run_id_of(base.identity("fp32", "f" * 16, "gelu", "cuda")) != reference  # dropout draws differ by device
    assert run_id_of(base.identity("fp32", "f" * 16, "gelu", "cpu", "other-resize")) != reference
    zeroshot = RunConfig(method="zeroshot")
    assert zeroshot.identity("fp32", "f", "gelu", "cuda") == zeroshot.identity("fp32", "f", "gelu", "cpu")
    assert run_id(changed(base, "dataset=eurosat", "data_root=/d")) != reference


def test_identity_resolves_presets() -> None:
    """`train.lr=None` on eurosat is the same run as an explicit 2e-4; on isic2018 it is 4e-4."""
    eurosat = RunConfig(dataset="eurosat", data_root="/d")
    assert run_id(eurosat) == run_id(changed(eurosat, "train.lr=2e-4"))
    assert run_id(eurosat) != run_id(changed(eurosat, "train.lr=4e-4"))
    isic = RunConfig(dataset="isic2018", data_root="/d")
    assert run_id(isic) == run_id(changed(isic, "train.lr=4e-4"))
    vtt = RunConfig(method="vtt")
    assert run_id(vtt) == run_id(changed(vtt, "vtt.lr=5e-4"))
    # train.precision is replaced by the resolved precision: auto on CPU is fp32.
    assert run_id(RunConfig()) == run_id(changed(RunConfig(), "train.precision=fp32"))


@pytest.mark.parametrize(
    ("method", "unused", "used"),
    [
        ("lora", ["tir.ratio=0.5", "tir.variant=inhibit", "vtt.beta=1", "vtt.lr=1e-2"], ["lora.rank=4"]),
        ("tir", ["vtt.beta=1", "vtt.fusion=gru"], ["tir.ratio=0.5", "tir.beta=0.1", "lora.dropout=0"]),
        ("vtt", ["tir.ratio=0.5", "tir.blocks=-1"], ["vtt.beta=1", "vtt.lr=1e-2", "augment.views=plain"]),
        ("tir+vtt", [], ["tir.ratio=0.5", "vtt.beta=1", "train.iterations=3"]),
        (
            "zeroshot",
            ["lora.rank=4", "augment.views=plain", "train.iterations=3", "train.lr=1", "tir.ratio=0.5", "vtt.beta=1"],
            ["train.template=an image of {}.", "train.logit_scale=50"],
        ),
    ],
)
def test_identity_ignores_sections_of_unused_methods(method: str, unused: list[str], used: list[str]) -> None:
    base = RunConfig(method=method)
    reference = run_id(base)
    for assignment in unused:
        assert run_id(changed(base, assignment)) == reference, assignment
    for assignment in used:
        assert run_id(changed(base, assignment)) != reference, assignment


def test_tir_knobs_change_tir_but_not_lora_run() -> None:
    lora, tir = RunConfig(method="lora"), RunConfig(method="tir")
    assert run_id(lora) != run_id(tir)
    assert run_id(changed(lora, "tir.ratio=0.2")) == run_id(lora)
    assert run_id(changed(tir, "tir.ratio=0.2")) != run_id(tir)


def test_run_id_is_short_stable_hash() -> None:
    identity = RunConfig().identity("fp32", "0123456789abcdef", "gelu")
    assert run_id_of(identity) == run_id_of(dict(reversed(list(identity.items()))))
    assert len(run_id_of(identity)) == 16
    int(run_id_of(identity), 16)
