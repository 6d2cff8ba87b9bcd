"""Recipe `clip-lora-release`: its values and sources, what each base reads of it, the identities it leaves alone,
every method of the registry fitting under it (tiny model, one step), and the CLIP few-shot suite's sweep file."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.cli import app
from cdfsl.config import METHODS, RunConfig, apply_override, run_id_of
from cdfsl.data.augment import DEFAULT_VIEWS
from cdfsl.data.benchmarks import DATASETS, Benchmark
from cdfsl.engine.runner import episode_total
from cdfsl.engine.sweep import load_sweep, plan_sweep
from cdfsl.errors import ConfigError
from cdfsl.methods import build_method
from cdfsl.methods.lora.method import learning_rate_schedules
from cdfsl.methods.tir.recalibration import class_votes
from cdfsl.recipes import CLIP_LORA_VIEWS, RECIPES, RELEASE_VIEWS
from cdfsl.registry import BASES, PLUGINS
from digits_world import DigitsWorld, configured

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = "clip-lora-release"
SUITE = Path(__file__).parents[1] / "sweeps" / "clip-fewshot-suite.toml"
SUITE_DATASETS = (
    "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft", "sun397", "dtd",
    "ucf101", "imagenet", "eurosat_coop",
)  # fmt: skip


def resolved(method: str = "lora", shots: int = 4, **changes: object) -> RunConfig:
    return configured(RunConfig(method=method, recipe=RECIPE, shots=shots), **changes).resolved()


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_the_release_values(shots: int) -> None:
    config = resolved(shots=shots)
    assert config.train.iterations == 500 * shots  # lora.py: total_iters = n_iters * shots
    assert (config.lora.rank, config.lora.alpha, config.lora.dropout) == (2, 1.0, 0.25)
    assert (config.lora.towers, config.lora.targets, config.prompt.context) == ("both", ("q", "k", "v"), "")
    assert (config.train.lr, config.train.weight_decay, config.train.beta1, config.train.beta2) == (
        2e-4,
        0.01,
        0.9,
        0.999,
    )
    assert (config.train.batch_size, config.train.schedule, config.train.schedule_horizon) == (32, "cosine", 1.0)
    assert (config.train.min_lr, config.train.logit_scale, config.train.template) == (1e-6, 100.0, "a photo of a {}.")
    assert config.augment.views == CLIP_LORA_VIEWS == ("crop+flip",) * 8
    assert (config.augment.crop_scale, config.augment.flip_p, config.pre_resize) == ((0.08, 1.0), 0.5, 0)


def test_every_value_names_its_source_in_the_release_or_says_it_is_ours() -> None:
    for value in RECIPES[RECIPE].values:
        assert value.source.startswith(("MaxZanella/CLIP-LoRA ", "cdfsl ")), value.key
    assert RELEASE_VIEWS == DEFAULT_VIEWS  # the other recipes keep the benchmark's five views


def test_the_cosine_reaches_its_floor_at_the_last_step() -> None:
    """Horizon 1: T_max = the iterations, so the rate falls from 2e-4 to 1e-6 over the run (not 1/8 of the way)."""
    config = resolved(shots=1, train__iterations=10)
    lora = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([lora], lr=config.train.lr)
    schedules = learning_rate_schedules([optimizer], config)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        for schedule in schedules:
            schedule.step()
    assert rates[0] == pytest.approx(2e-4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6)
    assert rates[5] == pytest.approx(1e-6 + (2e-4 - 1e-6) / 2)


def test_set_wins_over_the_recipe() -> None:
    config = RunConfig(method="lora", recipe=RECIPE, shots=2)
    for assignment in ("lora.rank=4", "train.iterations=7", "augment.views=plain,crop", "augment.crop_scale=0.5,1"):
        apply_override(config, assignment)
    config = config.resolved()
    assert (config.lora.rank, config.train.iterations) == (4, 7)
    assert (config.augment.views, config.augment.crop_scale) == (("plain", "crop"), (0.5, 1.0))


@pytest.mark.parametrize("bad", ["0,1", "0.5,0.2", "0.5", "0.1,1.5"])
def test_a_bad_crop_scale_is_refused(bad: str) -> None:
    config = RunConfig(method="lora", recipe=RECIPE)
    with pytest.raises(ConfigError, match=r"augment\.crop_scale"):
        apply_override(config, f"augment.crop_scale={bad}")
        config.validate()


def test_each_base_reads_what_applies_to_it() -> None:
    """LoRA's shape is read where a tower has LoRA; coop (no LoRA) reads none of it; maple reads its own loop and the
    crop views; the crop's scale is read only where a view crops."""
    lora = resolved("lora").reads()
    assert {"lora.rank", "lora.alpha", "train.schedule_horizon", "augment.crop_scale", "augment.flip_p"} <= lora
    assert "augment.rotation" not in lora
    coop = resolved("coop").reads()
    assert not {"lora.rank", "lora.alpha"} & coop and "augment.crop_scale" in coop
    maple = resolved("maple").reads()
    assert "augment.crop_scale" in maple and "train.iterations" not in maple
    assert "augment.crop_scale" not in RunConfig(method="lora").reads()


