"""The frozen run spec wired through: one run validates its config once, resolves it once and parses its method name
once (counted in `cdfsl.run(...)` and in `cdfsl run`), and a `RunSpec` is taken as it is by the context, the runner,
the sweep and the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from typer.testing import CliRunner

import cdfsl
from cdfsl import registry
from cdfsl.cli import app
from cdfsl.cli.options import spec_from_options
from cdfsl.config import RunConfig
from cdfsl.engine.context import build_context
from cdfsl.engine.runner import Runner, run_identity
from cdfsl.engine.sweep import load_sweep, plan_sweep
from cdfsl.errors import ConfigError
from cdfsl.spec import RunSpec
from digits_world import stored_run_config
from test_sweep import sweep_file

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Counts:
    validated: mock.MagicMock
    resolved: mock.MagicMock
    parsed: mock.MagicMock  # uncached parses of a method name (`registry._parse`)


@pytest.fixture
def counts() -> Iterator[Counts]:
    """Counters around every validation (`RunConfig.validated`, which `validate` and `RunSpec.of` go through), every
    resolution and every uncached name parse; the parse cache starts empty."""
    registry._PARSED.clear()
    with (
        mock.patch.object(RunConfig, "validated", autospec=True, side_effect=RunConfig.validated) as validated,
        mock.patch.object(RunConfig, "resolved", autospec=True, side_effect=RunConfig.resolved) as resolved,
        mock.patch.object(registry, "_parse", side_effect=registry._parse) as parsed,
    ):
        yield Counts(validated, resolved, parsed)


def test_a_python_run_validates_resolves_and_parses_once(tmp_path: Path, counts: Counts) -> None:
    result = cdfsl.run(stored_run_config(tmp_path / "r.sqlite", 2, episodes=2), progress=False)
    assert result.trained_episodes == 2
    assert (counts.validated.call_count, counts.resolved.call_count, counts.parsed.call_count) == (1, 1, 1)


def test_a_cli_run_validates_resolves_and_parses_once(tmp_path: Path, counts: Counts) -> None:
    args = ["run", "--dataset", "digits", "--method", "maple", "--backbone", "tiny", "--pretrained", "none"]
    args += ["--episodes", "2", "--iterations", "2", "--device", "cpu", "--db", str(tmp_path / "r.sqlite")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 trained" in result.output
    assert (counts.validated.call_count, counts.resolved.call_count, counts.parsed.call_count) == (1, 1, 1)


def test_a_spec_is_run_as_it_is_and_finds_the_configs_run(tmp_path: Path) -> None:
    config = stored_run_config(tmp_path / "r.sqlite", 2, episodes=2)
    runner = Runner()
    first = runner.run(config)
    spec = config.resolve()
    with mock.patch.object(RunConfig, "validated", side_effect=AssertionError("validated again")):
        again = cdfsl.run(spec, progress=False)  # as docs/methods.md shows
    assert again.run_id == first.run_id and again.trained_episodes == 0
    assert again.per_episode == first.per_episode and again.config == spec.config


def test_the_context_holds_the_spec_and_its_identity_is_the_configs(tmp_path: Path) -> None:
    config = stored_run_config(tmp_path / "r.sqlite", 2, method="maple", pretrained="openai")
    spec = RunSpec.of(config)
    with mock.patch.object(RunConfig, "validated", side_effect=AssertionError("validated again")):
        context = build_context(spec)
    # tiny's default tag is recorded as the weights' one name; the method and what it reads are the spec's own
    assert context.config.pretrained == "shipped" and spec.config.pretrained == "openai"
    assert context.spec.method is spec.method and context.spec.reads == spec.reads
    assert context.config is context.spec.config
    config.pretrained = "shipped"
    _, identity = run_identity(context)
    _, from_config = run_identity(build_context(config))
    assert identity == from_config
    assert "iterations" not in identity["train"]  # maple never reads train.iterations


def test_a_spec_is_a_private_copy_and_replaced_keeps_its_method(tmp_path: Path) -> None:
    config = stored_run_config(tmp_path / "r.sqlite", 2)
    spec = config.resolve()
    config.shots = 5
    assert spec.config.shots == 1 and spec.config.recipe == "vtt-release" and config.recipe is None
    moved = spec.replaced(device="cuda")
    assert moved.config.device == "cuda" and spec.config.device == "cpu" and moved.method is spec.method
    for field in ("method", "recipe", "no_such_field"):
        with pytest.raises(ValueError, match=field):
            spec.replaced(**{field: "x"})
    assert RunSpec.of(spec) is spec and spec.trains and not RunSpec.of(RunConfig(method="zeroshot")).trains


def test_spec_from_options_validates_once_and_refuses_zero_iterations(counts: Counts) -> None:
    options = {"dataset": "digits", "method": "lora", "backbone": "tiny", "iterations": 3, "episodes": 2}
    spec = spec_from_options(options, ["queries=4"], episode_batch="2", refuse_zero_iterations=True)
    assert (spec.config.train.iterations, spec.config.queries, spec.config.episode_batch) == (3, 4, 2)
    assert (counts.validated.call_count, counts.resolved.call_count) == (1, 1)
    with pytest.raises(ConfigError, match="trains nothing"):
        spec_from_options({**options, "iterations": 0}, refuse_zero_iterations=True)
    assert spec_from_options({**options, "method": "zeroshot", "iterations": 0}, refuse_zero_iterations=True)


def test_a_sweep_validates_each_run_once_when_loaded(tmp_path: Path, counts: Counts) -> None:
    sweep = load_sweep(sweep_file(tmp_path, tmp_path / "r.sqlite", episodes=2))
    assert counts.validated.call_count == len(sweep.runs) == 2
    assert [run.spec.config.method for run in sweep.runs] == ["zeroshot", "lora"]
    counts.validated.reset_mock()
    counts.resolved.reset_mock()
    plans = plan_sweep(sweep, device="cuda")  # planned for another device: each spec moved, not validated again
    assert (counts.validated.call_count, counts.resolved.call_count) == (0, 0)
    assert [plan.config.device for plan in plans] == ["cuda", "cuda"]