def test_runs_of_the_other_recipes_keep_their_ids() -> None:
    """The new fields (lora.rank, lora.alpha, train.schedule_horizon and augment.views now recipe-decided;
    augment.crop_scale added) leave the identity and the legacy identity of every earlier run as they were."""
    for method in ("lora", "tir", "maple", "coop+lora+vtt"):
        config = RunConfig(method=method)
        legacy = config.legacy_identity("fp32", "index", "gelu")
        assert "crop_scale" not in legacy.get("augment", {})
        if "augment" in legacy:
            assert legacy["augment"]["views"] == DEFAULT_VIEWS
        if "lora" in legacy:
            assert (legacy["lora"]["rank"], legacy["lora"]["alpha"]) == (16, 8.0)
        assert legacy["train"].get("schedule_horizon", 8.0) == 8.0
        spelled = RunConfig(method=method)
        for assignment in ("lora.rank=16", "lora.alpha=8", "train.schedule_horizon=8", "augment.crop_scale=0.08,1"):
            apply_override(spelled, assignment)
        apply_override(spelled, "augment.views=" + ",".join(DEFAULT_VIEWS))
        for identity in ("identity", "legacy_identity"):
            ours = run_id_of(getattr(config, identity)("fp32", "index", "gelu"))
            assert ours == run_id_of(getattr(spelled, identity)("fp32", "index", "gelu")), (method, identity)


def test_the_crop_scale_splits_runs_only_where_a_view_crops() -> None:
    base = RunConfig(method="lora", recipe=RECIPE)
    other = RunConfig(method="lora", recipe=RECIPE)
    apply_override(other, "augment.crop_scale=0.5,1")
    assert base.identity("fp32", "i", "gelu") != other.identity("fp32", "i", "gelu")
    plain, plain_other = RunConfig(method="lora"), RunConfig(method="lora")
    apply_override(plain_other, "augment.crop_scale=0.5,1")
    assert plain.identity("fp32", "i", "gelu") == plain_other.identity("fp32", "i", "gelu")


@pytest.fixture(scope="module")
def world(tiny: ClipAdapter) -> DigitsWorld:
    return DigitsWorld.of(tiny)


def _fit_cases() -> list[object]:
    """Every method of the registry; each base alone and each plug-in on its default base run in `make test`, their
    combinations (a few seconds each on the tiny model) in `make test-slow`."""
    core = {*BASES, *PLUGINS}
    return [m if m in core else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]


@pytest.mark.parametrize("method", _fit_cases())
def test_every_method_fits_under_the_recipe(method: str, world: DigitsWorld) -> None:
    """Registry-driven: each base and plug-in builds and fits under clip-lora-release (one step, two crop views)."""
    config = RunConfig(
        dataset="digits", method=method, recipe=RECIPE, backbone="tiny", pretrained="none", shots=1, queries=2
    )
    config = configured(
        config, train__iterations=1, maple__epochs=1, maple__batch_size=3, augment__views=("crop+flip", "crop")
    )
    config.validate()
    config = config.resolved()
    model = build_method(config, world.backbone)
    batch = world.batch(config, [0])
    assert batch.support.shape[1] == 5 * 1 * 2  # ways x shots x views
    model.fit(batch)
    logits = model.predict(batch)
    assert logits.shape == (1, 5 * 2, 5) and torch.isfinite(logits).all()


def test_cdfsl_run_under_the_recipe(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "run", "--dataset", "digits", "--method", "lora", "--recipe", RECIPE, "--backbone", "tiny",
            "--pretrained", "none", "--shots", "1", "--episodes", "1", "--db", str(tmp_path / "r.sqlite"),
            "--set", "train.iterations=1", "--set", "augment.views=crop+flip", "--set", "queries=2", "--json",
            str(tmp_path / "run.json"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["recipe"] == RECIPE
    assert summary["config"]["lora"]["rank"] == 2 and summary["config"]["train"]["schedule_horizon"] == 1.0


# ------------------------------------------------------------------ the suite's sweep file


@pytest.fixture
def suite_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite's datasets: the registered ones, or stand-ins of the same names where a reader is not there."""
    for name in SUITE_DATASETS:
        if name not in DATASETS:
            monkeypatch.setitem(DATASETS, name, Benchmark(name, reader="eurosat", class_names="stand-in"))


def test_the_suite_file_names_the_whole_grid() -> None:
    grid = tomllib.loads(SUITE.read_text())["grid"]
    assert grid["dataset"] == list(SUITE_DATASETS) and grid["method"] == ["lora", "tir", "vtt", "tir+vtt"]
    assert (grid["shots"], grid["seed"]) == ([1, 2, 4, 8, 16], [1, 2, 3])
    assert (grid["protocol"], grid["recipe"], grid["backbone"]) == ("all-way", RECIPE, "ViT-B-16")
    assert set(tomllib.loads(SUITE.read_text())["roots"]) == set(SUITE_DATASETS)


@pytest.mark.slow  # 660 runs, each built and checked: about 10 s
@pytest.mark.usefixtures("suite_datasets")
def test_the_suite_sweep_reads_and_plans_without_its_data(tmp_path: Path) -> None:
    sweep = load_sweep(SUITE)
    assert len(sweep.runs) == 4 * 11 * 5 * 3
    configs = [run.config for run in sweep.runs]
    assert {c.dataset for c in configs} == set(SUITE_DATASETS)
    assert {c.method for c in configs} == {"lora", "tir", "vtt", "tir+vtt"}
    assert {c.shots for c in configs} == {1, 2, 4, 8, 16} and {c.seed for c in configs} == {1, 2, 3}
    assert {c.protocol for c in configs} == {"all-way"} and {c.recipe_name for c in configs} == {RECIPE}
    assert {episode_total(c) for c in configs} == {1}  # one fit per (dataset, shots, seed)
    assert all(run.config.data_root and "clip-fewshot" in run.config.data_root for run in sweep.runs)
    few = type(sweep)(sweep.path, tmp_path / "none.sqlite", sweep.runs[:: len(sweep.runs) // 11][:11])
    plans = plan_sweep(few, device="cuda")
    assert len(plans) == 11 and all(p.data_missing and p.run_id is None and p.total == 1 for p in plans)


@pytest.mark.usefixtures("suite_datasets")
def test_sweep_plan_lists_the_suite_and_names_the_missing_roots(tmp_path: Path) -> None:
    trimmed = tmp_path / "suite.toml"
    trimmed.write_text(
        SUITE.read_text()
        .replace("shots = [1, 2, 4, 8, 16]", "shots = [16]")
        .replace("seed = [1, 2, 3]", "seed = [1]")
        .replace('method = ["lora", "tir", "vtt", "tir+vtt"]', 'method = ["lora"]')
        .replace('db = "clip-fewshot-suite.sqlite"', f'db = "{tmp_path / "s.sqlite"}"')
    )
    result = CliRunner().invoke(app, ["sweep", "plan", str(trimmed), "--device", "cuda"])
    assert result.exit_code == 0, result.output
    assert "11 runs" in result.output and "no data here" in result.output
    assert "clip-lora-release" in result.output
    assert "11 episodes to train at most" in result.output
    assert "no data for run(s)" in result.output


def test_tir_votes_at_a_thousand_classes_are_the_marks_counted() -> None:
    """`class_votes` counts each class's top-k tokens from their indices (no [K, M] mark tensor): the count equals
    the plain 0/1 marks summed over the classes, at the suite's largest class count."""
    similarity = torch.randn((1, 2, 1000, 196), generator=torch.Generator().manual_seed(3))
    k = 58  # floor(0.3 · 196)
    marks = torch.zeros_like(similarity, dtype=torch.int64)
    marks.scatter_(-1, similarity.topk(k, dim=-1).indices, 1)
    votes = class_votes(similarity, 0.3)
    assert torch.equal(votes, marks.sum(dim=-2))
    assert int(votes.sum()) == 2 * 1000 * k and votes.shape == (1, 2, 196)


def test_a_sweep_takes_protocol_as_a_run_key(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("[grid]\nmethod = 'lora'\ndataset = 'digits'\nprotocol = ['episodic', 'all-way']\n")
    runs = load_sweep(path).runs
    assert [r.config.protocol for r in runs] == ["episodic", "all-way"]
    assert [episode_total(r.config) for r in runs] == [800, 1]
    path.write_text("[grid]\nmethod = 'lora'\ndataset = 'digits'\nprotocol = 'allway'\n")
    with pytest.raises(ConfigError, match=r"run 1 .*protocol"):
        load_sweep(path)
